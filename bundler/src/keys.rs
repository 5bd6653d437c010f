//! Key files: `keygen` and loading the `.key` / `.pub` files the other commands take.
//!
//! The formats are protocol's ([`protocol::keys`]); this module only does the file handling:
//! the secret key is created with mode 0600 before a byte is written to it, and nothing that
//! already exists is overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::keys::{KeyId, Keyring, SecretKey};

use crate::error::{KeyFileError, KeygenError};

/// The key name `keygen` uses when none is given.
pub const DEFAULT_KEY_NAME: &str = "signing";

/// The two files a key pair is stored in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyFiles {
    pub key_id: KeyId,
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// Generates a key pair as `out_dir/NAME.key` (mode 0600) and `out_dir/NAME.pub`, creating
/// `out_dir` if needed. Refuses to overwrite either file.
pub fn keygen(out_dir: &Path, name: &str) -> Result<KeyId, KeygenError> {
    keygen_files(out_dir, name).map(|f| f.key_id)
}

/// [`keygen`], returning the paths written as well.
pub fn keygen_files(out_dir: &Path, name: &str) -> Result<KeyFiles, KeygenError> {
    protocol::tar::check_entry_name(name).map_err(|reason| KeygenError::BadName {
        name: name.into(),
        reason,
    })?;
    let secret = out_dir.join(format!("{name}.key"));
    let public = out_dir.join(format!("{name}.pub"));
    for path in [&secret, &public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeygenError::Exists(path.clone()));
        }
    }
    fs::create_dir_all(out_dir).map_err(|source| KeygenError::Io {
        path: out_dir.into(),
        source,
    })?;
    let key = SecretKey::generate()?;
    write_new(&secret, key.to_file_text().as_bytes(), 0o600)?;
    let public_text = format!(
        "# modelfleet public key {id} ({name})\n{line}\n",
        id = key.id(),
        line = key.public().to_line()
    );
    if let Err(e) = write_new(&public, public_text.as_bytes(), 0o644) {
        // Leave no half key pair behind.
        let _ = fs::remove_file(&secret);
        return Err(e);
    }
    Ok(KeyFiles {
        key_id: key.id(),
        secret,
        public,
    })
}

/// Creates `path` (failing if it exists) with `mode` from the start, writes and fsyncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeygenError> {
    let io_err = |source| KeygenError::Io {
        path: path.into(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeygenError::Exists(path.into())
        } else {
            io_err(e)
        }
    })?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Reads a secret key file (`NAME.key`).
pub fn load_secret_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.into(),
        source,
    })?;
    SecretKey::from_file_text(&text).map_err(|source| KeyFileError::Parse {
        path: path.into(),
        what: "secret key",
        source,
    })
}

/// Reads one or more keyring / `.pub` files into one keyring.
pub fn load_keyring(paths: &[impl AsRef<Path>]) -> Result<Keyring, KeyFileError> {
    let mut keyring: Option<Keyring> = None;
    for path in paths {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.into(),
            source,
        })?;
        let ring = Keyring::from_file_text(&text).map_err(|source| KeyFileError::Parse {
            path: path.into(),
            what: "keyring",
            source,
        })?;
        match &mut keyring {
            Some(k) => k.extend(ring),
            None => keyring = Some(ring),
        }
    }
    Ok(keyring.unwrap_or_else(|| Keyring::new([])))
}
