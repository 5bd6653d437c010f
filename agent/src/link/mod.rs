//! The device's MQTT link to the fleet: presence, commands, bundle transfer, events, telemetry.
//!
//! [`Link::start`] connects an [`Agent`] to a broker and returns a [`LinkHandle`]; the agent keeps
//! serving whatever happens to the link. The topics and messages are `protocol::link`'s
//! (`docs/protocol.md`).
//!
//! # Design
//! One tokio task (`session`) owns the MQTT session: it reads rumqttc's event loop, receives
//! commands and chunk frames, and is the only one that publishes, so it can map packet ids to
//! what they carried ([`acks`]) and delete telemetry, advance the event cursor or count a chunk
//! request only on the broker's PUBACK. Everything it must not do on the event loop — installing
//! a bundle (verify, load, self-test), downloading over HTTP — runs on blocking threads that
//! report through the agent's store (events) and a channel.
//!
//! - Session: client id = device id, persistent session (`clean_session = false`), keep-alive,
//!   retained [`protocol::link::DeviceStatus`] on every connect and whenever a model changes,
//!   the last will marks the device offline; reconnects with jittered exponential backoff
//!   ([`backoff`]). On a connection loss the link drops rumqttc's pending retransmissions and
//!   re-sends from its own durable state instead (event cursor, outbox, bitmap), so it behaves the
//!   same whether or not the broker kept the session.
//! - Events: the agent's event log, published in `seq` order from a cursor persisted in
//!   `agent.redb` that advances only over acknowledged events ([`event_pump`]).
//! - Telemetry: the outbox drained with QoS 1, records deleted only once acknowledged
//!   ([`telemetry_pump`]).
//! - Transfer: on `stage`, chunks are requested by index range with a bounded window and
//!   re-requested on timeout or a bad hash, written at their offset in a partial file whose
//!   received-chunk bitmap is kept in `agent.redb` (never ahead of what is fsynced), so a transfer
//!   resumes after a broker outage, a restart or a power cut ([`transfer`]); or fetched over HTTP
//!   with Range requests ([`http_fetch`]). The complete file must hash to the bundle id, then goes
//!   through [`Agent::install_with`] on a blocking thread. Over MQTT the session task only checks
//!   and writes chunks; each transfer's disk work — checkpoint syncs, progress events, a running
//!   hash of the chunks in order, then the hash check and install — runs on its own thread
//!   ([`transfer_worker`]), so requests for the next chunks go out while the disk works.
//! - Robustness: malformed messages, unknown transfers, bad chunks are logged and counted
//!   ([`metrics`], on the agent's `/metrics`), never fatal.
//!
//! # Modules
//! - [`connect`]: broker URL, rustls configuration, MQTT options.
//! - `session`: the task owning the session (commands, chunks, acks, pumps, goodbye).
//! - [`command_check`]: commands obeyed only if signed by the server key, for this device,
//!   unexpired and new ([`replay`]: the `seq` memory in `agent.redb`); refusals counted and recorded.
//! - [`acks`]: packet id → published item, for QoS 1 acknowledgements.
//! - [`transfer`]: bitmap, partial file, request window, checkpoints, the final hash + install.
//! - [`transfer_worker`]: an MQTT transfer's disk thread (syncs, progress events, running hash, end).
//! - [`http_fetch`]: the HTTP Range transport.
//! - [`event_pump`], [`telemetry_pump`]: what to publish next and what was acknowledged.
//! - [`status`]: the retained status message.
//! - [`backoff`], [`metrics`].

pub mod acks;
pub mod backoff;
pub mod command_check;
pub mod connect;
pub mod event_pump;
pub mod http_fetch;
pub mod metrics;
pub mod replay;
mod session;
pub mod status;
pub mod telemetry_pump;
pub mod transfer;
pub mod transfer_worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use protocol::keys::PublicKey;
use protocol::link::{check_device_id, Topics, DEFAULT_CHUNK_SIZE, DEFAULT_PREFIX};

use crate::agent::Agent;
use crate::store::StoreError;

pub use metrics::LinkMetrics;

/// How bundles are fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// Chunks over the request/reply topics.
    #[default]
    Mqtt,
    /// HTTP Range requests to the command's `http_url`.
    Http,
}

impl std::str::FromStr for TransferMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TransferMode, String> {
        match s {
            "mqtt" => Ok(TransferMode::Mqtt),
            "http" => Ok(TransferMode::Http),
            other => Err(format!("transfer '{other}': use mqtt or http")),
        }
    }
}

/// PEM files for `mqtts://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate chain and key for mutual TLS (both or neither).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Settings of a device's link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub broker_url: String,
    /// Topic level, MQTT client id and file name: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub device_id: String,
    /// Reported in the status; the server selects devices by them.
    pub labels: BTreeMap<String, String>,
    /// Required for `mqtts://`.
    pub tls: Option<TlsFiles>,
    /// Topic prefix (default `modelfleet/v1`).
    pub prefix: String,
    /// Chunk size used when a stage command does not name one (default 64 KiB).
    pub chunk_size: u32,
    pub transfer: TransferMode,
    /// MQTT keep-alive (default 10 s): how soon the broker notices a dead device.
    pub keep_alive: Duration,
    /// Chunks requested and not yet received, at most (default 32).
    pub window: u32,
    /// A requested chunk that has not arrived after this long is asked for again (default 10 s).
    pub request_timeout: Duration,
    /// Reconnection backoff: first delay and cap (defaults 0.5 s and 30 s, ±50 % jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Telemetry records published and not yet acknowledged, at most (default 32).
    pub telemetry_window: usize,
    /// The fleet server's public key: only commands it signed are obeyed. Without one, every
    /// command is refused (`no_server_key`).
    pub server_key: Option<PublicKey>,
    /// How often the link looks at timeouts, checkpoints and the telemetry outbox (default
    /// 100 ms; a simulated fleet of thousands of devices uses 1 s).
    pub tick: Duration,
}

impl LinkConfig {
    pub fn new(broker_url: impl Into<String>, device_id: impl Into<String>) -> LinkConfig {
        LinkConfig {
            broker_url: broker_url.into(),
            device_id: device_id.into(),
            labels: BTreeMap::new(),
            tls: None,
            prefix: DEFAULT_PREFIX.to_string(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            transfer: TransferMode::Mqtt,
            keep_alive: Duration::from_secs(10),
            window: 32,
            request_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            telemetry_window: 32,
            server_key: None,
            tick: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("broker URL '{url}': {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    Protocol(#[from] protocol::link::LinkError),
    #[error("TLS file {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the link needs a tokio runtime: call Link::start from inside one")]
    NoRuntime,
}

/// Starts links.
pub struct Link;

impl Link {
    /// Checks the configuration (device id, prefix, broker URL, TLS files), then spawns the
    /// session task on the current tokio runtime and returns at once; the task connects (and
    /// reconnects) in the background. Transfers stored by an earlier run resume.
    pub fn start(agent: Arc<Agent>, config: LinkConfig) -> Result<LinkHandle, LinkError> {
        check_device_id(&config.device_id)?;
        let topics = Topics::new(&config.prefix)?;
        let options = connect::mqtt_options(&config, &topics)?;
        if config.server_key.is_none() {
            tracing::warn!(device = %config.device_id, "no server key: every command will be refused");
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
        let connected = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let session = session::Session::new(agent, config, topics, options, connected.clone())?;
        let task = runtime.spawn(session.run(stop_rx));
        Ok(LinkHandle {
            stop: Some(stop_tx),
            task: Some(task),
            connected,
        })
    }
}

/// A running link. [`LinkHandle::shutdown`] says goodbye; dropping the handle (or
/// [`LinkHandle::abort`]) stops the session without one, as a crash or power cut would — the
/// broker then publishes the last will.
pub struct LinkHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    connected: Arc<AtomicBool>,
}

impl LinkHandle {
    /// Checkpoints transfers, deletes acknowledged telemetry, publishes a retained status with
    /// `online: false`, waits (up to a few seconds) for the broker to acknowledge it, and
    /// disconnects cleanly (no last will). Returns when the session task has ended.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops the session task at once, without goodbye or final checkpoint (the connection just
    /// drops), and returns once the task — and its reference to the agent — is gone.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Connected to the broker right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
