//! The on-disk layout of the data directory and its crash-safe file operations.
//!
//! ```text
//! DATA_DIR/
//!   agent.redb                     state: slot records, security floors, events
//!   tmp/<unique>/                  an install in progress (wiped at every start)
//!   tmp/transfers/<bundle>.part    a bundle being fetched by the MQTT link (kept across starts;
//!                                  its received-chunk bitmap is in agent.redb)
//!   slots/<model>/<slot dir>/      verified payloads: model.onnx, golden.bin, manifest.json
//! ```
//!
//! Invariant: a directory under `slots/` is complete and verified before it gets its name. An
//! install writes and fsyncs every file in `tmp/`, then renames the directory into `slots/` and
//! fsyncs the parent; only afterwards does the store record point at it. A crash leaves at worst a
//! `tmp/` directory or an unreferenced slot, both removed at the next start.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const MANIFEST_FILE: &str = "manifest.json";
const TRANSFERS_DIR: &str = "transfers";

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("agent.redb")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Partial bundles of the link's transfers: the one part of `tmp/` that survives a restart.
    pub fn transfers(&self) -> PathBuf {
        self.tmp().join(TRANSFERS_DIR)
    }

    pub fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join("slots").join(model)
    }

    pub fn slot(&self, model: &str, dir: &str) -> PathBuf {
        self.model_dir(model).join(dir)
    }

    /// Creates the directories; removes whatever an interrupted install left in `tmp/` (but not
    /// `tmp/transfers/`: a transfer resumes after a restart).
    pub fn prepare(&self) -> io::Result<()> {
        fs::create_dir_all(self.root.join("slots"))?;
        let tmp = self.tmp();
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_name() == TRANSFERS_DIR {
                continue;
            }
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
        fs::create_dir_all(self.transfers())
    }

    /// A fresh staging directory under `tmp/`.
    pub fn staging_dir(&self) -> io::Result<PathBuf> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = self.tmp().join(format!("{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves a complete staging directory to its slot name, durably.
    pub fn commit_staging(&self, staging: &Path, model: &str, dir: &str) -> io::Result<PathBuf> {
        let parent = self.model_dir(model);
        fs::create_dir_all(&parent)?;
        sync_dir(staging)?;
        let target = parent.join(dir);
        fs::rename(staging, &target)?;
        sync_dir(&parent)?;
        Ok(target)
    }

    /// Removes slot directories that no record references (`keep`: (model, dir) pairs), and
    /// model directories left empty.
    pub fn remove_unreferenced(
        &self,
        keep: &HashSet<(String, String)>,
    ) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let slots = self.root.join("slots");
        for model in fs::read_dir(&slots)? {
            let model = model?;
            let model_name = model.file_name().to_string_lossy().into_owned();
            for slot in fs::read_dir(model.path())? {
                let slot = slot?;
                let key = (
                    model_name.clone(),
                    slot.file_name().to_string_lossy().into_owned(),
                );
                if !keep.contains(&key) {
                    fs::remove_dir_all(slot.path())?;
                    removed.push(slot.path());
                }
            }
            if fs::read_dir(model.path())?.next().is_none() {
                fs::remove_dir(model.path())?;
            }
        }
        Ok(removed)
    }
}

/// Writes `bytes` to `path` through a temp file, fsync and rename.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_commit_and_cleanup() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        layout.prepare().unwrap();
        let s = layout.staging_dir().unwrap();
        fs::write(s.join("model.onnx"), b"x").unwrap();
        let slot = layout.commit_staging(&s, "m", "1.0.0-a").unwrap();
        assert!(slot.join("model.onnx").exists() && !s.exists());
        let leftover = layout.staging_dir().unwrap();
        fs::create_dir_all(layout.slot("m", "orphan")).unwrap();
        let keep = HashSet::from([("m".to_string(), "1.0.0-a".to_string())]);
        let removed = layout.remove_unreferenced(&keep).unwrap();
        assert_eq!(removed, vec![layout.slot("m", "orphan")]);
        fs::write(layout.transfers().join("b.part"), b"x").unwrap();
        layout.prepare().unwrap();
        assert!(!leftover.exists(), "tmp is wiped at start");
        assert!(
            layout.transfers().join("b.part").exists(),
            "but transfers survive"
        );
        assert!(slot.exists());
    }
}
