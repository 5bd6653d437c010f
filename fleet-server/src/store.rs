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
//! | `rollouts` | rollout id | [`Rollout`] without its devices (spec, state, decisions with evidence) |
//! | `rollout_devices` | (rollout id, device id) | [`DeviceProgress`]: one row per device of a rollout |
//!
//! A new kind of state (the rollout engine's rollouts and decisions) is another table opened
//! in [`Store::open`] with its own record type; [`Store::write`] gives a write transaction in
//! which any table can change together with the events that record the change, so "every
//! mutation leaves an audit event" holds by construction for callers that use it.
//!
//! Device records are also kept in memory, decoded: every rollout tick, API device page and
//! `/metrics` scrape reads the whole fleet, and decoding ten thousand JSON records for each
//! was most of a 10,000-device server's CPU (BENCHMARKS.md, "Fleet scale", session 12).
//! Invariant: the in-memory copy is the `devices` table as of the last commit that changed it.
//! Device records change only through [`Store::batch`], which updates the copy right after its
//! commit, under the one device-writer lock (so two batches cannot apply their copies out of
//! order).
//!
//! A rollout's devices are rows of their own, so a rollout step stores the devices it changed,
//! not all ten thousand of a fleet-wide rollout (which made each step's cost grow with the
//! fleet, and a fan-out's cost with its square). Rollouts stored by an earlier version, with
//! their devices inside the record, are moved to rows when the store opens.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use protocol::link::ModelSummary;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::rollout::engine::{DeviceProgress, Rollout};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
pub(crate) const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("bundles");
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(crate) const DEVICE_EVENT_KEYS: TableDefinition<(&str, u64), u64> =
    TableDefinition::new("device_event_keys");
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const ROLLOUT_DEVICES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("rollout_devices");
/// Stage commands a rollout sent that no device has settled yet: command id → the signed
/// command as published, so a re-send is the same command (same id, same `seq`).
const PENDING_COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_commands");

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

    /// What the device last reported of model `name`.
    pub fn model(&self, name: &str) -> Option<&ModelSummary> {
        self.models.iter().find(|m| m.name == name)
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
    /// The `devices` table, decoded (see the module's invariant).
    devices: RwLock<DeviceCopy>,
    /// Held by [`Store::batch`] from its first write until its changes are in `devices`.
    device_writer: Mutex<()>,
}

/// The decoded device records, and the keys of records that could not be decoded at open.
#[derive(Default)]
struct DeviceCopy {
    records: BTreeMap<String, Arc<DeviceRecord>>,
    unreadable: BTreeMap<String, String>,
}

impl DeviceCopy {
    fn load(db: &Database) -> Result<DeviceCopy, StoreError> {
        let mut copy = DeviceCopy::default();
        let tx = db.begin_read()?;
        for row in tx.open_table(DEVICES)?.iter()? {
            let (k, v) = row?;
            match decode::<DeviceRecord>(k.value(), v.value()) {
                Ok(d) => {
                    copy.records.insert(k.value().to_string(), Arc::new(d));
                }
                Err(StoreError::Corrupt { key, reason }) => {
                    copy.unreadable.insert(key, reason);
                }
                Err(other) => return Err(other),
            }
        }
        Ok(copy)
    }

    /// An unreadable record fails every read of the whole fleet, as reading the table would.
    fn check(&self) -> Result<(), StoreError> {
        match self.unreadable.iter().next() {
            Some((key, reason)) => Err(StoreError::Corrupt {
                key: key.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
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
        tx.open_table(ROLLOUT_DEVICES)?;
        move_rollout_devices_to_rows(&tx)?;
        tx.commit()?;
        let devices = RwLock::new(DeviceCopy::load(&db)?);
        Ok(Store {
            db,
            devices,
            device_writer: Mutex::new(()),
        })
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
        let copy = self.devices.read().expect("devices lock");
        if let Some(reason) = copy.unreadable.get(id) {
            return Err(StoreError::Corrupt {
                key: id.to_string(),
                reason: reason.clone(),
            });
        }
        Ok(copy.records.get(id).map(|d| (**d).clone()))
    }

    /// Every device record, sorted by id, shared with the store's copy (no record is copied).
    pub fn device_records(&self) -> Result<Vec<Arc<DeviceRecord>>, StoreError> {
        let copy = self.devices.read().expect("devices lock");
        copy.check()?;
        Ok(copy.records.values().cloned().collect())
    }

    /// How many devices are known, and how many of them are online.
    pub fn device_counts(&self) -> Result<(usize, usize), StoreError> {
        let copy = self.devices.read().expect("devices lock");
        copy.check()?;
        let online = copy.records.values().filter(|d| d.online).count();
        Ok((copy.records.len(), online))
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
            writer: &self.device_writer,
            tx: None,
            written: HashMap::new(),
            failed: None,
        };
        let value = f(&mut batch);
        if let Some(e) = batch.failed {
            return Err(e); // dropping the transaction aborts it
        }
        // A batch that changed nothing (telemetry only) costs no commit.
        if let Some((_writer, tx)) = batch.tx {
            tx.commit()?;
            if !batch.written.is_empty() {
                let mut copy = self.devices.write().expect("devices lock");
                for (id, record) in batch.written {
                    copy.unreadable.remove(&id);
                    copy.records.insert(id, Arc::new(record));
                }
            }
        }
        Ok(value)
    }

    // ---- rollouts ----

    /// A rollout with its devices.
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        let tx = self.db.begin_read()?;
        let Some(v) = tx.open_table(ROLLOUTS)?.get(id)? else {
            return Ok(None);
        };
        let mut r: Rollout = decode(id, v.value())?;
        read_rollout_devices(&tx.open_table(ROLLOUT_DEVICES)?, &mut r)?;
        Ok(Some(r))
    }

    /// Every rollout without its devices (`devices` is empty): what lists and state checks
    /// need, without reading a row per device of every rollout ever run.
    pub fn rollout_headers(&self) -> Result<Vec<Rollout>, StoreError> {
        all(&self.db, ROLLOUTS)
    }

    /// How many devices rollout `id` has taken.
    pub fn rollout_device_count(&self, id: &str) -> Result<usize, StoreError> {
        let tx = self.db.begin_read()?;
        let rows = tx.open_table(ROLLOUT_DEVICES)?;
        let mut n = 0;
        for row in rows.range((id, "")..)? {
            if row?.0.value().0 != id {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Stores a rollout, its events, the stage commands it is about to send (`sent`: command
    /// id and signed payload) and forgets the ones that are settled, in one commit.
    ///
    /// `before` is the rollout as stored before this change: only the devices whose progress
    /// differs from it are written. None writes every device.
    pub fn put_rollout_with_commands(
        &self,
        rollout: &Rollout,
        before: Option<&Rollout>,
        events: Vec<Event>,
        sent: &[(String, Vec<u8>)],
        settled: &[String],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(ROLLOUTS)?.insert(
                rollout.id.as_str(),
                encode(&rollout.without_devices()).as_slice(),
            )?;
            let mut rows = tx.open_table(ROLLOUT_DEVICES)?;
            let id = rollout.id.as_str();
            for (device, progress) in &rollout.devices {
                if before.is_some_and(|b| b.devices.get(device) == Some(progress)) {
                    continue;
                }
                rows.insert((id, device.as_str()), encode(progress).as_slice())?;
            }
            for device in before.iter().flat_map(|b| b.devices.keys()) {
                if !rollout.devices.contains_key(device) {
                    rows.remove((id, device.as_str()))?;
                }
            }
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
    writer: &'a Mutex<()>,
    /// Begun by the first change, with the device-writer lock held until the store's copy of
    /// the device records has this batch's changes.
    tx: Option<(std::sync::MutexGuard<'a, ()>, redb::WriteTransaction)>,
    /// The device records this batch wrote (the last version of each).
    written: HashMap<String, DeviceRecord>,
    /// The first error after a change began writing: the batch is not committed.
    failed: Option<StoreError>,
}

impl Batch<'_> {
    fn tx(&mut self) -> Result<&redb::WriteTransaction, StoreError> {
        if self.tx.is_none() {
            // Poisoned only by a panic in another batch, whose transaction was then dropped
            // (aborted): the lock guards no data of its own.
            let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.tx = Some((writer, self.db.begin_write()?));
        }
        Ok(&self.tx.as_ref().expect("just begun").1)
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
            if let Some(next) = &next {
                tx.open_table(DEVICES)?
                    .insert(id, encode(next).as_slice())?;
            }
            append_events(tx, events)
        })();
        let stored = self.writing(written)?;
        if let Some(next) = next {
            self.written.insert(id.to_string(), next);
        }
        Ok(stored)
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

/// Adds the rows of `r`'s devices to `r`.
fn read_rollout_devices(
    rows: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    r: &mut Rollout,
) -> Result<(), StoreError> {
    for row in rows.range((r.id.as_str(), "")..)? {
        let (k, v) = row?;
        let (rollout, device) = k.value();
        if rollout != r.id {
            break;
        }
        let progress: DeviceProgress = decode(&format!("{rollout}/{device}"), v.value())?;
        r.devices.insert(device.to_string(), progress);
    }
    Ok(())
}

/// Moves the devices of rollouts stored with their devices inside the record (by a server
/// before rows per device) to rows, once, when the store opens.
fn move_rollout_devices_to_rows(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut table = tx.open_table(ROLLOUTS)?;
    let mut whole: Vec<Rollout> = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let r: Rollout = decode(k.value(), v.value())?;
        if !r.devices.is_empty() {
            whole.push(r);
        }
    }
    let mut rows = tx.open_table(ROLLOUT_DEVICES)?;
    for r in whole {
        for (device, progress) in &r.devices {
            rows.insert(
                (r.id.as_str(), device.as_str()),
                encode(progress).as_slice(),
            )?;
        }
        table.insert(r.id.as_str(), encode(&r.without_devices()).as_slice())?;
    }
    Ok(())
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

    fn device_record(id: &str, online: bool) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            online,
            last_seen: Utc::now(),
            first_seen: Utc::now(),
            status_time: Utc::now(),
            labels: BTreeMap::new(),
            target: None,
            agent_version: None,
            models: vec![],
        }
    }

    /// Writes a device record that is not JSON, behind the store's back.
    fn write_unreadable_device(s: &Store, id: &str) {
        let tx = s.db.begin_write().unwrap();
        tx.open_table(DEVICES)
            .unwrap()
            .insert(id, b"not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
    }

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
        let record = |id: &str| device_record(id, true);
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
        assert_eq!(s.device_records().unwrap().len(), 2);
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
        write_unreadable_device(&s, "bad");
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

    fn rollout_with(devices: &[(&str, DeviceState)]) -> Rollout {
        let spec: crate::rollout::spec::RolloutSpec =
            serde_json::from_value(serde_json::json!({"bundle_id": "b1"})).unwrap();
        let bundle = protocol::link::BundleRef {
            bundle_id: "b1".into(),
            name: "digits".into(),
            version: "2.0.0".into(),
            size: 1000,
            chunk_size: 64,
            http_url: None,
        };
        let mut r = Rollout::new("r-1".into(), spec, bundle, "admin".into(), Utc::now());
        for (id, state) in devices {
            r.devices.insert(
                id.to_string(),
                DeviceProgress {
                    stage: 0,
                    state: *state,
                    since: Utc::now(),
                    command_id: Some(format!("c-{id}")),
                    reason: None,
                    revert_ordered_at: None,
                },
            );
        }
        r
    }

    use crate::rollout::engine::DeviceState;

    /// A rollout's devices are rows: a step writes the ones it changed (and only those are
    /// compared), and reading the rollout gives them all back.
    #[test]
    fn a_rollout_step_stores_the_devices_it_changed_as_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server.redb")).unwrap();
        let first = rollout_with(&[("d1", DeviceState::Staged), ("d2", DeviceState::Staged)]);
        s.put_rollout_with_commands(&first, None, vec![], &[], &[])
            .unwrap();
        assert_eq!(s.rollout("r-1").unwrap().unwrap(), first);
        assert_eq!(s.rollout_device_count("r-1").unwrap(), 2);
        let headers = s.rollout_headers().unwrap();
        assert_eq!(headers.len(), 1);
        assert!(headers[0].devices.is_empty(), "headers carry no devices");

        let mut next = first.clone();
        next.devices.get_mut("d1").unwrap().state = DeviceState::Installed;
        next.devices.insert("d3".into(), next.devices["d2"].clone());
        next.stage = 1;
        // What is written is the difference from `before`: d2, unchanged, is not rewritten,
        // so a `before` that lies about d2 leaves the stored d2 alone.
        let mut lying = first.clone();
        lying.devices.get_mut("d2").unwrap().reason = Some("changed".into());
        let mut claimed = next.clone();
        claimed.devices.get_mut("d2").unwrap().reason = Some("changed".into());
        s.put_rollout_with_commands(&claimed, Some(&lying), vec![], &[], &[])
            .unwrap();
        let stored = s.rollout("r-1").unwrap().unwrap();
        assert_eq!(stored, next, "d1 changed, d3 added, d2 as first stored");
        assert_eq!(s.rollout_device_count("r-1").unwrap(), 3);

        // A device gone from the rollout loses its row; another rollout's rows stay apart.
        let mut other = rollout_with(&[("d1", DeviceState::Failed)]);
        other.id = "r-0".into();
        s.put_rollout_with_commands(&other, None, vec![], &[], &[])
            .unwrap();
        let mut fewer = next.clone();
        fewer.devices.remove("d3");
        s.put_rollout_with_commands(&fewer, Some(&next), vec![], &[], &[])
            .unwrap();
        assert_eq!(s.rollout("r-1").unwrap().unwrap(), fewer);
        assert_eq!(s.rollout("r-0").unwrap().unwrap(), other);
        assert_eq!(s.rollout_device_count("r-0").unwrap(), 1);
    }

    /// A rollout stored by an earlier server, its devices inside the record, reads the same
    /// after the store moves them to rows at open.
    #[test]
    fn rollouts_stored_whole_move_their_devices_to_rows_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.redb");
        let whole = rollout_with(&[("d1", DeviceState::Installed), ("d2", DeviceState::Staged)]);
        {
            let s = Store::open(&path).unwrap();
            let tx = s.db.begin_write().unwrap();
            tx.open_table(ROLLOUTS)
                .unwrap()
                .insert("r-1", encode(&whole).as_slice())
                .unwrap();
            tx.commit().unwrap();
            assert_eq!(s.rollout_device_count("r-1").unwrap(), 0, "not moved yet");
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.rollout("r-1").unwrap().unwrap(), whole);
        assert_eq!(s.rollout_device_count("r-1").unwrap(), 2);
        assert!(s.rollout_headers().unwrap()[0].devices.is_empty());
        let tx = s.db.begin_read().unwrap();
        let raw: Rollout = decode(
            "r-1",
            tx.open_table(ROLLOUTS)
                .unwrap()
                .get("r-1")
                .unwrap()
                .unwrap()
                .value(),
        )
        .unwrap();
        assert!(
            raw.devices.is_empty(),
            "the record itself no longer holds them"
        );
    }

    /// The in-memory device records follow every committed batch, and nothing of a failed one.
    #[test]
    fn the_device_copy_follows_commits_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.redb");
        let record = device_record;
        {
            let s = Store::open(&path).unwrap();
            s.update_device("d1", |_| (Some(record("d1", true)), vec![]))
                .unwrap();
            s.update_device("d2", |_| (Some(record("d2", false)), vec![]))
                .unwrap();
            assert_eq!(s.device_counts().unwrap(), (2, 1));
            // A batch whose change fails after writing stores nothing, in the copy neither.
            let failed = s.batch(|b| {
                b.update_device("d1", |_| (Some(record("d1", false)), vec![]))
                    .unwrap();
                b.failed = Some(StoreError::Db("injected".into()));
            });
            assert!(failed.is_err());
            assert!(s.device("d1").unwrap().unwrap().online, "copy unchanged");
            s.update_device("d1", |cur| {
                let mut d = cur.unwrap();
                d.labels.insert("site".into(), "a".into());
                (Some(d), vec![])
            })
            .unwrap();
            let all = s.device_records().unwrap();
            assert_eq!(
                all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
                ["d1", "d2"]
            );
            assert!(all[0].has_label("site", "a"));
        }
        let s = Store::open(&path).unwrap();
        assert!(s.device("d1").unwrap().unwrap().has_label("site", "a"));
        assert_eq!(s.device_counts().unwrap(), (2, 1));
    }

    /// A record that cannot be decoded at open fails reads of the whole fleet and names itself.
    #[test]
    fn an_unreadable_device_record_is_reported_by_fleet_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.redb");
        {
            let s = Store::open(&path).unwrap();
            write_unreadable_device(&s, "bad");
        }
        let s = Store::open(&path).unwrap();
        let e = s.device_records().unwrap_err().to_string();
        assert!(e.contains("'bad'"), "{e}");
        assert!(s.device("bad").is_err());
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
