//! The health watch: one thread that judges every model on trial each `watch_tick` (default
//! 100 ms) — and at once when a request fails or answers NaN — reverting or committing it, and
//! that closes a telemetry window into the outbox every `telemetry_window` (default 10 s).
//!
//! Why a tick and not a decision on each request: the request path only adds to counters (one
//! short mutex, no allocation), so the watch costs serving almost nothing; judging merges
//! histograms and computes PSI, which is cheap but not free and pointless 10 000 times a second.
//! A 100 ms tick bounds how long a statistically regressed model keeps serving after the evidence
//! is in (at most one tick of traffic more); failures wake the watch at once, so a model that
//! errors or emits NaN is judged on the request that shows it. A revert — which loads and
//! self-tests the previous slot — never runs on an inference worker.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::agent::Agent;

/// Starts the watch thread for `agent` (once; later calls do nothing). It stops when the agent
/// is dropped. [`crate::http::router`] calls this, so a serving agent is always watched.
pub fn spawn(agent: &Arc<Agent>) {
    if !agent.config.health_watch || agent.watch_started.swap(true, Ordering::SeqCst) {
        return;
    }
    let weak: Weak<Agent> = Arc::downgrade(agent);
    let tick = agent.config.watch_tick;
    let wake = agent.wake.clone();
    let window = agent.config.telemetry_window;
    let mut last_flush = std::time::Instant::now();
    std::thread::Builder::new()
        .name("health-watch".into())
        .spawn(move || loop {
            wake.wait(tick);
            let Some(agent) = weak.upgrade() else {
                return;
            };
            agent.judge_trials();
            if last_flush.elapsed() >= window {
                last_flush = std::time::Instant::now();
                if let Err(e) = agent.flush_telemetry() {
                    tracing::error!("telemetry outbox: {e}");
                }
            }
        })
        .expect("spawn health watch thread");
}
