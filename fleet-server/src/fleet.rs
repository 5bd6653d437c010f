//! The fleet: the server's shared state and every operation on it.
//!
//! HTTP handlers and the MQTT ingest are thin layers over [`Fleet`]; the rollout engine will be
//! another caller. Each mutation goes through the store together with the event that records
//! it (who, what, when), so the event log is the audit log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use protocol::bundle::BundleError;
use protocol::command_auth::SignedCommand;
use protocol::keys::{KeyId, Keyring, PublicKey, SecretKey, SignedKeyringUpdate};
use protocol::link::{
    self, Action, BundleRef, Channel, Command, ModelSummary, ServerPresence, Topics, LINK_SCHEMA,
};
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use serde_json::json;

use crate::auth::{self, Caller, Role, TokenIndex};
use crate::bulk::BulkLink;
use crate::bundles::{BundleFileError, BundleFiles};
use crate::keyring::{FleetKeyring, KeyringError};
use crate::metrics::{Gauges, Metrics};
use crate::store::{
    BundleRecord, DeviceRecord, Event, EventFilter, Store, StoreError, TokenRecord,
};
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("bundle does not verify: {0}")]
    Verify(BundleError),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bundle storage: {0}")]
    Files(String),
    #[error("cannot queue the command for the broker: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl From<BundleFileError> for FleetError {
    fn from(e: BundleFileError) -> FleetError {
        match e {
            BundleFileError::Verify(v) => FleetError::Verify(v),
            other => FleetError::Files(other.to_string()),
        }
    }
}

/// How far the server got serving a device's current transfer (from the chunk requests it
/// answered and the transfer events the device reported).
#[derive(Debug, Clone, Serialize)]
pub struct TransferProgress {
    pub bundle_id: String,
    /// Chunks in the bundle at the requested chunk size.
    pub total_chunks: u32,
    /// Chunks the server published for this transfer (re-sent chunks count again).
    pub chunks_served: u64,
    /// The last transfer event the device reported (`transfer_progress`, `transfer_completed`, …).
    pub last_event: Option<String>,
    pub last_event_detail: Option<serde_json::Value>,
    pub updated: DateTime<Utc>,
}

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub online: bool,
    pub last_seen: DateTime<Utc>,
    pub first_seen: DateTime<Utc>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub target: Option<String>,
    pub agent_version: Option<String>,
    pub models: Vec<ModelSummary>,
    pub transfer: Option<TransferProgress>,
}

/// Which devices to list.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    pub online: Option<bool>,
    /// Every (key, value) must match.
    pub labels: Vec<(String, String)>,
    /// Case-insensitive substring of the id, a label `key:value`, the target or a model name.
    pub search: Option<String>,
    /// Has this model (any version, or `model@version`).
    pub model: Option<String>,
    /// Has a model in this state (`trial`, `committed`, `reverted`).
    pub model_state: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

impl DeviceQuery {
    /// The search, model and model-state filters.
    pub fn matches_extra(&self, d: &DeviceRecord) -> bool {
        if let Some(text) = self.search.as_deref().filter(|t| !t.is_empty()) {
            let text = text.to_lowercase();
            let hit = d.id.to_lowercase().contains(&text)
                || d.target
                    .as_deref()
                    .is_some_and(|t| t.to_lowercase().contains(&text))
                || d.labels
                    .iter()
                    .any(|(k, v)| format!("{k}:{v}").to_lowercase().contains(&text))
                || d.models
                    .iter()
                    .any(|m| m.name.to_lowercase().contains(&text));
            if !hit {
                return false;
            }
        }
        if let Some(want) = self.model.as_deref() {
            let (name, version) = match want.split_once('@') {
                Some((n, v)) => (n, Some(v)),
                None => (want, None),
            };
            if !d
                .models
                .iter()
                .any(|m| m.name == name && version.is_none_or(|v| m.active == v))
            {
                return false;
            }
        }
        if let Some(state) = self.model_state.as_deref() {
            if !d.models.iter().any(|m| m.state == state) {
                return false;
            }
        }
        true
    }
}

/// A command checked and numbered, with its `command_sent` event, waiting for
/// [`Fleet::send_prepared`].
#[derive(Debug)]
pub struct PreparedCommand {
    command: Command,
    event: Event,
}

/// A command signed for its device: what is published, and re-published unchanged (same id,
/// same `seq`: a device that already obeyed it refuses the copy as a replay).
#[derive(Debug, Clone)]
pub struct SealedCommand {
    pub command_id: String,
    pub device_id: String,
    pub payload: Vec<u8>,
}

/// The server's state: store, bundle files, telemetry, metrics, and the MQTT client that
/// carries commands and chunks.
pub struct Fleet {
    pub store: Store,
    pub files: BundleFiles,
    /// Keys trusted to sign bundles, and their rotations.
    pub keyring: FleetKeyring,
    pub telemetry: Telemetry,
    pub metrics: Metrics,
    pub topics: Topics,
    pub(crate) mqtt: AsyncClient,
    /// The publish-only connection chunk frames take when there is one ([`crate::bulk`]).
    pub bulk: BulkLink,
    pub(crate) mqtt_connected: AtomicBool,
    pub(crate) mqtt_subscribed: AtomicBool,
    tokens: RwLock<TokenIndex>,
    /// Tokens from `--tokens FILE`: in force, never stored.
    file_tokens: Vec<(String, Role, String)>,
    /// When each device was last heard from (any message), newer than the stored `last_seen`.
    last_heard: RwLock<HashMap<String, DateTime<Utc>>>,
    transfers: RwLock<HashMap<String, TransferProgress>>,
    /// Base URL of the HTTP API (`http://host:port`), for bundle content URLs in commands.
    http_base: RwLock<String>,
    /// Signs every command (`protocol::command_auth`).
    server_key: SecretKey,
    /// The last command sequence number signed.
    command_seq: AtomicU64,
    /// How long a command stays valid.
    command_ttl: chrono::Duration,
    /// The chunk size stage commands name.
    pub(crate) chunk_size: u32,
}

impl Fleet {
    pub(crate) fn new(
        store: Store,
        files: BundleFiles,
        keyring: FleetKeyring,
        topics: Topics,
        mqtt: AsyncClient,
        file_tokens: Vec<(String, Role, String)>,
        server_key: SecretKey,
        command_ttl: chrono::Duration,
        chunk_size: u32,
        telemetry: crate::telemetry::Retention,
    ) -> Result<Fleet, FleetError> {
        let fleet = Fleet {
            store,
            files,
            keyring,
            telemetry: Telemetry::new(telemetry),
            metrics: Metrics::default(),
            topics,
            mqtt,
            bulk: BulkLink::default(),
            mqtt_connected: AtomicBool::new(false),
            mqtt_subscribed: AtomicBool::new(false),
            tokens: RwLock::default(),
            file_tokens,
            last_heard: RwLock::default(),
            transfers: RwLock::default(),
            http_base: RwLock::new(String::new()),
            server_key,
            command_seq: AtomicU64::new(0),
            command_ttl,
            chunk_size,
        };
        fleet.reload_tokens()?;
        Ok(fleet)
    }

    pub(crate) fn set_http_base(&self, base: String) {
        *self.http_base.write().unwrap_or_else(|p| p.into_inner()) = base;
    }

    /// The public half of the key commands are signed with (what agents are given).
    pub fn server_public_key(&self) -> PublicKey {
        self.server_key.public()
    }

    /// The next command sequence number: microseconds since the epoch, bumped past the last
    /// one, so it grows across restarts without being stored (as long as the clock does).
    fn next_command_seq(&self) -> u64 {
        let now = Utc::now().timestamp_micros().max(0) as u64;
        let prev = self
            .command_seq
            .fetch_update(Relaxed, Relaxed, |last| Some(now.max(last + 1)))
            .expect("the closure always returns Some");
        now.max(prev + 1)
    }

    pub fn mqtt_connected(&self) -> bool {
        self.mqtt_connected.load(Relaxed)
    }

    // ---- tokens ----

    /// Rebuilds the token index from the file tokens and the stored ones.
    pub fn reload_tokens(&self) -> Result<(), FleetError> {
        let stored = self.store.tokens()?;
        let all = self.file_tokens.iter().cloned().chain(
            stored
                .into_iter()
                .map(|t| (t.name, t.role, t.secret_sha256)),
        );
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = TokenIndex::new(all);
        Ok(())
    }

    /// Who holds bearer secret `secret`.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .check(secret)
            .cloned()
    }

    /// Creates (or replaces) a stored token; returns its secret (shown once).
    pub fn create_token(&self, name: &str, role: Role, actor: &str) -> Result<String, FleetError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(FleetError::BadRequest(
                "token name must be 1 to 64 characters of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if self.file_tokens.iter().any(|t| t.0 == name) {
            return Err(FleetError::Conflict(format!(
                "token '{name}' is defined in the token file"
            )));
        }
        let secret = auth::generate_secret();
        let record = TokenRecord {
            name: name.to_string(),
            role,
            secret_sha256: auth::hash_secret(&secret),
            created_at: Utc::now(),
            source: if actor == "server" {
                "generated"
            } else {
                "api"
            }
            .into(),
        };
        let event = Event::new("token_created", actor, json!({"name": name, "role": role}));
        self.store.put_token(&record, event)?;
        self.reload_tokens()?;
        Ok(secret)
    }

    pub fn delete_token(&self, name: &str, actor: &str) -> Result<(), FleetError> {
        let event = Event::new("token_deleted", actor, json!({"name": name}));
        if !self.store.delete_token(name, event)? {
            return Err(FleetError::NotFound {
                what: "token",
                id: name.into(),
            });
        }
        self.reload_tokens()
    }

    /// Token names and roles (file and stored), never secrets.
    pub fn token_list(&self) -> Result<Vec<serde_json::Value>, FleetError> {
        let mut out: Vec<_> = self
            .file_tokens
            .iter()
            .map(|(n, r, _)| json!({"name": n, "role": r, "source": "file"}))
            .collect();
        for t in self.store.tokens()? {
            out.push(json!({"name": t.name, "role": t.role, "source": t.source, "created_at": t.created_at}));
        }
        Ok(out)
    }

    // ---- bundles ----

    /// Verifies and stores a bundle. Returns its record and whether it is new (an upload of
    /// bytes already stored returns the existing record). Blocking.
    pub fn upload_bundle(
        &self,
        bytes: &[u8],
        actor: &str,
    ) -> Result<(BundleRecord, bool), FleetError> {
        let verified = self
            .files
            .verify_and_store(bytes, &self.keyring.current())?;
        let m = &verified.manifest;
        let record = BundleRecord {
            id: verified.sha256.clone(),
            name: m.name.clone(),
            version: m.version.to_string(),
            size: verified.size,
            security_version: m.security_version,
            signed_by: verified.signed_by.iter().map(|k| k.to_string()).collect(),
            uploaded_at: Utc::now(),
            uploaded_by: actor.to_string(),
            targets: m.targets.clone(),
        };
        let event = Event::new(
            "bundle_uploaded",
            actor,
            json!({"bundle_id": record.id, "size": record.size,
                   "security_version": record.security_version, "signed_by": record.signed_by}),
        )
        .model(&record.name, Some(record.version.as_str()));
        Ok(self.store.insert_bundle(&record, event)?)
    }

    pub fn bundle(&self, id: &str) -> Result<BundleRecord, FleetError> {
        self.store.bundle(id)?.ok_or_else(|| FleetError::NotFound {
            what: "bundle",
            id: id.into(),
        })
    }

    // ---- devices ----

    fn view(&self, d: DeviceRecord) -> DeviceView {
        let heard = self
            .last_heard
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&d.id)
            .copied();
        let transfer = self
            .transfers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&d.id)
            .cloned();
        DeviceView {
            last_seen: heard.map_or(d.last_seen, |h| h.max(d.last_seen)),
            id: d.id,
            online: d.online,
            first_seen: d.first_seen,
            labels: d.labels,
            target: d.target,
            agent_version: d.agent_version,
            models: d.models,
            transfer,
        }
    }

    pub fn device(&self, id: &str) -> Result<DeviceView, FleetError> {
        let d = self.store.device(id)?.ok_or_else(|| FleetError::NotFound {
            what: "device",
            id: id.into(),
        })?;
        Ok(self.view(d))
    }

    /// Devices matching `q` (sorted by id), a page of them, and how many matched in all.
    pub fn devices(&self, q: &DeviceQuery) -> Result<(Vec<DeviceView>, usize), FleetError> {
        let matching: Vec<Arc<DeviceRecord>> = self
            .store
            .device_records()?
            .into_iter()
            .filter(|d| q.online.is_none_or(|o| d.online == o))
            .filter(|d| q.labels.iter().all(|(k, v)| d.has_label(k, v)))
            .filter(|d| q.matches_extra(d))
            .collect();
        let total = matching.len();
        let page = matching
            .into_iter()
            .skip(q.offset)
            .take(q.limit)
            .map(|d| self.view(Arc::unwrap_or_clone(d)))
            .collect();
        Ok((page, total))
    }

    pub(crate) fn heard_from(&self, device: &str) {
        self.last_heard
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device.to_string(), Utc::now());
    }

    pub(crate) fn note_chunks_served(&self, device: &str, bundle_id: &str, total: u32, n: u64) {
        let mut t = self.transfers.write().unwrap_or_else(|p| p.into_inner());
        let entry = t
            .entry(device.to_string())
            .or_insert_with(|| TransferProgress {
                bundle_id: bundle_id.to_string(),
                total_chunks: total,
                chunks_served: 0,
                last_event: None,
                last_event_detail: None,
                updated: Utc::now(),
            });
        if entry.bundle_id != bundle_id {
            *entry = TransferProgress {
                bundle_id: bundle_id.to_string(),
                total_chunks: total,
                chunks_served: 0,
                last_event: None,
                last_event_detail: None,
                updated: Utc::now(),
            };
        }
        entry.total_chunks = total;
        entry.chunks_served += n;
        entry.updated = Utc::now();
    }

    pub(crate) fn note_transfer_event(&self, device: &str, kind: &str, detail: &serde_json::Value) {
        let mut t = self.transfers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = t.get_mut(device) {
            entry.last_event = Some(kind.to_string());
            entry.last_event_detail = Some(detail.clone());
            entry.updated = Utc::now();
        }
    }

    // ---- commands ----

    /// Sends `action` to a known device with QoS 1 and records the `command_sent` event.
    /// Returns the command id.
    pub async fn send_command(
        &self,
        device_id: &str,
        action: Action,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<String, FleetError> {
        let prepared = self.prepare_command(device_id, action, rollout_id, actor)?;
        self.send_one(prepared).await
    }

    /// Numbers and describes a command to a known device, without recording or sending it.
    fn prepare_command(
        &self,
        device_id: &str,
        action: Action,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<PreparedCommand, FleetError> {
        if self.store.device(device_id)?.is_none() {
            return Err(FleetError::NotFound {
                what: "device",
                id: device_id.into(),
            });
        }
        let time = Utc::now();
        let command = Command {
            schema: LINK_SCHEMA,
            command_id: new_command_id(),
            rollout_id: rollout_id.map(str::to_string),
            device_id: device_id.to_string(),
            seq: self.next_command_seq(),
            time,
            expires: time + self.command_ttl,
            action,
        };
        let (model, version) = match &command.action {
            Action::Stage { bundle } => (Some(bundle.name.clone()), Some(bundle.version.clone())),
            Action::Revert { model, version } => (Some(model.clone()), version.clone()),
            Action::CancelTransfer { .. } => (None, None),
        };
        let mut event = Event::new(
            "command_sent",
            actor,
            serde_json::to_value(&command.action).unwrap_or_default(),
        )
        .device(device_id)
        .command(&command.command_id, rollout_id);
        if let Some(m) = &model {
            event = event.model(m, version.as_deref());
        }
        Ok(PreparedCommand { command, event })
    }

    async fn send_one(&self, prepared: PreparedCommand) -> Result<String, FleetError> {
        self.send_prepared(vec![prepared])
            .await?
            .pop()
            .expect("one result per command")
    }

    /// Records the `command_sent` events of `commands` in one transaction, then publishes each
    /// with QoS 1: a rollout stage of 10,000 devices is one commit, not 10,000. Returns each
    /// command's id or why it did not go out, in order; `Err` if nothing could be recorded.
    pub async fn send_prepared(
        &self,
        commands: Vec<PreparedCommand>,
    ) -> Result<Vec<Result<String, FleetError>>, FleetError> {
        // Recorded before they are sent: an audit log may name a command a device never got,
        // but never miss one it got.
        let (commands, events): (Vec<SealedCommand>, Vec<Event>) =
            commands.into_iter().map(|p| self.seal(p)).unzip();
        self.store.append(events)?;
        let mut results = Vec::with_capacity(commands.len());
        for command in commands {
            let sent = self.publish_command(&command).await;
            results.push(sent.map(|()| command.command_id));
        }
        Ok(results)
    }

    /// Signs a prepared command: the payload to publish (and to re-publish unchanged) and its
    /// `command_sent` event, to be stored before the command goes out.
    pub fn seal(&self, prepared: PreparedCommand) -> (SealedCommand, Event) {
        let PreparedCommand { command, event } = prepared;
        let sealed = SealedCommand {
            payload: SignedCommand::sign(&command, &self.server_key).encode(),
            command_id: command.command_id,
            device_id: command.device_id,
        };
        (sealed, event)
    }

    /// Publishes a sealed command to its device's command topic with QoS 1.
    pub async fn publish_command(&self, command: &SealedCommand) -> Result<(), FleetError> {
        let publish = self.mqtt.publish(
            self.topics.device(&command.device_id, Channel::Commands),
            QoS::AtLeastOnce,
            false,
            command.payload.clone(),
        );
        // The request queue only fills when the broker has been unreachable for a while.
        tokio::time::timeout(COMMAND_QUEUE_TIMEOUT, publish)
            .await
            .map_err(|_| {
                FleetError::Mqtt("the MQTT request queue is full (broker unreachable?)".into())
            })?
            .map_err(|e| FleetError::Mqtt(e.to_string()))?;
        self.metrics.commands_sent.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Tells a device to fetch, install and activate bundle `bundle_id`.
    pub async fn stage(
        &self,
        device_id: &str,
        bundle_id: &str,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<String, FleetError> {
        let prepared = self.prepare_stage(device_id, bundle_id, rollout_id, actor)?;
        self.send_one(prepared).await
    }

    /// The checks of [`Fleet::stage`] and its command, not yet recorded or sent
    /// ([`Fleet::send_prepared`]).
    pub fn prepare_stage(
        &self,
        device_id: &str,
        bundle_id: &str,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<PreparedCommand, FleetError> {
        let b = self.bundle(bundle_id)?;
        let keyring = self.keyring.current();
        let trusted = b.signed_by.iter().any(|id| {
            id.parse::<KeyId>()
                .is_ok_and(|id| keyring.get(&id).is_some())
        });
        if !trusted {
            return Err(FleetError::Conflict(format!(
                "bundle {bundle_id} is signed only by keys no longer in the keyring ({}); \
                 devices would refuse it",
                b.signed_by.join(", ")
            )));
        }
        self.check_target(device_id, &b, rollout_id, actor)?;
        let base = self
            .http_base
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let bundle = BundleRef {
            http_url: (!base.is_empty()).then(|| format!("{base}/api/v1/bundles/{}/content", b.id)),
            bundle_id: b.id,
            name: b.name,
            version: b.version,
            size: b.size,
            chunk_size: self.chunk_size,
        };
        self.prepare_command(device_id, Action::Stage { bundle }, rollout_id, actor)
    }

    /// Refuses (409, with a `stage_refused` event) a bundle whose manifest lists targets that do
    /// not include the one the device reports: it would refuse the bundle anyway, after fetching
    /// it. A device that has not reported a target yet is not refused here (it checks itself).
    fn check_target(
        &self,
        device_id: &str,
        b: &BundleRecord,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<(), FleetError> {
        if b.targets.is_empty() {
            return Ok(());
        }
        let Some(target) = self.store.device(device_id)?.and_then(|d| d.target) else {
            return Ok(());
        };
        if b.targets.contains(&target) {
            return Ok(());
        }
        let why = format!(
            "bundle {} ({} {}) is built for [{}]; device {device_id} reports target {target}",
            b.id,
            b.name,
            b.version,
            b.targets.join(", ")
        );
        let mut event = Event::new(
            "stage_refused",
            actor,
            json!({"bundle_id": b.id, "reason": "target", "device_target": target,
                   "bundle_targets": b.targets, "error": why}),
        )
        .device(device_id)
        .model(&b.name, Some(&b.version));
        if let Some(r) = rollout_id {
            event.rollout_id = Some(r.to_string());
        }
        self.store.append(vec![event])?;
        Err(FleetError::Conflict(why))
    }

    /// Tells a device to go back to the previous version of `model` (only if `version`, when
    /// given, is the active one).
    pub async fn revert(
        &self,
        device_id: &str,
        model: &str,
        version: Option<&str>,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<String, FleetError> {
        let prepared = self.prepare_revert(device_id, model, version, rollout_id, actor)?;
        self.send_one(prepared).await
    }

    /// The command of [`Fleet::revert`], not yet recorded or sent ([`Fleet::send_prepared`]).
    pub fn prepare_revert(
        &self,
        device_id: &str,
        model: &str,
        version: Option<&str>,
        rollout_id: Option<&str>,
        actor: &str,
    ) -> Result<PreparedCommand, FleetError> {
        let action = Action::Revert {
            model: model.to_string(),
            version: version.map(str::to_string),
        };
        self.prepare_command(device_id, action, rollout_id, actor)
    }

    // ---- keyring ----

    /// Accepts a keyring rotation signed by a threshold of the current keys: stores it, records
    /// a `keyring_updated` event and publishes the chain (retained) to every device.
    pub async fn update_keyring(
        &self,
        update: SignedKeyringUpdate,
        actor: &str,
    ) -> Result<Keyring, FleetError> {
        let (old, new) = self.keyring.accept(update)?;
        let ids = |k: &Keyring| k.ids().map(|i| i.to_string()).collect::<Vec<_>>();
        let retired: Vec<String> = old
            .ids()
            .filter(|k| new.get(k).is_none())
            .map(|k| k.to_string())
            .collect();
        let event = Event::new(
            "keyring_updated",
            actor,
            json!({"from_version": old.version, "version": new.version, "threshold": new.threshold,
                   "keys": ids(&new), "retired": retired}),
        );
        self.store.append(vec![event])?;
        self.publish_keyring().await?;
        Ok(new)
    }

    /// Publishes the keyring chain retained on `{p}/keyring` (nothing before the first rotation).
    pub(crate) async fn publish_keyring(&self) -> Result<(), FleetError> {
        let chain = self.keyring.chain();
        if chain.updates.is_empty() {
            return Ok(());
        }
        self.publish_retained(self.topics.keyring(), link::encode(&chain))
            .await
    }

    /// Publishes the server's presence, retained on `{p}/server` (see
    /// `protocol::link::ServerPresence`): `online` once the subscriptions are acknowledged,
    /// offline when the server stops.
    pub(crate) async fn publish_presence(&self, online: bool) -> Result<(), FleetError> {
        let presence = link::encode(&ServerPresence::new(online));
        self.publish_retained(self.topics.server(), presence).await
    }

    async fn publish_retained(&self, topic: String, payload: Vec<u8>) -> Result<(), FleetError> {
        let publish = self.mqtt.publish(topic, QoS::AtLeastOnce, true, payload);
        tokio::time::timeout(COMMAND_QUEUE_TIMEOUT, publish)
            .await
            .map_err(|_| {
                FleetError::Mqtt("the MQTT request queue is full (broker unreachable?)".into())
            })?
            .map_err(|e| FleetError::Mqtt(e.to_string()))
    }

    // ---- events and metrics ----

    pub fn events(&self, filter: &EventFilter, limit: usize) -> Result<Vec<Event>, FleetError> {
        Ok(self.store.events(filter, limit)?)
    }

    pub fn render_metrics(&self) -> String {
        let (devices, devices_online) = self.store.device_counts().unwrap_or_default();
        let g = Gauges {
            devices: devices as u64,
            devices_online: devices_online as u64,
            bundles: self.store.bundles().map(|b| b.len() as u64).unwrap_or(0),
            events: self.store.event_count().unwrap_or(0),
            mqtt_connected: self.mqtt_connected(),
            bulk_connected: self.bulk.is_connected(),
            telemetry_keys: self.telemetry.keys() as u64,
            telemetry_windows: self.telemetry.windows_kept() as u64,
        };
        self.metrics.render(&g)
    }
}

/// How long a command may wait for room in the MQTT request queue.
const COMMAND_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn new_command_id() -> String {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    format!("cmd-{}", hex::encode(b))
}

/// A shared handle to the fleet.
pub type SharedFleet = Arc<Fleet>;
