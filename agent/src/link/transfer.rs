//! A bundle being fetched: the partial file, the received-chunk bitmap, the request window, and
//! what happens when the last chunk is in (hash check, install).
//!
//! Durability: a chunk is written at `index * chunk_size` in `tmp/transfers/<bundle_id>.part`
//! and marked in the in-memory bitmap; every [`CHECKPOINT_CHUNKS`] chunks or more (more when the
//! disk is slower than the network, see [`super::transfer_worker`]), and when the transfer
//! completes, pauses or the link stops, a checkpoint ([`persist_checkpoint`]) fsyncs the file
//! and only then writes the bitmap to the `transfers` table of `agent.redb`. So the stored bitmap never claims a
//! chunk that is not durably on disk; after a power cut at worst the chunks since the last
//! checkpoint are fetched again. The bitmap's own commit does not wait for the disk
//! ([`crate::store::Store::put_transfer_checkpoint`]): losing it only loses claims. The record also keeps the [`BundleRef`] and the command and
//! rollout ids, so a restarted agent resumes the transfer (or, if it was complete, goes straight
//! to the install) without the server re-sending the command.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use protocol::link::{max_chunks_per_request, BundleRef};

use crate::agent::Agent;
use crate::store::{Event, EventContext};

use super::TransferMode;

/// Chunks received between two checkpoints (fsync of the file, then the bitmap to redb).
pub const CHECKPOINT_CHUNKS: u32 = 16;

/// Which chunks of a bundle are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl Bitmap {
    pub fn new(len: u32) -> Bitmap {
        Bitmap {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            count: 0,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[i as usize / 64] & (1 << (i % 64)) != 0
    }

    /// Marks chunk `i`; returns whether it was new.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.words[i as usize / 64] |= 1 << (i % 64);
        self.count += 1;
        true
    }

    /// Chunks present.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.len
    }

    /// Indices of missing chunks, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }

    /// Little-endian bytes of the words, hex: compact and readable in a dump of the record.
    pub fn to_hex(&self) -> String {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        hex::encode(bytes)
    }

    /// Parses [`Bitmap::to_hex`]; anything malformed reads as "nothing received".
    pub fn from_hex(len: u32, text: &str) -> Bitmap {
        let mut map = Bitmap::new(len);
        let Ok(bytes) = hex::decode(text) else {
            return map;
        };
        if bytes.len() != map.words.len() * 8 {
            return map;
        }
        for i in 0..len {
            if bytes[i as usize / 8] & (1 << (i % 8)) != 0 {
                map.set(i);
            }
        }
        map
    }
}

/// The row of a transfer in `agent.redb` (`transfers` table, keyed by bundle id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferRecord {
    pub bundle: BundleRef,
    #[serde(default)]
    pub context: EventContext,
    pub transport: TransferMode,
    /// [`Bitmap::to_hex`] of the chunks durably on disk.
    pub received: String,
    pub started_at: DateTime<Utc>,
}

/// A transfer in progress (owned by the link session, or by a blocking thread while it fetches
/// over HTTP or installs).
#[derive(Debug)]
pub struct Transfer {
    pub bundle: BundleRef,
    pub context: EventContext,
    pub transport: TransferMode,
    pub path: PathBuf,
    received: Bitmap,
    file: File,
    started_at: DateTime<Utc>,
    started: Instant,
    /// Chunks received since the last checkpoint.
    unsynced: u32,
    last_checkpoint: Instant,
    /// Requested chunks not yet received, with when they were asked for.
    outstanding: BTreeMap<u32, Instant>,
    /// The last progress event's tenth (0..=10).
    reported_tenths: u32,
    /// Chunks present when this process took the transfer over.
    pub resumed_with: u32,
}

/// The partial file of `bundle_id`.
pub fn part_path(transfers_dir: &Path, bundle_id: &str) -> PathBuf {
    transfers_dir.join(format!("{bundle_id}.part"))
}

/// Bundle ids name files: only 64 lowercase hex digits (a sha256) are accepted.
pub fn valid_bundle_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Transfer {
    /// A new transfer (an empty partial file of the bundle's size), recorded in the store
    /// together with its [`Transfer::started_event`].
    pub fn create(
        agent: &Agent,
        bundle: BundleRef,
        context: EventContext,
        transport: TransferMode,
    ) -> Result<Transfer, super::LinkError> {
        let path = part_path(&agent.layout().transfers(), &bundle.bundle_id);
        let _ = fs::remove_file(&path);
        let record = TransferRecord {
            received: Bitmap::new(bundle.chunks()).to_hex(),
            bundle,
            context,
            transport,
            started_at: Utc::now(),
        };
        let t = Transfer::open(&path, record)?;
        agent.store().put_transfer_with_events(
            &t.bundle.bundle_id,
            &t.record(),
            &[t.started_event()],
        )?;
        Ok(t)
    }

    /// Takes a stored transfer over after a restart. A missing or wrongly sized partial file
    /// means nothing of it can be trusted: the bitmap starts empty.
    pub fn resume(agent: &Agent, record: TransferRecord) -> Result<Transfer, super::LinkError> {
        let path = part_path(&agent.layout().transfers(), &record.bundle.bundle_id);
        let intact = fs::metadata(&path).is_ok_and(|m| m.len() == record.bundle.size);
        let mut record = record;
        if !intact {
            record.received = Bitmap::new(record.bundle.chunks()).to_hex();
        }
        let t = Transfer::open(&path, record)?;
        if !intact {
            agent
                .store()
                .put_transfer(&t.bundle.bundle_id, &t.record())?;
        }
        Ok(t)
    }

    fn open(path: &Path, record: TransferRecord) -> Result<Transfer, super::LinkError> {
        let io_err = |source| super::LinkError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        if file.metadata().map_err(io_err)?.len() != record.bundle.size {
            file.set_len(record.bundle.size).map_err(io_err)?;
        }
        let received = Bitmap::from_hex(record.bundle.chunks(), &record.received);
        let resumed_with = received.count();
        Ok(Transfer {
            reported_tenths: tenths(resumed_with, received.len()),
            bundle: record.bundle,
            context: record.context,
            transport: record.transport,
            path: path.to_path_buf(),
            received,
            file,
            started_at: record.started_at,
            started: Instant::now(),
            unsynced: 0,
            last_checkpoint: Instant::now(),
            outstanding: BTreeMap::new(),
            resumed_with,
        })
    }

    pub fn id(&self) -> &str {
        &self.bundle.bundle_id
    }

    pub fn record(&self) -> TransferRecord {
        TransferRecord {
            bundle: self.bundle.clone(),
            context: self.context.clone(),
            transport: self.transport,
            received: self.received.to_hex(),
            started_at: self.started_at,
        }
    }

    pub fn received(&self) -> &Bitmap {
        &self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received.is_complete()
    }

    /// Byte length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> u64 {
        let cs = self.bundle.chunk_size as u64;
        (self.bundle.size - index as u64 * cs).min(cs)
    }

    /// Writes a verified chunk at its offset. Returns false for a chunk already stored.
    pub fn write_chunk(&mut self, index: u32, bytes: &[u8]) -> Result<bool, ChunkError> {
        self.outstanding.remove(&index);
        if index >= self.received.len() {
            return Err(ChunkError::Index(index));
        }
        if self.received.get(index) {
            return Ok(false);
        }
        if bytes.len() as u64 != self.chunk_len(index) {
            return Err(ChunkError::Length {
                index,
                len: bytes.len(),
                expected: self.chunk_len(index),
            });
        }
        write_at(
            &self.file,
            bytes,
            index as u64 * self.bundle.chunk_size as u64,
        )
        .map_err(ChunkError::Io)?;
        self.received.set(index);
        self.unsynced += 1;
        Ok(true)
    }

    /// Chunks written since the last checkpoint.
    pub fn unsynced(&self) -> u32 {
        self.unsynced
    }

    pub fn since_checkpoint(&self) -> Duration {
        self.last_checkpoint.elapsed()
    }

    /// Makes the written chunks durable, then records them in the bitmap of the store (here;
    /// the MQTT path does it on its [`super::transfer_worker`] with [`Transfer::take_checkpoint`]).
    pub fn checkpoint(&mut self, agent: &Agent) -> Result<(), super::LinkError> {
        match self.take_checkpoint() {
            Some(record) => persist_checkpoint(&self.file, &self.path, agent, &record),
            None => Ok(()),
        }
    }

    /// The record to store at a checkpoint, if chunks were written since the last one, and
    /// counts them as checkpointed. The caller must sync the file before storing it
    /// ([`persist_checkpoint`]): the record claims every chunk written so far.
    pub fn take_checkpoint(&mut self) -> Option<TransferRecord> {
        self.last_checkpoint = Instant::now();
        if self.unsynced == 0 {
            return None;
        }
        self.unsynced = 0;
        Some(self.record())
    }

    /// A second handle on the partial file (for the thread that syncs it).
    pub fn file_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// A `transfer_progress` event each time another tenth of the chunks is in.
    pub fn progress_event(&mut self) -> Option<Event> {
        let now = tenths(self.received.count(), self.received.len());
        if now <= self.reported_tenths || self.is_complete() {
            return None;
        }
        self.reported_tenths = now;
        Some(self.event(
            "transfer_progress",
            json!({"bundle_id": self.id(), "percent": now * 10,
                   "chunks_received": self.received.count(), "chunks": self.received.len()}),
        ))
    }

    /// An event about this transfer (model and version of the bundle, command ids attached).
    pub fn event(&self, kind: &str, detail: serde_json::Value) -> Event {
        Event::new(
            kind,
            Some(&self.bundle.name),
            Some(&self.bundle.version),
            detail,
        )
        .with_context(&self.context)
    }

    pub fn started_event(&self) -> Event {
        self.event(
            "transfer_started",
            json!({"bundle_id": self.id(), "size": self.bundle.size,
                   "chunk_size": self.bundle.chunk_size, "chunks": self.received.len(),
                   "chunks_present": self.received.count(), "transport": self.transport}),
        )
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Forgets which chunks were asked for (the session that carried the requests is gone).
    pub fn forget_requests(&mut self) {
        self.outstanding.clear();
    }

    /// A chunk that arrived corrupted: ask for it again at the next planning.
    pub fn forget_request(&mut self, index: u32) {
        self.outstanding.remove(&index);
    }

    /// The index ranges `(first, count)` to request now: chunks asked for more than `timeout`
    /// ago are asked for again; missing chunks fill the window of `window` chunks in flight,
    /// but only once at least `min_batch` slots are free (fewer, larger requests).
    /// Returns the ranges and how many chunks had timed out.
    pub fn plan_requests(
        &mut self,
        now: Instant,
        window: u32,
        timeout: Duration,
        min_batch: u32,
    ) -> (Vec<(u32, u32)>, u32) {
        let before = self.outstanding.len();
        self.outstanding
            .retain(|_, asked| now.duration_since(*asked) < timeout);
        let timed_out = (before - self.outstanding.len()) as u32;
        let free = window.saturating_sub(self.outstanding.len() as u32);
        let wanted: Vec<u32> = self
            .received
            .missing()
            .filter(|i| !self.outstanding.contains_key(i))
            .take(free as usize)
            .collect();
        let remaining = self.received.len() - self.received.count() - self.outstanding.len() as u32;
        if wanted.is_empty() || (free < min_batch.min(remaining).max(1)) {
            return (Vec::new(), timed_out);
        }
        // One request per run of consecutive chunks, each within what the server serves for
        // one request (it would silently serve less, and the rest would wait for the timeout).
        let cap = max_chunks_per_request(self.bundle.chunk_size);
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for i in wanted {
            self.outstanding.insert(i, now);
            match ranges.last_mut() {
                Some((first, count)) if *first + *count == i && *count < cap => *count += 1,
                _ => ranges.push((i, 1)),
            }
        }
        (ranges, timed_out)
    }
}

/// A checkpoint: `file` synced to disk, then `record` (taken before the sync) stored.
pub fn persist_checkpoint(
    file: &File,
    path: &Path,
    agent: &Agent,
    record: &TransferRecord,
) -> Result<(), super::LinkError> {
    file.sync_data().map_err(|source| super::LinkError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    agent
        .store()
        .put_transfer_checkpoint(&record.bundle.bundle_id, record)?;
    Ok(())
}

fn tenths(count: u32, len: u32) -> u32 {
    if len == 0 {
        10
    } else {
        (count as u64 * 10 / len as u64) as u32
    }
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk index {0} is past the end of the bundle")]
    Index(u32),
    #[error("chunk {index} has {len} bytes, expected {expected}")]
    Length {
        index: u32,
        len: usize,
        expected: u64,
    },
    #[error("writing the partial bundle: {0}")]
    Io(io::Error),
}

/// Why a complete transfer did not reach the install path.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    #[error("reading the partial bundle {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the reassembled bundle hashes to {actual}, not its id {expected}")]
    Hash { expected: String, actual: String },
}

/// The end of a complete transfer, on a blocking thread: check the whole file against the bundle
/// id, record `transfer_completed`, run the install path (which records `installed`/`activated`
/// or `rejected` with the reason, all attributed to the command), then delete the partial file
/// and the record. A hash mismatch records `transfer_failed` and deletes both (a new `stage`
/// fetches from scratch). `streamed_sha256` is the hash of the chunks as they were written, when
/// the [`super::transfer_worker`] saw all of them: the file is then not hashed again, and is read
/// (for the install) only after `transfer_completed`.
pub fn finish(
    agent: &Agent,
    bundle: &BundleRef,
    context: &EventContext,
    path: &Path,
    elapsed: Duration,
    streamed_sha256: Option<&str>,
) {
    let metrics = &agent.link_metrics;
    let event = |kind: &str, detail| {
        Event::new(kind, Some(&bundle.name), Some(&bundle.version), detail).with_context(context)
    };
    let read = || {
        fs::read(path).map_err(|source| FinishError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    // With the running hash the file is read after `transfer_completed` (for the install);
    // without it, read and hashed first.
    let checked = match streamed_sha256 {
        Some(hash) if hash == bundle.bundle_id => Ok(None),
        Some(hash) => Err(FinishError::Hash {
            expected: bundle.bundle_id.clone(),
            actual: hash.to_string(),
        }),
        None => read().and_then(|bytes| {
            let actual = protocol::link::sha256_hex(&bytes);
            if actual == bundle.bundle_id {
                Ok(Some(bytes))
            } else {
                Err(FinishError::Hash {
                    expected: bundle.bundle_id.clone(),
                    actual,
                })
            }
        }),
    };
    let bytes = checked.and_then(|read_already| {
        super::metrics::LinkMetrics::inc(&metrics.transfers_completed_total);
        let secs = elapsed.as_secs_f64();
        let _ = agent.record(&[event(
            "transfer_completed",
            json!({"bundle_id": bundle.bundle_id, "bytes": bundle.size, "seconds": secs,
                   "bytes_per_second": bundle.size as f64 / secs.max(1e-9),
                   "hashed_while_receiving": streamed_sha256.is_some()}),
        )]);
        read_already.map_or_else(read, Ok)
    });
    match bytes {
        Ok(bytes) => match agent.install_with(&bytes, context) {
            Ok(installed) => {
                tracing::info!(model = %installed.model, version = %installed.version,
                already_active = installed.already_active, "staged bundle installed")
            }
            Err(e) => tracing::warn!(bundle = %bundle.bundle_id, "staged bundle rejected: {e}"),
        },
        Err(e) => {
            super::metrics::LinkMetrics::inc(&metrics.transfers_failed_total);
            tracing::warn!(bundle = %bundle.bundle_id, "transfer failed: {e}");
            let reason = match e {
                FinishError::Read { .. } => "read_error",
                FinishError::Hash { .. } => "bundle_hash_mismatch",
            };
            let _ = agent.record(&[event(
                "transfer_failed",
                json!({"bundle_id": bundle.bundle_id, "reason": reason, "error": e.to_string()}),
            )]);
        }
    }
    discard(agent, &bundle.bundle_id);
}

/// Deletes a transfer's record, then its partial file. In this order a crash between the two
/// leaves a partial file without a record, which the next start deletes; the other order left a
/// record whose file was gone, and the next start took the transfer of a bundle already
/// installed over again from nothing.
pub fn discard(agent: &Agent, bundle_id: &str) {
    if let Err(e) = agent.store().remove_transfer(bundle_id) {
        tracing::error!(bundle = %bundle_id, "cannot delete the transfer record: {e}");
    }
    let _ = fs::remove_file(part_path(&agent.layout().transfers(), bundle_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trips_through_hex() {
        let mut b = Bitmap::new(130);
        for i in [0, 5, 64, 129] {
            assert!(b.set(i));
        }
        assert!(!b.set(5), "already set");
        assert!(!b.set(130), "out of range");
        let back = Bitmap::from_hex(130, &b.to_hex());
        assert_eq!(back, b);
        assert_eq!(back.count(), 4);
        assert_eq!(back.missing().take(3).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            Bitmap::from_hex(130, "zz").count(),
            0,
            "garbage reads as empty"
        );
        assert_eq!(
            Bitmap::from_hex(200, &b.to_hex()).count(),
            0,
            "wrong length reads as empty"
        );
    }

    #[test]
    fn bundle_ids_are_plain_sha256_hex() {
        assert!(valid_bundle_id(&"ab".repeat(32)));
        assert!(!valid_bundle_id(&"AB".repeat(32)));
        assert!(!valid_bundle_id("../../etc/passwd"));
        assert!(!valid_bundle_id(&"a".repeat(63)));
    }

    fn transfer(dir: &Path, chunks: u32) -> Transfer {
        let bundle = BundleRef {
            bundle_id: "00".repeat(32),
            name: "m".into(),
            version: "1.0.0".into(),
            size: chunks as u64 * 10 - 3,
            chunk_size: 10,
            http_url: None,
        };
        let record = TransferRecord {
            received: Bitmap::new(bundle.chunks()).to_hex(),
            bundle,
            context: EventContext::default(),
            transport: TransferMode::Mqtt,
            started_at: Utc::now(),
        };
        Transfer::open(&dir.join("x.part"), record).unwrap()
    }

    #[test]
    fn requests_fill_the_window_in_ranges_and_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = transfer(dir.path(), 100);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        assert_eq!(t.plan_requests(t0, 32, timeout, 8), (vec![(0, 32)], 0));
        // Window full: nothing more.
        assert_eq!(t.plan_requests(t0, 32, timeout, 8).0, vec![]);
        // Chunks 0..4 and 10 arrive: 5 free slots < min batch 8, so wait.
        for i in (0..4).chain([10]) {
            assert!(t.write_chunk(i, &[1; 10]).unwrap());
        }
        assert_eq!(t.plan_requests(t0, 32, timeout, 8).0, vec![]);
        for i in 4..7 {
            t.write_chunk(i, &[1; 10]).unwrap();
        }
        assert_eq!(t.plan_requests(t0, 32, timeout, 8).0, vec![(32, 8)]);
        // A corrupted chunk 20 is forgotten and asked for alone once slots free up.
        t.forget_request(20);
        let (ranges, timed_out) = t.plan_requests(t0 + timeout, 32, timeout, 1);
        assert_eq!(
            timed_out, 31,
            "everything outstanding timed out (20 was forgotten)"
        );
        assert_eq!(ranges, vec![(7, 3), (11, 29)]);
    }

    #[test]
    fn a_wide_window_is_split_into_requests_the_server_serves_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = transfer(dir.path(), 300);
        let cap = protocol::link::MAX_CHUNKS_PER_REQUEST;
        let (ranges, _) = t.plan_requests(Instant::now(), 2 * cap + 10, Duration::from_secs(5), 8);
        assert_eq!(ranges, vec![(0, cap), (cap, cap), (2 * cap, 10)]);
        // Large chunks: the byte cap binds first (4 MiB / 1 MiB = 4 chunks per request).
        assert_eq!(protocol::link::max_chunks_per_request(1 << 20), 4);
    }

    #[test]
    fn the_end_of_the_bundle_is_requested_even_below_the_min_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = transfer(dir.path(), 3);
        assert_eq!(
            t.plan_requests(Instant::now(), 32, Duration::from_secs(5), 8)
                .0,
            vec![(0, 3)]
        );
        assert!(
            matches!(t.write_chunk(2, &[0; 10]), Err(ChunkError::Length { .. })),
            "the last chunk is short"
        );
        assert!(t.write_chunk(2, &[0; 7]).unwrap());
        assert!(!t.write_chunk(2, &[0; 7]).unwrap(), "duplicate");
        assert!(matches!(
            t.write_chunk(3, &[0; 7]),
            Err(ChunkError::Index(3))
        ));
    }
}
