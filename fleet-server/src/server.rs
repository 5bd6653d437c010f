//! Putting it together: [`Server::start`] opens the data directory, starts (or connects to) the
//! broker, runs the MQTT session and serves HTTP; [`RunningServer`] reports the addresses and
//! shuts everything down.

use crate::rollout::driver::Rollouts;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::keys::Keyring;
use protocol::link::{LinkError, Topics};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{Role, TokenLine};
use crate::broker::{BrokerError, EmbeddedBroker};
use crate::bulk::{self, BulkError, BulkPlan, BulkSettings, OnMain};
use crate::bundles::{BundleFileError, BundleFiles};
use crate::fleet::{Fleet, FleetError};
use crate::http::limit::AuthFailureLimit;
use crate::keyring::{FleetKeyring, KeyringError};
use crate::mqtt::{self, BrokerConnection, MqttError};
use crate::server_key::{self, ServerKeyError};
use crate::store::{Store, StoreError};

/// Which broker the server uses.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Start the embedded rumqttd broker on this address (port 0: a free port).
    Embedded(SocketAddr),
    /// Connect to an external broker.
    External(BrokerConnection),
}

/// Everything `fleet-server run` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Keys trusted to sign bundles (the `--keyring` file; rotations accepted since are stored in
    /// the data directory and applied on top).
    pub keyring: Keyring,
    /// HTTP listen address (port 0: a free port).
    pub listen: SocketAddr,
    /// Base URL agents reach the HTTP API at (for `http_url` in stage commands);
    /// default `http://{bound address}`.
    pub public_url: Option<String>,
    pub broker: BrokerChoice,
    pub topic_prefix: String,
    /// Tokens from a token file; `None` to use stored tokens (generating an admin token on the
    /// first start).
    pub tokens: Option<Vec<TokenLine>>,
    /// Subscribe telemetry as `$share/{group}/…` so several servers split it.
    pub shared_subscription: Option<String>,
    /// MQTT client id; default `fleet-server-<hash of the data directory>`.
    pub client_id: Option<String>,
    /// How long `start` waits for the MQTT subscriptions to be acknowledged before returning
    /// anyway (the session keeps reconnecting in the background).
    pub wait_for_broker: Duration,
    /// How often the rollout engine looks at the fleet (default 1 s).
    pub rollout_tick: Duration,
    /// How long a running rollout waits for a staged device to answer its stage command before
    /// publishing the same command again (default 30 s; see `rollout::driver`).
    pub stage_resend_after: Duration,
    /// Failed authentications per client address before the API answers 429.
    pub auth_failure_limit: AuthFailureLimit,
    /// The secret key commands are signed with; default `DATA_DIR/server.key`, generated on the
    /// first start (`DATA_DIR/server.pub` is its public half, for agents).
    pub server_key: Option<PathBuf>,
    /// How long a command stays valid (default 1 hour): a device that receives it later refuses it.
    pub command_ttl: Duration,
    /// The chunk size stage commands name (default 64 KiB, at most
    /// [`protocol::link::MAX_CHUNK_SIZE`]): smaller for brokers with a smaller message cap.
    pub chunk_size: u32,
    /// The publish-only connection chunk frames take (default: on, client id
    /// `{client_id}-bulk`; under mutual TLS only with its own certificate), see [`crate::bulk`].
    pub bulk: BulkSettings,
    /// How much device telemetry is kept in memory (see [`crate::telemetry`]).
    pub telemetry: crate::telemetry::Retention,
}

impl ServerConfig {
    /// Defaults: HTTP and an embedded broker on free loopback ports, the default topic prefix,
    /// stored tokens.
    pub fn new(data_dir: impl Into<PathBuf>, keyring: Keyring) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            keyring,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: None,
            broker: BrokerChoice::Embedded(SocketAddr::from(([127, 0, 0, 1], 0))),
            topic_prefix: protocol::link::DEFAULT_PREFIX.to_string(),
            tokens: None,
            shared_subscription: None,
            client_id: None,
            wait_for_broker: Duration::from_secs(10),
            rollout_tick: Duration::from_secs(1),
            stage_resend_after: crate::rollout::driver::DEFAULT_STAGE_RESEND_AFTER,
            auth_failure_limit: AuthFailureLimit::default(),
            server_key: None,
            command_ttl: Duration::from_secs(
                protocol::command_auth::DEFAULT_COMMAND_TTL_SECONDS as u64,
            ),
            chunk_size: protocol::link::DEFAULT_CHUNK_SIZE,
            bulk: BulkSettings::default(),
            telemetry: crate::telemetry::Retention::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] BundleFileError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Bulk(#[from] BulkError),
    #[error(transparent)]
    Topics(#[from] LinkError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    ServerKey(#[from] ServerKeyError),
    #[error("chunk size {0}: use 1 to {max} bytes", max = protocol::link::MAX_CHUNK_SIZE)]
    ChunkSize(u32),
    #[error(transparent)]
    Rotation(#[from] KeyringError),
    #[error("cannot read keyring {path}: {reason}")]
    Keyring { path: String, reason: String },
}

/// Reads a keyring file (one public key per line, as `bundler keygen` writes `NAME.pub`).
pub fn load_keyring(path: &Path) -> Result<Keyring, ServerError> {
    let err = |reason: String| ServerError::Keyring {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let ring = Keyring::from_file_text(&text).map_err(|e| err(e.to_string()))?;
    if ring.is_empty() {
        return Err(err("no keys in the file".into()));
    }
    Ok(ring)
}

pub struct Server;

impl Server {
    /// Starts the server and returns once HTTP is listening and the MQTT subscriptions are
    /// acknowledged (or `wait_for_broker` passed).
    pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
        if config.chunk_size == 0 || config.chunk_size > protocol::link::MAX_CHUNK_SIZE {
            return Err(ServerError::ChunkSize(config.chunk_size));
        }
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let store = open_store(&data_dir.join("server.redb")).await?;
        let files = BundleFiles::open(&data_dir.join("bundles"))?;
        let server_key = server_key::load_or_generate(data_dir, config.server_key.as_deref())?;
        let keyring = FleetKeyring::open(config.keyring.clone(), data_dir)?;
        let topics = Topics::new(&config.topic_prefix)?;

        let (broker, connection) = match &config.broker {
            BrokerChoice::Embedded(addr) => {
                let addr = *addr;
                let b = tokio::task::spawn_blocking(move || EmbeddedBroker::start(addr))
                    .await
                    .map_err(|e| BrokerError::Start(e.to_string()))??;
                let conn = BrokerConnection::plain(b.url());
                (Some(b), conn)
            }
            BrokerChoice::External(conn) => (None, conn.clone()),
        };
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| default_client_id(data_dir));
        let bulk_plan = bulk::plan(&connection, &config.bulk)?;
        let mut opts = mqtt::options(&connection, &client_id)?;
        if config.shared_subscription.is_none() {
            opts.set_last_will(rumqttc::LastWill::new(
                topics.server(),
                protocol::link::encode(&protocol::link::ServerPresence::new(false)),
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) =
            rumqttc::AsyncClient::new(opts.clone(), opts.request_channel_capacity());
        // Acknowledgements and error frames are small writes a device waits on: no Nagle delay.
        eventloop.network_options.set_tcp_nodelay(true);

        let file_tokens = config
            .tokens
            .iter()
            .flatten()
            .map(|t| (t.name.clone(), t.role, crate::auth::hash_secret(&t.secret)))
            .collect();
        let fleet = Arc::new(Fleet::new(
            store,
            files,
            keyring,
            topics.clone(),
            client.clone(),
            file_tokens,
            server_key,
            chrono::Duration::from_std(config.command_ttl).unwrap_or(chrono::Duration::MAX),
            config.chunk_size,
            config.telemetry,
        )?);
        let admin_token = if config.tokens.is_none() && fleet.store.tokens()?.is_empty() {
            Some(fleet.create_token("admin", Role::Admin, "server")?)
        } else {
            None
        };

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let http_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        fleet.set_http_base(
            config
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{http_addr}"))
                .trim_end_matches('/')
                .to_string(),
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let bulk_task = match bulk_plan {
            BulkPlan::Connect(conn) => {
                let opts = bulk::options(&conn, &client_id)?;
                let (bulk_client, bulk_loop) =
                    rumqttc::AsyncClient::new(opts.clone(), opts.request_channel_capacity());
                fleet.bulk.set_client(bulk_client);
                Some(tokio::spawn(bulk::run(
                    fleet.clone(),
                    bulk_loop,
                    stop_rx.clone(),
                )))
            }
            BulkPlan::Main(OnMain::Disabled) => {
                tracing::info!("no bulk connection (--no-bulk-connection): chunk frames go on the main MQTT connection at QoS 1");
                None
            }
            BulkPlan::Main(OnMain::NoBulkIdentity) => {
                tracing::warn!("mutual TLS without --bulk-client-cert/--bulk-client-key: chunk frames go on the main MQTT connection at QoS 1, where they queue in front of chunk requests (a bulk connection needs a certificate identity of its own, see docs/protocol.md)");
                None
            }
        };
        let filters = mqtt::subscriptions(&topics, config.shared_subscription.as_deref());
        let mqtt_task = tokio::spawn(mqtt::run(
            fleet.clone(),
            client,
            eventloop,
            filters,
            stop_rx.clone(),
        ));
        let rollouts = Arc::new(Rollouts::new(fleet.clone(), config.stage_resend_after));
        let rollout_task = rollouts.clone().spawn(config.rollout_tick);
        let router = crate::http::router_until(
            fleet.clone(),
            rollouts.clone(),
            stop_rx.clone(),
            config.auth_failure_limit,
        )
        .into_make_service_with_connect_info::<SocketAddr>();
        let mut http_stop = stop_rx;
        let http_task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = http_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });

        let deadline = Instant::now() + config.wait_for_broker;
        while !fleet.mqtt_subscribed.load(Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !fleet.mqtt_subscribed.load(Relaxed) {
            tracing::warn!(broker = %connection.url, "not connected to the MQTT broker yet; retrying in the background");
        }
        Ok(RunningServer {
            fleet,
            http_addr,
            broker_url: connection.url,
            broker,
            admin_token,
            stop: stop_tx,
            rollouts,
            rollout_task,
            tasks: [mqtt_task, http_task]
                .into_iter()
                .chain(bulk_task)
                .collect(),
        })
    }
}

async fn open_store(path: &Path) -> Result<Store, StoreError> {
    // A server shut down in this process a moment ago may still be closing its database.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(path) {
            Err(StoreError::Locked) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

fn default_client_id(data_dir: &Path) -> String {
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = protocol::link::sha256_hex(canonical.to_string_lossy().as_bytes());
    format!("fleet-server-{}", &hash[..12])
}

/// A running server.
pub struct RunningServer {
    fleet: Arc<Fleet>,
    http_addr: SocketAddr,
    broker_url: String,
    broker: Option<EmbeddedBroker>,
    admin_token: Option<String>,
    stop: watch::Sender<bool>,
    rollouts: Arc<Rollouts>,
    rollout_task: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// The address the HTTP API listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://ADDR`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The broker URL agents should use (the embedded broker's, or the external one).
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// The embedded broker, when the server started one.
    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// The admin token generated at this start (first start without a token file), if any.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The rollouts, for in-process callers.
    pub fn rollouts(&self) -> &Arc<Rollouts> {
        &self.rollouts
    }

    /// The public key agents must be given to obey this server's commands.
    pub fn server_public_key(&self) -> protocol::keys::PublicKey {
        self.fleet.server_public_key()
    }

    /// The fleet, for in-process callers (the rollout engine, tests).
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Stops HTTP and the MQTT session and closes the database. The embedded broker (if any)
    /// keeps running until the process exits: rumqttd has no shutdown.
    pub async fn shutdown(self) {
        self.rollout_task.abort();
        let _ = self.rollout_task.await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.fleet);
    }
}
