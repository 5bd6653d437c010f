//! Counters of the server's work, and their Prometheus text exposition (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use protocol::link::Channel;

/// Monotonic counters; gauges (devices, bundles, events) are read from the state when rendered.
#[derive(Default)]
pub struct Metrics {
    pub status_received: AtomicU64,
    pub events_received: AtomicU64,
    pub telemetry_received: AtomicU64,
    pub chunk_requests_received: AtomicU64,
    /// Messages on topics of ours that the server does not read (commands, chunks) or foreign topics.
    pub other_received: AtomicU64,
    pub malformed_status: AtomicU64,
    pub malformed_events: AtomicU64,
    pub malformed_telemetry: AtomicU64,
    pub malformed_chunk_requests: AtomicU64,
    pub duplicate_events: AtomicU64,
    /// Telemetry windows received again (kept once).
    pub duplicate_windows: AtomicU64,
    pub chunks_served: AtomicU64,
    pub chunk_bytes_served: AtomicU64,
    pub chunk_errors_sent: AtomicU64,
    /// Chunk requests dropped because the serving queue was full.
    pub chunk_requests_dropped: AtomicU64,
    /// Chunk frames (data and error frames) published on the bulk connection (QoS 0) ...
    pub chunk_frames_bulk: AtomicU64,
    /// ... and on the main connection (QoS 1: no bulk connection, or it was down).
    pub chunk_frames_main: AtomicU64,
    /// Chunk frames that could not be queued for the broker (the rest of that request is
    /// dropped; the agent asks again).
    pub chunk_frames_unsent: AtomicU64,
    /// The bulk connection's ConnAcks and errors.
    pub bulk_connects: AtomicU64,
    pub bulk_connection_errors: AtomicU64,
    pub commands_sent: AtomicU64,
    /// Stage commands published again, unchanged, because their device had not answered.
    pub commands_resent: AtomicU64,
    pub mqtt_connects: AtomicU64,
    pub mqtt_connection_errors: AtomicU64,
    pub store_errors: AtomicU64,
    pub http_unauthorized: AtomicU64,
    /// API requests answered 429 because their address failed authentication too often.
    pub http_rate_limited: AtomicU64,
    /// Status and event messages whose payload names another device than their topic.
    pub device_mismatch: AtomicU64,
}

/// The gauges, read from the state at render time.
pub struct Gauges {
    pub devices: u64,
    pub devices_online: u64,
    pub bundles: u64,
    pub events: u64,
    pub mqtt_connected: bool,
    /// The bulk connection for chunk frames is up (false when there is none).
    pub bulk_connected: bool,
    pub telemetry_keys: u64,
    pub telemetry_windows: u64,
}

impl Metrics {
    pub fn received(&self, channel: Channel) {
        let c = match channel {
            Channel::Status => &self.status_received,
            Channel::Events => &self.events_received,
            Channel::Telemetry => &self.telemetry_received,
            Channel::TransferRequest => &self.chunk_requests_received,
            Channel::Commands | Channel::TransferChunk => &self.other_received,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn malformed(&self, channel: Channel) {
        let c = match channel {
            Channel::Status => &self.malformed_status,
            Channel::Events => &self.malformed_events,
            Channel::Telemetry => &self.malformed_telemetry,
            Channel::TransferRequest => &self.malformed_chunk_requests,
            Channel::Commands | Channel::TransferChunk => &self.other_received,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Total malformed messages over every channel.
    pub fn malformed_total(&self) -> u64 {
        [
            &self.malformed_status,
            &self.malformed_events,
            &self.malformed_telemetry,
            &self.malformed_chunk_requests,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        let l = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "fleet_devices",
            "gauge",
            "Devices known to the server.",
            &[("", g.devices)],
        );
        metric(
            "fleet_devices_online",
            "gauge",
            "Devices whose last status says online.",
            &[("", g.devices_online)],
        );
        metric(
            "fleet_bundles",
            "gauge",
            "Bundles stored.",
            &[("", g.bundles)],
        );
        metric(
            "fleet_events",
            "gauge",
            "Events in the event log.",
            &[("", g.events)],
        );
        metric(
            "fleet_telemetry_series",
            "gauge",
            "(device, model, version) keys with telemetry windows in memory.",
            &[("", g.telemetry_keys)],
        );
        metric(
            "fleet_telemetry_windows",
            "gauge",
            "Telemetry windows in memory, over every key (bounded by --telemetry-max-windows).",
            &[("", g.telemetry_windows)],
        );
        metric(
            "fleet_mqtt_connected",
            "gauge",
            "1 while the server's MQTT session is up.",
            &[("", g.mqtt_connected as u64)],
        );
        metric(
            "fleet_mqtt_messages_received_total",
            "counter",
            "MQTT messages received, by channel.",
            &[
                ("channel=\"status\"", l(&self.status_received)),
                ("channel=\"events\"", l(&self.events_received)),
                ("channel=\"telemetry\"", l(&self.telemetry_received)),
                ("channel=\"transfer_req\"", l(&self.chunk_requests_received)),
                ("channel=\"other\"", l(&self.other_received)),
            ],
        );
        metric(
            "fleet_mqtt_messages_malformed_total",
            "counter",
            "MQTT messages dropped as malformed (bad JSON, unknown schema, oversize, bad values), by channel.",
            &[
                ("channel=\"status\"", l(&self.malformed_status)),
                ("channel=\"events\"", l(&self.malformed_events)),
                ("channel=\"telemetry\"", l(&self.malformed_telemetry)),
                ("channel=\"transfer_req\"", l(&self.malformed_chunk_requests)),
            ],
        );
        metric(
            "fleet_device_events_duplicate_total",
            "counter",
            "Device events received again (same device and seq) and not stored twice.",
            &[("", l(&self.duplicate_events))],
        );
        metric(
            "fleet_telemetry_windows_duplicate_total",
            "counter",
            "Telemetry windows received again (same device, model, version and start); kept once.",
            &[("", l(&self.duplicate_windows))],
        );
        metric(
            "fleet_chunks_served_total",
            "counter",
            "Bundle chunks published.",
            &[("", l(&self.chunks_served))],
        );
        metric(
            "fleet_chunk_bytes_served_total",
            "counter",
            "Bundle bytes published in chunks.",
            &[("", l(&self.chunk_bytes_served))],
        );
        metric(
            "fleet_chunk_errors_total",
            "counter",
            "Error frames sent (unknown bundle, bad range, unreadable file).",
            &[("", l(&self.chunk_errors_sent))],
        );
        metric(
            "fleet_chunk_requests_dropped_total",
            "counter",
            "Chunk requests dropped because the serving queue was full (the agent asks again).",
            &[("", l(&self.chunk_requests_dropped))],
        );
        metric(
            "fleet_chunk_frames_sent_total",
            "counter",
            "Chunk frames published, by connection: bulk (QoS 0) or main (QoS 1).",
            &[
                ("connection=\"bulk\"", l(&self.chunk_frames_bulk)),
                ("connection=\"main\"", l(&self.chunk_frames_main)),
            ],
        );
        metric(
            "fleet_chunk_frames_unsent_total",
            "counter",
            "Chunk frames that could not be queued for the broker (the agent asks again).",
            &[("", l(&self.chunk_frames_unsent))],
        );
        metric(
            "fleet_mqtt_bulk_connected",
            "gauge",
            "1 while the bulk connection for chunk frames is up (0 when down or not configured).",
            &[("", g.bulk_connected as u64)],
        );
        metric(
            "fleet_mqtt_bulk_connects_total",
            "counter",
            "Bulk connections made (ConnAck received).",
            &[("", l(&self.bulk_connects))],
        );
        metric(
            "fleet_mqtt_bulk_connection_errors_total",
            "counter",
            "Bulk connection errors (each followed by a backoff and a reconnect; frames take the main connection meanwhile).",
            &[("", l(&self.bulk_connection_errors))],
        );
        metric(
            "fleet_commands_sent_total",
            "counter",
            "Commands published to devices.",
            &[("", l(&self.commands_sent))],
        );
        metric(
            "fleet_commands_resent_total",
            "counter",
            "Rollout stage commands published again unchanged (no answer from the device yet).",
            &[("", l(&self.commands_resent))],
        );
        metric(
            "fleet_mqtt_connects_total",
            "counter",
            "MQTT connections made (ConnAck received).",
            &[("", l(&self.mqtt_connects))],
        );
        metric(
            "fleet_mqtt_connection_errors_total",
            "counter",
            "MQTT connection errors (each followed by a backoff and a reconnect).",
            &[("", l(&self.mqtt_connection_errors))],
        );
        metric(
            "fleet_store_errors_total",
            "counter",
            "Failed database operations.",
            &[("", l(&self.store_errors))],
        );
        metric(
            "fleet_http_unauthorized_total",
            "counter",
            "API requests refused for a missing or unknown token.",
            &[("", l(&self.http_unauthorized))],
        );
        metric(
            "fleet_http_auth_rate_limited_total",
            "counter",
            "API requests refused (429) because their client address failed authentication too often.",
            &[("", l(&self.http_rate_limited))],
        );
        metric(
            "fleet_mqtt_device_mismatch_total",
            "counter",
            "Status and event messages dropped because their payload names another device than their topic.",
            &[("", l(&self.device_mismatch))],
        );
        out
    }
}
