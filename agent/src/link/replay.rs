//! The replay memory of signed commands, in `agent.redb`.
//!
//! A command is obeyed once per `seq` (`protocol::command_auth`). The agent remembers every
//! `seq` it accepted with the command's expiry, and a *floor*: every `seq` at or below it is
//! refused. An entry is forgotten once its command has expired (plus the clock slack) — an
//! expired command is refused anyway — and the floor rises to it, so a clock set back later
//! does not make forgotten commands acceptable again. At most [`MAX_REMEMBERED`] entries are
//! kept; past that the oldest are forgotten the same way. Admission is one write transaction,
//! durable before the command is acted on, so a restart does not reopen a replay.

use chrono::{DateTime, Duration, Utc};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use protocol::command_auth::CLOCK_SLACK_SECONDS;

use crate::store::StoreError;

/// Accepted command `seq` → its `expires` (unix seconds).
const SEEN: TableDefinition<u64, i64> = TableDefinition::new("command_seqs");
/// `"floor"` → the highest `seq` forgotten.
const FLOOR: TableDefinition<&str, u64> = TableDefinition::new("command_seq_floor");

/// Accepted sequence numbers remembered, at most.
pub const MAX_REMEMBERED: u64 = 4096;

/// Records `seq` as accepted and returns true, or returns false if it was accepted before (or
/// is at or below the floor). `expires` is the command's; `now` the device's clock.
pub fn admit(
    db: &Database,
    seq: u64,
    expires: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let tx = db.begin_write()?;
    {
        let mut floor_table = tx.open_table(FLOOR)?;
        let mut seen = tx.open_table(SEEN)?;
        let mut floor = floor_table.get("floor")?.map(|v| v.value()).unwrap_or(0);
        if seq <= floor || seen.get(seq)?.is_some() {
            return Ok(false);
        }
        seen.insert(seq, expires.timestamp())?;
        let forget_before = (now - Duration::seconds(CLOCK_SLACK_SECONDS)).timestamp();
        let mut forget = Vec::new();
        for row in seen.iter()? {
            let (k, v) = row?;
            if v.value() < forget_before {
                forget.push(k.value());
            }
        }
        let excess = seen.len()?.saturating_sub(forget.len() as u64);
        if excess > MAX_REMEMBERED {
            for row in seen.iter()?.take((excess - MAX_REMEMBERED) as usize) {
                forget.push(row?.0.value());
            }
        }
        for k in forget {
            seen.remove(k)?;
            floor = floor.max(k);
        }
        floor_table.insert("floor", floor)?;
    }
    tx.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seq_is_admitted_once_even_after_a_reopen_and_forgotten_ones_stay_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let now = Utc::now();
        let later = now + Duration::hours(1);
        {
            let db = Database::create(&path).unwrap();
            assert!(admit(&db, 10, later, now).unwrap());
            assert!(!admit(&db, 10, later, now).unwrap(), "the same seq twice");
            assert!(admit(&db, 5, later, now).unwrap(), "out of order is fine");
        }
        let db = Database::create(&path).unwrap();
        assert!(
            !admit(&db, 10, later, now).unwrap(),
            "remembered across a reopen"
        );
        // Two days on: 5 and 10 have expired and are forgotten, under the floor.
        let much_later = now + Duration::days(2);
        assert!(admit(&db, 20, much_later + Duration::hours(1), much_later).unwrap());
        assert!(!admit(&db, 5, much_later + Duration::hours(1), now).unwrap());
        assert!(!admit(&db, 10, much_later + Duration::hours(1), now).unwrap());
        assert!(admit(&db, 11, much_later + Duration::hours(1), now).unwrap());
    }

    #[test]
    fn the_memory_is_bounded_and_the_floor_rises_over_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("agent.redb")).unwrap();
        let now = Utc::now();
        let later = now + Duration::hours(1);
        for seq in 1..=MAX_REMEMBERED + 10 {
            assert!(admit(&db, seq, later, now).unwrap());
        }
        let tx = db.begin_read().unwrap();
        assert_eq!(tx.open_table(SEEN).unwrap().len().unwrap(), MAX_REMEMBERED);
        let floor = tx
            .open_table(FLOOR)
            .unwrap()
            .get("floor")
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(floor, 10);
        drop(tx);
        assert!(!admit(&db, 3, later, now).unwrap());
    }
}
