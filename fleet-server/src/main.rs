//! `fleet-server`: the modelfleet control plane CLI.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use fleet_server::broker::{BrokerTls, EmbeddedBroker};
use fleet_server::{load_keyring, BrokerChoice, BrokerConnection, Server, ServerConfig};

#[derive(Parser)]
#[command(
    name = "fleet-server",
    version,
    about = "modelfleet control plane: device registry, bundle store, MQTT link, HTTP API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (with the embedded broker unless --broker is given).
    Run(RunArgs),
    /// Run the embedded MQTT broker alone.
    Broker {
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
        /// Serve TLS with this certificate chain (PEM) ...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ... and this private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Write the Mosquitto ACL that confines every device to its own topics (docs/security.md).
    MosquittoAcl {
        #[arg(long, default_value = protocol::link::DEFAULT_PREFIX)]
        topic_prefix: String,
        /// Username (certificate CN) of a fleet server: reads and writes every device topic.
        #[arg(long = "server-identity", default_values_t = [fleet_server::isolation::SERVER_IDENTITY.to_string()])]
        servers: Vec<String>,
        /// Username (certificate CN) of a fleet server's bulk connection: may only publish chunk
        /// frames, on every device's transfer/chunk topic (repeatable; one per server).
        #[arg(long = "bulk-identity", default_values_t = [fleet_server::bulk::BULK_IDENTITY.to_string()])]
        bulk: Vec<String>,
        /// Username allowed to read every device's telemetry (repeatable).
        #[arg(long = "telemetry-reader")]
        readers: Vec<String>,
        /// Write here (temp file + rename) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue a device's client certificate (CN = device id) from the fleet CA in --ca-dir,
    /// creating the CA on first use. Writes OUT/ID.pem, OUT/ID.key and OUT/ca.pem.
    IssueDeviceCert {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        device_id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a client certificate for a non-device identity (the fleet server, a telemetry
    /// reader) from the fleet CA.
    IssueIdentityCert {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = fleet_server::isolation::SERVER_IDENTITY)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue the broker's server certificate (OUT/broker.pem, OUT/broker.key) from the fleet CA.
    IssueBrokerCert {
        #[arg(long)]
        ca_dir: PathBuf,
        /// DNS name or IP address devices reach the broker at (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Public keys trusted to sign bundles.
    #[arg(long)]
    keyring: PathBuf,
    /// HTTP listen address (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Base URL agents reach the API at (default: http://LISTEN-ADDRESS).
    #[arg(long)]
    public_url: Option<String>,
    /// Start the embedded broker on this address (the default, on 127.0.0.1:1883).
    #[arg(long, conflicts_with = "broker")]
    embedded_broker: Option<SocketAddr>,
    /// Use an external broker: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long)]
    broker: Option<String>,
    /// CA certificate(s) (PEM) trusted for mqtts://.
    #[arg(long, requires = "broker")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Keep chunk frames on the main MQTT connection (QoS 1) instead of a second,
    /// publish-only connection (client id CLIENT_ID-bulk, QoS 0).
    #[arg(long)]
    no_bulk_connection: bool,
    /// Client certificate (PEM) of the bulk connection under mutual TLS: an identity of its own
    /// (e.g. fleet-server-bulk@fleet). Without it, under mutual TLS, chunk frames stay on the
    /// main connection.
    #[arg(
        long,
        requires = "bulk_client_key",
        conflicts_with = "no_bulk_connection"
    )]
    bulk_client_cert: Option<PathBuf>,
    /// Private key (PEM) of the bulk connection's certificate.
    #[arg(long, requires = "bulk_client_cert")]
    bulk_client_key: Option<PathBuf>,
    #[arg(long, default_value = protocol::link::DEFAULT_PREFIX)]
    topic_prefix: String,
    /// Token file: lines `NAME ROLE SECRET` (role viewer|operator|admin).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Subscribe telemetry as $share/GROUP/... so several servers split it.
    #[arg(long)]
    shared_subscription: Option<String>,
    /// MQTT client id (default: fleet-server-<hash of the data directory>).
    #[arg(long)]
    client_id: Option<String>,
    /// Secret key commands are signed with (default: DATA_DIR/server.key, generated on the
    /// first start). Agents get its public half, DATA_DIR/server.pub, as --server-key.
    #[arg(long, value_name = "FILE.key")]
    server_key: Option<PathBuf>,
    /// Seconds a command stays valid; devices refuse it afterwards.
    #[arg(long, default_value_t = protocol::command_auth::DEFAULT_COMMAND_TTL_SECONDS as u64)]
    command_ttl: u64,
    /// Seconds a running rollout waits for a staged device to answer its stage command before
    /// publishing the same signed command again.
    #[arg(long, default_value_t = fleet_server::rollout::driver::DEFAULT_STAGE_RESEND_AFTER.as_secs())]
    stage_resend_after: u64,
    /// Telemetry windows kept in memory over the whole fleet (each ≈ 1–1.6 KB); each device,
    /// model and version keeps its newest share of them. The rollout gates judge a bake on the
    /// windows still held.
    #[arg(long, default_value_t = fleet_server::telemetry::Retention::default().max_windows_total)]
    telemetry_max_windows: usize,
    /// Bytes per chunk of a bundle sent over MQTT (at most 1 MiB; keep it under the broker's
    /// message size limit)
    #[arg(long, default_value_t = protocol::link::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
}

fn init_tracing() {
    // rumqttd logs every connect and disconnect at info/error: quiet unless RUST_LOG asks.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Broker {
            listen,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert_pem, key_pem)| BrokerTls { cert_pem, key_pem });
            let broker = EmbeddedBroker::start_with(listen, tls).context("starting the broker")?;
            say(&format!("broker {}", broker.url()));
            loop {
                std::thread::park();
            }
        }
        Command::MosquittoAcl {
            topic_prefix,
            servers,
            bulk,
            readers,
            out,
        } => {
            let topics = protocol::link::Topics::new(&topic_prefix)?;
            let acl = fleet_server::isolation::mosquitto_acl(&topics, &servers, &bulk, &readers)?;
            match out {
                None => print!("{acl}"),
                Some(path) => {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, acl)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("writing {}", path.display()))?;
                    say(&format!("wrote {}", path.display()));
                }
            }
            Ok(())
        }
        Command::IssueDeviceCert {
            ca_dir,
            device_id,
            out,
        } => {
            let issued = fleet_server::pki::issue_device_cert(&ca_dir, &device_id, &out)?;
            print_issued(&issued);
            Ok(())
        }
        Command::IssueIdentityCert { ca_dir, name, out } => {
            let issued = fleet_server::pki::issue_identity_cert(&ca_dir, &name, &out)?;
            print_issued(&issued);
            Ok(())
        }
        Command::IssueBrokerCert { ca_dir, names, out } => {
            let issued = fleet_server::pki::issue_server_cert(&ca_dir, &names, &out)?;
            print_issued(&issued);
            Ok(())
        }
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(run(args))
        }
    }
}

fn print_issued(issued: &fleet_server::pki::Issued) {
    say(&format!("certificate {}", issued.cert.display()));
    say(&format!("key {}", issued.key.display()));
    say(&format!("ca {}", issued.ca.display()));
}

async fn run(args: RunArgs) -> Result<()> {
    let keyring = load_keyring(&args.keyring)?;
    let tokens = match &args.tokens {
        Some(path) => Some(fleet_server::auth::read_token_file(path)?),
        None => None,
    };
    let broker = match (&args.broker, args.embedded_broker) {
        (Some(url), _) => BrokerChoice::External(BrokerConnection {
            url: url.clone(),
            ca_file: args.ca_file.clone(),
            client_cert: args.client_cert.clone(),
            client_key: args.client_key.clone(),
        }),
        (None, Some(addr)) => BrokerChoice::Embedded(addr),
        (None, None) => BrokerChoice::Embedded(SocketAddr::from(([127, 0, 0, 1], 1883))),
    };
    if (args.client_cert.is_some() || args.bulk_client_cert.is_some()) && args.broker.is_none() {
        bail!("--client-cert and --bulk-client-cert need --broker mqtts://...");
    }
    let mut config = ServerConfig::new(&args.data_dir, keyring);
    config.listen = args.listen;
    config.public_url = args.public_url;
    config.broker = broker;
    config.topic_prefix = args.topic_prefix;
    config.tokens = tokens;
    config.shared_subscription = args.shared_subscription;
    config.client_id = args.client_id;
    config.server_key = args.server_key;
    config.command_ttl = std::time::Duration::from_secs(args.command_ttl.max(1));
    config.stage_resend_after = std::time::Duration::from_secs(args.stage_resend_after.max(1));
    config.telemetry.max_windows_total = args.telemetry_max_windows.max(1);
    config.chunk_size = args.chunk_size;
    config.bulk = fleet_server::BulkSettings {
        enabled: !args.no_bulk_connection,
        client_cert: args.bulk_client_cert,
        client_key: args.bulk_client_key,
    };
    let server = Server::start(config).await.context("starting the server")?;
    if let Some(token) = server.admin_token() {
        say(&format!("admin token: {token}"));
        say("(shown once: the server keeps only its hash)");
    }
    say(&format!(
        "commands signed by server key {} (agents: --server-key {})",
        server.server_public_key().id(),
        args.data_dir.join("server.pub").display()
    ));
    say(&format!("broker {}", server.broker_url()));
    say(&format!("listening on {}", server.http_url()));
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
