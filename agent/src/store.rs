//! Durable agent state in one redb database: which slot each model serves, the security floor
//! per model, the event log, and the MQTT link's state (bundle transfers in progress with their
//! received-chunk bitmaps, the cursor of the last event the broker acknowledged).
//!
//! Every commit that appends events also bumps a [`tokio::sync::watch`] channel with the newest
//! event's `seq` ([`Store::subscribe`]), so the link learns of installs, reverts and commits
//! without polling.
//!
//! Invariant: activation is one write transaction that sets a model's `active` slot, moves the old
//! one to `previous`, raises the floor and appends the event. redb commits are atomic and
//! crash-safe, so after a power cut the record names either the old or the new slot, never a mix.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
const FLOORS: TableDefinition<&str, u64> = TableDefinition::new("security_floors");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");
const LINK_META: TableDefinition<&str, u64> = TableDefinition::new("link_meta");

/// Events kept; older ones are pruned on append.
pub const MAX_EVENTS: u64 = 10_000;
/// Memory redb may keep of the database's pages (its default is 1 GiB): a device's database is
/// small except for the telemetry outbox, which is written once and read once.
pub const DB_CACHE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory is in use by another fleet-agent process (database locked); use --agent URL to talk to it")]
    Locked,
    #[error("agent database: {0}")]
    Db(String),
    #[error("agent database holds an unreadable record for '{key}': {reason}")]
    Corrupt { key: String, reason: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// One installed copy of a model: a directory under `slots/` holding the verified payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRef {
    /// Directory name under `slots/<model>/`.
    pub dir: String,
    pub version: String,
    pub security_version: u64,
    /// sha256 of the bundle the slot was installed from.
    pub bundle_sha256: String,
    pub installed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Activated, under observation by the health watch.
    Trial,
    /// Passed (or needs no) trial.
    Committed,
    /// The active slot is the older version after a revert.
    Reverted,
}

/// Which slots a model has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub active: SlotRef,
    pub previous: Option<SlotRef>,
    pub state: ModelState,
    pub activated_at: DateTime<Utc>,
}

/// Something that happened, kept for `GET /admin/v1/events` and reported upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// `installed`, `activated`, `committed`, `reverted`, `rejected`, `load_failed`, …
    pub kind: String,
    pub model: Option<String>,
    pub version: Option<String>,
    pub detail: serde_json::Value,
    /// The fleet command that caused this event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// The rollout that command belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
}

/// Which fleet command (and rollout) an operation runs for; copied into the events it records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventContext {
    pub command_id: Option<String>,
    pub rollout_id: Option<String>,
}

impl EventContext {
    pub fn is_empty(&self) -> bool {
        self.command_id.is_none() && self.rollout_id.is_none()
    }
}

pub struct Store {
    db: Arc<Database>,
    /// The newest event's `seq`, bumped after every commit that appends events.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(DB_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
                redb::DatabaseError::Storage(redb::StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    StoreError::Locked
                }
                other => StoreError::Db(other.to_string()),
            })?;
        let tx = db.begin_write()?;
        tx.open_table(MODELS)?;
        tx.open_table(FLOORS)?;
        tx.open_table(EVENTS)?;
        tx.open_table(TRANSFERS)?;
        tx.open_table(LINK_META)?;
        tx.commit()?;
        let store = Store {
            db: Arc::new(db),
            changes: tokio::sync::watch::Sender::new(0),
        };
        let last = store.recent_events(1)?.first().map(|e| e.seq).unwrap_or(0);
        store.changes.send_replace(last);
        Ok(store)
    }

    /// The database, for modules that keep their own tables in it (the command replay memory).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// The database, for modules that keep their own tables in it and outlive a borrow (the
    /// telemetry outbox).
    pub(crate) fn shared_database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// A receiver that sees the newest event `seq` change whenever events are appended.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self, stored: &[Event]) {
        if let Some(last) = stored.last() {
            self.changes.send_replace(last.seq);
        }
    }

    /// Every bundle transfer in progress: (bundle id, record as stored).
    pub fn transfers<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TRANSFERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Creates or replaces the record of a transfer (one transaction, durable on return).
    pub fn put_transfer<T: Serialize>(
        &self,
        bundle_id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        self.put_transfer_with_events(bundle_id, record, &[])?;
        Ok(())
    }

    /// [`Store::put_transfer`] and [`Store::append`] in one durable commit (a new transfer and
    /// its `transfer_started` event: one wait for the disk before the first chunk request).
    pub fn put_transfer_with_events<T: Serialize>(
        &self,
        bundle_id: &str,
        record: &T,
        events: &[Event],
    ) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(TRANSFERS)?;
            let bytes = serde_json::to_vec(record).expect("transfer record serialises");
            table.insert(bundle_id, bytes.as_slice())?;
        }
        let stored = append_events(&tx, events)?;
        tx.commit()?;
        self.notify(&stored);
        Ok(stored)
    }

    /// [`Store::put_transfer`] without waiting for the disk: a checkpoint's bitmap. Safe
    /// because the chunks it claims were fsynced before this is called: if a crash loses this
    /// commit the store falls back to an older bitmap that claims fewer chunks, which are
    /// fetched again; the next durable commit of this store (an event, the next transfer
    /// record) persists it. Saves the two fsyncs of a redb commit per checkpoint on the link's
    /// receive path.
    pub fn put_transfer_checkpoint<T: Serialize>(
        &self,
        bundle_id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None);
        {
            let mut table = tx.open_table(TRANSFERS)?;
            let bytes = serde_json::to_vec(record).expect("transfer record serialises");
            table.insert(bundle_id, bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn remove_transfer(&self, bundle_id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(TRANSFERS)?.remove(bundle_id)?;
        tx.commit()?;
        Ok(())
    }

    /// A counter of the link (e.g. the last event seq the broker acknowledged); 0 if never set.
    pub fn link_meta(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(LINK_META)?;
        let v = table.get(key)?.map(|v| v.value()).unwrap_or(0);
        Ok(v)
    }

    pub fn set_link_meta(&self, key: &str, value: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(LINK_META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    pub fn models(&self) -> Result<Vec<(String, ModelRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MODELS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MODELS)?;
        let v = table.get(name)?;
        v.map(|v| decode(name, v.value())).transpose()
    }

    pub fn floor(&self, name: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(FLOORS)?;
        let v = table.get(name)?;
        Ok(v.map(|v| v.value()).unwrap_or(0))
    }

    /// Atomically: set `name`'s record, raise its floor to at least `floor`, append `events`.
    pub fn commit_model(
        &self,
        name: &str,
        record: &ModelRecord,
        floor: u64,
        events: &[Event],
    ) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut models = tx.open_table(MODELS)?;
            let bytes = serde_json::to_vec(record).expect("record serialises");
            models.insert(name, bytes.as_slice())?;
            let mut floors = tx.open_table(FLOORS)?;
            let current = floors.get(name)?.map(|v| v.value()).unwrap_or(0);
            if floor > current {
                floors.insert(name, floor)?;
            }
        }
        let stored = append_events(&tx, events)?;
        tx.commit()?;
        self.notify(&stored);
        Ok(stored)
    }

    /// Appends events in their own transaction; returns them with sequence numbers set.
    pub fn append(&self, events: &[Event]) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_write()?;
        let stored = append_events(&tx, events)?;
        tx.commit()?;
        self.notify(&stored);
        Ok(stored)
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.range(after + 1..)?.take(limit) {
            let (k, v) = row?;
            out.push(decode(&format!("event {}", k.value()), v.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` events, oldest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(limit) {
            let (k, v) = row?;
            out.push(decode(&format!("event {}", k.value()), v.value())?);
        }
        out.reverse();
        Ok(out)
    }
}

fn append_events(tx: &redb::WriteTransaction, events: &[Event]) -> Result<Vec<Event>, StoreError> {
    let mut table = tx.open_table(EVENTS)?;
    let last = table.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let mut stored = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let mut e = e.clone();
        e.seq = last + 1 + i as u64;
        let bytes = serde_json::to_vec(&e).expect("event serialises");
        table.insert(e.seq, bytes.as_slice())?;
        stored.push(e);
    }
    let newest = last + events.len() as u64;
    if newest > MAX_EVENTS {
        let cutoff = newest - MAX_EVENTS;
        table.retain_in(..=cutoff, |_, _| false)?;
    }
    Ok(stored)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

impl Event {
    /// A new event (sequence number assigned when stored).
    pub fn new(
        kind: &str,
        model: Option<&str>,
        version: Option<&str>,
        detail: serde_json::Value,
    ) -> Event {
        Event {
            seq: 0,
            time: Utc::now(),
            kind: kind.to_string(),
            model: model.map(str::to_string),
            version: version.map(str::to_string),
            detail,
            command_id: None,
            rollout_id: None,
        }
    }

    /// The event, attributed to the command in `context`.
    pub fn with_context(mut self, context: &EventContext) -> Event {
        self.command_id = context.command_id.clone();
        self.rollout_id = context.rollout_id.clone();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(v: &str) -> SlotRef {
        SlotRef {
            dir: format!("d{v}"),
            version: v.into(),
            security_version: 1,
            bundle_sha256: "00".into(),
            installed_at: Utc::now(),
        }
    }

    #[test]
    fn records_floors_and_events_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        {
            let s = Store::open(&path).unwrap();
            let rec = ModelRecord {
                active: slot("1.0.0"),
                previous: None,
                state: ModelState::Committed,
                activated_at: Utc::now(),
            };
            let ev = Event::new("activated", Some("m"), Some("1.0.0"), serde_json::json!({}));
            let stored = s.commit_model("m", &rec, 5, &[ev]).unwrap();
            assert_eq!(stored[0].seq, 1);
            s.commit_model("m", &rec, 3, &[]).unwrap();
            assert!(matches!(Store::open(&path), Err(StoreError::Locked)));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.floor("m").unwrap(), 5, "the floor never goes down");
        assert_eq!(s.model("m").unwrap().unwrap().active.version, "1.0.0");
        assert_eq!(s.events(0, 10).unwrap().len(), 1);
        assert_eq!(s.models().unwrap().len(), 1);
    }

    #[test]
    fn events_are_pruned_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("a.redb")).unwrap();
        let batch: Vec<Event> = (0..1000)
            .map(|_| Event::new("x", None, None, serde_json::json!(null)))
            .collect();
        for _ in 0..11 {
            s.append(&batch).unwrap();
        }
        let first = s.events(0, 1).unwrap();
        assert_eq!(first[0].seq, 11_000 - MAX_EVENTS + 1);
        assert_eq!(s.recent_events(3).unwrap().last().unwrap().seq, 11_000);
    }
}
