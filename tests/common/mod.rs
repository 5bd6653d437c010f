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
        let fleet = {
            let _guard = self.rt.enter();
            agent::simulate::SimFleet::start(&config).unwrap()
        };
        wait_until(
            "the simulated fleet online",
            Duration::from_secs(180),
            || {
                let online = self.get("/api/v1/devices?online=true&limit=1");
                (online["total"] == devices).then_some(())
            },
        )
        .unwrap();
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
            let d = self.get(&format!("/api/v1/devices/{id}"));
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

impl Drop for World {
    fn drop(&mut self) {
        self.stop_server();
    }
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
