//! `agent.toml`: every `fleet-agent run` setting in a file; command-line flags override it.
//!
//! ```toml
//! data_dir = "/var/lib/modelfleet"
//! keyring = "/etc/modelfleet/fleet.pub"
//! listen = "127.0.0.1:8500"
//! workers = 2             # concurrent inference requests
//! queue_limit = 64        # waiting requests before 503
//! engine_threads = 1      # intra-op threads per request
//! f16_compute = true      # f16 bundles in half precision where the CPU has it natively (ARMv8.2 FP16)
//! backend = "tract"       # inference backend (the only one this build has)
//! expiry_slack_seconds = 604800
//! admin_token = "…"       # optional: required as a bearer token on /admin/v1
//!
//! [health]                # the health watch; every key optional (defaults shown)
//! watch = true            # false: commit new versions at once, inspect no request
//! watch_tick_ms = 100     # how often trials are judged
//! trial_min_requests = 200
//! trial_min_seconds = 60
//! trial_max_error_rate = 0.01          # above the previous model's rate
//! trial_max_p95_latency_ratio = 2.0
//! trial_latency_floor_ms = 0.5         # p95s below this count as this
//! trial_max_confidence_drop = 0.10
//! trial_max_prediction_psi = 0.25      # in excess of chance
//! trial_max_output_shift = 1.0         # standard deviations
//! trial_max_accuracy_drop = 0.05       # with label feedback
//! trial_max_input_psi = 0.5            # unset by default: input drift is reported only
//! telemetry_window_seconds = 10
//! sample_rate = 0.01                   # fraction of requests kept as sampled records
//! sample_bytes_per_hour = 4194304      # all models together
//! outbox_max_records = 50000           # telemetry outbox cap: oldest dropped (and counted)
//! outbox_max_bytes = 33554432
//!
//! [link]                  # the MQTT link to the fleet; without `broker` the agent runs offline
//! broker = "mqtts://fleet.example:8883"   # or mqtt://HOST:PORT (plain)
//! device_id = "berlin-7"  # 1-64 of A-Z a-z 0-9 . _ - (also the MQTT client id)
//! labels = { site = "berlin", hw = "pi5" }  # --label k=v adds or overrides
//! ca_file = "/etc/modelfleet/ca.pem"      # required for mqtts://: verifies the broker
//! client_cert = "/etc/modelfleet/device.pem"  # optional mutual TLS (with client_key)
//! client_key = "/etc/modelfleet/device.key"
//! topic_prefix = "modelfleet/v1"
//! transfer = "mqtt"       # or "http": bundles by HTTP Range from the command's http_url
//! chunk_size = 65536      # when a stage command names none
//! server_key = "/etc/modelfleet/server.pub"  # required: commands must be signed by the server
//! ```
//!
//! A bundle's `health_policy` overrides the trial thresholds it sets. The `fleet-agent run` flags
//! `--broker`, `--device-id`, `--label`, `--ca-file`, `--client-cert`, `--client-key`,
//! `--topic-prefix`, `--transfer` and `--server-key` override the `[link]` keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub keyring: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub workers: Option<usize>,
    pub queue_limit: Option<usize>,
    pub engine_threads: Option<usize>,
    pub f16_compute: Option<bool>,
    pub backend: Option<String>,
    pub expiry_slack_seconds: Option<u64>,
    pub admin_token: Option<String>,
    pub target: Option<String>,
    #[serde(default)]
    pub health: HealthFile,
    #[serde(default)]
    pub link: LinkFile,
}

/// The `[link]` section: the MQTT link (see [`crate::link::LinkConfig`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFile {
    pub broker: Option<String>,
    pub device_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub topic_prefix: Option<String>,
    pub transfer: Option<crate::link::TransferMode>,
    pub chunk_size: Option<u32>,
    /// The fleet server's public key file (`server.pub`): commands must be signed by it.
    pub server_key: Option<PathBuf>,
}

/// The `[health]` section.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub watch: Option<bool>,
    pub watch_tick_ms: Option<u64>,
    pub trial_min_requests: Option<u64>,
    pub trial_min_seconds: Option<u64>,
    pub trial_max_error_rate: Option<f64>,
    pub trial_max_p95_latency_ratio: Option<f64>,
    pub trial_latency_floor_ms: Option<f64>,
    pub trial_max_confidence_drop: Option<f64>,
    pub trial_max_prediction_psi: Option<f64>,
    pub trial_max_output_shift: Option<f64>,
    pub trial_max_accuracy_drop: Option<f64>,
    pub trial_max_input_psi: Option<f64>,
    pub telemetry_window_seconds: Option<u64>,
    pub sample_rate: Option<f64>,
    pub sample_bytes_per_hour: Option<u64>,
    pub outbox_max_records: Option<u64>,
    pub outbox_max_bytes: Option<u64>,
}

impl HealthFile {
    /// Applies the settings present to `config`.
    pub fn apply(&self, config: &mut crate::AgentConfig) {
        let t = &mut config.trial;
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {$(
                if let Some(v) = self.$field { $target = v; }
            )*};
        }
        set!(
            watch => config.health_watch,
            trial_min_requests => t.min_requests,
            trial_min_seconds => t.min_seconds,
            trial_max_error_rate => t.max_error_rate,
            trial_max_p95_latency_ratio => t.max_p95_latency_ratio,
            trial_latency_floor_ms => t.latency_floor_ms,
            trial_max_confidence_drop => t.max_confidence_drop,
            trial_max_prediction_psi => t.max_prediction_psi,
            trial_max_output_shift => t.max_output_shift,
            trial_max_accuracy_drop => t.max_accuracy_drop,
            sample_rate => config.sample_rate,
            sample_bytes_per_hour => config.sample_bytes_per_hour,
            outbox_max_records => config.outbox.max_records,
            outbox_max_bytes => config.outbox.max_bytes,
        );
        if let Some(s) = self.telemetry_window_seconds {
            config.telemetry_window = std::time::Duration::from_secs(s.max(1));
        }
        if let Some(v) = self.trial_max_input_psi {
            t.max_input_psi = Some(v);
        }
        if let Some(ms) = self.watch_tick_ms {
            config.watch_tick = std::time::Duration::from_millis(ms.max(1));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nworkers = 3\n").unwrap();
        let c = ConfigFile::load(&path).unwrap();
        assert_eq!((c.listen.unwrap().port(), c.workers), (9000, Some(3)));
        std::fs::write(&path, "listn = 1\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("listn"), "{err}");
    }

    #[test]
    fn link_section_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[link]\nbroker = \"mqtt://127.0.0.1:1883\"\ndevice_id = \"d1\"\n\
             labels = { site = \"berlin\" }\ntransfer = \"http\"\n",
        )
        .unwrap();
        let c = ConfigFile::load(&path).unwrap();
        assert_eq!(c.link.broker.as_deref(), Some("mqtt://127.0.0.1:1883"));
        assert_eq!(c.link.labels["site"], "berlin");
        assert_eq!(c.link.transfer, Some(crate::link::TransferMode::Http));
        std::fs::write(&path, "[link]\nbrokr = \"x\"\n").unwrap();
        assert!(ConfigFile::load(&path).is_err(), "typos are refused");
    }

    #[test]
    fn health_section_overrides_trial_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[health]\ntrial_min_requests = 100\ntrial_min_seconds = 2\ntrial_max_input_psi = 0.3\n",
        )
        .unwrap();
        let c = ConfigFile::load(&path).unwrap();
        let mut config = crate::AgentConfig::new(dir.path());
        let defaults = config.trial.clone();
        c.health.apply(&mut config);
        assert_eq!(
            (config.trial.min_requests, config.trial.min_seconds),
            (100, 2)
        );
        assert_eq!(config.trial.max_input_psi, Some(0.3));
        assert_eq!(
            config.trial.max_p95_latency_ratio,
            defaults.max_p95_latency_ratio
        );
        assert!(config.health_watch);
        std::fs::write(&path, "[health]\ntrial_min_request = 1\n").unwrap();
        assert!(ConfigFile::load(&path).is_err(), "typos are refused");
    }
}
