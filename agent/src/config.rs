//! `agent.toml`: every `fleet-agent run` setting in a file; command-line flags override it.
//!
//! ```toml
//! data_dir = "/var/lib/modelfleet"
//! keyring = "/etc/modelfleet/fleet.pub"
//! listen = "127.0.0.1:8500"
//! workers = 2             # concurrent inference requests
//! queue_limit = 64        # waiting requests before 503
//! engine_threads = 1      # intra-op threads per request
//! expiry_slack_seconds = 604800
//! admin_token = "…"       # optional: required as a bearer token on /admin/v1
//! ```

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
    pub expiry_slack_seconds: Option<u64>,
    pub admin_token: Option<String>,
    pub target: Option<String>,
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
}
