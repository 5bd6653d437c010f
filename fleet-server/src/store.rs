//! Durable server state in one redb database (`DATA_DIR/server.redb`).
//!
//! Tables, each keyed by a plain value and holding a JSON record:
//!
//! | table | key | value |
//! |---|---|---|
//! | `devices` | device id | [`DeviceRecord`] |
//! | `bundles` | bundle id (sha256 hex) | [`BundleRecord`] |
//! | `events` | server sequence number | [`Event`] (audit and device events) |
//! | `device_event_keys` | (device id, device seq) | server sequence number: dedupe of redelivered events |
//! | `tokens` | token name | [`TokenRecord`] (only the sha256 of the secret) |
//! | `rollouts` | rollout id | [`Rollout`] (spec, state, devices, decisions with evidence) |
//!
//! A new kind of state (the rollout engine's rollouts and decisions) is another table opened
//! in [`Store::open`] with its own record type; [`Store::write`] gives a write transaction in
//! which any table can change together with the events that record the change, so "every
//! mutation leaves an audit event" holds by construction for callers that use it.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use protocol::link::ModelSummary;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::rollout::engine::Rollout;

pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
pub(crate) const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("bundles");
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(crate) const DEVICE_EVENT_KEYS: TableDefinition<(&str, u64), u64> =
    TableDefinition::new("device_event_keys");
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
pub(crate) const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Stage commands a rollout sent that no device has settled yet: command id → the signed
/// command as published, so a re-send is the same command (same id, same `seq`).
pub(crate) const PENDING_COMMANDS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("pending_commands");

/// Events kept; the oldest are pruned (with their dedupe keys) beyond this.
pub const MAX_EVENTS: u64 = 1_000_000;
/// Memory redb may keep of the database's pages (its default is 1 GiB, which a server with ten
/// thousand devices and a million events fills: its RSS grew past 500 MB in a 10,000-device
/// fan-out). What is not cached is read from the page cache of the OS.
pub const DB_CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory is in use by another fleet-server process (database locked)")]
    Locked,
    #[error("server database: {0}")]
    Db(String),
    #[error("server database holds an unreadable record for '{key}': {reason}")]
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

/// What the server knows about a device, from its status messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub online: bool,
    /// When the server last heard from the device (any message).
    pub last_seen: DateTime<Utc>,
    pub first_seen: DateTime<Utc>,
    /// The device's clock in its last status message.
    pub status_time: DateTime<Utc>,
    pub labels: BTreeMap<String, String>,
    /// The device's target (triple or profile name), when it reported one.
    pub target: Option<String>,
    pub agent_version: Option<String>,
    /// Models as of the last status that listed them (a last will keeps these).
    pub models: Vec<ModelSummary>,
}

impl DeviceRecord {
    /// Whether the device carries label `key` with `value`.
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.get(key).is_some_and(|v| v == value)
    }
}

/// A stored bundle (its bytes are `DATA_DIR/bundles/<id>.mfb`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub id: String,
    pub name: String,
    pub version: String,
    pub size: u64,
    pub security_version: u64,
    /// Key ids that signed it (hex), as verified at upload.
    pub signed_by: Vec<String>,
    pub uploaded_at: DateTime<Utc>,
    pub uploaded_by: String,
    /// The manifest's `targets` (empty: any device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

/// Something that happened: an audit record of a mutation (`actor` is a token name or
/// `device:<id>`) or an event a device reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Server sequence number (assigned when stored).
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub kind: String,
    pub actor: String,
    pub device_id: Option<String>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub rollout_id: Option<String>,
    pub command_id: Option<String>,
    /// The device's own sequence number, for events a device reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_seq: Option<u64>,
    pub detail: serde_json::Value,
}

impl Event {
    /// A new event by `actor` (time now; sequence number assigned when stored).
    pub fn new(kind: &str, actor: &str, detail: serde_json::Value) -> Event {
        Event {
            seq: 0,
            time: Utc::now(),
            kind: kind.to_string(),
            actor: actor.to_string(),
            device_id: None,
            model: None,
            version: None,
            rollout_id: None,
            command_id: None,
            device_seq: None,
            detail,
        }
    }

    pub fn device(mut self, id: &str) -> Event {
        self.device_id = Some(id.to_string());
        self
    }

    pub fn model(mut self, model: &str, version: Option<&str>) -> Event {
        self.model = Some(model.to_string());
        self.version = version.map(str::to_string);
        self
    }

    pub fn command(mut self, command_id: &str, rollout_id: Option<&str>) -> Event {
        self.command_id = Some(command_id.to_string());
        self.rollout_id = rollout_id.map(str::to_string);
        self
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub device_id: Option<String>,
    pub rollout_id: Option<String>,
    pub kind: Option<String>,
}

impl EventFilter {
    fn matches(&self, e: &Event) -> bool {
        (self.device_id.is_none() || self.device_id == e.device_id)
            && (self.rollout_id.is_none() || self.rollout_id == e.rollout_id)
            && (self.kind.is_none() || self.kind.as_deref() == Some(e.kind.as_str()))
    }
}

/// An API token: its role and the sha256 (hex) of its secret. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    pub secret_sha256: String,
    pub created_at: DateTime<Utc>,
    /// `generated` (first start), `file` (`--tokens`) or `api`.
    pub source: String,
}

pub struct Store {
    db: Database,
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
        tx.open_table(DEVICES)?;
        tx.open_table(BUNDLES)?;
        tx.open_table(EVENTS)?;
        tx.open_table(DEVICE_EVENT_KEYS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(ROLLOUTS)?;
        tx.open_table(PENDING_COMMANDS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// Runs `f` in one write transaction and commits it: the changes `f` makes and the events
    /// it returns are stored together or not at all. Returns the events with sequence numbers.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(T, Vec<Event>), StoreError>,
    ) -> Result<(T, Vec<Event>), StoreError> {
        let tx = self.db.begin_write()?;
        let (value, events) = f(&tx)?;
        let stored = append_events(&tx, events)?;
        tx.commit()?;
        Ok((value, stored))
    }

    /// Appends events on their own.
    pub fn append(&self, events: Vec<Event>) -> Result<Vec<Event>, StoreError> {
        Ok(self.write(|_| Ok(((), events)))?.1)
    }

    // ---- devices ----

    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        get(&self.db, DEVICES, id)
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        all(&self.db, DEVICES)
    }

    /// Applies `update` to a device's record (None if new) in one transaction with the events it
    /// returns; `update` returns None to leave the record as it is.
    pub fn update_device(
        &self,
        id: &str,
        update: impl FnOnce(Option<DeviceRecord>) -> (Option<DeviceRecord>, Vec<Event>),
    ) -> Result<Vec<Event>, StoreError> {
        self.batch(|b| b.update_device(id, update))?
    }

    /// Runs `f` on one write transaction in which several changes can be made, each with its
    /// events, and commits once: one disk sync for a whole batch of device messages instead of
    /// one each (the server's ingest thread; see `mqtt::run`). All or nothing: if a change failed
    /// after it began writing (so it may be half made), or the commit fails, nothing of the
    /// batch is stored and that error is returned. A change refused before writing (a record
    /// that cannot be read) fails alone.
    pub fn batch<T>(&self, f: impl FnOnce(&mut Batch) -> T) -> Result<T, StoreError> {
        let mut batch = Batch {
            db: &self.db,
            tx: None,
            failed: None,
        };
        let value = f(&mut batch);
        if let Some(e) = batch.failed {
            return Err(e); // dropping the transaction aborts it
        }
        // A batch that changed nothing (telemetry only) costs no commit.
        if let Some(tx) = batch.tx {
            tx.commit()?;
        }
        Ok(value)
    }

    // ---- rollouts ----

    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        get(&self.db, ROLLOUTS, id)
    }

    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        all(&self.db, ROLLOUTS)
    }

    /// Stores a rollout together with the events describing what changed.
    pub fn put_rollout(&self, rollout: &Rollout, events: Vec<Event>) -> Result<(), StoreError> {
        self.put_rollout_with_commands(rollout, events, &[], &[])
    }

    /// Stores a rollout, its events, the stage commands it is about to send (`sent`: command
    /// id and signed payload) and forgets the ones that are settled, in one commit.
    pub fn put_rollout_with_commands(
        &self,
        rollout: &Rollout,
        events: Vec<Event>,
        sent: &[(String, Vec<u8>)],
        settled: &[String],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(ROLLOUTS)?
                .insert(rollout.id.as_str(), encode(rollout).as_slice())?;
            let mut pending = tx.open_table(PENDING_COMMANDS)?;
            for (id, payload) in sent {
                pending.insert(id.as_str(), payload.as_slice())?;
            }
            for id in settled {
                pending.remove(id.as_str())?;
            }
            Ok(((), events))
        })?;
        Ok(())
    }

    /// The signed payload of a stage command still pending (see [`PENDING_COMMANDS`]).
    pub fn pending_command(&self, command_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(PENDING_COMMANDS)?;
        Ok(table.get(command_id)?.map(|v| v.value().to_vec()))
    }

    /// How many stage commands are pending (metrics, tests).
    pub fn pending_command_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(PENDING_COMMANDS)?.len()?)
    }

    // ---- bundles ----

    pub fn bundle(&self, id: &str) -> Result<Option<BundleRecord>, StoreError> {
        get(&self.db, BUNDLES, id)
    }

    pub fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        all(&self.db, BUNDLES)
    }

    /// Records a bundle (with its upload event) unless one with the same id exists; returns
    /// the stored record and whether it was new.
    pub fn insert_bundle(
        &self,
        record: &BundleRecord,
        event: Event,
    ) -> Result<(BundleRecord, bool), StoreError> {
        Ok(self
            .write(|tx| {
                let mut table = tx.open_table(BUNDLES)?;
                if let Some(v) = table.get(record.id.as_str())? {
                    let existing = decode(&record.id, v.value())?;
                    return Ok(((existing, false), vec![]));
                }
                table.insert(record.id.as_str(), encode(record).as_slice())?;
                Ok(((record.clone(), true), vec![event]))
            })?
            .0)
    }

    // ---- events ----

    /// Stores a device-reported event unless (device id, device seq) was stored before.
    /// Returns whether it was new.
    pub fn append_device_event(&self, event: Event) -> Result<bool, StoreError> {
        self.batch(|b| b.append_device_event(event))?
    }

    /// Events newest first, at most `limit`, that match `filter`.
    pub fn events(&self, filter: &EventFilter, limit: usize) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let e: Event = decode(&format!("event {}", k.value()), v.value())?;
            if filter.matches(&e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Events stored after sequence number `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            out.push(decode(&format!("event {}", k.value()), v.value())?);
        }
        Ok(out)
    }

    /// Events newest first while `keep_going` says so (it sees each event before it is kept;
    /// the first event it refuses ends the scan and is not kept).
    pub fn events_back_while(
        &self,
        mut keep_going: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            let (k, v) = row?;
            let e: Event = decode(&format!("event {}", k.value()), v.value())?;
            if !keep_going(&e) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    pub fn event_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(EVENTS)?.len()?)
    }

    // ---- tokens ----

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        all(&self.db, TOKENS)
    }

    /// Inserts or replaces a token, with its audit event.
    pub fn put_token(&self, token: &TokenRecord, event: Event) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(TOKENS)?
                .insert(token.name.as_str(), encode(token).as_slice())?;
            Ok(((), vec![event]))
        })?;
        Ok(())
    }

    /// Deletes a token (with its audit event); returns whether it existed.
    pub fn delete_token(&self, name: &str, event: Event) -> Result<bool, StoreError> {
        Ok(self
            .write(|tx| {
                let existed = tx.open_table(TOKENS)?.remove(name)?.is_some();
                Ok((existed, if existed { vec![event] } else { vec![] }))
            })?
            .0)
    }
}

/// Changes made in one write transaction of [`Store::batch`]; each method's changes and events
/// are visible to the next (a device event repeated within one batch is stored once).
pub struct Batch<'a> {
    db: &'a Database,
    /// Begun by the first change.
    tx: Option<redb::WriteTransaction>,
    /// The first error after a change began writing: the batch is not committed.
    failed: Option<StoreError>,
}

impl Batch<'_> {
    fn tx(&mut self) -> Result<&redb::WriteTransaction, StoreError> {
        if self.tx.is_none() {
            self.tx = Some(self.db.begin_write()?);
        }
        Ok(self.tx.as_ref().expect("just begun"))
    }

    /// Notes `result`'s error as the batch's failure (the change may be half made).
    fn writing<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            self.failed.get_or_insert_with(|| e.clone());
        }
        result
    }

    /// [`Store::update_device`] within the batch; returns the events stored.
    pub fn update_device(
        &mut self,
        id: &str,
        update: impl FnOnce(Option<DeviceRecord>) -> (Option<DeviceRecord>, Vec<Event>),
    ) -> Result<Vec<Event>, StoreError> {
        let current = match self.tx()?.open_table(DEVICES)?.get(id)? {
            Some(v) => Some(decode::<DeviceRecord>(id, v.value())?),
            None => None,
        };
        let (next, events) = update(current);
        let tx = self.tx()?;
        let written = (|| {
            if let Some(next) = next {
                tx.open_table(DEVICES)?
                    .insert(id, encode(&next).as_slice())?;
            }
            append_events(tx, events)
        })();
        self.writing(written)
    }

    /// [`Store::append_device_event`] within the batch.
    pub fn append_device_event(&mut self, event: Event) -> Result<bool, StoreError> {
        let tx = self.tx()?;
        if let (Some(device), Some(dseq)) = (&event.device_id, event.device_seq) {
            let keys = tx.open_table(DEVICE_EVENT_KEYS)?;
            if keys.get((device.as_str(), dseq))?.is_some() {
                return Ok(false);
            }
        }
        let written = append_events(tx, vec![event]);
        self.writing(written)?;
        Ok(true)
    }
}

fn append_events(
    tx: &redb::WriteTransaction,
    events: Vec<Event>,
) -> Result<Vec<Event>, StoreError> {
    if events.is_empty() {
        return Ok(events);
    }
    let mut table = tx.open_table(EVENTS)?;
    let mut keys = tx.open_table(DEVICE_EVENT_KEYS)?;
    let last = table.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let mut stored = Vec::with_capacity(events.len());
    for (i, mut e) in events.into_iter().enumerate() {
        e.seq = last + 1 + i as u64;
        table.insert(e.seq, encode(&e).as_slice())?;
        if let (Some(d), Some(ds)) = (&e.device_id, e.device_seq) {
            keys.insert((d.as_str(), ds), e.seq)?;
        }
        stored.push(e);
    }
    let newest = last + stored.len() as u64;
    if newest > MAX_EVENTS {
        let cutoff = newest - MAX_EVENTS;
        let mut pruned = Vec::new();
        for row in table.range(..=cutoff)? {
            let (k, v) = row?;
            if let Ok(e) = serde_json::from_slice::<Event>(v.value()) {
                if let (Some(d), Some(ds)) = (e.device_id, e.device_seq) {
                    pruned.push((d, ds));
                }
            }
            let _ = k;
        }
        table.retain_in(..=cutoff, |_, _| false)?;
        for (d, ds) in pruned {
            keys.remove((d.as_str(), ds))?;
        }
    }
    Ok(stored)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialise")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn get<T: serde::de::DeserializeOwned>(
    db: &Database,
    def: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let tx = db.begin_read()?;
    let table = tx.open_table(def)?;
    let v = table.get(key)?;
    v.map(|v| decode(key, v.value())).transpose()
}

fn all<T: serde::de::DeserializeOwned>(
    db: &Database,
    def: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let tx = db.begin_read()?;
    let table = tx.open_table(def)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_event(device: &str, dseq: u64) -> Event {
        let mut e = Event::new(
            "installed",
            &format!("device:{device}"),
            serde_json::json!({}),
        );
        e.device_id = Some(device.into());
        e.device_seq = Some(dseq);
        e
    }

    #[test]
    fn device_events_are_deduplicated_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.redb");
        {
            let s = Store::open(&path).unwrap();
            assert!(s.append_device_event(device_event("d1", 1)).unwrap());
            assert!(!s.append_device_event(device_event("d1", 1)).unwrap());
            assert!(s.append_device_event(device_event("d2", 1)).unwrap());
            s.append(vec![Event::new(
                "bundle_uploaded",
                "admin",
                serde_json::json!({}),
            )])
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(!s.append_device_event(device_event("d2", 1)).unwrap());
        let all = s.events(&EventFilter::default(), 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].kind, "bundle_uploaded", "newest first");
        assert_eq!(all[0].seq, 3);
        let d1 = EventFilter {
            device_id: Some("d1".into()),
            ..Default::default()
        };
        assert_eq!(s.events(&d1, 10).unwrap().len(), 1);
    }

    /// One commit for several devices' messages: each change sees the ones before it, so a
    /// device event delivered twice within one batch is stored once.
    #[test]
    fn a_batch_stores_every_change_once_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server.redb")).unwrap();
        let record = |id: &str| DeviceRecord {
            id: id.into(),
            online: true,
            last_seen: Utc::now(),
            first_seen: Utc::now(),
            status_time: Utc::now(),
            labels: BTreeMap::new(),
            target: None,
            agent_version: None,
            models: vec![],
        };
        let fresh = s
            .batch(|b| {
                let mut fresh = Vec::new();
                for id in ["d1", "d2"] {
                    b.update_device(id, |cur| {
                        assert!(cur.is_none());
                        (
                            Some(record(id)),
                            vec![Event::new("device_registered", id, serde_json::json!({}))],
                        )
                    })
                    .unwrap();
                }
                fresh.push(b.append_device_event(device_event("d1", 7)).unwrap());
                fresh.push(b.append_device_event(device_event("d1", 7)).unwrap());
                fresh.push(b.append_device_event(device_event("d2", 7)).unwrap());
                // An update later in the batch sees the record stored earlier in it.
                b.update_device("d1", |cur| {
                    assert_eq!(cur.map(|d| d.id).as_deref(), Some("d1"));
                    (None, vec![])
                })
                .unwrap();
                fresh
            })
            .unwrap();
        assert_eq!(fresh, vec![true, false, true]);
        assert_eq!(s.devices().unwrap().len(), 2);
        let events = s.events(&EventFilter::default(), 10).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            vec![4, 3, 2, 1],
            "two registrations, two device events"
        );
        assert!(!s.append_device_event(device_event("d1", 7)).unwrap());
    }

    /// A change refused before it writes (an unreadable record) fails alone; the rest of the
    /// batch is stored.
    #[test]
    fn an_unreadable_record_fails_its_change_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server.redb")).unwrap();
        let tx = s.db.begin_write().unwrap();
        tx.open_table(DEVICES)
            .unwrap()
            .insert("bad", b"not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
        let results = s
            .batch(|b| {
                let bad = b.update_device("bad", |_| (None, vec![]));
                let good = b.append_device_event(device_event("good", 1));
                (bad.is_err(), good.unwrap())
            })
            .unwrap();
        assert_eq!(results, (true, true));
        assert_eq!(s.events(&EventFilter::default(), 10).unwrap().len(), 1);
    }

    #[test]
    fn update_device_can_leave_the_record_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server.redb")).unwrap();
        s.update_device("d1", |cur| {
            assert!(cur.is_none());
            (None, vec![])
        })
        .unwrap();
        assert!(s.device("d1").unwrap().is_none());
    }

    #[test]
    fn events_read_forward_after_a_seq_and_back_while_asked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server.redb")).unwrap();
        let kinds = ["a", "mark", "b", "c", "d"];
        s.append(
            kinds
                .iter()
                .map(|k| Event::new(k, "admin", serde_json::json!({})))
                .collect(),
        )
        .unwrap();
        let kinds_of = |v: Vec<Event>| v.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(kinds_of(s.events_after(2, 10).unwrap()), ["b", "c", "d"]);
        assert_eq!(kinds_of(s.events_after(2, 2).unwrap()), ["b", "c"]);
        assert!(s.events_after(5, 10).unwrap().is_empty());
        let back = s.events_back_while(|e| e.kind != "mark").unwrap();
        assert_eq!(
            kinds_of(back),
            ["d", "c", "b"],
            "newest first, the mark not kept"
        );
        assert_eq!(s.events_back_while(|_| true).unwrap().len(), 5);
    }
}
