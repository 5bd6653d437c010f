//! The server key: the ed25519 key the fleet server signs every command with
//! (`protocol::command_auth`). Agents are given its public half (`server.pub`) and obey only
//! commands it signed.
//!
//! Without `--server-key FILE`, the key is `DATA_DIR/server.key`, generated on the first start
//! (created with mode 0600 before a byte is written), and its public half is written next to it
//! as `DATA_DIR/server.pub` on every start.

use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::keys::{KeyError, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    #[error("server key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("server key {path}: {source}")]
    Parse { path: PathBuf, source: KeyError },
    #[error("cannot generate the server key: {0}")]
    Generate(KeyError),
}

/// The server key from `given`, or `data_dir/server.key` (generated if absent). Writes
/// `data_dir/server.pub` for agents either way.
pub fn load_or_generate(
    data_dir: &Path,
    given: Option<&Path>,
) -> Result<SecretKey, ServerKeyError> {
    let default = data_dir.join("server.key");
    let path = given.unwrap_or(&default);
    let key = if given.is_none() && !path.exists() {
        let key = SecretKey::generate().map_err(ServerKeyError::Generate)?;
        write_new(path, key.to_file_text().as_bytes())?;
        tracing::info!(key_id = %key.id(), path = %path.display(), "generated the server key");
        key
    } else {
        let text = std::fs::read_to_string(path).map_err(|source| ServerKeyError::Io {
            path: path.into(),
            source,
        })?;
        SecretKey::from_file_text(&text).map_err(|source| ServerKeyError::Parse {
            path: path.into(),
            source,
        })?
    };
    let public = data_dir.join("server.pub");
    let text = format!(
        "# modelfleet fleet-server command key {} (give it to agents: --server-key)\n{}\n",
        key.id(),
        key.public().to_line()
    );
    std::fs::write(&public, text).map_err(|source| ServerKeyError::Io {
        path: public,
        source,
    })?;
    Ok(key)
}

/// Creates `path` (failing if it exists) with mode 0600 from the start, writes and fsyncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), ServerKeyError> {
    let io_err = |source| ServerKeyError::Io {
        path: path.into(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_and_public_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate(dir.path(), None).unwrap();
        let b = load_or_generate(dir.path(), None).unwrap();
        assert_eq!(a.id(), b.id());
        let public = std::fs::read_to_string(dir.path().join("server.pub")).unwrap();
        let ring = protocol::keys::Keyring::from_file_text(&public).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![a.id()]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("server.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let missing = dir.path().join("nope.key");
        assert!(load_or_generate(dir.path(), Some(&missing)).is_err());
    }
}
