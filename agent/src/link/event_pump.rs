//! Publishing the agent's event log with a durable cursor.
//!
//! Events are read from the store by `seq` and published in order, at most `window` at a time.
//! The cursor — the highest `seq` below which everything was acknowledged by the broker — is kept
//! in `agent.redb` (`link_meta`, key [`CURSOR_KEY`]) and only ever advances over acknowledged
//! events, so after a reconnect or a restart publishing resumes from the first unacknowledged
//! event (receivers de-duplicate by `seq`).

use std::collections::BTreeSet;

use crate::store::{Store, StoreError};

pub const CURSOR_KEY: &str = "events_acked";

#[derive(Debug)]
pub struct EventPump {
    /// Everything up to here is acknowledged.
    acked: u64,
    /// The cursor as stored.
    persisted: u64,
    /// The highest seq published.
    published: u64,
    in_flight: BTreeSet<u64>,
}

impl EventPump {
    pub fn open(store: &Store) -> Result<EventPump, StoreError> {
        let acked = store.link_meta(CURSOR_KEY)?;
        Ok(EventPump {
            acked,
            persisted: acked,
            published: acked,
            in_flight: BTreeSet::new(),
        })
    }

    /// Publish events with `seq > after()`, at most `room(window)` of them.
    pub fn after(&self) -> u64 {
        self.published
    }

    pub fn room(&self, window: usize) -> usize {
        window.saturating_sub(self.in_flight.len())
    }

    pub fn published(&mut self, seq: u64) {
        self.in_flight.insert(seq);
        self.published = self.published.max(seq);
    }

    pub fn acked(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
        self.acked = match self.in_flight.first() {
            Some(&lowest) => lowest - 1,
            None => self.published,
        };
    }

    /// The session is gone: everything unacknowledged is published again.
    pub fn reset(&mut self) {
        self.in_flight.clear();
        self.published = self.acked;
    }

    pub fn cursor(&self) -> u64 {
        self.acked
    }

    /// Stores the cursor if it moved.
    pub fn persist(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.acked != self.persisted {
            store.set_link_meta(CURSOR_KEY, self.acked)?;
            self.persisted = self.acked;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_advances_only_over_acknowledged_events_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        {
            let store = Store::open(&path).unwrap();
            let mut p = EventPump::open(&store).unwrap();
            for seq in 1..=4 {
                p.published(seq);
            }
            assert_eq!(p.room(16), 12);
            p.acked(2);
            assert_eq!(p.cursor(), 0, "1 is not acknowledged yet");
            p.acked(1);
            assert_eq!(p.cursor(), 2);
            p.persist(&store).unwrap();
            p.reset();
            assert_eq!(p.after(), 2, "3 and 4 are published again");
        }
        let store = Store::open(&path).unwrap();
        let mut p = EventPump::open(&store).unwrap();
        assert_eq!((p.cursor(), p.after()), (2, 2));
        // Gaps (events pruned before they were published) do not hold the cursor back.
        p.published(500);
        p.acked(500);
        assert_eq!(p.cursor(), 500);
    }
}
