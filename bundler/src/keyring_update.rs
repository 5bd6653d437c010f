//! `bundler keyring-update`: a threshold-signed keyring update, to rotate the fleet's
//! bundle-signing keys (`protocol::keys::KeyringUpdate`, `POST /api/v1/keyring`).
//!
//! The holders of the current keys sign in turn: the first writes the update with its
//! signature ([`new_update`]), each next one adds theirs ([`cosign`]); the file is the JSON the
//! fleet server takes. Nothing here checks the threshold of the *current* keyring — the server
//! and every device do that when the update is applied.

use std::path::{Path, PathBuf};

use protocol::keys::{KeyError, Keyring, SignedKeyringUpdate};

use crate::error::KeyFileError;
use crate::keys::{load_keyring, load_secret_key};

#[derive(Debug, thiserror::Error)]
pub enum KeyringUpdateError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("the new keyring is not valid: {0}")]
    Invalid(KeyError),
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

/// An update to keyring `version` made of the public keys in `new_keys` with `threshold`,
/// signed with each secret key file in `signers`.
pub fn new_update(
    version: u64,
    threshold: usize,
    new_keys: &[PathBuf],
    signers: &[PathBuf],
) -> Result<SignedKeyringUpdate, KeyringUpdateError> {
    let mut ring = load_keyring(new_keys)?;
    ring.version = version;
    ring.threshold = threshold;
    let body = ring.to_update_body();
    Keyring::from_update_body(&body).map_err(KeyringUpdateError::Invalid)?;
    let keys = signers
        .iter()
        .map(|p| load_secret_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SignedKeyringUpdate::sign(
        &body,
        &keys.iter().collect::<Vec<_>>(),
    ))
}

/// Adds the signatures of `signers` to the update in file `path` (a key that already signed
/// is not added twice).
pub fn cosign(path: &Path, signers: &[PathBuf]) -> Result<SignedKeyringUpdate, KeyringUpdateError> {
    let err = |reason: String| KeyringUpdateError::File {
        path: path.into(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut update: SignedKeyringUpdate =
        serde_json::from_slice(&bytes).map_err(|e| err(format!("not a keyring update: {e}")))?;
    for p in signers {
        let key = load_secret_key(p)?;
        if !update.signatures.iter().any(|s| s.key_id == key.id()) {
            update.signatures.push(key.sign(&update.body));
        }
    }
    Ok(update)
}
