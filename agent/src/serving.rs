//! What is being served right now: the registry of loaded models, the bounded inference pool,
//! and per-model request metrics.
//!
//! Hot swap is an `Arc` replacement in the registry: a request takes the `Arc` of the model it
//! starts on and keeps it to the end, so in-flight requests finish on the old model while new ones
//! go to the new one, and the old model is dropped when its last request completes.
//!
//! Inference runs on a fixed pool of worker threads fed by a bounded queue, never on the async
//! threads. When the queue is full a request is refused at once (HTTP 503) instead of queueing
//! without bound. A job that panics fails its request, not the worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protocol::manifest::Manifest;

use crate::store::SlotRef;

/// A model loaded and ready to answer requests.
pub struct ServingModel {
    pub name: String,
    pub manifest: Manifest,
    pub slot: SlotRef,
    /// The loaded model, from the agent's [`crate::backend::Backend`]. Shared with other agents
    /// of the process that serve the same bytes when they have a common
    /// [`crate::model_cache::ModelCache`]; everything else here is this agent's own.
    pub engine: Arc<dyn crate::backend::LoadedModel>,
    pub metrics: ModelMetrics,
    /// Live health figures for the trial watch and telemetry.
    pub health: crate::health::Health,
    pub load_time: Duration,
}

impl ServingModel {
    pub fn version(&self) -> &str {
        &self.slot.version
    }
}

/// The models being served, by name.
#[derive(Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ServingModel>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<ServingModel>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<ServingModel>> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Makes `model` the one new requests for its name get; returns the one it replaces.
    pub fn swap_in(&self, model: Arc<ServingModel>) -> Option<Arc<ServingModel>> {
        self.models
            .write()
            .expect("registry lock")
            .insert(model.name.clone(), model)
    }

    pub fn is_empty(&self) -> bool {
        self.models.read().expect("registry lock").is_empty()
    }
}

/// Upper bounds (seconds) of the latency histogram buckets in `/metrics`.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Request counters of one loaded model version. Lock-free: updated on every request.
#[derive(Default)]
pub struct ModelMetrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Cumulative-free bucket counts; the last slot counts everything above the last bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
}

impl ModelMetrics {
    pub fn observe(&self, latency: Duration, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = latency.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Appends this model's series in Prometheus text format.
    pub fn render(&self, model: &str, version: &str, out: &mut String) {
        use std::fmt::Write;
        let labels = format!(
            "model=\"{}\",version=\"{}\"",
            escape(model),
            escape(version)
        );
        let requests = self.requests.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "modelfleet_agent_requests_total{{{labels}}} {requests}"
        );
        let _ = writeln!(
            out,
            "modelfleet_agent_errors_total{{{labels}}} {}",
            self.errors.load(Ordering::Relaxed)
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "modelfleet_agent_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "modelfleet_agent_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "modelfleet_agent_request_duration_seconds_sum{{{labels}}} {sum}"
        );
        let _ = writeln!(
            out,
            "modelfleet_agent_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of inference threads behind a bounded queue.
#[derive(Debug)]
pub struct InferencePool {
    tx: SyncSender<Job>,
    pub workers: usize,
    pub queue_limit: usize,
}

/// The queue is full: the caller should answer 503.
#[derive(Debug, thiserror::Error)]
#[error("inference queue is full ({0} waiting); retry later")]
pub struct PoolFull(pub usize);

impl InferencePool {
    pub fn new(workers: usize, queue_limit: usize) -> InferencePool {
        let workers = workers.max(1);
        let (tx, rx) = sync_channel::<Job>(queue_limit);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panicking job fails its own request (its result sender is dropped:
                        // HTTP 500) and this worker takes the next one; without the catch the
                        // thread would end and the pool shrink for good. In a `panic = "abort"`
                        // build (the device profile) a panic ends the process instead, and
                        // systemd restarts the agent (BENCHMARKS.md, "Agent footprint").
                        Ok(job) => {
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err()
                            {
                                tracing::error!("an inference job panicked; its request failed");
                            }
                        }
                        Err(_) => return,
                    }
                })
                .expect("spawn inference thread");
        }
        InferencePool {
            tx,
            workers,
            queue_limit,
        }
    }

    /// Queues `f`; its result arrives on the returned receiver.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<R>, PoolFull> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        match self.tx.try_send(job) {
            Ok(()) => Ok(result),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Err(PoolFull(self.queue_limit))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_refuses_when_full_instead_of_growing() {
        let pool = InferencePool::new(1, 2);
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let first = pool.submit(move || {
            g.wait();
            1
        });
        assert!(first.is_ok());
        // The worker holds the first job; two more fit in the queue, the fourth does not.
        std::thread::sleep(Duration::from_millis(50));
        let queued: Vec<_> = (0..2).map(|i| pool.submit(move || i).unwrap()).collect();
        assert!(pool.submit(|| 9).is_err());
        gate.wait();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(first.unwrap()).unwrap(), 1);
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(rt.block_on(q).unwrap(), i);
        }
    }

    #[test]
    fn a_panicking_job_fails_its_request_and_the_worker_goes_on() {
        let pool = InferencePool::new(1, 4);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let panicked = pool.submit(|| -> u32 { panic!("job panics") }).unwrap();
        assert!(rt.block_on(panicked).is_err());
        // The single worker is still there.
        let next = pool.submit(|| 7).unwrap();
        assert_eq!(rt.block_on(next).unwrap(), 7);
    }

    #[test]
    fn metrics_render_cumulative_buckets() {
        let m = ModelMetrics::default();
        m.observe(Duration::from_micros(30), true);
        m.observe(Duration::from_millis(3), false);
        m.observe(Duration::from_secs(10), true);
        let mut out = String::new();
        m.render("digits", "1.0.0", &mut out);
        assert!(
            out.contains("modelfleet_agent_requests_total{model=\"digits\",version=\"1.0.0\"} 3")
        );
        assert!(out.contains("modelfleet_agent_errors_total{model=\"digits\",version=\"1.0.0\"} 1"));
        assert!(out.contains("le=\"0.00005\"} 1\n"));
        assert!(out.contains("le=\"0.005\"} 2\n"));
        assert!(out.contains("le=\"+Inf\"} 3\n"));
    }
}
