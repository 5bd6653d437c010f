//! The bulk connection: chunk frames leave the server on a second, publish-only MQTT connection
//! at QoS 0, so they never queue in front of the chunk requests, status, events and telemetry
//! that arrive on the main connection (nor their PUBACKs in front of the next request).
//!
//! Why: on one connection, rumqttc's event loop alternates between reading the socket and
//! writing queued publishes, and a 64 KiB frame is written and flushed whole; with QoS 1 every
//! frame also owes the broker a PUBACK the loop must read. A chunk request that arrived while
//! the server pushed a window of frames waited 11–45 ms before the server even saw it
//! (BENCHMARKS.md, issue 5), and a transfer is a sequence of such round trips.
//!
//! The bulk connection ([`plan`]):
//! - client id `{client_id}-bulk`, clean session, no subscriptions, no last will;
//! - the main connection's broker URL and CA file; under mutual TLS it needs a certificate
//!   identity of its own (`--bulk-client-cert`/`--bulk-client-key`): with Mosquitto's
//!   `use_identity_as_username` + `use_username_as_clientid` the same certificate would make
//!   both connections one client id, and each connect would throw the other off. Without one
//!   the frames stay on the main connection, and the server says so once at start;
//! - `--no-bulk-connection` keeps them on the main connection (QoS 1) too.
//!
//! QoS 0: a frame lost on the way (the bulk connection dropped, a broker dropped it) is asked for
//! again by the agent once its request times out (`LinkConfig::request_timeout`, 10 s by default,
//! and at once after the agent's own reconnect); the agent checks every chunk's sha256 and the
//! whole bundle's against its id, so nothing relies on delivery guarantees. While the bulk
//! connection is down, frames go out on the main connection at QoS 1 ([`BulkLink::route`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::fleet::Fleet;
use crate::mqtt::{self, BrokerConnection, MqttError};

/// Appended to the server's client id for its bulk connection.
pub const BULK_CLIENT_SUFFIX: &str = "-bulk";

/// The identity (certificate CN) of a fleet server's bulk connection on Mosquitto by default
/// (`fleet-server issue-identity-cert --name fleet-server-bulk@fleet`). Like
/// [`crate::isolation::SERVER_IDENTITY`] it contains `@`, which no device id may contain.
pub const BULK_IDENTITY: &str = "fleet-server-bulk@fleet";

/// Frames queued for the bulk connection's event loop, at most (64 × 64 KiB = 4 MiB); a chunk
/// worker waits for room.
pub const BULK_QUEUE: usize = 64;

/// How long a chunk worker waits for room in the bulk queue before giving up on a request (the
/// agent asks again).
const BULK_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// How chunk frames leave the server (`ServerConfig::bulk`).
#[derive(Debug, Clone)]
pub struct BulkSettings {
    /// Use a bulk connection (default true; `--no-bulk-connection` turns it off).
    pub enabled: bool,
    /// Client certificate and key of the bulk connection under mutual TLS (both or neither).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl Default for BulkSettings {
    fn default() -> BulkSettings {
        BulkSettings {
            enabled: true,
            client_cert: None,
            client_key: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BulkError {
    #[error("--bulk-client-cert and --bulk-client-key go together")]
    HalfIdentity,
    #[error("a bulk client certificate needs an mqtts:// broker (it is for mutual TLS)")]
    NotTls,
}

/// Why chunk frames stay on the main connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMain {
    /// `--no-bulk-connection`.
    Disabled,
    /// Mutual TLS without a bulk certificate: a second connection with the main certificate
    /// would share its client id on Mosquitto (`use_username_as_clientid`).
    NoBulkIdentity,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkPlan {
    /// Connect a bulk connection like this.
    Connect(BrokerConnection),
    /// Chunk frames go on the main connection.
    Main(OnMain),
}

/// The bulk connection for a server whose main connection is `main`.
pub fn plan(main: &BrokerConnection, settings: &BulkSettings) -> Result<BulkPlan, BulkError> {
    if !settings.enabled {
        return Ok(BulkPlan::Main(OnMain::Disabled));
    }
    let identity = match (&settings.client_cert, &settings.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err(BulkError::HalfIdentity),
    };
    if identity.is_some() && !main.url.starts_with("mqtts://") {
        return Err(BulkError::NotTls);
    }
    let mutual_tls = main.client_cert.is_some();
    match identity {
        Some((cert, key)) => Ok(BulkPlan::Connect(BrokerConnection {
            client_cert: Some(cert),
            client_key: Some(key),
            ..main.clone()
        })),
        None if mutual_tls => Ok(BulkPlan::Main(OnMain::NoBulkIdentity)),
        None => Ok(BulkPlan::Connect(main.clone())),
    }
}

/// MQTT options of the bulk connection: the main connection's (TLS, packet sizes, keep-alive),
/// with a clean session and a short request queue.
pub fn options(conn: &BrokerConnection, client_id: &str) -> Result<MqttOptions, MqttError> {
    let mut opts = mqtt::options(conn, &format!("{client_id}{BULK_CLIENT_SUFFIX}"))?;
    opts.set_clean_session(true)
        .set_request_channel_capacity(BULK_QUEUE);
    Ok(opts)
}

/// Which connection a frame went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Bulk,
    Main,
}

/// The server's bulk connection as the chunk workers see it.
#[derive(Default)]
pub struct BulkLink {
    client: OnceLock<AsyncClient>,
    connected: AtomicBool,
}

impl BulkLink {
    /// Gives the link its client (once, at start).
    pub(crate) fn set_client(&self, client: AsyncClient) {
        let _ = self.client.set(client);
    }

    /// Whether a bulk connection is configured.
    pub fn enabled(&self) -> bool {
        self.client.get().is_some()
    }

    /// Connected to the broker right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Publishes a chunk frame: on the bulk connection at QoS 0 while it is up, else on `main`
    /// at QoS 1. Returns the route taken, or an error when the frame could not be queued.
    pub(crate) async fn publish(
        &self,
        main: &AsyncClient,
        topic: &str,
        frame: Vec<u8>,
    ) -> Result<Route, String> {
        match self.client.get() {
            Some(bulk) if self.is_connected() => {
                let queued = tokio::time::timeout(
                    BULK_QUEUE_TIMEOUT,
                    bulk.publish(topic, QoS::AtMostOnce, false, frame),
                )
                .await;
                match queued {
                    Ok(Ok(())) => Ok(Route::Bulk),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the bulk connection's queue stayed full".into()),
                }
            }
            _ => main
                .publish(topic, QoS::AtLeastOnce, false, frame)
                .await
                .map(|()| Route::Main)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Polls the bulk connection's event loop until `stop` turns true: nothing comes in on it but
/// acknowledgements of the connection and pings; errors are counted and followed by a backoff
/// (as on the main connection) and a reconnect.
pub async fn run(fleet: Arc<Fleet>, mut eventloop: EventLoop, mut stop: watch::Receiver<bool>) {
    // Frames are written whole; the last one of a window should not wait for an ACK.
    eventloop.network_options.set_tcp_nodelay(true);
    let mut attempt = 0u32;
    let link = &fleet.bulk;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                link.connected.store(true, Relaxed);
                fleet.metrics.bulk_connects.fetch_add(1, Relaxed);
                tracing::info!("bulk connection for chunk frames up");
            }
            Ok(_) => {}
            Err(e) => {
                let was_up = link.connected.swap(false, Relaxed);
                fleet.metrics.bulk_connection_errors.fetch_add(1, Relaxed);
                let wait = mqtt::backoff(attempt);
                attempt = attempt.saturating_add(1);
                if was_up || attempt == 1 {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "bulk MQTT connection error; chunk frames go on the main connection meanwhile");
                } else {
                    tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "bulk MQTT connection error");
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    link.connected.store(false, Relaxed);
    if let Some(client) = link.client.get() {
        let _ = client.try_disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(cert: bool) -> BrokerConnection {
        BrokerConnection {
            url: "mqtts://broker:8883".into(),
            ca_file: Some("ca.pem".into()),
            client_cert: cert.then(|| "server.pem".into()),
            client_key: cert.then(|| "server.key".into()),
        }
    }

    fn bulk_identity() -> BulkSettings {
        BulkSettings {
            client_cert: Some("bulk.pem".into()),
            client_key: Some("bulk.key".into()),
            ..BulkSettings::default()
        }
    }

    #[test]
    fn a_plain_or_server_only_tls_broker_gets_a_bulk_connection_like_the_main_one() {
        for main in [BrokerConnection::plain("mqtt://127.0.0.1:1883"), tls(false)] {
            assert_eq!(
                plan(&main, &BulkSettings::default()),
                Ok(BulkPlan::Connect(main.clone()))
            );
        }
    }

    #[test]
    fn mutual_tls_needs_a_bulk_identity_or_frames_stay_on_the_main_connection() {
        assert_eq!(
            plan(&tls(true), &BulkSettings::default()),
            Ok(BulkPlan::Main(OnMain::NoBulkIdentity))
        );
        let Ok(BulkPlan::Connect(c)) = plan(&tls(true), &bulk_identity()) else {
            panic!("a bulk identity gives a bulk connection")
        };
        assert_eq!(
            (c.client_cert, c.client_key),
            (Some("bulk.pem".into()), Some("bulk.key".into()))
        );
        assert_eq!((c.url, c.ca_file), (tls(true).url, tls(true).ca_file));
    }

    #[test]
    fn the_flag_turns_it_off_and_half_an_identity_or_plain_tcp_is_refused() {
        let off = BulkSettings {
            enabled: false,
            ..bulk_identity()
        };
        assert_eq!(plan(&tls(true), &off), Ok(BulkPlan::Main(OnMain::Disabled)));
        let half = BulkSettings {
            client_key: None,
            ..bulk_identity()
        };
        assert_eq!(plan(&tls(true), &half), Err(BulkError::HalfIdentity));
        assert_eq!(
            plan(&BrokerConnection::plain("mqtt://h:1"), &bulk_identity()),
            Err(BulkError::NotTls)
        );
    }

    #[test]
    fn the_bulk_client_id_is_the_main_one_with_a_suffix_and_a_clean_session() {
        let o = options(&BrokerConnection::plain("mqtt://127.0.0.1:1883"), "fs-1").unwrap();
        assert_eq!(o.client_id(), "fs-1-bulk");
        assert!(o.clean_session());
        assert_eq!(o.request_channel_capacity(), BULK_QUEUE);
    }
}
