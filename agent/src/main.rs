//! `fleet-agent`: the modelfleet device agent CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use agent::config::{ConfigFile, LinkFile};
use agent::link::{Link, LinkConfig, TlsFiles, TransferMode};
use agent::{Agent, AgentConfig};
use protocol::keys::Keyring;

#[derive(Parser)]
#[command(
    name = "fleet-agent",
    version,
    about = "modelfleet device agent: verified model installs, OIP v2 serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the installed models (and accept installs through the admin API).
    Run(RunArgs),
    /// Verify, self-test and activate a bundle.
    Install {
        bundle: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Trusted public key file(s) (with --data-dir).
        #[arg(long)]
        keyring: Vec<PathBuf>,
    },
    /// Show installed models.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Switch a model back to its previous version.
    Revert {
        model: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        keyring: Vec<PathBuf>,
    },
    /// Run N simulated devices in this process: each a real agent with its own data directory,
    /// MQTT session, installs, health watch and telemetry, serving traffic drawn from the golden
    /// inputs of the bundles it runs. The demo's fleet and the scale tests' fleet.
    Simulate(SimArgs),
}

#[derive(Args)]
struct SimArgs {
    /// How many devices
    #[arg(long)]
    devices: usize,
    /// MQTT broker of the fleet: mqtt://HOST:PORT or mqtts://HOST:PORT
    #[arg(long)]
    broker: String,
    /// Trusted public key file(s)
    #[arg(long, required = true)]
    keyring: Vec<PathBuf>,
    /// Where the devices keep their data (one directory per device, kept across runs)
    #[arg(long)]
    data_dir: PathBuf,
    /// Labels KEY=VALUE or KEY=V1|V2|… (device i gets the (i mod n)-th value; repeatable)
    #[arg(long = "label", value_parser = agent::simulate::parse_label)]
    labels: Vec<(String, Vec<String>)>,
    /// Inference requests per second per device and model (0: no traffic)
    #[arg(long, default_value_t = 5.0)]
    rps: f64,
    /// Device ids are PREFIX-0000, PREFIX-0001, …
    #[arg(long, default_value = "sim")]
    id_prefix: String,
    /// Seconds per telemetry window
    #[arg(long, default_value_t = 10)]
    telemetry_seconds: u64,
    /// CA certificate (PEM) that the broker's certificate must chain to (mqtts://)
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Load a model per device instead of sharing one loaded copy among the devices that run
    /// the same model bytes (for comparison: memory grows with the fleet)
    #[arg(long)]
    no_share_models: bool,
    /// The fleet server's public key (its DATA_DIR/server.pub): only commands it signed are obeyed
    #[arg(long, value_name = "FILE.pub")]
    server_key: PathBuf,
}

/// Where the agent is: a data directory (agent not running) or a running agent's URL.
#[derive(Args)]
struct Target {
    #[arg(long, conflicts_with = "agent", required_unless_present = "agent")]
    data_dir: Option<PathBuf>,
    /// URL of a running agent, e.g. http://127.0.0.1:8500
    #[arg(long)]
    agent: Option<String>,
    /// Admin token of the running agent (or MODELFLEET_ADMIN_TOKEN).
    #[arg(long, env = "MODELFLEET_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    keyring: Vec<PathBuf>,
    /// Address of the local API [default: 127.0.0.1:8500]
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Concurrent inference requests [default: CPU count]
    #[arg(long)]
    workers: Option<usize>,
    /// Intra-op threads per inference [default: 1; more needs a build with the `multithread`
    /// feature]
    #[arg(long)]
    engine_threads: Option<usize>,
    /// Inference backend [default: tract, the only one this build has]
    #[arg(long)]
    backend: Option<String>,
    /// Bearer token required on /admin/v1 (or MODELFLEET_ADMIN_TOKEN).
    #[arg(long, env = "MODELFLEET_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    link: LinkArgs,
}

/// Joining the fleet: without --broker (or `[link] broker`) the agent serves offline.
#[derive(Args)]
struct LinkArgs {
    /// MQTT broker of the fleet: mqtt://HOST:PORT or mqtts://HOST:PORT
    #[arg(long)]
    broker: Option<String>,
    /// This device's id (MQTT client id and topic level)
    #[arg(long)]
    device_id: Option<String>,
    /// A label KEY=VALUE reported in the status (repeatable)
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// CA certificate (PEM) that the broker's certificate must chain to (mqtts://)
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Topic prefix [default: modelfleet/v1]
    #[arg(long)]
    topic_prefix: Option<String>,
    /// How bundles are fetched: mqtt (chunks over the broker) or http (Range requests) [default: mqtt]
    #[arg(long)]
    transfer: Option<TransferMode>,
    /// The fleet server's public key (its DATA_DIR/server.pub): only commands it signed are obeyed
    #[arg(long, value_name = "FILE.pub")]
    server_key: Option<PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label '{s}': use KEY=VALUE")),
    }
}

/// The link settings from flags over `[link]`; None without a broker.
fn link_config(args: LinkArgs, file: LinkFile) -> Result<Option<LinkConfig>> {
    let Some(broker) = args.broker.or(file.broker) else {
        if args.device_id.is_some() || !args.labels.is_empty() {
            bail!("--device-id and --label need --broker (or [link] broker in the config)");
        }
        return Ok(None);
    };
    let device_id = args
        .device_id
        .or(file.device_id)
        .context("--broker needs --device-id (or [link] device_id in the config)")?;
    let mut config = LinkConfig::new(broker, device_id);
    config.labels = file.labels;
    config.labels.extend(args.labels);
    let ca_file = args.ca_file.or(file.ca_file);
    let client_cert = args.client_cert.or(file.client_cert);
    let client_key = args.client_key.or(file.client_key);
    config.tls = match ca_file {
        Some(ca_file) => Some(TlsFiles {
            ca_file,
            client_cert,
            client_key,
        }),
        None if client_cert.is_some() || client_key.is_some() => {
            bail!("a client certificate needs --ca-file too")
        }
        None => None,
    };
    if let Some(p) = args.topic_prefix.or(file.topic_prefix) {
        config.prefix = p;
    }
    if let Some(t) = args.transfer.or(file.transfer) {
        config.transfer = t;
    }
    if let Some(c) = file.chunk_size {
        config.chunk_size = c;
    }
    let server_key = args.server_key.or(file.server_key).context(
        "--broker needs --server-key FILE.pub (or [link] server_key): the fleet server's public \
         key (DATA_DIR/server.pub); devices obey only commands it signed",
    )?;
    config.server_key = Some(load_server_key(&server_key)?);
    Ok(Some(config))
}

fn load_server_key(path: &Path) -> Result<protocol::keys::PublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read server key {}", path.display()))?;
    protocol::command_auth::server_key_from_file_text(&text)
        .with_context(|| format!("server key {}", path.display()))
}

/// Gives the heap pages freed after loading the models back to the kernel. Opening the store
/// and loading a model (NNEF parse, declutter, optimise, golden check) peaks at a few MB of heap
/// that glibc keeps (it trims only the top of the heap, and only past 128 KB): 1.7 MB of the
/// agent's PSS with `digits_cnn` (BENCHMARKS.md, "Agent footprint", step 4). Once, at start-up,
/// before the serving threads exist; a no-op on other C libraries.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes no pointers and may be called at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn main() {
    // RUST_LOG as `target=level` directives (`warn`, `info,agent::link=debug`), read by
    // tracing-subscriber's `Targets`, not its `EnvFilter`: EnvFilter's span and field-value
    // directives bring a regex engine (regex-automata + regex-syntax), a size cost on the device
    // (issue 9, BENCHMARKS.md "Agent footprint"). An unset, empty or unreadable RUST_LOG means
    // `info`.
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => serve(args),
        Command::Simulate(args) => simulate(args),
        Command::Install {
            bundle,
            target,
            keyring,
        } => {
            let bytes = std::fs::read(&bundle)
                .with_context(|| format!("cannot read bundle {}", bundle.display()))?;
            let installed: serde_json::Value = match (&target.agent, &target.data_dir) {
                (Some(url), _) => remote(
                    url,
                    &target.token,
                    "POST",
                    "/admin/v1/bundles",
                    Some(&bytes),
                )?,
                (None, Some(dir)) => {
                    let agent = open_local(dir, &keyring)?;
                    serde_json::to_value(agent.install(&bytes)?)?
                }
                _ => unreachable!("clap requires one"),
            };
            if installed["already_active"] == true {
                println!(
                    "{} {} is already active",
                    installed["model"].as_str().unwrap_or(""),
                    installed["version"].as_str().unwrap_or("")
                );
            } else {
                println!(
                    "installed {} {} (previous: {})",
                    installed["model"].as_str().unwrap_or(""),
                    installed["version"].as_str().unwrap_or(""),
                    installed["previous"].as_str().unwrap_or("none")
                );
            }
            Ok(())
        }
        Command::Status { target, json } => {
            let status: serde_json::Value = match (&target.agent, &target.data_dir) {
                (Some(url), _) => remote(url, &target.token, "GET", "/admin/v1/status", None)?,
                (None, Some(dir)) => serde_json::to_value(Agent::read_status(dir)?)?,
                _ => unreachable!("clap requires one"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Revert {
            model,
            target,
            keyring,
        } => {
            let result: serde_json::Value = match (&target.agent, &target.data_dir) {
                (Some(url), _) => remote(
                    url,
                    &target.token,
                    "POST",
                    &format!("/admin/v1/models/{model}/revert"),
                    Some(&[]),
                )?,
                (None, Some(dir)) => {
                    let agent = open_local(dir, &keyring)?;
                    serde_json::to_value(agent.revert(
                        &model,
                        "manual",
                        serde_json::json!({"requested_by": "cli"}),
                    )?)?
                }
                _ => unreachable!("clap requires one"),
            };
            println!(
                "{model} reverted to {}",
                result["active"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

fn load_keyring(paths: &[PathBuf]) -> Result<Keyring> {
    let mut ring: Option<Keyring> = None;
    for p in paths {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read keyring {}", p.display()))?;
        let k =
            Keyring::from_file_text(&text).with_context(|| format!("keyring {}", p.display()))?;
        match &mut ring {
            Some(r) => r.extend(k),
            None => ring = Some(k),
        }
    }
    ring.context(
        "--keyring FILE.pub is required: the agent installs only bundles signed by trusted keys",
    )
}

fn open_local(dir: &Path, keyring: &[PathBuf]) -> Result<Agent> {
    let keyring = load_keyring(keyring)?;
    Agent::open(AgentConfig::new(dir), keyring)
        .with_context(|| format!("cannot open agent data directory {}", dir.display()))
}

fn serve(args: RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .context("--data-dir (or data_dir in the config) is required")?;
    let keyring_paths = if args.keyring.is_empty() {
        file.keyring.into_iter().collect()
    } else {
        args.keyring
    };
    let keyring = load_keyring(&keyring_paths)?;
    let mut config = AgentConfig::new(&data_dir);
    file.health.apply(&mut config);
    if let Some(w) = args.workers.or(file.workers) {
        config.workers = w.max(1);
    }
    if let Some(q) = file.queue_limit {
        config.queue_limit = q;
    }
    if let Some(half) = file.f16_compute {
        config.f16_compute = half;
    }
    if let Some(t) = args.engine_threads.or(file.engine_threads) {
        config.engine_threads = t.max(1);
        if t > 1 && !engine::MULTITHREAD {
            bail!(
                "engine_threads = {t} (--engine-threads or the config file): {}",
                engine::threads_unsupported(t)
            );
        }
    }
    if let Some(name) = args.backend.or(file.backend) {
        config.backend = agent::backend::by_name(&name)?;
    }
    if let Some(s) = file.expiry_slack_seconds {
        config.expiry_slack = Duration::from_secs(s);
    }
    if let Some(t) = file.target {
        config.target = t;
    }
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8500)));
    let admin_token = args.admin_token.or(file.admin_token);
    let link = link_config(args.link, file.link)?;
    if admin_token.is_none() && !listen.ip().is_loopback() {
        bail!("refusing to expose the admin API on {listen} without --admin-token");
    }
    let agent = Arc::new(
        Agent::open(config, keyring)
            .with_context(|| format!("cannot open agent data directory {}", data_dir.display()))?,
    );
    for m in agent.registry.all() {
        tracing::info!(model = %m.name, version = %m.version(), load_ms = m.load_time.as_secs_f64() * 1e3, "serving");
    }
    if agent.registry.is_empty() {
        tracing::info!("no model installed yet; install one with `fleet-agent install BUNDLE --agent http://{listen}`");
    }
    release_free_heap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        let app = agent::http::router(agent.clone(), admin_token);
        let link = match link {
            Some(config) => {
                tracing::info!(device = %config.device_id, broker = %config.broker_url, "joining the fleet");
                Some(Link::start(agent, config).context("cannot start the MQTT link")?)
            }
            None => None,
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        if let Some(link) = link {
            link.shutdown().await;
        }
        Ok(())
    })
}

fn simulate(args: SimArgs) -> Result<()> {
    use agent::simulate::{SimConfig, SimFleet};
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(args.rps >= 0.0 && args.rps.is_finite()) {
        bail!("--rps {} is not a rate (use 0 for no traffic)", args.rps);
    }
    let keyring = load_keyring(&args.keyring)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let mut config = SimConfig::new(args.devices, &args.broker, keyring, args.data_dir);
    config.id_prefix = args.id_prefix;
    config.labels = args.labels;
    config.rps = args.rps;
    config.agent.telemetry_window = Duration::from_secs(args.telemetry_seconds.max(1));
    if args.no_share_models {
        config.agent.share_models = None;
    }
    config.server_key = Some(load_server_key(&args.server_key)?);
    config.tls = args.ca_file.map(|ca_file| TlsFiles {
        ca_file,
        client_cert: None,
        client_key: None,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let fleet = SimFleet::start(&config).context("cannot start the simulated fleet")?;
        tracing::info!(devices = fleet.devices.len(), broker = %config.broker_url, "simulated fleet started");
        let mut report = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = report.tick() => {
                    let serving = fleet.devices.iter().filter(|d| !d.agent.registry.is_empty()).count();
                    let loaded_models = config.agent.share_models.as_ref().map(|c| c.live());
                    tracing::info!(connected = fleet.connected(), serving, ?loaded_models, "fleet");
                }
            }
        }
        fleet.shutdown().await;
        Ok(())
    })
}

fn remote(
    url: &str,
    token: &Option<String>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<serde_json::Value> {
    let full = format!("{}{}", url.trim_end_matches('/'), path);
    let mut req = ureq::request(method, &full).timeout(Duration::from_secs(600));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let response = match body {
        Some(b) => req
            .set("Content-Type", "application/octet-stream")
            .send_bytes(b),
        None => req.call(),
    };
    match response {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            bail!(
                "agent at {url} answered {code}: {}",
                v["error"].as_str().unwrap_or("(no message)")
            )
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot reach the agent at {url}"))),
    }
}

fn print_status(s: &serde_json::Value) {
    let models = s["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        println!(
            "no models installed (target {})",
            s["target"].as_str().unwrap_or("?")
        );
        return;
    }
    println!(
        "{:<24} {:<12} {:<12} {:<10} {:<7}",
        "MODEL", "ACTIVE", "PREVIOUS", "STATE", "COMPUTE"
    );
    for m in &models {
        let field = |k: &str| m[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<24} {:<12} {:<12} {:<10} {:<7}",
            field("name"),
            field("active"),
            field("previous"),
            field("state"),
            field("compute")
        );
    }
}
