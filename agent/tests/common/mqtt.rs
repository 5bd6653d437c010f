//! MQTT test infrastructure: rumqttd in this process, a raw recording client, and commands
//! signed as the fleet server signs them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agent::link::LinkConfig;
use agent::{Agent, AgentConfig};
use protocol::command_auth::SignedCommand;
use protocol::keys::SecretKey;
use protocol::link::{
    self, encode_chunk, sha256_hex, Action, BundleRef, Channel, ChunkHeader, ChunkRequest, Command,
    DeviceEvent, DeviceStatus, ServerPresence, Topics, LINK_SCHEMA,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::{free_port, Fixture};

pub const DEADLINE: Duration = Duration::from_secs(60);

// ---- infrastructure ----

/// rumqttd on a free loopback port, in this process (it cannot bind port 0, and its `start`
/// blocks: it runs on its own thread for the rest of the test process), with the fleet server's
/// online presence retained on it ([`announce_server`]).
pub fn start_broker_on(port: u16) {
    start_broker_with(port, None)
}

/// `tls`: (server certificate, server key) PEM files.
pub fn start_broker_with(port: u16, tls: Option<(&std::path::Path, &std::path::Path)>) {
    start_bare_broker(port, tls);
    if tls.is_none() {
        announce_server(port, true);
    }
}

/// Plays the part of the fleet server that agents wait for before they publish events and
/// telemetry: its presence, retained on `{p}/server` of the plain broker on `port`.
pub fn announce_server(port: u16, online: bool) {
    std::thread::spawn(move || {
        let options = MqttOptions::new(format!("presence-{port}"), "127.0.0.1", port);
        let (client, mut connection) = rumqttc::Client::new(options, 10);
        client
            .publish(
                Topics::default().server(),
                QoS::AtLeastOnce,
                true,
                link::encode(&ServerPresence::new(online)),
            )
            .unwrap();
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("cannot announce the server: {e}"),
            }
        }
    })
    .join()
    .unwrap();
}

/// rumqttd without the server's presence (see [`start_broker_with`]).
pub fn start_bare_broker(port: u16, tls: Option<(&std::path::Path, &std::path::Path)>) {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
    let server = ServerSettings {
        name: "v4".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        tls: tls.map(|(cert, key)| TlsConfig::Rustls {
            capath: None,
            certpath: cert.to_str().unwrap().into(),
            keypath: key.to_str().unwrap().into(),
        }),
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 2 << 20,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("1".to_string(), server)].into_iter().collect()),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn start_broker() -> String {
    let port = free_port();
    start_broker_on(port);
    format!("mqtt://127.0.0.1:{port}")
}

pub fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Polls `check` every 50 ms until it returns Some, failing with `what` after the deadline.
pub async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw MQTT client that records every message on the topics it subscribed to.
pub struct Tap {
    pub client: AsyncClient,
    pub messages: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    pub connected: Arc<AtomicBool>,
}

impl Tap {
    pub async fn new(broker: &str, id: &str, filters: &[String]) -> Tap {
        let port = port_of(broker);
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        for f in filters {
            client.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
        }
        let messages: Arc<Mutex<Vec<(String, Vec<u8>)>>> = Arc::default();
        let connected = Arc::new(AtomicBool::new(false));
        let (m, c) = (messages.clone(), connected.clone());
        let need_suback = !filters.is_empty();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => m
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec())),
                    Ok(Event::Incoming(Packet::SubAck(_))) => c.store(true, Ordering::SeqCst),
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !need_suback => {
                        c.store(true, Ordering::SeqCst)
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let tap = Tap {
            client,
            messages,
            connected,
        };
        let c = tap.connected.clone();
        wait_for("the tap's subscription", || {
            c.load(Ordering::SeqCst).then_some(())
        })
        .await;
        tap
    }

    pub fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn statuses(&self, device: &str) -> Vec<DeviceStatus> {
        self.on(&topic(device, Channel::Status))
            .iter()
            .map(|p| link::decode(p).unwrap())
            .collect()
    }

    pub fn events(&self, device: &str) -> Vec<DeviceEvent> {
        self.on(&topic(device, Channel::Events))
            .iter()
            .map(|p| link::decode(p).unwrap())
            .collect()
    }
}

pub fn topic(device: &str, channel: Channel) -> String {
    Topics::default().device(device, channel)
}

/// The fleet server's command key in these tests (one per test process).
pub fn server_key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| SecretKey::generate().unwrap())
}

/// A command for `device` as the fleet server would publish it: signed by the server key,
/// valid for an hour, with a fresh sequence number.
pub fn signed_command(device: &str, id: &str, action: Action) -> Vec<u8> {
    SignedCommand::sign(&command_for(device, id, action), server_key()).encode()
}

pub fn command_for(device: &str, id: &str, action: Action) -> Command {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = chrono::Utc::now();
    Command {
        schema: LINK_SCHEMA,
        command_id: id.into(),
        rollout_id: Some("r-1".into()),
        device_id: device.into(),
        seq: now.timestamp_micros() as u64 + SEQ.fetch_add(1, Ordering::SeqCst),
        time: now,
        expires: now + chrono::Duration::hours(1),
        action,
    }
}

// ---- a fake fleet server and a device ----

/// The fleet server's side of transfers: answers chunk requests from a bundle file, counting
/// every chunk asked for; can hold back chunks, corrupt chosen ones once, and send commands.
pub struct FakeServer {
    pub tap: Tap,
    /// Chunks asked for, in order (an index appears once per request).
    pub requested: Arc<Mutex<Vec<u32>>>,
    /// Serve only chunks below this index (others are ignored, as if lost).
    pub serve_below: Arc<AtomicU32>,
    /// Chunks to corrupt the first time they are sent.
    pub corrupt_once: Arc<Mutex<HashSet<u32>>>,
    /// Chunks not to send the first time they are asked for (lost on the way).
    pub lose_once: Arc<Mutex<HashSet<u32>>>,
    /// Chunks sent with other bytes every time, each with the hash of what is sent: frames that
    /// check out, of a file that is not the bundle the id names.
    pub tamper: Arc<Mutex<HashSet<u32>>>,
}

impl FakeServer {
    /// Frames published with QoS 1, as on the server's main connection.
    pub async fn new(broker: &str, device: &str, bundle: Vec<u8>, chunk_size: u32) -> FakeServer {
        FakeServer::with_qos(broker, device, bundle, chunk_size, QoS::AtLeastOnce).await
    }

    /// Frames published with `qos` (QoS 0: the server's bulk connection).
    pub async fn with_qos(
        broker: &str,
        device: &str,
        bundle: Vec<u8>,
        chunk_size: u32,
        qos: QoS,
    ) -> FakeServer {
        let tap = Tap::new(
            broker,
            &format!("server-{device}"),
            &[topic(device, Channel::TransferRequest)],
        )
        .await;
        let server = FakeServer {
            tap,
            requested: Arc::default(),
            serve_below: Arc::new(AtomicU32::new(u32::MAX)),
            corrupt_once: Arc::default(),
            lose_once: Arc::default(),
            tamper: Arc::default(),
        };
        let (client, messages) = (server.tap.client.clone(), server.tap.messages.clone());
        let (requested, serve_below, corrupt, lose, tamper) = (
            server.requested.clone(),
            server.serve_below.clone(),
            server.corrupt_once.clone(),
            server.lose_once.clone(),
            server.tamper.clone(),
        );
        let chunk_topic = topic(device, Channel::TransferChunk);
        let id = sha256_hex(&bundle);
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let batch: Vec<Vec<u8>> = {
                    let m = messages.lock().unwrap();
                    let new = m[seen..].iter().map(|(_, p)| p.clone()).collect();
                    seen = m.len();
                    new
                };
                for payload in batch {
                    let req: ChunkRequest = link::decode(&payload).unwrap();
                    assert_eq!(
                        (req.bundle_id.as_str(), req.chunk_size),
                        (id.as_str(), chunk_size)
                    );
                    let total = link::chunk_count(bundle.len() as u64, chunk_size);
                    for index in req.first..req.first + req.count {
                        requested.lock().unwrap().push(index);
                        if index >= serve_below.load(Ordering::SeqCst)
                            || lose.lock().unwrap().remove(&index)
                        {
                            continue;
                        }
                        let start = index as usize * chunk_size as usize;
                        let mut bytes =
                            bundle[start..(start + chunk_size as usize).min(bundle.len())].to_vec();
                        if tamper.lock().unwrap().contains(&index) {
                            bytes[0] ^= 0x01;
                        }
                        let header = ChunkHeader {
                            bundle_id: id.clone(),
                            index,
                            chunk_size,
                            total,
                            sha256: sha256_hex(&bytes),
                            error: None,
                        };
                        let mut frame = encode_chunk(&header, &bytes);
                        if corrupt.lock().unwrap().remove(&index) {
                            let last = frame.len() - 1;
                            frame[last] ^= 0xff;
                        }
                        client
                            .publish(chunk_topic.clone(), qos, false, frame)
                            .await
                            .unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        server
    }

    pub async fn command(&self, device: &str, id: &str, action: Action) {
        self.tap
            .client
            .publish(
                topic(device, Channel::Commands),
                QoS::AtLeastOnce,
                false,
                signed_command(device, id, action),
            )
            .await
            .unwrap();
    }

    pub fn requests_of(&self, index: u32) -> usize {
        self.requested
            .lock()
            .unwrap()
            .iter()
            .filter(|&&i| i == index)
            .count()
    }
}

pub fn bundle_ref(bytes: &[u8], name: &str, version: &str, chunk_size: u32) -> BundleRef {
    BundleRef {
        bundle_id: sha256_hex(bytes),
        name: name.into(),
        version: version.into(),
        size: bytes.len() as u64,
        chunk_size,
        http_url: None,
    }
}

pub fn open_agent(fx: &Fixture, data: &str) -> Arc<Agent> {
    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&fx.keyring).unwrap())
            .unwrap();
    let mut config = AgentConfig::new(fx.path(data));
    config.workers = 1;
    Arc::new(Agent::open(config, keyring).unwrap())
}

pub fn link_config(broker: &str, device: &str) -> LinkConfig {
    let mut c = LinkConfig::new(broker, device);
    c.server_key = Some(server_key().public());
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(500);
    c
}
