//! The disk side of an MQTT transfer, on a thread of its own.
//!
//! The link's task receives chunk frames, checks each chunk's hash and writes it at its offset;
//! everything that waits for the disk or hashes the whole bundle happens here instead, so the
//! next chunk requests go out while the disk works:
//! - **checkpoints**: `fdatasync` of the partial file, *then* the bitmap as it was when the
//!   checkpoint was asked for (taken before the sync, so the stored bitmap never claims a chunk
//!   the sync did not cover: [`super::transfer`]'s invariant);
//! - **progress events** (each a durable commit of the agent's store);
//! - **the running hash** of the bundle, fed the chunks in order as they arrive, so the complete
//!   file need not be hashed again at the end. Chunks arriving ahead of a gap wait here (at most
//!   [`MAX_WAITING_CHUNKS`]); past that, or when the link could not hand a chunk over without
//!   waiting, or for a transfer resumed with chunks already on disk, the running hash is given up
//!   and [`transfer::finish`] hashes the file as before;
//! - **the end**: the last checkpoint, then [`transfer::finish`] (hash check, install).
//!
//! The disk sets the pace of the syncs and progress events, not the network: while a checkpoint
//! is queued and not yet begun the session asks for no other ([`TransferWorker::sync_queued`];
//! the next one covers every chunk written meanwhile), and a progress event not yet recorded is
//! replaced by a newer one instead of queueing behind it. So a slow disk means fewer, larger
//! syncs, and the queue never holds work the last item makes moot. How far the network may run
//! ahead of the disk is bounded too: the session asks for no more chunks while more than
//! [`MAX_UNSYNCED_CHUNKS`] received ones are not covered by a finished checkpoint
//! ([`TransferWorker::synced`]; each finished checkpoint is reported, [`WorkerReport::Synced`],
//! so requests resume at once). So a power cut costs at most that many chunks (plus the window
//! in flight), however slow the disk.
//!
//! Jobs run in the order they were sent. A failed checkpoint is reported to the session (which
//! fails the transfer) and every later job is skipped; if the transfer's end was already handed
//! over, the worker records the failure itself.
//!
//! Invariant: once the session has stopped a worker ([`TransferWorker::stop`]), the worker
//! writes nothing more for that transfer, so the session can delete the partial file and the
//! record (or start the same bundle afresh) without a late checkpoint bringing them back.
//! Dropping the handle instead (the link stops or its task is aborted) lets the queued jobs run
//! and waits for them: what was written before is checkpointed as far as it was asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;

use protocol::link::BundleRef;

use crate::agent::Agent;
use crate::store::{Event, EventContext};

use super::metrics::LinkMetrics;
use super::transfer::{self, TransferRecord};

/// Jobs queued for a worker before the link's task waits for it (chunks are not waited for:
/// the running hash is given up instead). Each chunk job holds its frame: with 64 KiB chunks
/// at most 4 MiB wait here while a sync is slow.
const QUEUE: usize = 64;
/// Chunks held for the running hash while an earlier one is missing (2 MiB of 64 KiB chunks);
/// a chunk lost on the way is asked for again only after the request timeout, by when the rest
/// of the window has arrived: past this the file is hashed at the end instead.
pub const MAX_WAITING_CHUNKS: usize = 32;
/// Received chunks not yet covered by a finished checkpoint above which no more are requested.
pub const MAX_UNSYNCED_CHUNKS: u32 = 32;

/// Numbers each worker this process starts ([`TransferWorker::generation`]).
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// What a worker tells the session. `generation` names the worker that sent it: a report from a
/// worker the session has stopped may still be queued when a new transfer of the same bundle
/// has begun, and must not touch that one.
#[derive(Debug)]
pub enum WorkerReport {
    /// A checkpoint failed while the transfer was still being fetched: fail it.
    DiskError {
        bundle_id: String,
        generation: u64,
        error: String,
    },
    /// A checkpoint finished: the session may ask for more chunks.
    Synced { bundle_id: String, generation: u64 },
    /// The transfer's end ran (installed, rejected or failed): the bundle is free again.
    Done { bundle_id: String },
}

enum Job {
    Chunk(u32, Bytes),
    Checkpoint {
        record: TransferRecord,
        /// Chunks the record claims.
        covers: u32,
        done: Option<mpsc::Sender<()>>,
    },
    /// Record the event in the progress slot, if it is still there.
    Progress,
    Finish {
        bundle: BundleRef,
        context: EventContext,
        elapsed: Duration,
    },
}

/// The session's handle on one transfer's worker thread.
pub struct TransferWorker {
    jobs: Option<SyncSender<Job>>,
    /// Set by the session: skip whatever is still queued.
    stopped: Arc<AtomicBool>,
    /// Set by the session when a chunk could not be queued: the running hash has a hole.
    hash_hole: Arc<AtomicBool>,
    /// A checkpoint is queued and its sync has not begun.
    sync_queued: Arc<AtomicBool>,
    /// The newest progress event not yet recorded.
    progress: Arc<Mutex<Option<Event>>>,
    /// Chunks the last finished checkpoint covers.
    synced: Arc<AtomicU32>,
    generation: u64,
    thread: Option<JoinHandle<()>>,
}

impl TransferWorker {
    /// Starts the worker of a transfer whose partial file is `file` (a second handle on it) and
    /// of which `present` chunks are stored already; the running hash is kept only if none is.
    pub fn start(
        agent: Arc<Agent>,
        bundle: &BundleRef,
        path: PathBuf,
        file: File,
        present: u32,
        reports: UnboundedSender<WorkerReport>,
    ) -> std::io::Result<TransferWorker> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let stopped = Arc::new(AtomicBool::new(false));
        let hash_hole = Arc::new(AtomicBool::new(false));
        let sync_queued = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(None));
        let synced = Arc::new(AtomicU32::new(present));
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let state = Worker {
            agent,
            bundle_id: bundle.bundle_id.clone(),
            generation,
            chunks: bundle.chunks(),
            path,
            file,
            hash: (present == 0).then(RunningHash::default),
            failed: None,
            stopped: stopped.clone(),
            hash_hole: hash_hole.clone(),
            sync_queued: sync_queued.clone(),
            progress: progress.clone(),
            synced: synced.clone(),
            reports,
        };
        let thread = std::thread::Builder::new()
            .name("transfer-disk".into())
            .spawn(move || state.run(rx))?;
        Ok(TransferWorker {
            jobs: Some(tx),
            stopped,
            hash_hole,
            sync_queued,
            progress,
            synced,
            generation,
            thread: Some(thread),
        })
    }

    /// This worker's number, which its reports carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A chunk just written, for the running hash. Never waits: with the queue full the running
    /// hash is given up.
    pub fn chunk(&self, index: u32, bytes: Bytes) {
        if self.hash_hole.load(Ordering::Relaxed) {
            return;
        }
        if let Some(jobs) = &self.jobs {
            if let Err(TrySendError::Full(_)) = jobs.try_send(Job::Chunk(index, bytes)) {
                self.hash_hole.store(true, Ordering::Relaxed);
            }
        }
    }

    /// A checkpoint is queued and has not begun: a new one now would only queue behind it.
    pub fn sync_queued(&self) -> bool {
        self.sync_queued.load(Ordering::Relaxed)
    }

    /// Chunks covered by the last finished checkpoint.
    pub fn synced(&self) -> u32 {
        self.synced.load(Ordering::Relaxed)
    }

    /// Sync the file, then store `record` (the bitmap as of now, claiming `covers` chunks).
    pub fn checkpoint(&self, record: TransferRecord, covers: u32) {
        self.sync_queued.store(true, Ordering::Relaxed);
        self.send(Job::Checkpoint {
            record,
            covers,
            done: None,
        });
    }

    /// [`TransferWorker::checkpoint`], returning once it is done (or skipped).
    pub fn checkpoint_and_wait(&self, record: TransferRecord, covers: u32) {
        let (done, wait) = mpsc::channel();
        self.send(Job::Checkpoint {
            record,
            covers,
            done: Some(done),
        });
        let _ = wait.recv();
    }

    /// Records a progress event of the transfer, unless a newer one replaces it before the
    /// worker gets to it.
    pub fn progress(&self, event: Event) {
        let was_empty = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(event)
            .is_none();
        if was_empty {
            self.send(Job::Progress);
        }
    }

    /// Hands the transfer's end over (after the checkpoints queued before it): hash check,
    /// install, [`WorkerReport::Done`]. The thread then ends on its own; nothing waits for it.
    pub fn finish(mut self, bundle: BundleRef, context: EventContext, elapsed: Duration) {
        self.send(Job::Finish {
            bundle,
            context,
            elapsed,
        });
        self.jobs = None;
        self.thread = None;
    }

    /// Skips what is still queued and waits for the job in progress to end (one sync at most).
    pub fn stop(mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.join();
    }

    /// Closes the queue and waits for the thread to run what is in it.
    fn join(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Fails only if the thread is gone (it ended after a failure): nothing to do then.
            let _ = jobs.send(job);
        }
    }
}

impl Drop for TransferWorker {
    fn drop(&mut self) {
        self.join();
    }
}

struct Worker {
    agent: Arc<Agent>,
    bundle_id: String,
    generation: u64,
    chunks: u32,
    path: PathBuf,
    file: File,
    hash: Option<RunningHash>,
    /// The first checkpoint error; later jobs are skipped.
    failed: Option<String>,
    stopped: Arc<AtomicBool>,
    hash_hole: Arc<AtomicBool>,
    sync_queued: Arc<AtomicBool>,
    progress: Arc<Mutex<Option<Event>>>,
    synced: Arc<AtomicU32>,
    reports: UnboundedSender<WorkerReport>,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        for job in jobs {
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            match job {
                Job::Chunk(index, bytes) => self.hash_chunk(index, bytes),
                Job::Checkpoint {
                    record,
                    covers,
                    done,
                } => {
                    // From here on a new checkpoint covers what this one's sync may not.
                    self.sync_queued.store(false, Ordering::Relaxed);
                    if self.failed.is_none() {
                        self.checkpoint(&record, covers);
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Job::Progress => {
                    let event = self
                        .progress
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let (Some(event), None) = (event, &self.failed) {
                        if let Err(e) = self.agent.record(&[event]) {
                            tracing::error!("cannot record an event: {e}");
                        }
                    }
                }
                Job::Finish {
                    bundle,
                    context,
                    elapsed,
                } => {
                    self.end(&bundle, &context, elapsed);
                    return;
                }
            }
        }
    }

    fn hash_chunk(&mut self, index: u32, bytes: Bytes) {
        if self.hash_hole.load(Ordering::Relaxed) {
            self.hash = None;
        }
        if let Some(hash) = &mut self.hash {
            if !hash.add(index, bytes) {
                self.hash = None;
            }
        }
    }

    fn checkpoint(&mut self, record: &TransferRecord, covers: u32) {
        let result = transfer::persist_checkpoint(&self.file, &self.path, &self.agent, record);
        if result.is_ok() {
            self.synced.fetch_max(covers, Ordering::Relaxed);
            let _ = self.reports.send(WorkerReport::Synced {
                bundle_id: self.bundle_id.clone(),
                generation: self.generation,
            });
        }
        if let Err(error) = result.map_err(|e| e.to_string()) {
            tracing::error!(bundle = %self.bundle_id, "transfer checkpoint failed: {error}");
            let _ = self.reports.send(WorkerReport::DiskError {
                bundle_id: self.bundle_id.clone(),
                generation: self.generation,
                error: error.clone(),
            });
            self.failed = Some(error);
        }
    }

    fn end(mut self, bundle: &BundleRef, context: &EventContext, elapsed: Duration) {
        if self.hash_hole.load(Ordering::Relaxed) {
            self.hash = None;
        }
        let streamed = self.hash.take().and_then(|h| h.finish(self.chunks));
        match &self.failed {
            None => transfer::finish(
                &self.agent,
                bundle,
                context,
                &self.path,
                elapsed,
                streamed.as_deref(),
            ),
            Some(error) => {
                LinkMetrics::inc(&self.agent.link_metrics.transfers_failed_total);
                let _ = self.agent.record(&[Event::new(
                    "transfer_failed",
                    Some(&bundle.name),
                    Some(&bundle.version),
                    json!({"bundle_id": bundle.bundle_id, "reason": "disk_error", "error": error}),
                )
                .with_context(context)]);
                transfer::discard(&self.agent, &bundle.bundle_id);
            }
        }
        let _ = self.reports.send(WorkerReport::Done {
            bundle_id: self.bundle_id,
        });
    }
}

/// sha256 of the chunks in index order, fed in any order (a few ahead of a gap are held).
#[derive(Default)]
struct RunningHash {
    hasher: Sha256,
    next: u32,
    waiting: BTreeMap<u32, Bytes>,
}

impl RunningHash {
    /// Returns false when the hash cannot be completed any more (too many chunks held).
    fn add(&mut self, index: u32, bytes: Bytes) -> bool {
        if index < self.next || self.waiting.contains_key(&index) {
            return true; // a duplicate: the link writes each chunk once, but be safe
        }
        if index > self.next {
            self.waiting.insert(index, bytes);
            return self.waiting.len() <= MAX_WAITING_CHUNKS;
        }
        self.hasher.update(&bytes);
        self.next += 1;
        while let Some(bytes) = self.waiting.remove(&self.next) {
            self.hasher.update(&bytes);
            self.next += 1;
        }
        true
    }

    /// The hex digest, if all `chunks` went in.
    fn finish(self, chunks: u32) -> Option<String> {
        (self.next == chunks).then(|| hex::encode(self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> Vec<Bytes> {
        (0..10u8)
            .map(|i| Bytes::from(vec![i; 7 + i as usize]))
            .collect()
    }

    fn whole(chunks: &[Bytes]) -> String {
        hex::encode(Sha256::digest(chunks.concat()))
    }

    #[test]
    fn the_running_hash_is_the_whole_files_in_any_arrival_order() {
        let c = chunks();
        let mut h = RunningHash::default();
        for i in [1, 0, 3, 2, 2, 9, 4, 5, 6, 8, 7] {
            assert!(h.add(i, c[i as usize].clone()));
        }
        assert_eq!(h.finish(10), Some(whole(&c)));
    }

    #[test]
    fn a_missing_chunk_leaves_no_hash_and_too_many_held_give_it_up() {
        let c = chunks();
        let mut h = RunningHash::default();
        for i in 1..10 {
            h.add(i, c[i as usize].clone());
        }
        assert_eq!(h.finish(10), None, "chunk 0 never came");

        let mut h = RunningHash::default();
        let big = Bytes::from_static(b"x");
        for i in 1..=MAX_WAITING_CHUNKS as u32 {
            assert!(h.add(i, big.clone()));
        }
        assert!(!h.add(MAX_WAITING_CHUNKS as u32 + 1, big));
    }
}
