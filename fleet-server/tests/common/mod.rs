//! Shared fixtures: real keys and bundles, a server in process, a device played by a raw MQTT
//! client, and a blocking HTTP helper.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use chrono::Utc;
use fleet_server::{RunningServer, Server, ServerConfig};
use protocol::link::{self, Channel, DeviceStatus, ModelSummary, Topics, LINK_SCHEMA};
use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, Publish, QoS};

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

/// Secrets of the three tokens [`token_lines`] configures (names `ro`, `ci`, `root`).
pub const VIEWER: &str = "viewer-secret-0123456789";
pub const OPERATOR: &str = "operator-secret-0123456789";
pub const ADMIN: &str = "admin-secret-0123456789abc";

/// One token per role, as `--tokens FILE` would give them.
pub fn token_lines() -> Vec<fleet_server::auth::TokenLine> {
    [
        ("ro", fleet_server::auth::Role::Viewer, VIEWER),
        ("ci", fleet_server::auth::Role::Operator, OPERATOR),
        ("root", fleet_server::auth::Role::Admin, ADMIN),
    ]
    .into_iter()
    .map(|(n, r, s)| fleet_server::auth::TokenLine {
        name: n.into(),
        role: r,
        secret: s.into(),
    })
    .collect()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub keyring_file: PathBuf,
    pub rt: tokio::runtime::Runtime,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let files = bundler::keys::keygen_files(&dir.path().join("keys"), "fleet").unwrap();
        Fixture {
            key: files.secret,
            keyring_file: files.public,
            dir,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A bundle of reference model `model` (digits_mlp unless said otherwise).
    pub fn bundle(&self, model: &str, version: &str) -> PathBuf {
        self.bundle_with(model, version, |_| {})
    }

    /// [`Fixture::bundle`] with build options changed by `edit`.
    pub fn bundle_with(
        &self,
        model: &str,
        version: &str,
        edit: impl FnOnce(&mut bundler::BuildOptions),
    ) -> PathBuf {
        let src = models_dir().join(model);
        let out = self.path(&format!("{model}-{version}.mfb"));
        let mut opts = bundler::BuildOptions::new(
            src.join(format!("{model}.onnx")),
            model,
            version,
            1,
            &self.key,
            &out,
        );
        opts.golden_inputs = Some(src.join("test_input.npy"));
        opts.golden_max = 8;
        opts.latency_runs = 1;
        edit(&mut opts);
        bundler::build(&opts).unwrap();
        out
    }

    pub fn config(&self, data: &str) -> ServerConfig {
        let keyring = fleet_server::load_keyring(&self.keyring_file).unwrap();
        let mut c = ServerConfig::new(self.path(data), keyring);
        c.wait_for_broker = Duration::from_secs(20);
        c
    }

    pub fn start(&self, config: ServerConfig) -> RunningServer {
        self.rt.block_on(Server::start(config)).unwrap()
    }

    pub fn stop(&self, server: RunningServer) {
        self.rt.block_on(server.shutdown());
    }
}

/// A blocking HTTP client for one server.
pub struct Api {
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    pub fn new(server: &RunningServer, token: Option<&str>) -> Api {
        Api {
            base: server.http_url(),
            token: token.map(str::to_string),
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            base: self.base.clone(),
            token: token.map(str::to_string),
        }
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = ureq::request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn finish(res: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("HTTP transport error: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, json)
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        Self::finish(self.req("GET", path).call())
    }

    pub fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        Self::finish(self.req("POST", path).send_json(body))
    }

    pub fn post_bytes(&self, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        Self::finish(
            self.req("POST", path)
                .set("Content-Type", "application/octet-stream")
                .send_bytes(body),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        Self::finish(self.req("DELETE", path).call())
    }

    /// GET returning status, headers of interest and raw bytes.
    pub fn get_raw(&self, path: &str, range: Option<&str>) -> (u16, Option<String>, Vec<u8>) {
        let mut r = self.req("GET", path);
        if let Some(range) = range {
            r = r.set("Range", range);
        }
        let resp = match r.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("HTTP transport error: {e}"),
        };
        let status = resp.status();
        let content_range = resp.header("Content-Range").map(str::to_string);
        let mut bytes = Vec::new();
        resp.into_reader().read_to_end(&mut bytes).unwrap();
        (status, content_range, bytes)
    }

    pub fn metric(&self, name_and_labels: &str) -> u64 {
        let (_, _, body) = self.get_raw("/metrics", None);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("metric {name_and_labels} not in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }
}

use std::io::Read;

/// Polls `f` until it returns Some, or panics after `secs` seconds naming `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A device played by a raw MQTT client: subscribed to its commands and chunk topics.
pub struct FakeDevice {
    pub id: String,
    pub client: Client,
    pub topics: Topics,
    pub rx: mpsc::Receiver<Publish>,
    stop: Arc<AtomicBool>,
    seq: u64,
}

impl FakeDevice {
    pub fn connect(broker_url: &str, id: &str) -> FakeDevice {
        let (_, host, port) = fleet_server::mqtt::parse_url(broker_url).unwrap();
        let topics = Topics::default();
        let mut opts = MqttOptions::new(id, host, port);
        opts.set_max_packet_size(4 << 20, 4 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_last_will(LastWill::new(
            topics.device(id, Channel::Status),
            link::encode(&DeviceStatus::last_will(id)),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut connection) = Client::new(opts, 256);
        let (tx, rx) = mpsc::channel();
        let (subacks_tx, subacks_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subacks_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        client
            .subscribe(topics.device(id, Channel::Commands), QoS::AtLeastOnce)
            .unwrap();
        client
            .subscribe(topics.device(id, Channel::TransferChunk), QoS::AtLeastOnce)
            .unwrap();
        for _ in 0..2 {
            subacks_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("device subscribed");
        }
        FakeDevice {
            id: id.to_string(),
            client,
            topics,
            rx,
            stop,
            seq: 0,
        }
    }

    pub fn publish(&self, channel: Channel, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(
                self.topics.device(&self.id, channel),
                QoS::AtLeastOnce,
                retain,
                payload,
            )
            .unwrap();
    }

    pub fn status(
        &self,
        labels: &[(&str, &str)],
        models: Option<Vec<ModelSummary>>,
    ) -> DeviceStatus {
        DeviceStatus {
            schema: LINK_SCHEMA,
            device_id: self.id.clone(),
            online: true,
            time: Utc::now(),
            agent_version: Some("0.1.0-test".into()),
            target: Some("x86_64-unknown-linux-gnu".into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            models,
        }
    }

    pub fn publish_status(&self, status: &DeviceStatus) {
        self.publish(Channel::Status, link::encode(status), true);
    }

    /// Publishes an event with the next sequence number; returns it.
    pub fn event(
        &mut self,
        kind: &str,
        model: &str,
        version: &str,
        command_id: Option<&str>,
    ) -> link::DeviceEvent {
        self.seq += 1;
        let e = link::DeviceEvent {
            schema: LINK_SCHEMA,
            device_id: self.id.clone(),
            seq: self.seq,
            time: Utc::now(),
            kind: kind.into(),
            model: Some(model.into()),
            version: Some(version.into()),
            rollout_id: None,
            command_id: command_id.map(str::to_string),
            detail: serde_json::json!({"test": true}),
        };
        self.publish(Channel::Events, link::encode(&e), false);
        e
    }

    /// The next message on `channel`, within `secs` seconds.
    pub fn recv(&self, channel: Channel, secs: u64) -> Publish {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = self.rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("{}: nothing on {:?} within {secs} s", self.id, channel)
            });
            if self.topics.parse(&p.topic).map(|(_, c)| c) == Some(channel) {
                return p;
            }
        }
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
    }
}
