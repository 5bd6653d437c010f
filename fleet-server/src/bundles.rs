//! Bundle files: verification at upload, durable storage, and reads by byte range or chunk.
//!
//! A bundle is stored as `DATA_DIR/bundles/<sha256>.mfb`, written to a temp name in the same
//! directory, fsynced, renamed, and the directory fsynced, so a crash leaves either no file or
//! the whole file. Its record (name, version, size, …) lives in the store; this module only
//! deals with bytes.
//!
//! Chunk serving reads with positioned reads (`pread`) on files kept open in a small cache, so
//! a transfer neither re-opens nor re-hashes the bundle per chunk; each chunk's sha256 is
//! computed once and kept (a bundle file never changes: its name is its hash), so a fan-out to
//! ten thousand devices hashes each chunk once, not ten thousand times.

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
/// Chunk hashes kept (about 100 bytes each); beyond this the cache starts over.
const CHUNK_HASHES: usize = 65_536;

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
    /// (bundle id, chunk size, index) → the chunk's sha256 (hex).
    chunk_hashes: Mutex<HashMap<(String, u32, u32), String>>,
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
            chunk_hashes: Mutex::new(HashMap::new()),
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
            sha256: self.chunk_hash(id, chunk_size, index, &bytes),
            error: None,
        };
        Ok(encode_chunk(&header, &bytes))
    }

    /// The sha256 of chunk `index` of bundle `id`, whose bytes are `bytes`: hashed the first
    /// time, then from the cache.
    fn chunk_hash(&self, id: &str, chunk_size: u32, index: u32, bytes: &[u8]) -> String {
        let key = (id.to_string(), chunk_size, index);
        let lock = || self.chunk_hashes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hash) = lock().get(&key) {
            return hash.clone();
        }
        let hash = sha256_hex(bytes);
        let mut hashes = lock();
        if hashes.len() >= CHUNK_HASHES {
            hashes.clear();
        }
        hashes.insert(key, hash.clone());
        hash
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

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::link::decode_chunk;

    /// Every frame carries the hash of its own bytes, whether hashed now or taken from the
    /// cache, for each chunk and each chunk size.
    #[test]
    fn chunk_frames_carry_their_own_hash_when_cached_too() {
        let dir = tempfile::tempdir().unwrap();
        let files = BundleFiles::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(files.path("b1"), &bytes).unwrap();
        for round in 0..2 {
            for chunk_size in [4096u32, 3000] {
                for index in 0..chunk_count(bytes.len() as u64, chunk_size) {
                    let frame = files
                        .chunk_frame("b1", bytes.len() as u64, chunk_size, index)
                        .unwrap();
                    let (header, payload) = decode_chunk(&frame).unwrap();
                    let start = (index * chunk_size) as usize;
                    let end = (start + chunk_size as usize).min(bytes.len());
                    assert_eq!(payload, &bytes[start..end], "round {round}");
                    assert_eq!(header.sha256, sha256_hex(payload), "round {round}");
                }
            }
        }
        assert_eq!(files.chunk_hashes.lock().unwrap().len(), 3 + 4);
    }
}
