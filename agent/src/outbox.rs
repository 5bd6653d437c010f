//! The telemetry outbox: a bounded, durable queue of telemetry records, in two tables of the
//! agent's database `agent.redb`. (Until the 10,000-device work it was a file of its own,
//! `outbox.redb`; but every redb database costs ≈ 1 MB of memory from the moment it is open —
//! its page allocator's bitmaps — which is a real share of a small device's budget and of a
//! simulated fleet's. An agent that finds the old file moves its records over once:
//! [`Outbox::adopt_legacy`].) Appends and acks are short write transactions; the install path's
//! long steps (decompress, load, self-test) run outside any transaction, so slot commits wait
//! for at most one telemetry commit.
//!
//! Records are appended in batches by the watch's telemetry tick and drained by the MQTT link
//! (`crate::link`) with [`Outbox::peek_after`] then [`Outbox::ack`]: a record is gone only once acked, so
//! nothing is lost while offline or across restarts. At the cap (records or bytes) the oldest
//! records are dropped, in the same transaction as the append, and counted in a persistent
//! counter that every window record reports (`outbox_dropped_total`).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use protocol::telemetry::TelemetryRecord;

use crate::store::StoreError;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("telemetry_outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("telemetry_meta");

/// Caps of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub max_records: u64,
    pub max_bytes: u64,
}

impl Default for OutboxLimits {
    /// 50 000 records or 32 MiB: a day of 10 s windows for a handful of models plus the default
    /// sample budget, on the storage of a small device.
    fn default() -> OutboxLimits {
        OutboxLimits {
            max_records: 50_000,
            max_bytes: 32 << 20,
        }
    }
}

/// A record waiting in the outbox, with the id to ack it by.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub id: u64,
    /// The record as JSON, exactly as it will be published.
    pub json: Vec<u8>,
}

impl Pending {
    pub fn record(&self) -> Result<TelemetryRecord, serde_json::Error> {
        serde_json::from_slice(&self.json)
    }
}

pub struct Outbox {
    db: Arc<Database>,
    limits: OutboxLimits,
}

impl Outbox {
    /// Opens the database file at `path` and the outbox in it: a stopped agent's `agent.redb`
    /// (tools and tests reading what is waiting), or a file of its own.
    pub fn open(path: &Path, limits: OutboxLimits) -> Result<Outbox, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
            other => StoreError::Db(other.to_string()),
        })?;
        Outbox::in_database(Arc::new(db), limits)
    }

    /// The outbox in an open database (the agent's), creating its tables if needed.
    pub fn in_database(db: Arc<Database>, limits: OutboxLimits) -> Result<Outbox, StoreError> {
        let tx = db.begin_write()?;
        tx.open_table(RECORDS)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Outbox { db, limits })
    }

    /// Moves the records of an outbox kept in a file of its own (`outbox.redb`, agents before
    /// the outbox moved into `agent.redb`) to the end of this one, oldest first, adds its dropped
    /// count, then deletes the file. The move is one transaction that also marks it done, so a
    /// crash before the file is deleted does not move the records twice. Returns how many moved.
    pub fn adopt_legacy(&self, path: &Path) -> Result<u64, StoreError> {
        if !path.exists() {
            return Ok(0);
        }
        let done_key = "legacy_outbox_adopted";
        let adopted = self.meta(done_key)? > 0;
        let mut moved = 0;
        if !adopted {
            let legacy = Outbox::open(path, self.limits)?;
            let records = legacy.peek(usize::MAX)?;
            let legacy_dropped = legacy.dropped()?;
            drop(legacy);
            let tx = self.db.begin_write()?;
            {
                let mut table = tx.open_table(RECORDS)?;
                let mut meta = tx.open_table(META)?;
                let json: Vec<Vec<u8>> = records.iter().map(|r| r.json.clone()).collect();
                append(&mut table, &mut meta, &json)?;
                let dropped = meta_value(&meta, "dropped")? + legacy_dropped;
                meta.insert("dropped", dropped)?;
                meta.insert(done_key, 1)?;
            }
            tx.commit()?;
            moved = records.len() as u64;
        }
        std::fs::remove_file(path)
            .map_err(|e| StoreError::Db(format!("cannot delete {}: {e}", path.display())))?;
        Ok(moved)
    }

    fn meta(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        meta_value(&tx.open_table(META)?, key)
    }

    /// Appends `records` (one transaction); drops the oldest beyond the caps. Returns how many
    /// were dropped by this call.
    pub fn push(&self, records: &[TelemetryRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write()?;
        let dropped;
        {
            let mut table = tx.open_table(RECORDS)?;
            let mut meta = tx.open_table(META)?;
            let json: Vec<Vec<u8>> = records
                .iter()
                .map(|r| serde_json::to_vec(r).expect("telemetry serialises"))
                .collect();
            let mut bytes = append(&mut table, &mut meta, &json)?;
            let mut count = table.len()?;
            let mut gone = 0;
            while count > self.limits.max_records || bytes > self.limits.max_bytes {
                let Some((_, v)) = table.pop_first()? else {
                    break;
                };
                bytes = bytes.saturating_sub(v.value().len() as u64);
                count -= 1;
                gone += 1;
            }
            dropped = gone;
            let total = meta_value(&meta, "dropped")? + gone;
            meta.insert("bytes", bytes)?;
            meta.insert("dropped", total)?;
        }
        tx.commit()?;
        Ok(dropped)
    }

    /// The oldest `n` records, oldest first (they stay until acked).
    pub fn peek(&self, n: usize) -> Result<Vec<Pending>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RECORDS)?;
        let mut out = Vec::new();
        for row in table.iter()?.take(n) {
            let (k, v) = row?;
            out.push(Pending {
                id: k.value(),
                json: v.value().to_vec(),
            });
        }
        Ok(out)
    }

    /// Up to `n` records with ids above `after`, oldest first (a publisher with records in
    /// flight asks for the ones after them).
    pub fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Pending>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RECORDS)?;
        let mut out = Vec::new();
        for row in table.range(after + 1..)?.take(n) {
            let (k, v) = row?;
            out.push(Pending {
                id: k.value(),
                json: v.value().to_vec(),
            });
        }
        Ok(out)
    }

    /// Removes published records. Unknown ids (already acked or dropped) are ignored.
    pub fn ack(&self, ids: &[u64]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(RECORDS)?;
            let mut meta = tx.open_table(META)?;
            let mut bytes = meta_value(&meta, "bytes")?;
            for id in ids {
                if let Some(v) = table.remove(id)? {
                    bytes = bytes.saturating_sub(v.value().len() as u64);
                }
            }
            meta.insert("bytes", bytes)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records waiting.
    pub fn len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(RECORDS)?.len()?)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Records dropped at the cap since the outbox was created.
    pub fn dropped(&self) -> Result<u64, StoreError> {
        self.meta("dropped")
    }
}

/// Appends `records` (JSON) at the next ids; stores the new `next_id` and `bytes` and returns
/// the bytes now held.
fn append(
    table: &mut redb::Table<u64, &[u8]>,
    meta: &mut redb::Table<&str, u64>,
    records: &[Vec<u8>],
) -> Result<u64, StoreError> {
    let mut next = meta_value(meta, "next_id")?.max(1);
    let mut bytes = meta_value(meta, "bytes")?;
    for json in records {
        table.insert(next, json.as_slice())?;
        bytes += json.len() as u64;
        next += 1;
    }
    meta.insert("next_id", next)?;
    meta.insert("bytes", bytes)?;
    Ok(bytes)
}

fn meta_value(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
    Ok(meta.get(key)?.map(|v| v.value()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::telemetry::{SampleRecord, TELEMETRY_SCHEMA};

    fn sample(i: usize) -> TelemetryRecord {
        TelemetryRecord::Sample(SampleRecord {
            schema: TELEMETRY_SCHEMA,
            model: "m".into(),
            version: "1.0.0".into(),
            time: chrono::Utc::now(),
            request_id: Some(format!("r{i}")),
            latency_ms: 0.1,
            inputs: vec![],
            outputs: vec![],
        })
    }

    fn id_of(p: &Pending) -> String {
        match p.record().unwrap() {
            TelemetryRecord::Sample(s) => s.request_id.unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn adopts_a_legacy_outbox_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("outbox.redb");
        let small = OutboxLimits {
            max_records: 3,
            max_bytes: 1 << 20,
        };
        {
            let old = Outbox::open(&legacy, small).unwrap();
            let batch: Vec<_> = (0..5).map(sample).collect();
            assert_eq!(old.push(&batch).unwrap(), 2);
        }
        let outbox = Outbox::open(&dir.path().join("agent.redb"), OutboxLimits::default()).unwrap();
        outbox.push(&[sample(9)]).unwrap();
        assert_eq!(outbox.adopt_legacy(&legacy).unwrap(), 3);
        assert!(!legacy.exists(), "the old file is deleted");
        let ids: Vec<_> = outbox.peek(10).unwrap().iter().map(id_of).collect();
        assert_eq!(
            ids,
            ["r9", "r2", "r3", "r4"],
            "appended after what was there"
        );
        assert_eq!(
            outbox.dropped().unwrap(),
            2,
            "its dropped count carries over"
        );
        // A crash after the move and before the delete leaves the file: nothing moves twice.
        Outbox::open(&legacy, small)
            .unwrap()
            .push(&[sample(7)])
            .unwrap();
        assert_eq!(outbox.adopt_legacy(&legacy).unwrap(), 0);
        assert!(!legacy.exists());
        assert_eq!(outbox.len().unwrap(), 4);
    }

    #[test]
    fn drops_oldest_at_the_cap_counts_them_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let limits = OutboxLimits {
            max_records: 5,
            max_bytes: 1 << 20,
        };
        {
            let o = Outbox::open(&path, limits).unwrap();
            let batch: Vec<_> = (0..4).map(sample).collect();
            assert_eq!(o.push(&batch).unwrap(), 0);
            let batch: Vec<_> = (4..8).map(sample).collect();
            assert_eq!(o.push(&batch).unwrap(), 3);
            assert_eq!(o.len().unwrap(), 5);
        }
        let o = Outbox::open(&path, limits).unwrap();
        assert_eq!(o.dropped().unwrap(), 3);
        let pending = o.peek(2).unwrap();
        assert_eq!(
            pending.iter().map(id_of).collect::<Vec<_>>(),
            ["r3", "r4"],
            "oldest first, the three oldest gone"
        );
        o.ack(&[pending[0].id, pending[1].id, 999]).unwrap();
        assert_eq!(o.len().unwrap(), 3);
        assert_eq!(id_of(&o.peek(1).unwrap()[0]), "r5");
        // Ids keep growing after a reopen: no reuse of an acked id.
        o.push(&[sample(8)]).unwrap();
        let all = o.peek(10).unwrap();
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    }

    #[test]
    fn byte_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&sample(0)).unwrap().len() as u64;
        let o = Outbox::open(
            &dir.path().join("o.redb"),
            OutboxLimits {
                max_records: 1000,
                max_bytes: one * 3 + one / 2,
            },
        )
        .unwrap();
        for i in 0..10 {
            o.push(&[sample(i)]).unwrap();
        }
        assert_eq!(o.len().unwrap(), 3);
        assert_eq!(o.dropped().unwrap(), 7);
    }
}
