//! The server's MQTT session: connection options (TCP or TLS), the event loop with reconnects,
//! subscriptions, and the hand-off of incoming messages to the ingest and chunk workers.
//!
//! One persistent session (`clean_session = false`, a client id stable per data directory), so
//! QoS 1 messages published while the server was away are delivered when it comes back. The
//! event loop is polled by one task; after an error it sleeps (exponential backoff from 100 ms
//! to 10 s, ±50 % jitter) and polls again, which reconnects. Every ConnAck resubscribes.
//!
//! Every SubAck is followed by the server's retained presence (`{p}/server`, `online: true`):
//! devices hold events and telemetry until they see it, so nothing they publish falls into a
//! broker that lost the server's subscriptions (a restart without persistence). A clean stop
//! publishes `online: false`, and so does the last will (unless the server shares its
//! subscriptions with others, `--shared-subscription`: one leaving says nothing of the rest).
//!
//! Incoming messages never block that task on slow work: status, events and telemetry go to an
//! ingest thread (it writes the store); chunk requests go to a bounded queue served by async
//! workers (dropped and counted when full — the agent asks again).

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use protocol::link::{self, max_frame_len, Channel, ChunkRequest, Topics, MAX_CHUNK_SIZE};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch, Mutex};

use crate::fleet::Fleet;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("broker URL '{0}' is not valid: use mqtt://HOST:PORT or mqtts://HOST:PORT")]
    BadUrl(String),
    #[error("cannot read {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("an mqtts:// broker needs --ca-file (the CA that signed the broker's certificate)")]
    NoCa,
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConnection {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub url: String,
    /// PEM file of the CA(s) to trust (required with `mqtts://`).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl BrokerConnection {
    pub fn plain(url: impl Into<String>) -> BrokerConnection {
        BrokerConnection {
            url: url.into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// Largest MQTT packet the server sends.
pub fn max_packet() -> usize {
    max_frame_len(MAX_CHUNK_SIZE) + 64 * 1024
}

/// Largest MQTT packet the server accepts: the protocol's maximum. A smaller limit would let
/// one oversize message (which a broker with a large limit delivers) close the session, and
/// the persistent session would redeliver it forever; instead it is read, counted and dropped.
pub const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;

/// Splits `mqtt://host:port` / `mqtts://host:port` into (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), MqttError> {
    let bad = || MqttError::BadUrl(url.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(bad());
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || rest.contains('/') {
        return Err(bad());
    }
    Ok((tls, host.to_string(), port))
}

/// MQTT options for the server's session.
pub fn options(conn: &BrokerConnection, client_id: &str) -> Result<MqttOptions, MqttError> {
    let (tls, host, port) = parse_url(&conn.url)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(MAX_INCOMING_PACKET, max_packet())
        .set_request_channel_capacity(1024)
        .set_inflight(100);
    if tls {
        opts.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(rustls_config(conn)?)),
        ));
    }
    Ok(opts)
}

/// A rustls client configuration (ring provider) trusting `ca_file`, with the client
/// certificate when given.
pub fn rustls_config(conn: &BrokerConnection) -> Result<rustls::ClientConfig, MqttError> {
    let ca = conn.ca_file.as_ref().ok_or(MqttError::NoCa)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca, "CA file")? {
        roots
            .add(cert)
            .map_err(|e| MqttError::Tls(format!("CA file {}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MqttError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    match (&conn.client_cert, &conn.client_key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "client certificate")?;
            let pem_err = |reason: String| MqttError::Pem {
                what: "client key",
                path: key.display().to_string(),
                reason,
            };
            let bytes = std::fs::read(key).map_err(|e| pem_err(e.to_string()))?;
            let key = rustls_pemfile::private_key(&mut &bytes[..])
                .map_err(|e| pem_err(e.to_string()))?
                .ok_or_else(|| pem_err("no private key in the file".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttError::Tls(e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(MqttError::Tls(
            "--client-cert and --client-key go together".into(),
        )),
    }
}

fn read_certs(
    path: &std::path::Path,
    what: &'static str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, MqttError> {
    let err = |reason: String| MqttError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut &bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The topic filters the server subscribes to; telemetry through `$share/{group}/` when set.
pub fn subscriptions(topics: &Topics, shared_group: Option<&str>) -> Vec<String> {
    let telemetry = topics.every_device(Channel::Telemetry);
    vec![
        topics.every_device(Channel::Status),
        topics.every_device(Channel::Events),
        match shared_group {
            Some(g) => format!("$share/{g}/{telemetry}"),
            None => telemetry,
        },
        topics.every_device(Channel::TransferRequest),
    ]
}

/// Backoff before reconnect attempt `attempt` (0-based): 100 ms doubling to 10 s, ±50 % jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    let mut r = [0u8; 2];
    let _ = getrandom::getrandom(&mut r);
    let jitter = u16::from_le_bytes(r) as f64 / u16::MAX as f64; // 0..1
    Duration::from_millis((base as f64 * (0.5 + jitter)) as u64)
}

/// Chunk requests queued for serving.
const CHUNK_QUEUE: usize = 4096;
/// Messages queued for the ingest thread.
const INGEST_QUEUE: usize = 8192;
/// Most messages the ingest thread stores in one commit.
const INGEST_BATCH: usize = 512;
/// Async tasks serving chunk requests.
const CHUNK_WORKERS: usize = 2;

/// Runs the event loop until `stop` turns true: dispatches messages, reconnects, resubscribes.
pub async fn run(
    fleet: Arc<Fleet>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    filters: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let (ingest_tx, mut ingest_rx) = mpsc::channel::<(String, Channel, bytes::Bytes)>(INGEST_QUEUE);
    let ingest_fleet = fleet.clone();
    let ingest = tokio::task::spawn_blocking(move || {
        // Whatever queued up while the last batch was being stored goes in the next one.
        let mut batch = Vec::with_capacity(INGEST_BATCH);
        while let Some(first) = ingest_rx.blocking_recv() {
            batch.push(first);
            while batch.len() < INGEST_BATCH {
                match ingest_rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            ingest_fleet.ingest_batch(
                batch
                    .iter()
                    .map(|(device, channel, payload)| (device.as_str(), *channel, &payload[..])),
            );
            batch.clear();
        }
    });
    let (chunk_tx, chunk_rx) = mpsc::channel::<(String, ChunkRequest)>(CHUNK_QUEUE);
    let chunk_rx = Arc::new(Mutex::new(chunk_rx));
    let mut workers = Vec::new();
    for _ in 0..CHUNK_WORKERS {
        let (fleet, rx) = (fleet.clone(), chunk_rx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some((device, req)) = next else { break };
                fleet.serve_chunks(&device, req).await;
            }
        }));
    }

    let mut attempt = 0u32;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                fleet.mqtt_connected.store(true, Relaxed);
                fleet.metrics.mqtt_connects.fetch_add(1, Relaxed);
                tracing::info!("connected to the MQTT broker; subscribing");
                let (client, filters) = (client.clone(), filters.clone());
                let keyring_fleet = fleet.clone();
                tokio::spawn(async move {
                    let subs = filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        tracing::warn!(error = %e, "cannot queue the subscriptions");
                    }
                    // Retained, but a broker without persistence forgets it on a restart.
                    if let Err(e) = keyring_fleet.publish_keyring().await {
                        tracing::warn!(error = %e, "cannot publish the keyring chain");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                fleet.mqtt_subscribed.store(true, Relaxed);
                // Devices hold events and telemetry until they see this (after a broker restart
                // the subscriptions were gone until now).
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    if let Err(e) = fleet.publish_presence(true).await {
                        tracing::warn!(error = %e, "cannot publish the server's presence");
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                dispatch(&fleet, &ingest_tx, &chunk_tx, &p.topic, p.payload).await;
            }
            Ok(_) => {}
            Err(e) => {
                fleet.mqtt_connected.store(false, Relaxed);
                fleet.metrics.mqtt_connection_errors.fetch_add(1, Relaxed);
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT connection error");
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    if fleet.mqtt_connected.load(Relaxed) {
        // Devices hold what they would publish until a server is back; the last will says the
        // same when the server dies instead.
        let _ = tokio::time::timeout(Duration::from_secs(1), fleet.publish_presence(false)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Incoming(Packet::PubAck(_))) {
                    break;
                }
            }
        })
        .await;
    }
    fleet.mqtt_connected.store(false, Relaxed);
    let _ = client.try_disconnect();
    drop(ingest_tx);
    drop(chunk_tx);
    for w in workers {
        w.abort();
        let _ = w.await;
    }
    let _ = ingest.await;
}

async fn dispatch(
    fleet: &Fleet,
    ingest: &mpsc::Sender<(String, Channel, bytes::Bytes)>,
    chunks: &mpsc::Sender<(String, ChunkRequest)>,
    topic: &str,
    payload: bytes::Bytes,
) {
    let Some((device, channel)) = fleet.topics.parse(topic) else {
        fleet.metrics.other_received.fetch_add(1, Relaxed);
        tracing::warn!(topic, "message on a topic the server does not read");
        return;
    };
    match channel {
        Channel::TransferRequest => {
            fleet.metrics.received(channel);
            fleet.heard_from(device);
            match link::decode::<ChunkRequest>(&payload) {
                Ok(req) => {
                    if chunks.try_send((device.to_string(), req)).is_err() {
                        fleet.metrics.chunk_requests_dropped.fetch_add(1, Relaxed);
                        tracing::warn!(device, "chunk request dropped: serving queue full");
                    }
                }
                Err(e) => {
                    fleet.metrics.malformed(channel);
                    tracing::warn!(device, error = %e, "dropped malformed chunk request");
                }
            }
        }
        Channel::Status | Channel::Events | Channel::Telemetry => {
            let _ = ingest.send((device.to_string(), channel, payload)).await;
        }
        Channel::Commands | Channel::TransferChunk => {
            fleet.metrics.other_received.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_url("mqtts://broker.local").unwrap(),
            (true, "broker.local".into(), 8883)
        );
        for bad in ["http://x:1", "mqtt://", "mqtt://h:port", "mqtt://h:1/path"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for _ in 0..20 {
            let first = backoff(0).as_millis();
            assert!((50..=150).contains(&first), "{first}");
            let late = backoff(30).as_millis();
            assert!((5_000..=15_000).contains(&late), "{late}");
        }
    }

    #[test]
    fn telemetry_can_be_shared() {
        let subs = subscriptions(&Topics::default(), Some("servers"));
        assert!(subs.contains(&"$share/servers/modelfleet/v1/devices/+/telemetry".to_string()));
        assert!(subs.contains(&"modelfleet/v1/devices/+/status".to_string()));
    }
}
