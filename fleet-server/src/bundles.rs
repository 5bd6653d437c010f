//! Bundle files: verification at upload, durable storage, and reads by byte range or chunk.
//!
//! A bundle is stored as `DATA_DIR/bundles/<sha256>.mfb`, written to a temp name in the same
//! directory, fsynced, renamed, and the directory fsynced, so a crash leaves either no file or
//! the whole file. Its record (name, version, size, …) lives in the store; this module only
//! deals with bytes.
//!
//! Chunk serving reads with positioned reads (`pread`) on files kept open in a small cache, so
//! a transfer neither re-opens nor re-hashes the bundle per chunk.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::bundle::{read_bundle, BundleError, DiscardSink, VerifiedBundle, VerifyOptions};
use protocol::keys::Keyring;
use protocol::link::{chunk_count, encode_chunk, sha256_hex, ChunkHeader};

/// Open files kept for chunk serving.
const OPEN_FILES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum BundleFileError {
    #[error("bundle does not verify: {0}")]
    Verify(#[from] BundleError),
    #[error("bundle file {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// The bundle directory and its open-file cache.
pub struct BundleFiles {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl BundleFiles {
    /// Uses `dir` (created if missing); leftover temp files of interrupted uploads are removed.
    pub fn open(dir: &Path) -> Result<BundleFiles, BundleFileError> {
        let io_err = |source| BundleFileError::Io {
            path: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        for entry in fs::read_dir(dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(BundleFiles {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.mfb"))
    }

    /// Verifies `bytes` against `keyring` and, when they verify, stores them under their sha256
    /// (unless that file exists already). Blocking: call from a blocking thread.
    pub fn verify_and_store(
        &self,
        bytes: &[u8],
        keyring: &Keyring,
    ) -> Result<VerifiedBundle, BundleFileError> {
        let verified = read_bundle(bytes, &VerifyOptions::new(keyring), &mut DiscardSink)?;
        let path = self.path(&verified.sha256);
        if !path.exists() {
            self.write_atomically(&path, bytes)
                .map_err(|source| BundleFileError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        Ok(verified)
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix).map_err(io::Error::other)?;
        let tmp = self.dir.join(format!(".{}.tmp", hex::encode(suffix)));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The open file of bundle `id`.
    pub fn file(&self, id: &str) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(id))?);
        if open.len() >= OPEN_FILES {
            // Any entry will do: re-opening a bundle is cheap, and transfers are bursty.
            let victim = open.keys().next().cloned();
            if let Some(v) = victim {
                open.remove(&v);
            }
        }
        open.insert(id.to_string(), f.clone());
        Ok(f)
    }

    /// Reads `len` bytes of bundle `id` at `offset` (fewer at the end of the file).
    pub fn read_at(&self, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = self.file(id)?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = f.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// The frame carrying chunk `index` of bundle `id` (of `size` bytes) cut at `chunk_size`.
    pub fn chunk_frame(
        &self,
        id: &str,
        size: u64,
        chunk_size: u32,
        index: u32,
    ) -> io::Result<Vec<u8>> {
        let offset = index as u64 * chunk_size as u64;
        let len = (size.saturating_sub(offset)).min(chunk_size as u64) as usize;
        let bytes = self.read_at(id, offset, len)?;
        if bytes.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bundle {id} is shorter than its record says"),
            ));
        }
        let header = ChunkHeader {
            bundle_id: id.to_string(),
            index,
            chunk_size,
            total: chunk_count(size, chunk_size),
            sha256: sha256_hex(&bytes),
            error: None,
        };
        Ok(encode_chunk(&header, &bytes))
    }
}

/// An error frame: the chunk cannot be served.
pub fn error_frame(bundle_id: &str, chunk_size: u32, index: u32, total: u32, why: &str) -> Vec<u8> {
    encode_chunk(
        &ChunkHeader {
            bundle_id: bundle_id.to_string(),
            index,
            chunk_size,
            total,
            sha256: String::new(),
            error: Some(why.to_string()),
        },
        &[],
    )
}
