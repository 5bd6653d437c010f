//! The embedded MQTT broker: rumqttd, configured in code, on its own threads.
//!
//! rumqttd's `Broker::start` blocks for the broker's lifetime and cannot report the port it
//! bound, so [`EmbeddedBroker::start`] picks a free port first when asked for port 0, runs the
//! broker on a thread of its own and returns once the port accepts TCP connections on a socket
//! of this process (on Linux; a port another process took between the pick and rumqttd's bind
//! is an error, not a broker that silently is someone else's). rumqttd keeps everything in
//! memory: retained messages and persistent sessions last as long as the process. It has no
//! shutdown; the broker lives until the process exits (tests that stop and restart a broker run
//! `fleet-server broker` as a child process).
//!
//! Limits set here: messages up to [`max_packet`] bytes (a 1 MiB chunk frame fits), 4096
//! connections, and per subscription filter a log of at most 4 segments of 8 MiB (a subscriber
//! that falls more than ~24 MiB behind on one filter loses the oldest messages). rumqttd hands a
//! new QoS 1 subscriber at most 100 retained messages per filter; the server's registry is
//! durable and devices republish their status on every connect, so this only delays the first
//! sight of devices beyond the hundredth when a new server subscribes to a busy broker.
//!
//! rumqttd 0.20 writes to its sockets with Nagle's algorithm on and has no setting to turn it
//! off, so a small packet it forwards (a device's chunk request to the server, an acknowledgement)
//! waits for the peer's acknowledgement of the previous one: a chunk transfer, which is a chain of
//! such round trips, ran at less than half the rate of a plain publish loop (BENCHMARKS.md,
//! "Staging a bundle over MQTT"). On Linux an accepted socket inherits `TCP_NODELAY` from its
//! listening socket, so once the broker listens, [`EmbeddedBroker::start`] finds the listener
//! among the process's own descriptors and sets the option there ([`set_nodelay_on_listener`]).

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
                // rumqttd returns once its listener's thread ends: at once when its bind fails.
                let outcome = match broker.start() {
                    Ok(()) => format!("its listener on {addr} stopped (is the address free?)"),
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
                match set_nodelay_on_listener(addr) {
                    Ok(true) => {}
                    // On Linux the listener is always among our descriptors once rumqttd
                    // listens: what accepted the connection is another process's socket, and
                    // rumqttd's bind failed (it logs that and keeps running without a listener).
                    Ok(false) if cfg!(target_os = "linux") => {
                        return Err(BrokerError::Bind {
                            addr,
                            source: std::io::Error::new(
                                std::io::ErrorKind::AddrInUse,
                                "another process listens on it",
                            ),
                        })
                    }
                    Ok(false) => tracing::warn!(
                        %addr,
                        "cannot set TCP_NODELAY on the embedded broker's listening socket on \
                         this system: it forwards small packets with Nagle's delay"
                    ),
                    Err(e) => tracing::warn!(
                        %addr,
                        error = %e,
                        "cannot set TCP_NODELAY on the embedded broker's listening socket: it \
                         forwards small packets with Nagle's delay"
                    ),
                }
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

/// Sets `TCP_NODELAY` on this process's socket listening on `addr` (rumqttd's; the connections
/// it accepts from then on inherit the option). Returns whether that socket was found. Only
/// Linux lists a process's descriptors in `/proc/self/fd` and makes accepted sockets inherit
/// the option; elsewhere this does nothing and returns `Ok(false)`.
#[cfg(target_os = "linux")]
pub fn set_nodelay_on_listener(addr: SocketAddr) -> std::io::Result<bool> {
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};

    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is only borrowed (ManuallyDrop: never closed here), and only
        // getsockname/getpeername/setsockopt are called on it. Were it closed and reused by
        // another thread meanwhile, the address checks below fail or a socket of ours gets
        // TCP_NODELAY, which is harmless.
        let socket = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
        let listening_on_addr =
            socket.local_addr().is_ok_and(|local| local == addr) && socket.peer_addr().is_err();
        if listening_on_addr {
            socket.set_nodelay(true)?;
            found = true;
        }
    }
    Ok(found)
}

#[cfg(not(target_os = "linux"))]
pub fn set_nodelay_on_listener(_addr: SocketAddr) -> std::io::Result<bool> {
    Ok(false)
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};

    /// `TCP_NODELAY` of this process's socket connected from `peer` to `local`, once it exists.
    fn nodelay_of_accepted(local: SocketAddr, peer: SocketAddr) -> Option<bool> {
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            // SAFETY: borrowed only, never closed; see `set_nodelay_on_listener`.
            let socket = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
            if socket.local_addr().ok() == Some(local) && socket.peer_addr().ok() == Some(peer) {
                return Some(socket.nodelay().unwrap());
            }
        }
        None
    }

    #[test]
    fn the_broker_accepts_connections_with_nagle_off() {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = TcpStream::connect(broker.addr()).unwrap();
        let client_addr = client.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let nodelay = loop {
            if let Some(nodelay) = nodelay_of_accepted(broker.addr(), client_addr) {
                break nodelay;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not accept the connection"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(nodelay, "the broker's side of the connection has Nagle on");
        assert!(client.peer_addr().is_ok());
    }
}
