//! The world of an end-to-end test: signing keys, real bundles of the reference models, a fleet
//! server and device agents in this process (on a tokio runtime), talking through a real broker
//! that runs as a child process (see `modelfleet::harness`).

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent::link::{Link, LinkConfig, LinkHandle, TlsFiles};
use agent::{Agent, AgentConfig};
use fleet_server::{BrokerChoice, BrokerConnection, RunningServer, Server, ServerConfig};
use modelfleet::api::ApiClient;
use modelfleet::harness::wait_until;
use protocol::keys::{Keyring, PublicKey, SecretKey};
use serde_json::{json, Value};

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models")
}

pub fn embedded_broker_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_embedded-broker"))
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub key: PathBuf,
    pub keyring_file: PathBuf,
    pub keyring: Keyring,
    pub server: Option<RunningServer>,
    pub token: String,
    pub api: String,
    /// Golden inputs stored in the bundles this world builds (default 16: small and quick).
    pub golden_max: usize,
    /// The fleet server's command key file (made up front, so devices started before the
    /// server know it) and its public half, which every device is given.
    pub server_key_file: PathBuf,
    pub server_key: PublicKey,
    /// The chunk size the server's stage commands name (default 64 KiB).
    pub chunk_size: u32,
    /// The server's bulk connection for chunk frames (default: on, no certificate of its own).
    pub bulk: fleet_server::BulkSettings,
}

/// A device: an agent and its link to the broker.
pub struct Device {
    pub id: String,
    pub agent: Arc<Agent>,
    pub link: Option<LinkHandle>,
    pub data_dir: PathBuf,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new()
            .prefix("modelfleet-e2e-")
            .tempdir()
            .unwrap();
        let files = bundler::keys::keygen_files(&dir.path().join("keys"), "fleet").unwrap();
        let keyring = bundler::load_keyring(&[&files.public]).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let server_key = SecretKey::generate().unwrap();
        let server_key_file = dir.path().join("keys/server.key");
        std::fs::write(&server_key_file, server_key.to_file_text()).unwrap();
        World {
            server_key_file,
            server_key: server_key.public(),
            key: files.secret,
            keyring_file: files.public,
            keyring,
            dir,
            rt,
            server: None,
            token: String::new(),
            api: String::new(),
            golden_max: 16,
            chunk_size: protocol::link::DEFAULT_CHUNK_SIZE,
            bulk: fleet_server::BulkSettings::default(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Builds (once per world) a bundle of reference model `model` at `version`.
    pub fn bundle(&self, model: &str, version: &str) -> PathBuf {
        self.bundle_of(
            model,
            &models_dir().join(model).join(format!("{model}.onnx")),
            version,
        )
    }

    /// A bundle named `name` of the ONNX file `onnx`, with `name`'s reference golden set.
    pub fn bundle_of(&self, name: &str, onnx: &Path, version: &str) -> PathBuf {
        let out = self.path(&format!("{name}-{version}.mfb"));
        self.build(name, onnx, version, &self.key, &out)
    }

    /// A bundle of reference model `model` at `version` signed by secret key file `key` only.
    pub fn bundle_signed_by(&self, model: &str, version: &str, key: &Path) -> PathBuf {
        let stem = key.file_stem().unwrap().to_string_lossy();
        let out = self.path(&format!("{model}-{version}-{stem}.mfb"));
        let onnx = models_dir().join(model).join(format!("{model}.onnx"));
        self.build(model, &onnx, version, key, &out)
    }

    fn build(&self, name: &str, onnx: &Path, version: &str, key: &Path, out: &Path) -> PathBuf {
        let out = out.to_path_buf();
        if out.exists() {
            return out;
        }
        let src = models_dir().join(name);
        let mut opts = bundler::BuildOptions::new(onnx, name, version, 1, key, &out);
        opts.golden_inputs = Some(src.join("test_input.npy"));
        if src.join("test_labels.npy").exists() {
            opts.golden_labels = Some(src.join("test_labels.npy"));
        }
        opts.golden_max = self.golden_max;
        opts.latency_runs = 3;
        bundler::build(&opts).unwrap();
        out
    }

    /// Starts the fleet server in this process, on `broker`.
    pub fn start_server(&mut self, broker: BrokerConnection) {
        let mut config = ServerConfig::new(self.path("server"), self.keyring.clone());
        config.broker = BrokerChoice::External(broker);
        config.server_key = Some(self.server_key_file.clone());
        config.chunk_size = self.chunk_size;
        config.bulk = self.bulk.clone();
        let server = self.rt.block_on(Server::start(config)).unwrap();
        if let Some(token) = server.admin_token() {
            self.token = token.to_string();
        }
        self.api = server.http_url();
        self.server = Some(server);
    }

    pub fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }

    /// Opens (or reopens) a device's agent in `devices/{id}` and links it to `broker_url`.
    pub fn start_device(
        &self,
        id: &str,
        labels: &[(&str, &str)],
        broker_url: &str,
        tls: Option<TlsFiles>,
    ) -> Device {
        let data_dir = self.path(&format!("devices/{id}"));
        let mut config = AgentConfig::new(&data_dir);
        config.workers = 1;
        config.telemetry_window = Duration::from_millis(500);
        let agent = Arc::new(Agent::open(config, self.keyring.clone()).unwrap());
        agent::watch::spawn(&agent);
        let mut link_config = LinkConfig::new(broker_url, id);
        link_config.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        link_config.tls = tls;
        link_config.server_key = Some(self.server_key);
        link_config.backoff_max = Duration::from_secs(2);
        link_config.request_timeout = Duration::from_secs(3);
        // A small window keeps a 14 MB transfer slow enough to interrupt halfway.
        link_config.window = 4;
        let link = {
            let _guard = self.rt.enter();
            Link::start(agent.clone(), link_config).unwrap()
        };
        Device {
            id: id.to_string(),
            agent,
            link: Some(link),
            data_dir,
        }
    }

    /// Stops a device without a goodbye, as a crash would.
    pub fn crash_device(&self, mut device: Device) {
        if let Some(link) = device.link.take() {
            self.rt.block_on(link.abort());
        }
    }

    /// Starts a simulated fleet of `devices` real agents on `broker_url` (ids `sim-0000`…, label
    /// `site` spread over `sites`, `rps` requests per second each) with test-sized settings —
    /// 0.5 s telemetry windows, trials of 100 requests / 2 s with a 5 ms latency floor, quick
    /// reconnects — and waits until the server lists all of them online.
    pub fn start_sim_fleet(
        &self,
        broker_url: &str,
        devices: usize,
        rps: f64,
        sites: &[&str],
    ) -> agent::simulate::SimFleet {
        self.start_sim_fleet_with(broker_url, devices, rps, sites, devices, |_| {})
    }

    /// [`World::start_sim_fleet`] with the settings changed by `tweak` (id prefix, outbox caps,
    /// …), waiting until the server lists `online_total` devices online (other fleets included).
    pub fn start_sim_fleet_with(
        &self,
        broker_url: &str,
        devices: usize,
        rps: f64,
        sites: &[&str],
        online_total: usize,
        tweak: impl FnOnce(&mut agent::simulate::SimConfig),
    ) -> agent::simulate::SimFleet {
        let mut config = agent::simulate::SimConfig::new(
            devices,
            broker_url,
            self.keyring.clone(),
            self.path("fleet"),
        );
        config.rps = rps;
        config.labels = vec![("site".into(), sites.iter().map(|s| s.to_string()).collect())];
        // Short windows and trials: a test has seconds, not the production minutes.
        config.agent.telemetry_window = Duration::from_millis(500);
        config.agent.trial.min_requests = 100;
        config.agent.trial.min_seconds = 2;
        // The trial compares the new version's p95 with the previous version's p95 from before
        // the swap, so a load spike on this shared 2-core machine between the two (Chromium
        // starting, another test binary) reads as a regression of a sub-millisecond model. These
        // tests judge models on their outputs; the floor keeps scheduler noise out, as the
        // server gates' 5 ms floor in these tests does for the canary/control comparison.
        config.agent.trial.latency_floor_ms = 5.0;
        let mut link = LinkConfig::new(broker_url, "template");
        link.backoff_max = Duration::from_secs(2);
        link.request_timeout = Duration::from_secs(3);
        config.link = Some(link);
        config.server_key = Some(self.server_key);
        tweak(&mut config);
        let fleet = {
            let _guard = self.rt.enter();
            agent::simulate::SimFleet::start(&config).unwrap()
        };
        let mut online = Value::Null;
        wait_until(
            "the simulated fleet online",
            Duration::from_secs(180),
            || {
                online = self.get("/api/v1/devices?online=true&limit=1");
                (online["total"] == online_total).then_some(())
            },
        )
        .unwrap_or_else(|e| {
            let devices = self.get("/api/v1/devices?limit=10000");
            panic!(
                "{e}: {} of {online_total} online; the server's devices: {devices}",
                online["total"]
            )
        });
        fleet
    }

    /// Waits until rollout `id` is in one of `states`; returns it (panics with the rollout).
    pub fn wait_for_rollout(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("rollout {id} to be {states:?}"), timeout, || {
            last = self.get(&format!("/api/v1/rollouts/{id}"));
            states
                .iter()
                .any(|s| last["state"] == *s)
                .then(|| last.clone())
        })
        .unwrap_or_else(|e| panic!("{e}\nrollout: {last:#}"))
    }

    /// The API as the admin of this world's server.
    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.api, &self.token)
    }

    pub fn get(&self, path: &str) -> Value {
        self.client().get(path).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// POSTs and returns the status and JSON body, whatever the status.
    pub fn post(&self, path: &str, body: &[u8]) -> (u16, Value) {
        self.client()
            .post_bytes(path, body)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.client()
            .post_json(path, &body)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Uploads a bundle file; returns its id.
    pub fn upload(&self, bundle: &Path) -> String {
        self.client()
            .upload(&std::fs::read(bundle).unwrap())
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the API shows `id` with `model` active at `version`.
    pub fn wait_for_version(&self, id: &str, model: &str, version: &str, timeout: Duration) {
        wait_until(&format!("{id} to run {model} {version}"), timeout, || {
            // Not found yet: the device has not registered.
            let d = self.client().get(&format!("/api/v1/devices/{id}")).ok()?;
            d["models"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == model && m["active"] == version)
                .then_some(())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ndevice: {}\nevents: {}",
                self.get(&format!("/api/v1/devices/{id}")),
                self.get(&format!("/api/v1/events?device_id={id}&limit=20"))
            )
        });
    }
}

/// The brokers the broker suites run on: the embedded rumqttd (as its own process) and
/// Mosquitto, both on a free loopback port, restartable.
#[derive(Debug, Clone, Copy)]
pub enum Broker {
    Embedded,
    Mosquitto,
}

impl Broker {
    /// Starts this broker (Mosquitto's files in the world's `mosquitto/`).
    pub fn start(self, world: &World) -> modelfleet::harness::BrokerProcess {
        use modelfleet::harness::BrokerProcess;
        match self {
            Broker::Embedded => BrokerProcess::embedded(embedded_broker_exe()),
            Broker::Mosquitto => BrokerProcess::mosquitto(&world.path("mosquitto"), None, false),
        }
        .unwrap()
    }
}

/// `on_both_brokers!(scenario, …)`: a test `embedded::scenario` and `mosquitto::scenario` for
/// each `fn scenario(broker: Broker)` of the test file.
#[allow(unused_macros)]
macro_rules! on_both_brokers {
    ($($scenario:ident),*) => {
        mod embedded {
            $(#[test] fn $scenario() { super::$scenario($crate::common::Broker::Embedded) })*
        }
        mod mosquitto {
            $(#[test] fn $scenario() { super::$scenario($crate::common::Broker::Mosquitto) })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_brokers;

/// What a rollout did to each device, from the server's event log.
#[derive(Debug, Default)]
pub struct RolloutRecord {
    /// Device id → the ids of the stage commands the rollout sent it.
    pub stage_commands: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Device id → how many `installed` events of the rollout's version it reported.
    pub installs: BTreeMap<String, usize>,
}

impl RolloutRecord {
    /// Every one of `devices` devices was staged by exactly one command and installed once.
    pub fn assert_each_device_staged_once_and_installed_once(&self, devices: usize) {
        let (commands, installs) = (&self.stage_commands, &self.installs);
        assert_eq!(commands.len(), devices, "every device staged: {commands:?}");
        assert!(
            commands.values().all(|c| c.len() == 1),
            "one stage command per device: {commands:?}"
        );
        assert_eq!(
            installs.len(),
            devices,
            "every device installed: {installs:?}"
        );
        assert!(
            installs.values().all(|n| *n == 1),
            "one install per device: {installs:?}"
        );
    }
}

impl World {
    /// The active version of `model` on each device that has it (the server's device list).
    pub fn versions(&self, model: &str) -> BTreeMap<String, String> {
        let list = self.get("/api/v1/devices?limit=1000");
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| {
                let m = d["models"]
                    .as_array()?
                    .iter()
                    .find(|m| m["name"] == model)?;
                Some((
                    d["id"].as_str()?.to_string(),
                    m["active"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// The stage commands rollout `id` sent and the installs of `version` it caused, per device.
    pub fn rollout_record(&self, id: &str, version: &str) -> RolloutRecord {
        let events = self.get(&format!("/api/v1/events?rollout_id={id}&limit=10000"));
        let mut record = RolloutRecord::default();
        for e in events["events"].as_array().unwrap() {
            let device = e["device_id"].as_str().unwrap_or_default().to_string();
            if e["kind"] == "command_sent" && e["detail"]["type"] == "stage" {
                record
                    .stage_commands
                    .entry(device)
                    .or_default()
                    .insert(e["command_id"].as_str().unwrap().to_string());
            } else if e["kind"] == "installed" && e["version"] == version {
                *record.installs.entry(device).or_default() += 1;
            }
        }
        record
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A small LCG: reproducible fault schedules without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The seed of a fault schedule: `MODELFLEET_FAULT_SEED` if set, else `default`; printed, so a
/// failing run can be replayed.
pub fn fault_seed(default: u64) -> u64 {
    let seed = std::env::var("MODELFLEET_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("fault schedule seed: {seed} (MODELFLEET_FAULT_SEED=N replays another)");
    seed
}

/// Runs `n` inference requests on the device's active `model` with the model's test inputs.
pub fn traffic(device: &Device, model: &str, n: usize) {
    let inputs = engine::npy::read_npy(models_dir().join(model).join("test_input.npy")).unwrap();
    let serving = device.agent.registry.get(model).expect("model is served");
    let per: usize = inputs.shape[1..].iter().product();
    let rows = inputs.shape[0];
    let input_name = serving.manifest.inputs[0].name.clone();
    for i in 0..n {
        let row = i % rows;
        let mut shape = inputs.shape.clone();
        shape[0] = 1;
        let data = &inputs.as_f32().unwrap()[row * per..(row + 1) * per];
        let body = json!({"inputs": [{"name": input_name, "datatype": "FP32", "shape": shape,
                                       "data": data}]});
        agent::http::serve_request(&serving, body.to_string().as_bytes(), None)
            .map_err(|(s, e)| format!("{s}: {e}"))
            .unwrap();
    }
}

/// Rewrites a bundle with other `created_at` / `expires_at` (same payloads, re-signed by this
/// world's key): a bundle built at another time than now, which the bundler cannot make (it
/// refuses an expiry in the past). Returns the new file, `{stem}-{tag}.mfb`.
pub fn redate_bundle(
    world: &World,
    bundle: &Path,
    created_at: chrono::DateTime<chrono::Utc>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    tag: &str,
) -> PathBuf {
    rewrite_manifest(
        world,
        bundle,
        |m| {
            m.created_at = created_at;
            m.expires_at = expires_at;
        },
        tag,
    )
}

/// Rewrites a bundle with its manifest changed by `edit` (same payloads, re-signed by this
/// world's key): a manifest the bundler would not write. Returns the new file,
/// `{stem}-{tag}.mfb`.
pub fn rewrite_manifest(
    world: &World,
    bundle: &Path,
    edit: impl FnOnce(&mut protocol::manifest::Manifest),
    tag: &str,
) -> PathBuf {
    use protocol::bundle::{
        compress_payload, read_bundle, write_bundle, MemorySink, VerifyOptions,
    };
    let mut sink = MemorySink::default();
    let verified = read_bundle(
        std::fs::File::open(bundle).unwrap(),
        &VerifyOptions::new(&world.keyring),
        &mut sink,
    )
    .unwrap();
    let mut manifest = verified.manifest;
    edit(&mut manifest);
    // Payloads in the manifest's order, so the tar layout stays canonical.
    let payloads: Vec<_> = manifest
        .payloads
        .iter()
        .map(|p| {
            let name = p.file.strip_suffix(".zst").unwrap();
            compress_payload(name, &sink.0[name], 3, |_, _| {}).unwrap()
        })
        .collect();
    let key = bundler::load_secret_key(&world.key).unwrap();
    let mut bytes = Vec::new();
    write_bundle(&mut bytes, &mut manifest, &payloads, &[&key]).unwrap();
    let stem = bundle.file_stem().unwrap().to_string_lossy();
    let out = world.path(&format!("{stem}-{tag}.mfb"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// The `fleet-agent` binary of this build: `target/<profile>/fleet-agent`, beside the
/// `embedded-broker` of this package. Cargo builds it for `cargo test --workspace` (the agent
/// package's tests need it); run alone, this suite needs an agent test selected too
/// (`cargo test --workspace --test agent_faults --test crash`). A binary older than the agent's
/// sources would test old code, so that is refused.
pub fn agent_exe() -> PathBuf {
    fresh_exe(
        "fleet-agent",
        &["agent/src", "agent/src/link", "protocol/src", "engine/src"],
        "`cargo test --workspace --test crash` builds it",
    )
}

/// The `fleet-server` binary of this build, beside `fleet-agent` (see [`agent_exe`]): built by
/// `cargo test --workspace`, or alone by `cargo build -p modelfleet-fleet-server --bin
/// fleet-server`. Refused if older than the server's sources.
pub fn server_exe() -> PathBuf {
    fresh_exe(
        "fleet-server",
        &[
            "fleet-server/src",
            "fleet-server/src/http",
            "fleet-server/src/rollout",
            "protocol/src",
        ],
        "`cargo build -p modelfleet-fleet-server --bin fleet-server` builds it",
    )
}

/// `name` in the directory of this package's binaries, checked to be newer than every file
/// in `sources` (directories of the workspace).
fn fresh_exe(name: &str, sources: &[&str], how: &str) -> PathBuf {
    let exe = embedded_broker_exe().with_file_name(name);
    let built = std::fs::metadata(&exe)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {how}", exe.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in sources {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            let changed = e.metadata().and_then(|m| m.modified()).unwrap();
            assert!(
                changed <= built,
                "{} is older than {}: rebuild it ({how})",
                exe.display(),
                e.path().display()
            );
        }
    }
    exe
}

/// A real `fleet-agent run` child process on a free loopback port. Dropping it kills it
/// (SIGKILL), as does [`AgentProcess::kill`].
pub struct AgentProcess {
    child: std::process::Child,
    pub url: String,
    pub log: PathBuf,
}

/// How to start an [`AgentProcess`].
pub struct AgentOptions<'a> {
    pub data_dir: &'a Path,
    /// `(device id, broker URL)`; `None`: the agent serves offline.
    pub link: Option<(&'a str, &'a str)>,
    /// The `agent.toml` given with `--config` (data dir, keyring, listen and link come as flags).
    pub config: &'a str,
    /// Extra environment (e.g. `MODELFLEET_CRASH_AT`).
    pub env: &'a [(&'a str, &'a str)],
}

impl World {
    /// The server's public command key as a `server.pub` file (devices get it as `--server-key`).
    pub fn server_pub_file(&self) -> PathBuf {
        let path = self.path("keys/server.pub");
        if !path.exists() {
            std::fs::write(&path, format!("{}\n", self.server_key.to_line())).unwrap();
        }
        path
    }

    /// Starts `fleet-agent run` and waits until its HTTP API answers. Its standard error goes to
    /// a log file in the world's directory (named in [`AgentProcess::log`]).
    pub fn spawn_agent(&self, opts: &AgentOptions<'_>) -> AgentProcess {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = modelfleet::harness::free_port();
        let config = self.path(&format!("agent-{n}.toml"));
        std::fs::write(&config, opts.config).unwrap();
        let log = self.path(&format!("agent-{n}.log"));
        let mut cmd = std::process::Command::new(agent_exe());
        cmd.arg("run")
            .arg("--data-dir")
            .arg(opts.data_dir)
            .arg("--keyring")
            .arg(&self.keyring_file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(&config)
            .args(["--workers", "1"]);
        if let Some((id, broker)) = opts.link {
            cmd.args(["--broker", broker, "--device-id", id])
                .arg("--server-key")
                .arg(self.server_pub_file());
        }
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("fleet-agent starts");
        let mut agent = AgentProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        wait_until("the agent's HTTP API", Duration::from_secs(120), || {
            if let Some(status) = agent.exited() {
                panic!(
                    "the agent exited ({status}) at start:\n{}",
                    agent.log_text()
                );
            }
            ureq::get(&format!("{}/v2/health/live", agent.url))
                .call()
                .ok()
                .map(|_| ())
        })
        .unwrap();
        agent
    }
}

impl AgentProcess {
    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the process has ended (e.g. at a `MODELFLEET_CRASH_AT` point).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET {url}{path}` as JSON; `None` if it fails.
    pub fn get(&self, path: &str) -> Option<Value> {
        ureq::get(&format!("{}{path}", self.url))
            .timeout(Duration::from_secs(30))
            .call()
            .ok()?
            .into_json()
            .ok()
    }

    /// `/admin/v1/status`'s entry for `model` (active, previous, state, …).
    pub fn model_status(&self, model: &str) -> Option<Value> {
        let status = self.get("/admin/v1/status")?;
        status["models"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == model)
            .cloned()
    }

    /// The `/metrics` page.
    pub fn metrics_text(&self) -> Option<String> {
        ureq::get(&format!("{}/metrics", self.url))
            .timeout(Duration::from_secs(30))
            .call()
            .ok()?
            .into_string()
            .ok()
    }

    /// `POST {url}{path}` with `body`: the status and the JSON answer, whatever the status.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let r = ureq::post(&format!("{}{path}", self.url))
            .timeout(Duration::from_secs(300))
            .set("Content-Type", content_type)
            .send_bytes(body);
        match r {
            Ok(r) => (r.status(), r.into_json().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    /// Every event in the agent's log (`/admin/v1/events`).
    pub fn events(&self) -> Vec<Value> {
        let v = self.get("/admin/v1/events?limit=1000").expect("events");
        v["events"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real `fleet-server run` child process on a loopback port that stays the same across
/// restarts, with its data in the world's `server/` directory (the one [`World::start_server`]
/// uses), so it can be killed and started again on the same state. Dropping it kills it
/// (SIGKILL), as does [`ServerProcess::kill`].
pub struct ServerProcess {
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    child: Option<std::process::Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The standard error of the current (or last) start.
    pub log: PathBuf,
    /// How many times it was started.
    pub starts: usize,
}

impl World {
    /// Starts `fleet-server run` on the external broker at `broker_url`, with this world's
    /// keyring, command key and chunk size and an admin token given in a token file (a restarted
    /// server knows it too), and waits until it answers. The world's API helpers (`get`,
    /// `client`, `wait_for_rollout`, …) talk to it from then on. `env`: extra environment of
    /// this start (e.g. `MODELFLEET_CRASH_AT`).
    pub fn spawn_server(&mut self, broker_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        assert!(self.server.is_none(), "an in-process server is running");
        let port = modelfleet::harness::free_port();
        let token = "test-admin-0123456789abcdef".to_string();
        let tokens = self.path("server-tokens");
        std::fs::write(&tokens, format!("admin admin {token}\n")).unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--data-dir".into(),
            self.path("server").into(),
            "--keyring".into(),
            self.keyring_file.clone().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--broker".into(),
            broker_url.into(),
            "--server-key".into(),
            self.server_key_file.clone().into(),
            "--tokens".into(),
            tokens.into(),
            "--chunk-size".into(),
            self.chunk_size.to_string().into(),
        ];
        let mut server = ServerProcess {
            args,
            dir: self.dir.path().to_path_buf(),
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            log: PathBuf::new(),
            starts: 0,
        };
        server.start(env);
        self.api = server.url.clone();
        self.token = token;
        server
    }
}

impl ServerProcess {
    /// Starts the server (again, on the same port and data) and waits until `/healthz` answers.
    /// Panics, with its log, if it exits first.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the server is running");
        self.starts += 1;
        self.log = self.dir.join(format!("server-{}.log", self.starts));
        let mut cmd = std::process::Command::new(server_exe());
        cmd.args(&self.args)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("fleet-server starts"));
        wait_until("the fleet server's API", Duration::from_secs(120), || {
            if let Some(status) = self.exited() {
                panic!(
                    "the fleet server exited ({status}) at start:\n{}",
                    self.log_text()
                );
            }
            ureq::get(&format!("{}/healthz", self.url))
                .timeout(Duration::from_secs(5))
                .call()
                .ok()
                .map(|_| ())
        })
        .unwrap();
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status, if the process has ended (e.g. at a `MODELFLEET_CRASH_AT` point); the
    /// process is then reaped and [`ServerProcess::start`] may be called again.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
