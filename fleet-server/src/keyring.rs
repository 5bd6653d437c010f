//! The fleet's bundle-signing keyring and its rotations.
//!
//! The server starts from the `--keyring` file (version 0). A rotation is a
//! [`SignedKeyringUpdate`] signed by a threshold of the current keys (`POST /api/v1/keyring`);
//! each accepted update is appended to `DATA_DIR/keyring-chain.json` (temp file, fsync, rename)
//! and the whole chain is published retained on `{p}/keyring` for the devices
//! ([`protocol::keyring_chain`]). At start the stored chain is re-applied to the file keyring,
//! step by step, so a tampered chain file stops the server instead of widening its trust.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use protocol::keyring_chain::KeyringChain;
use protocol::keys::{KeyError, Keyring, SignedKeyringUpdate};

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring update refused: {0}")]
    Refused(KeyError),
    #[error("stored keyring chain {path} does not apply to the --keyring file: {source}")]
    BadChain { path: PathBuf, source: KeyError },
    #[error("keyring chain {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The current keyring and the updates that led to it.
pub struct FleetKeyring {
    path: PathBuf,
    state: RwLock<(Keyring, Vec<SignedKeyringUpdate>)>,
}

impl FleetKeyring {
    /// `base` (the `--keyring` file) with the chain stored in `data_dir` applied.
    pub fn open(base: Keyring, data_dir: &Path) -> Result<FleetKeyring, KeyringError> {
        let path = data_dir.join("keyring-chain.json");
        let file_err = |reason: String| KeyringError::File {
            path: path.clone(),
            reason,
        };
        let chain = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<KeyringChain>(&bytes)
                .map_err(|e| file_err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeyringChain::new(Vec::new()),
            Err(e) => return Err(file_err(e.to_string())),
        };
        let current = chain
            .apply(&base)
            .map_err(|source| KeyringError::BadChain {
                path: path.clone(),
                source,
            })?;
        Ok(FleetKeyring {
            path,
            state: RwLock::new((current, chain.updates)),
        })
    }

    pub fn current(&self) -> Keyring {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Every accepted update, oldest first, as published on `{p}/keyring`.
    pub fn chain(&self) -> KeyringChain {
        KeyringChain::new(
            self.state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        )
    }

    /// Checks `update` against the current keyring; if it verifies, stores the longer chain
    /// durably and makes the new keyring current. Returns (old, new).
    pub fn accept(&self, update: SignedKeyringUpdate) -> Result<(Keyring, Keyring), KeyringError> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let next = state
            .0
            .apply_update(&update)
            .map_err(KeyringError::Refused)?;
        let mut updates = state.1.clone();
        updates.push(update);
        self.persist(&KeyringChain::new(updates.clone()))?;
        let old = std::mem::replace(&mut state.0, next.clone());
        state.1 = updates;
        Ok((old, next))
    }

    fn persist(&self, chain: &KeyringChain) -> Result<(), KeyringError> {
        use std::io::Write;
        let err = |e: std::io::Error| KeyringError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&protocol::link::encode(chain)).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::keys::{KeyringUpdate, SecretKey};

    #[test]
    fn accepted_rotations_survive_a_restart_and_bad_ones_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let base = Keyring::new([a.public()]);
        let ring = FleetKeyring::open(base.clone(), dir.path()).unwrap();
        let body = KeyringUpdate {
            version: 1,
            threshold: 1,
            keys: vec![hex::encode(b.public().0.as_bytes())],
        };
        assert!(ring
            .accept(SignedKeyringUpdate::sign(&body, &[&b]))
            .is_err());
        assert_eq!(ring.current(), base);
        let (_, next) = ring
            .accept(SignedKeyringUpdate::sign(&body, &[&a]))
            .unwrap();
        assert!(next.get(&b.id()).is_some() && next.get(&a.id()).is_none());
        let again = FleetKeyring::open(base, dir.path()).unwrap();
        assert_eq!(again.current(), next);
        assert_eq!(again.chain().updates.len(), 1);
        // The chain does not apply to another starting keyring.
        assert!(FleetKeyring::open(Keyring::new([b.public()]), dir.path()).is_err());
    }
}
