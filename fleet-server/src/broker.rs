//! The embedded MQTT broker: rumqttd, configured in code, on its own threads.
//!
//! rumqttd's `Broker::start` blocks for the broker's lifetime and cannot report the port it
//! bound, so [`EmbeddedBroker::start`] picks a free port first when asked for port 0, runs the
//! broker on a thread of its own and returns once the port accepts TCP connections. rumqttd
//! keeps everything in memory: retained messages and persistent sessions last as long as the
//! process. It has no shutdown; the broker lives until the process exits (tests that stop and
//! restart a broker run `fleet-server broker` as a child process).
//!
//! Limits set here: messages up to [`max_packet`] bytes (a 1 MiB chunk frame fits), 4096
//! connections, and per subscription filter a log of at most 4 segments of 8 MiB (a subscriber
//! that falls more than ~24 MiB behind on one filter loses the oldest messages). rumqttd hands a
//! new QoS 1 subscriber at most 100 retained messages per filter; the server's registry is
//! durable and devices republish their status on every connect, so this only delays the first
//! sight of devices beyond the hundredth when a new server subscribes to a busy broker.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::link::{max_frame_len, MAX_CHUNK_SIZE};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

/// Largest MQTT packet the broker accepts.
pub fn max_packet() -> usize {
    max_frame_len(MAX_CHUNK_SIZE) + 64 * 1024
}

/// Connections the broker accepts: a 10,000-device fleet plus servers and tools. rumqttd
/// preallocates its connection tables at this size (a few hundred bytes per place).
pub const MAX_CONNECTIONS: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot bind the broker address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded broker failed to start: {0}")]
    Start(String),
    #[error("the embedded broker did not accept connections on {0} within 10 s")]
    Timeout(SocketAddr),
}

/// Server-side TLS for the broker's listener (no client certificates: rumqttd is built
/// without `verify-client-cert`; use Mosquitto to test mutual TLS).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    tls: bool,
}

impl EmbeddedBroker {
    /// Starts a plain-TCP broker on `addr` (port 0: a free port) and returns when it accepts
    /// connections.
    pub fn start(addr: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
        EmbeddedBroker::start_with(addr, None)
    }

    /// Starts a broker, with TLS on its listener when `tls` is given.
    pub fn start_with(
        addr: SocketAddr,
        tls: Option<BrokerTls>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let addr = if addr.port() == 0 {
            let l = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
            l.local_addr()
                .map_err(|source| BrokerError::Bind { addr, source })?
        } else {
            addr
        };
        let is_tls = tls.is_some();
        let config = broker_config(addr, tls);
        let (failed_tx, failed_rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                let outcome = match broker.start() {
                    Ok(()) => "the broker stopped".to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = failed_tx.send(outcome);
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(why) = failed_rx.try_recv() {
                return Err(BrokerError::Start(why));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(EmbeddedBroker { addr, tls: is_tls });
            }
            if Instant::now() > deadline {
                return Err(BrokerError::Timeout(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://127.0.0.1:PORT` (or `mqtts://` with TLS): what agents and the server connect to.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}", self.addr)
    }
}

fn broker_config(addr: SocketAddr, tls: Option<BrokerTls>) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_packet(),
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4-embedded".into(),
        listen: addr,
        tls: tls.map(|t| TlsConfig::Rustls {
            capath: None,
            certpath: t.cert_pem.display().to_string(),
            keypath: t.key_pem.display().to_string(),
        }),
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: 8 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}
