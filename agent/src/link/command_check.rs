//! Which commands the agent obeys: signed by the fleet server's key, for this device, not
//! expired, not seen before (`protocol::command_auth`, [`super::replay`]).
//!
//! A refusal is counted (`modelfleet_link_commands_refused_total` and the reason's own
//! counter) and recorded as a `command_refused` event naming the reason; events are limited to
//! [`REFUSAL_EVENTS_PER_MINUTE`] so a flood of forged commands cannot push the device's real
//! history out of its capped event log (the counters still count every one).

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;

use protocol::command_auth::{self, Refusal};
use protocol::keys::PublicKey;
use protocol::link::Command;

use crate::agent::Agent;
use crate::store::{Event, StoreError};

use super::metrics::LinkMetrics;
use super::replay;

/// `command_refused` events recorded per minute, at most.
pub const REFUSAL_EVENTS_PER_MINUTE: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The replay memory cannot be read or written: the command is not obeyed (fail closed).
    #[error("replay memory: {0}")]
    Store(#[from] StoreError),
}

/// Authenticates a command message for `device_id` and records its `seq` as used.
pub fn check(
    agent: &Agent,
    server_key: Option<&PublicKey>,
    device_id: &str,
    payload: &[u8],
) -> Result<Command, CheckError> {
    let key = server_key.ok_or(Refusal::NoServerKey)?;
    let now = Utc::now();
    let command = command_auth::open(payload, key, device_id, now)?;
    if !replay::admit(agent.store().database(), command.seq, command.expires, now)? {
        return Err(Refusal::Replayed(command.seq).into());
    }
    Ok(command)
}

/// Counts refusals and records them as events, at a bounded rate.
pub struct Refusals {
    window_start: Instant,
    recorded: u32,
    suppressed: u64,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            window_start: Instant::now(),
            recorded: 0,
            suppressed: 0,
        }
    }
}

impl Refusals {
    pub fn refuse(&mut self, agent: &Agent, metrics: &LinkMetrics, refusal: &Refusal) {
        LinkMetrics::inc(&metrics.commands_refused_total);
        LinkMetrics::inc(metrics.refused_counter(refusal.reason()));
        tracing::warn!(reason = refusal.reason(), "command refused: {refusal}");
        if self.window_start.elapsed() >= Duration::from_secs(60) {
            self.window_start = Instant::now();
            self.recorded = 0;
        }
        if self.recorded >= REFUSAL_EVENTS_PER_MINUTE {
            self.suppressed += 1;
            return;
        }
        self.recorded += 1;
        let mut detail = json!({"reason": refusal.reason(), "error": refusal.to_string()});
        if self.suppressed > 0 {
            detail["suppressed_before"] = json!(self.suppressed);
            self.suppressed = 0;
        }
        let event = Event::new("command_refused", None, None, detail);
        if let Err(e) = agent.record(&[event]) {
            tracing::error!("cannot record an event: {e}");
        }
    }
}
