//! Counters of the MQTT link, rendered on the agent's `/metrics` as `modelfleet_link_*`.
//!
//! Everything that goes wrong on the link without stopping it (a malformed command, a chunk for
//! an unknown transfer, a chunk whose hash does not match, a dropped connection) is logged and
//! counted here, so an operator sees a misbehaving peer without reading device logs.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($field:ident: $kind:literal, $help:literal;)*) => {
        /// Link counters (all monotonic except the gauges `connected` and `awaiting_server`).
        #[derive(Debug, Default)]
        pub struct LinkMetrics {
            $(#[doc = $help] pub $field: AtomicU64,)*
        }

        impl LinkMetrics {
            /// Appends the Prometheus text of every counter to `out`.
            pub fn render(&self, out: &mut String) {
                $(
                    out.push_str(concat!("# HELP modelfleet_link_", stringify!($field), " ", $help, "\n"));
                    out.push_str(concat!("# TYPE modelfleet_link_", stringify!($field), " ", $kind, "\n"));
                    out.push_str(&format!(concat!("modelfleet_link_", stringify!($field), " {}\n"),
                                          self.$field.load(Ordering::Relaxed)));
                )*
            }

            /// Every counter's name (without the `modelfleet_link_` prefix) and value, in
            /// declaration order: for summing the links of a simulated fleet.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    connected: "gauge", "1 while connected to the broker.";
    awaiting_server: "gauge", "1 while connected but holding events and telemetry: no online presence of the fleet server seen on this connection.";
    connects_total: "counter", "Connections accepted by the broker (ConnAck).";
    connection_errors_total: "counter", "Connection attempts or sessions that failed.";
    commands_total: "counter", "Commands received.";
    commands_refused_total: "counter", "Commands refused (every reason below, and malformed ones).";
    commands_refused_unsigned_total: "counter", "Commands refused: no signature.";
    commands_refused_unknown_key_total: "counter", "Commands refused: signed by a key other than the server key.";
    commands_refused_bad_signature_total: "counter", "Commands refused: the signature does not verify.";
    commands_refused_wrong_device_total: "counter", "Commands refused: addressed to another device.";
    commands_refused_expired_total: "counter", "Commands refused: expired.";
    commands_refused_replayed_total: "counter", "Commands refused: sequence number seen before (replay).";
    commands_refused_no_server_key_total: "counter", "Commands refused: the agent has no server key to check them with.";
    malformed_messages_total: "counter", "Messages refused: bad JSON, unknown schema, oversize, bad chunk frame, invalid command.";
    keyring_updates_total: "counter", "Keyring rotations accepted from the fleet's keyring chain.";
    keyring_updates_refused_total: "counter", "Keyring chains refused (a step does not verify against the keyring before it).";
    unexpected_messages_total: "counter", "Messages on a topic the agent does not read.";
    chunks_received_total: "counter", "Chunks written to a partial bundle.";
    chunk_bytes_total: "counter", "Bytes of chunks written.";
    chunks_bad_hash_total: "counter", "Chunks whose sha256 did not match their header (re-requested).";
    chunks_duplicate_total: "counter", "Chunks received again after they were stored.";
    chunks_unknown_transfer_total: "counter", "Chunks for no transfer in progress, or inconsistent with it.";
    chunk_error_frames_total: "counter", "Chunk frames in which the server said it cannot serve.";
    chunk_requests_total: "counter", "Chunk request messages published.";
    chunks_requested_total: "counter", "Chunks asked for (re-requests included).";
    chunk_request_timeouts_total: "counter", "Chunks re-requested because they did not arrive in time.";
    transfers_started_total: "counter", "Transfers started (resumptions included).";
    transfers_completed_total: "counter", "Transfers whose bundle hashed to its id.";
    transfers_failed_total: "counter", "Transfers given up (server error, hash mismatch, disk error).";
    events_published_total: "counter", "Events published.";
    events_acked_total: "counter", "Events acknowledged by the broker.";
    telemetry_published_total: "counter", "Telemetry records published.";
    telemetry_acked_total: "counter", "Telemetry records acknowledged by the broker (and removed from the outbox).";
    status_published_total: "counter", "Status messages published.";
    publish_backpressure_total: "counter", "Publishes deferred because the client's request queue was full.";
}

impl LinkMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of a command refusal reason (`protocol::command_auth::Refusal::reason`);
    /// malformed commands count as malformed messages.
    pub fn refused_counter(&self, reason: &str) -> &AtomicU64 {
        match reason {
            "unsigned" => &self.commands_refused_unsigned_total,
            "unknown_key" => &self.commands_refused_unknown_key_total,
            "bad_signature" => &self.commands_refused_bad_signature_total,
            "wrong_device" => &self.commands_refused_wrong_device_total,
            "expired" => &self.commands_refused_expired_total,
            "replayed" => &self.commands_refused_replayed_total,
            "no_server_key" => &self.commands_refused_no_server_key_total,
            _ => &self.malformed_messages_total,
        }
    }

    /// Current value of a counter (for tests and logs).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = LinkMetrics::default();
        LinkMetrics::inc(&m.chunks_bad_hash_total);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("# TYPE modelfleet_link_chunks_bad_hash_total counter\n"));
        assert!(out.contains("\nmodelfleet_link_chunks_bad_hash_total 1\n"));
        assert!(out.contains("# TYPE modelfleet_link_connected gauge\n"));
    }
}
