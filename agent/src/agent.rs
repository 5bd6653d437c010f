//! The agent core: installed models, what is served, and the operations on them (install,
//! revert, status), independent of how they are invoked (HTTP admin API, CLI, MQTT later).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use protocol::bundle::{parse_manifest, read_head, Limits, VerifyOptions};
use protocol::keys::Keyring;

use crate::backend::Backend;
use crate::health::{self, Acc, Health, HealthOptions, SampleBudget, TrialPolicy, Verdict};
use crate::install::{self, InstallError};
use crate::model_cache::ModelCache;
use crate::outbox::{Outbox, OutboxLimits};
use crate::serving::{InferencePool, ModelMetrics, Registry, ServingModel};
use crate::slots::{Layout, MANIFEST_FILE};
use crate::store::{Event, EventContext, ModelRecord, ModelState, SlotRef, Store, StoreError};

/// The Rust target triple this agent was built for.
pub const BUILD_TARGET: &str = env!("AGENT_TARGET");

/// Settings of one agent process (CLI flags and `agent.toml`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// Threads running inference requests concurrently.
    pub workers: usize,
    /// Requests waiting for a worker before new ones get 503.
    pub queue_limit: usize,
    /// What runs the models ([`crate::backend`]; `backend = "tract"` in `agent.toml`).
    pub backend: Arc<dyn Backend>,
    /// Intra-op threads per inference.
    pub engine_threads: usize,
    /// Compute in half precision the `f16` bundles that offer it (`golden.f16_compute`), when
    /// this CPU has native f16 arithmetic ([`engine::native_f16`]: ARMv8.2 FP16, in a build
    /// with tract's FP16 kernels). `f16_compute = false` in `agent.toml` keeps every model in
    /// float32.
    pub f16_compute: bool,
    /// Accept bundles up to this long after their expiry (offline devices, clock skew).
    pub expiry_slack: Duration,
    /// Target triple reported and matched against bundles' `targets`.
    pub target: String,
    /// Watch every activated model's live behaviour (trial window, telemetry figures). Off: a new
    /// version is committed at once and requests are not inspected.
    pub health_watch: bool,
    /// Trial defaults (a bundle's health policy overrides them).
    pub trial: TrialPolicy,
    /// How often the watch judges trials.
    pub watch_tick: Duration,
    /// Length of a telemetry window.
    pub telemetry_window: Duration,
    /// Fraction of requests kept as sampled records (inputs, outputs, latency).
    pub sample_rate: f64,
    /// Bytes of sampled records per hour, all models together; samples beyond are counted only.
    pub sample_bytes_per_hour: u64,
    pub outbox: OutboxLimits,
    /// Share loaded models with the other agents given the same cache (a simulated fleet: one
    /// engine per distinct model file instead of one per device). `None`: this agent loads its
    /// own, as a device does.
    pub share_models: Option<Arc<ModelCache>>,
    /// Run inference on this pool, shared with the other agents given it (a simulated fleet:
    /// one pool of `cores` threads instead of `workers` threads per device). `None`: this agent
    /// starts its own pool of `workers` threads and `queue_limit` places.
    pub share_pool: Option<Arc<InferencePool>>,
    /// Wake this shared watch on a failed request (a simulated fleet: one watch thread for every
    /// device, [`crate::watch::spawn_shared`]). `None`: this agent has its own.
    pub share_wake: Option<Arc<health::Wake>>,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> AgentConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        AgentConfig {
            data_dir: data_dir.into(),
            workers: cores,
            queue_limit: 64,
            backend: Arc::new(crate::backend::Tract),
            engine_threads: 1,
            f16_compute: true,
            expiry_slack: Duration::from_secs(7 * 24 * 3600),
            target: BUILD_TARGET.to_string(),
            health_watch: true,
            trial: TrialPolicy::default(),
            watch_tick: Duration::from_millis(100),
            telemetry_window: Duration::from_secs(10),
            sample_rate: 0.01,
            sample_bytes_per_hour: 4 << 20,
            outbox: OutboxLimits::default(),
            share_models: None,
            share_pool: None,
            share_wake: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A setting this build cannot honour (such as `engine_threads > 1` without the
    /// `multithread` feature).
    #[error("configuration: {0}")]
    Config(String),
    #[error("no model named '{0}' is installed")]
    NoSuchModel(String),
    #[error("'{0}' has no previous version to revert to")]
    NothingToRevert(String),
    #[error("cannot revert '{model}': the previous version does not load: {source}")]
    RevertFailed { model: String, source: InstallError },
    #[error("not reverting '{model}': version {version} is not the active one ({active} is)")]
    NotActive {
        model: String,
        version: String,
        active: String,
    },
}

/// What an install did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub model: String,
    pub version: String,
    pub previous: Option<String>,
    /// The same bundle was already active: nothing changed.
    pub already_active: bool,
    pub bundle_sha256: String,
    pub load_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub active: String,
    pub previous: Option<String>,
    pub state: ModelState,
    pub security_version: u64,
    pub bundle_sha256: String,
    pub activated_at: chrono::DateTime<Utc>,
    /// Loaded and answering requests.
    pub serving: bool,
    /// The float precision the serving model computes in (`f32`, or `f16` for an `f16` bundle
    /// on a CPU with native half precision); absent when not serving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute: Option<&'static str>,
}

impl ModelStatus {
    fn of(name: &str, rec: &ModelRecord, serving: bool) -> ModelStatus {
        ModelStatus {
            name: name.to_string(),
            active: rec.active.version.clone(),
            previous: rec.previous.as_ref().map(|p| p.version.clone()),
            state: rec.state,
            security_version: rec.active.security_version,
            bundle_sha256: rec.active.bundle_sha256.clone(),
            activated_at: rec.activated_at,
            serving,
            compute: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub target: String,
    /// The inference backend serving the models; absent when read from a data directory
    /// whose agent is not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    pub agent_version: &'static str,
    pub models: Vec<ModelStatus>,
}

pub struct Agent {
    pub config: AgentConfig,
    layout: Layout,
    store: Store,
    keyring: RwLock<Keyring>,
    pub registry: Registry,
    pub pool: Arc<InferencePool>,
    /// One install or revert at a time.
    change: Mutex<()>,
    /// Models on trial, by name.
    trials: Mutex<HashMap<String, Trial>>,
    pub(crate) watch_started: AtomicBool,
    /// Failed requests wake the watch before its tick.
    pub(crate) wake: Arc<health::Wake>,
    health_options: HealthOptions,
    /// Telemetry waiting to be published.
    pub outbox: Outbox,
    /// Counters of the MQTT link (zero while the agent runs offline), shown on `/metrics`.
    pub link_metrics: Arc<crate::link::LinkMetrics>,
    /// Telemetry window records written to the outbox since start, by (model, version): what a
    /// receiver should have once the outbox is drained (`/metrics`, fault tests).
    windows_written: Mutex<BTreeMap<(String, String), u64>>,
}

/// A model version on trial: what it is compared with and by which policy.
struct Trial {
    slot: SlotRef,
    started: Instant,
    /// The previous model's live figures from before the swap (none after a restart).
    reference: Option<Acc>,
    policy: TrialPolicy,
    /// The command that installed this version; its commit or revert is attributed to it.
    context: EventContext,
}

impl Agent {
    /// Opens the data directory, cleans up after any interrupted install, and loads every
    /// installed model (falling back to its previous slot if the active one does not load).
    ///
    /// `keyring` is the provisioned one (`--keyring`); a keyring accepted later through a
    /// rotation ([`crate::keyring_store`]) and stored in the database supersedes it when newer.
    pub fn open(config: AgentConfig, keyring: Keyring) -> Result<Agent, AgentError> {
        // Refused before any model loads: a load failing on the options would look like a broken
        // slot and make the agent fall back to the previous version.
        if config.engine_threads > 1 && !engine::MULTITHREAD {
            return Err(AgentError::Config(engine::threads_unsupported(
                config.engine_threads,
            )));
        }
        let layout = Layout::new(&config.data_dir);
        layout.prepare().map_err(|source| AgentError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = Store::open(&layout.db())?;
        let keyring = match crate::keyring_store::load(store.database())? {
            Some(rotated) if rotated.version > keyring.version => rotated,
            _ => keyring,
        };
        let outbox = Outbox::in_database(store.shared_database(), config.outbox)?;
        outbox.adopt_legacy(&config.data_dir.join("outbox.redb"))?;
        let wake: Arc<health::Wake> = config.share_wake.clone().unwrap_or_default();
        let health_options = HealthOptions {
            enabled: config.health_watch,
            wake: Some(wake.clone()),
            sample_rate: config.sample_rate,
            budget: Arc::new(SampleBudget::new(config.sample_bytes_per_hour)),
        };
        let pool = match &config.share_pool {
            Some(shared) => shared.clone(),
            None => Arc::new(InferencePool::new(config.workers, config.queue_limit)),
        };
        let agent = Agent {
            config,
            layout,
            store,
            keyring: RwLock::new(keyring),
            registry: Registry::default(),
            pool,
            change: Mutex::new(()),
            trials: Mutex::new(HashMap::new()),
            watch_started: AtomicBool::new(false),
            wake,
            health_options,
            outbox,
            link_metrics: Arc::default(),
            windows_written: Mutex::default(),
        };
        agent.load_installed()?;
        Ok(agent)
    }

    fn engine_options(&self) -> engine::EngineOptions {
        let precision = if self.config.f16_compute && engine::native_f16() {
            engine::Precision::F16
        } else {
            engine::Precision::F32
        };
        engine::EngineOptions {
            threads: self.config.engine_threads,
            precision,
            ..Default::default()
        }
    }

    fn shared(&self) -> Option<&ModelCache> {
        self.config.share_models.as_deref()
    }

    fn load_installed(&self) -> Result<(), AgentError> {
        let mut keep = HashSet::new();
        for (name, rec) in self.store.models()? {
            match self.load(&name, &rec.active) {
                Ok(m) => {
                    if rec.state == ModelState::Trial {
                        // Interrupted trial: it starts again, without the previous model's live
                        // figures (confidence and predictions are judged against the baseline).
                        self.start_trial(&m, None);
                    }
                    self.registry.swap_in(Arc::new(m));
                }
                Err(e) => {
                    tracing::error!(model = %name, version = %rec.active.version, "active slot does not load: {e}");
                    let mut events = vec![Event::new(
                        "load_failed",
                        Some(&name),
                        Some(&rec.active.version),
                        json!({"reason": e.reason(), "error": e.to_string()}),
                    )];
                    let fallback = rec.previous.as_ref().map(|p| (p, self.load(&name, p)));
                    if let Some((prev, Ok(m))) = fallback {
                        events.push(Event::new(
                            "reverted",
                            Some(&name),
                            Some(&prev.version),
                            json!({"from": rec.active.version, "to": prev.version,
                                   "reason": "active_slot_unloadable", "evidence": {"error": e.to_string()}}),
                        ));
                        let record = ModelRecord {
                            active: prev.clone(),
                            previous: None,
                            state: ModelState::Reverted,
                            activated_at: Utc::now(),
                        };
                        self.store.commit_model(&name, &record, 0, &events)?;
                        self.registry.swap_in(Arc::new(m));
                        keep.insert((name.clone(), prev.dir.clone()));
                        continue;
                    }
                    self.store.append(&events)?;
                }
            }
            keep.insert((name.clone(), rec.active.dir.clone()));
            if let Some(p) = &rec.previous {
                keep.insert((name.clone(), p.dir.clone()));
            }
        }
        let removed =
            self.layout
                .remove_unreferenced(&keep)
                .map_err(|source| AgentError::DataDir {
                    path: self.layout.root.clone(),
                    source,
                })?;
        for path in removed {
            tracing::info!("removed leftover slot {}", path.display());
        }
        Ok(())
    }

    /// Loads an installed slot: manifest from disk, model hash re-checked, golden self-test.
    fn load(&self, name: &str, slot: &SlotRef) -> Result<ServingModel, InstallError> {
        let dir = self.layout.slot(name, &slot.dir);
        let manifest = parse_manifest(&fs::read(dir.join(MANIFEST_FILE))?)?;
        let (engine, load_time) = install::load_slot(
            &dir,
            &manifest,
            self.config.backend.as_ref(),
            &self.engine_options(),
            true,
            self.shared(),
        )?;
        Ok(ServingModel {
            name: name.to_string(),
            slot: slot.clone(),
            health: Health::new(&manifest, &self.health_options),
            engine,
            metrics: ModelMetrics::default(),
            manifest,
            load_time,
        })
    }

    pub fn keyring(&self) -> Keyring {
        self.keyring.read().expect("keyring lock").clone()
    }

    /// Replaces the keyring (after [`crate::keyring_store`] checked and stored a rotation).
    pub(crate) fn set_keyring(&self, keyring: Keyring) {
        *self.keyring.write().expect("keyring lock") = keyring;
    }

    /// Verifies, installs, self-tests and activates a bundle. On any error the serving model is
    /// untouched and a `rejected` event is recorded.
    pub fn install(&self, bundle: &[u8]) -> Result<Installed, InstallError> {
        self.install_with(bundle, &EventContext::default())
    }

    /// [`Agent::install`] on behalf of a fleet command: every event it records (and the commit or
    /// revert that ends its trial) carries the command and rollout ids of `context`.
    pub fn install_with(
        &self,
        bundle: &[u8],
        context: &EventContext,
    ) -> Result<Installed, InstallError> {
        let _one_at_a_time = self.change.lock().expect("install lock");
        let result = self
            .layout
            .staging_dir()
            .map_err(InstallError::from)
            .and_then(|staging| {
                let result = self.install_staged(bundle, &staging, context);
                if staging.exists() {
                    let _ = fs::remove_dir_all(&staging);
                }
                result
            })
            .map_err(InstallError::classify_no_space);
        if let Err(e) = &result {
            let (model, version) = peek_name_version(bundle);
            let _ = self.store.append(&[Event::new(
                "rejected",
                model.as_deref(),
                version.as_deref(),
                json!({"reason": e.reason(), "error": e.to_string()}),
            )
            .with_context(context)]);
        }
        result
    }

    fn install_staged(
        &self,
        bundle: &[u8],
        staging: &std::path::Path,
        context: &EventContext,
    ) -> Result<Installed, InstallError> {
        // Refuse a lower security version before decompressing anything. The head is not
        // verified yet, so this can only refuse; the verified manifest is checked again below.
        if let Ok(m) = read_head(&mut &bundle[..], &Limits::default()).and_then(|h| h.manifest()) {
            install::check_policy(&m, self.store.floor(&m.name)?, &self.config.target)?;
        }
        let keyring = self.keyring();
        let mut opts = VerifyOptions::new(&keyring);
        opts.expiry_slack =
            chrono::Duration::from_std(self.config.expiry_slack).unwrap_or(chrono::Duration::MAX);
        let verified = install::verify_into(bundle, staging, &opts)?;
        protocol::testing::crash_point("verified");
        let m = &verified.manifest;
        install::check_policy(m, self.store.floor(&m.name)?, &self.config.target)?;

        let old = self.store.model(&m.name)?;
        if let Some(old) = &old {
            if old.active.bundle_sha256 == verified.sha256 {
                return Ok(Installed {
                    model: m.name.clone(),
                    version: m.version.to_string(),
                    previous: old.previous.as_ref().map(|p| p.version.clone()),
                    already_active: true,
                    bundle_sha256: verified.sha256,
                    load_ms: 0.0,
                });
            }
        }
        let slot = SlotRef {
            dir: format!(
                "{}-{}-{}",
                m.version,
                &verified.sha256[..12],
                Utc::now().timestamp_micros()
            ),
            version: m.version.to_string(),
            security_version: m.security_version,
            bundle_sha256: verified.sha256.clone(),
            installed_at: Utc::now(),
        };
        install::expand_narrow_weights(staging, m)?;
        let slot_path = self.layout.commit_staging(staging, &m.name, &slot.dir)?;
        protocol::testing::crash_point("slot_written");
        let loaded = install::load_slot(
            &slot_path,
            m,
            self.config.backend.as_ref(),
            &self.engine_options(),
            false,
            self.shared(),
        );
        let (engine, load_time) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_dir_all(&slot_path);
                return Err(e);
            }
        };
        protocol::testing::crash_point("self_tested");

        // A trial needs something to revert to and a watch to judge it.
        let on_trial = old.is_some() && self.config.health_watch;
        let policy = self.config.trial.with_overrides(&m.health_policy);
        let record = ModelRecord {
            active: slot.clone(),
            previous: old.as_ref().map(|o| o.active.clone()),
            state: if on_trial {
                ModelState::Trial
            } else {
                ModelState::Committed
            },
            activated_at: Utc::now(),
        };
        let version = m.version.to_string();
        let detail = json!({"bundle_sha256": verified.sha256, "security_version": m.security_version,
                            "signed_by": verified.signed_by.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                            "previous": record.previous.as_ref().map(|p| p.version.clone()),
                            "load_ms": load_time.as_secs_f64() * 1e3,
                            "compute": engine.precision().name()});
        let mut activated = detail.clone();
        let mut events = vec![Event::new(
            "installed",
            Some(&m.name),
            Some(&version),
            detail,
        )];
        if on_trial {
            activated["trial"] = json!(policy);
            events.push(Event::new(
                "activated",
                Some(&m.name),
                Some(&version),
                activated,
            ));
        } else {
            events.push(Event::new(
                "activated",
                Some(&m.name),
                Some(&version),
                activated,
            ));
            let why = if old.is_none() {
                "first version of the model: nothing to revert to, no trial"
            } else {
                "health watch disabled: no trial"
            };
            events.push(Event::new(
                "committed",
                Some(&m.name),
                Some(&version),
                json!({"reason": why}),
            ));
        }
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| e.with_context(context))
            .collect();
        self.store
            .commit_model(&m.name, &record, m.security_version, &events)?;
        protocol::testing::crash_point("activated");
        let model = ServingModel {
            name: m.name.clone(),
            manifest: m.clone(),
            slot,
            engine,
            metrics: ModelMetrics::default(),
            health: Health::new(m, &self.health_options),
            load_time,
        };
        // Swap first, then take the replaced model's figures: they are final once it is out.
        let trial_of = on_trial.then(|| model.slot.clone());
        let replaced = self.registry.swap_in(Arc::new(model));
        self.flush_replaced(
            replaced.as_deref(),
            old.as_ref().map_or(ModelState::Committed, |r| r.state),
        );
        if let Some(slot) = trial_of {
            let reference = replaced
                .filter(|r| Some(&r.slot) == record.previous.as_ref())
                .map(|r| r.health.recent());
            self.trials.lock().expect("trials lock").insert(
                m.name.clone(),
                Trial {
                    slot,
                    started: Instant::now(),
                    reference,
                    policy,
                    context: context.clone(),
                },
            );
        } else {
            self.trials.lock().expect("trials lock").remove(&m.name);
        }
        // The slot that was previous until now is no longer referenced.
        if let Some(gone) = old.and_then(|o| o.previous) {
            let _ = fs::remove_dir_all(self.layout.slot(&m.name, &gone.dir));
        }
        Ok(Installed {
            model: m.name.clone(),
            version,
            previous: record.previous.map(|p| p.version),
            already_active: false,
            bundle_sha256: verified.sha256,
            load_ms: load_time.as_secs_f64() * 1e3,
        })
    }

    /// Switches `name` back to its previous slot, atomically, and records why.
    pub fn revert(
        &self,
        name: &str,
        reason: &str,
        evidence: serde_json::Value,
    ) -> Result<ModelStatus, AgentError> {
        self.revert_with(name, reason, evidence, &EventContext::default(), None)
    }

    /// [`Agent::revert`] on behalf of a fleet command (its ids go into the event); with
    /// `only_version`, only if that version is the active one (else [`AgentError::NotActive`]).
    pub fn revert_with(
        &self,
        name: &str,
        reason: &str,
        evidence: serde_json::Value,
        context: &EventContext,
        only_version: Option<&str>,
    ) -> Result<ModelStatus, AgentError> {
        let _one_at_a_time = self.change.lock().expect("install lock");
        let rec = self
            .store
            .model(name)?
            .ok_or_else(|| AgentError::NoSuchModel(name.into()))?;
        if let Some(v) = only_version {
            if rec.active.version != v {
                return Err(AgentError::NotActive {
                    model: name.into(),
                    version: v.into(),
                    active: rec.active.version.clone(),
                });
            }
        }
        self.revert_locked(name, rec, reason, evidence, context)
    }

    fn revert_locked(
        &self,
        name: &str,
        rec: ModelRecord,
        reason: &str,
        evidence: serde_json::Value,
        context: &EventContext,
    ) -> Result<ModelStatus, AgentError> {
        self.trials.lock().expect("trials lock").remove(name);
        let prev = rec
            .previous
            .clone()
            .ok_or_else(|| AgentError::NothingToRevert(name.into()))?;
        let model = self
            .load(name, &prev)
            .map_err(|source| AgentError::RevertFailed {
                model: name.into(),
                source,
            })?;
        let record = ModelRecord {
            active: prev.clone(),
            previous: None,
            state: ModelState::Reverted,
            activated_at: Utc::now(),
        };
        let event = Event::new(
            "reverted",
            Some(name),
            Some(&prev.version),
            json!({"from": rec.active.version, "to": prev.version, "reason": reason, "evidence": evidence}),
        )
        .with_context(context);
        self.store.commit_model(name, &record, 0, &[event])?;
        let replaced = self.registry.swap_in(Arc::new(model));
        self.flush_replaced(replaced.as_deref(), rec.state);
        let _ = fs::remove_dir_all(self.layout.slot(name, &rec.active.dir));
        Ok(self.model_status(name, &record))
    }

    fn model_status(&self, name: &str, rec: &ModelRecord) -> ModelStatus {
        let serving = self.registry.get(name).filter(|m| m.slot == rec.active);
        ModelStatus {
            compute: serving.as_ref().map(|m| m.engine.precision().name()),
            ..ModelStatus::of(name, rec, serving.is_some())
        }
    }

    pub fn status(&self) -> Result<Status, AgentError> {
        let models = self
            .store
            .models()?
            .iter()
            .map(|(n, r)| self.model_status(n, r))
            .collect();
        Ok(Status {
            target: self.config.target.clone(),
            backend: Some(self.config.backend.name()),
            agent_version: env!("CARGO_PKG_VERSION"),
            models,
        })
    }

    /// Status of a data directory whose agent is not running (reads the store only).
    pub fn read_status(data_dir: &std::path::Path) -> Result<Status, AgentError> {
        let store = Store::open(&Layout::new(data_dir).db())?;
        let models = store
            .models()?
            .into_iter()
            .map(|(name, rec)| ModelStatus::of(&name, &rec, false))
            .collect();
        Ok(Status {
            target: BUILD_TARGET.to_string(),
            backend: None,
            agent_version: env!("CARGO_PKG_VERSION"),
            models,
        })
    }

    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, AgentError> {
        Ok(self.store.events(after, limit)?)
    }

    /// Records events (e.g. the link's transfer progress); returns them with `seq` set.
    pub fn record(&self, events: &[Event]) -> Result<Vec<Event>, AgentError> {
        Ok(self.store.append(events)?)
    }

    /// Sees the newest event `seq` change on every install, activation, commit, revert or
    /// recorded event.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.subscribe()
    }

    /// The agent's database (the link keeps its transfer and cursor state there).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// The health watch's side of the agent: trials, their verdicts, label feedback.
impl Agent {
    fn start_trial(&self, model: &ServingModel, reference: Option<Acc>) {
        if !self.config.health_watch {
            return;
        }
        let policy = self
            .config
            .trial
            .with_overrides(&model.manifest.health_policy);
        self.trials.lock().expect("trials lock").insert(
            model.name.clone(),
            Trial {
                slot: model.slot.clone(),
                started: Instant::now(),
                reference,
                policy,
                context: EventContext::default(),
            },
        );
    }

    /// Models on trial now, with seconds on trial.
    pub fn on_trial(&self) -> Vec<(String, String, f64)> {
        self.trials
            .lock()
            .expect("trials lock")
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.slot.version.clone(),
                    t.started.elapsed().as_secs_f64(),
                )
            })
            .collect()
    }

    /// Judges every model on trial once: reverts a regressed one, commits one that passed.
    /// The watch thread calls this every `watch_tick`; returns the verdicts acted on.
    pub fn judge_trials(&self) -> Vec<(String, Verdict)> {
        let due: Vec<(String, Verdict, SlotRef)> = {
            let trials = self.trials.lock().expect("trials lock");
            trials
                .iter()
                .filter_map(|(name, t)| {
                    let model = self.registry.get(name)?;
                    if model.slot != t.slot {
                        return None;
                    }
                    let verdict = health::judge(
                        &model.health.recent(),
                        t.reference.as_ref(),
                        &model.manifest.baseline,
                        &t.policy,
                        t.started.elapsed(),
                    );
                    (verdict != Verdict::Continue).then(|| (name.clone(), verdict, t.slot.clone()))
                })
                .collect()
        };
        let mut acted = Vec::new();
        for (name, verdict, slot) in due {
            let result = match &verdict {
                Verdict::Breach { reason, evidence } => {
                    self.end_trial(&name, &slot, Some((reason, evidence.clone())))
                }
                Verdict::Pass(_) => self.end_trial(&name, &slot, None).inspect(|&done| {
                    if done {
                        tracing::info!(model = %name, version = %slot.version, "trial passed: committed");
                    }
                }),
                Verdict::Continue => Ok(false),
            };
            match result {
                Ok(true) => acted.push((name, verdict)),
                Ok(false) => {}
                Err(e) => tracing::error!(model = %name, "health watch could not act: {e}"),
            }
        }
        acted
    }

    /// Commits (`breach = None`) or reverts the trial of `slot`, if it is still the active,
    /// on-trial slot of `name`. Returns whether it acted.
    fn end_trial(
        &self,
        name: &str,
        slot: &SlotRef,
        breach: Option<(&String, serde_json::Value)>,
    ) -> Result<bool, AgentError> {
        let _one_at_a_time = self.change.lock().expect("install lock");
        let Some(rec) = self.store.model(name)? else {
            return Ok(false);
        };
        let context = self
            .trials
            .lock()
            .expect("trials lock")
            .get(name)
            .map(|t| t.context.clone())
            .unwrap_or_default();
        if &rec.active != slot || rec.state != ModelState::Trial {
            self.trials.lock().expect("trials lock").remove(name);
            return Ok(false);
        }
        match breach {
            Some((reason, evidence)) => {
                tracing::warn!(model = %name, version = %slot.version, %reason, "trial failed: reverting");
                let mut evidence = evidence;
                evidence["automatic"] = json!(true);
                self.revert_locked(name, rec, reason, evidence, &context)?;
            }
            None => {
                let figures = self.trial_figures(name);
                let record = ModelRecord {
                    state: ModelState::Committed,
                    ..rec
                };
                let event = Event::new("committed", Some(name), Some(&slot.version), figures)
                    .with_context(&context);
                self.store.commit_model(name, &record, 0, &[event])?;
                self.trials.lock().expect("trials lock").remove(name);
            }
        }
        Ok(true)
    }

    fn trial_figures(&self, name: &str) -> serde_json::Value {
        let trials = self.trials.lock().expect("trials lock");
        match (trials.get(name), self.registry.get(name)) {
            (Some(t), Some(m)) => {
                json!({"reason": "trial passed",
                       "elapsed_seconds": t.started.elapsed().as_secs_f64(),
                       "figures": health::figures(&m.health.recent(), t.reference.as_ref()
                            .filter(|r| r.requests >= t.policy.min_reference_requests),
                            &m.manifest.baseline),
                       "policy": t.policy})
            }
            _ => json!({"reason": "trial passed"}),
        }
    }

    /// Closes the telemetry window of every served model: a window record per model that served
    /// requests, plus its sampled records, appended to the outbox in one transaction.
    /// The watch thread calls this every `telemetry_window`. Returns how many records it wrote.
    pub fn flush_telemetry(&self) -> Result<usize, AgentError> {
        let states: HashMap<String, ModelRecord> = self.store.models()?.into_iter().collect();
        let dropped = self.outbox.dropped()?;
        let mut records = Vec::new();
        for m in self.registry.all() {
            let state = match states.get(&m.name) {
                Some(r) if r.active == m.slot => r.state,
                _ => ModelState::Committed,
            };
            records.extend(telemetry_of(&m, state, dropped));
        }
        self.push_telemetry(&records)?;
        Ok(records.len())
    }

    /// Appends records to the outbox and counts the windows among them.
    fn push_telemetry(
        &self,
        records: &[protocol::telemetry::TelemetryRecord],
    ) -> Result<(), StoreError> {
        self.outbox.push(records)?;
        let mut written = self.windows_written.lock().expect("windows lock");
        for r in records {
            if let protocol::telemetry::TelemetryRecord::Window(w) = r {
                *written
                    .entry((w.model.clone(), w.version.clone()))
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    /// Telemetry window records written to the outbox since start, by (model, version).
    pub fn windows_written(&self) -> BTreeMap<(String, String), u64> {
        self.windows_written.lock().expect("windows lock").clone()
    }

    /// Closes the telemetry window of a model just swapped out (it was in `state`): its last
    /// figures — for a reverted trial, the very evidence of the regression — are reported now,
    /// not dropped with it. (A request still finishing on it after this is not counted.)
    fn flush_replaced(&self, replaced: Option<&ServingModel>, state: ModelState) {
        let Some(m) = replaced else { return };
        let records = self
            .outbox
            .dropped()
            .map(|dropped| telemetry_of(m, state, dropped));
        if let Err(e) = records.and_then(|r| self.push_telemetry(&r)) {
            tracing::error!(model = %m.name, "telemetry of the replaced version lost: {e}");
        }
    }

    /// Label feedback: ground truth for earlier requests (by OIP request id) of `name`.
    /// Returns how many ids matched a remembered prediction and how many were correct.
    pub fn feedback(
        &self,
        name: &str,
        labels: &[(String, usize)],
    ) -> Result<(u64, u64), AgentError> {
        let model = self
            .registry
            .get(name)
            .ok_or_else(|| AgentError::NoSuchModel(name.into()))?;
        Ok(model.health.feedback(labels))
    }
}

/// The telemetry of `m` since its last window: the window record (if it served anything or
/// dropped samples) and the sampled requests.
fn telemetry_of(
    m: &ServingModel,
    state: ModelState,
    dropped: u64,
) -> Vec<protocol::telemetry::TelemetryRecord> {
    use protocol::telemetry::*;
    let mut records = Vec::new();
    let (start, w) = m.health.take_window();
    let (samples, over_budget) = m.health.take_samples();
    if w.requests > 0 || over_budget > 0 {
        let b = &m.manifest.baseline;
        let classification = (!w.classes.is_empty()).then(|| ClassificationWindow {
            class_counts: w.classes.clone(),
            confidence: w.confidence.clone(),
            mean_confidence: w.mean_confidence(),
            prediction_psi_baseline: b.classification.as_ref().filter(|_| w.rows > 0).map(|c| {
                protocol::stats::psi_of_fractions(
                    c.class_distribution.iter().copied(),
                    w.classes.iter().map(|&n| n as f64 / w.rows as f64),
                )
            }),
        });
        let regression = b.regression.as_ref().map(|_| RegressionWindow {
            statistic: w.statistic.clone(),
            mean: w.statistic_mean_std().map(|s| s.0),
            std: w.statistic_mean_std().map(|s| s.1),
        });
        records.push(TelemetryRecord::Window(WindowRecord {
            schema: TELEMETRY_SCHEMA,
            model: m.name.clone(),
            version: m.version().to_string(),
            start,
            end: Utc::now(),
            state: serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            requests: w.requests,
            errors: w.errors,
            non_finite: w.non_finite,
            latency: LatencyWindow {
                log10_us: w.latency.clone(),
                mean_ms: (w.requests > 0).then(|| w.latency_sum_us / w.requests as f64 / 1e3),
                p50_ms: w.latency_ms(0.5),
                p95_ms: w.latency_ms(0.95),
                p99_ms: w.latency_ms(0.99),
            },
            classification,
            regression,
            input_psi: health::input_psi(&w, b).into_iter().collect(),
            feedback: (w.labelled > 0).then(|| FeedbackWindow {
                labelled: w.labelled,
                correct: w.correct,
                accuracy: w.accuracy(),
            }),
            samples_over_budget: over_budget,
            outbox_dropped_total: dropped,
        }));
    }
    records.extend(samples.into_iter().map(TelemetryRecord::Sample));
    records
}

/// Best-effort name and version of a bundle for a `rejected` event (the bundle may be garbage).
fn peek_name_version(bundle: &[u8]) -> (Option<String>, Option<String>) {
    match read_head(&mut &bundle[..], &Limits::default())
        .ok()
        .map(|h| h.manifest_bytes)
    {
        Some(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            (
                v["name"].as_str().map(str::to_string),
                v["version"].as_str().map(str::to_string),
            )
        }
        None => (None, None),
    }
}
