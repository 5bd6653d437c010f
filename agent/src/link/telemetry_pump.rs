//! Draining the telemetry outbox: records are peeked oldest first, published with QoS 1, at most
//! `window` unacknowledged at a time, and deleted from the outbox only once the broker
//! acknowledged them (deletions are batched: one redb transaction per [`ACK_BATCH`] records or
//! per tick). While offline nothing is published and the outbox keeps (and caps) the records.

use std::collections::BTreeSet;

use crate::outbox::{Outbox, Pending};
use crate::store::StoreError;

/// Acknowledged records deleted per outbox transaction at most.
pub const ACK_BATCH: usize = 64;

#[derive(Debug, Default)]
pub struct TelemetryPump {
    /// The highest id published in this session.
    published: u64,
    in_flight: BTreeSet<u64>,
    /// Acknowledged, not yet deleted.
    to_delete: Vec<u64>,
    /// The last peek filled the window: there may be more.
    pub more: bool,
}

impl TelemetryPump {
    /// Records to publish now (oldest first, none already in flight).
    pub fn due(&mut self, outbox: &Outbox, window: usize) -> Result<Vec<Pending>, StoreError> {
        let room = window.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(Vec::new());
        }
        let records = outbox.peek_after(self.published, room)?;
        self.more = records.len() == room;
        Ok(records)
    }

    pub fn published(&mut self, id: u64) {
        self.in_flight.insert(id);
        self.published = self.published.max(id);
    }

    pub fn acked(&mut self, id: u64) {
        if self.in_flight.remove(&id) {
            self.to_delete.push(id);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Deletes acknowledged records when a batch is full (or always, with `force`).
    /// Returns how many were deleted.
    pub fn flush(&mut self, outbox: &Outbox, force: bool) -> Result<usize, StoreError> {
        if self.to_delete.is_empty() || (!force && self.to_delete.len() < ACK_BATCH) {
            return Ok(0);
        }
        outbox.ack(&self.to_delete)?;
        let n = self.to_delete.len();
        self.to_delete.clear();
        Ok(n)
    }

    /// The session is gone: what was not acknowledged is published again.
    pub fn reset(&mut self, outbox: &Outbox) -> Result<(), StoreError> {
        self.flush(outbox, true)?;
        self.in_flight.clear();
        self.published = 0;
        self.more = true;
        Ok(())
    }
}
