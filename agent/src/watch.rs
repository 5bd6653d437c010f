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
//!
//! A device runs one watch for its one agent ([`spawn`]). A simulated fleet runs one watch per
//! group of 50 agents ([`spawn_shared`]): ten thousand threads waking every tick would cost the
//! simulator more than the devices it simulates, and one thread closing every device's telemetry
//! window (a durable commit each) falls behind. Its agents share one [`Wake`]
//! (`AgentConfig::share_wake`), so a failure wakes one of the groups' threads (the others judge
//! it on their next tick), and a group's telemetry windows are spread over the window length
//! instead of all closing on the same tick.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::agent::Agent;

/// Starts the watch thread for `agent` (once; later calls do nothing). It stops when the agent
/// is dropped. [`crate::http::router`] calls this, so a serving agent is always watched.
pub fn spawn(agent: &Arc<Agent>) {
    spawn_shared(std::slice::from_ref(agent));
}

/// Starts one watch thread for every agent of `agents` not yet watched. Their tick, window and
/// wake are the first one's: give them the same config (a simulated fleet does). The thread
/// stops when every agent is dropped.
pub fn spawn_shared(agents: &[Arc<Agent>]) {
    let watched: Vec<&Arc<Agent>> = agents
        .iter()
        .filter(|a| a.config.health_watch && !a.watch_started.swap(true, Ordering::SeqCst))
        .collect();
    let Some(first) = watched.first() else {
        return;
    };
    let tick = first.config.watch_tick;
    let window = first.config.telemetry_window;
    let wake = first.wake.clone();
    let now = Instant::now();
    let count = watched.len() as u32;
    // Agent i closes its first window after (i + 1) / count of a window: spread, not a burst.
    let mut watched: Vec<(Weak<Agent>, Instant)> = watched
        .iter()
        .zip(0..)
        .map(|(a, i)| {
            (
                Arc::downgrade(a),
                now + window.mul_f64((i + 1) as f64 / count as f64),
            )
        })
        .collect();
    std::thread::Builder::new()
        .name("health-watch".into())
        .spawn(move || loop {
            wake.wait(tick);
            watched.retain(|(weak, _)| weak.strong_count() > 0);
            if watched.is_empty() {
                return;
            }
            for (weak, next_flush) in &mut watched {
                let Some(agent) = weak.upgrade() else {
                    continue;
                };
                watch_once(&agent, next_flush, window);
            }
        })
        .expect("spawn health watch thread");
}

/// One tick of the watch for one agent.
fn watch_once(agent: &Agent, next_flush: &mut Instant, window: Duration) {
    agent.judge_trials();
    let now = Instant::now();
    if now >= *next_flush {
        *next_flush = now + window;
        if let Err(e) = agent.flush_telemetry() {
            tracing::error!("telemetry outbox: {e}");
        }
    }
}
