//! Live health figures of one loaded model version, and the trial verdict computed from them.
//!
//! The serving path calls [`Health::observe`] once per request (after the response is encoded):
//! it summarises the request's outputs (top-1 class and confidence per row for classifiers, the
//! output statistic per row otherwise, non-finite values), bins a strided subset of the input
//! values against the bundle baseline's bins, and adds all of it to one accumulator under one
//! short mutex. Readers (the trial watch every tick, the telemetry window) fold that accumulator
//! into `recent` (the trial's figures, and the reference once the model is replaced) and
//! `window` (drained per telemetry window). The request path does not allocate: request ids are
//! remembered for label feedback by their 64-bit hash. Measured cost: BENCHMARKS.md,
//! "Health watch overhead".
//!
//! [`judge`] is a pure function from figures to a verdict, so the thresholds are unit-tested
//! without a server.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use protocol::telemetry::{SampleRecord, SampleTensor, TELEMETRY_SCHEMA};

use serde::Serialize;
use serde_json::json;

use engine::{Tensor, TensorData};
use protocol::manifest::{
    Baseline, HealthPolicy, Manifest, OutputStatistic, ScoreKind, Task, TelemetrySamples,
};
use protocol::stats::{psi, Histogram};

/// Latency histogram: log10 of microseconds over [0, 7] (1 µs … 10 s), 140 bins (≈ 5.9 % wide).
pub const LATENCY_LOG10_US: (f64, f64, usize) = (0.0, 7.0, 140);
/// Bins of the confidence histogram when the bundle has no classification baseline.
const CONFIDENCE_BINS: usize = 20;
/// At most this many values of each input are binned per request (strided), so input drift costs
/// the same on a 64-value digit and a 150 000-value image.
pub const MAX_INPUT_VALUES: usize = 256;
/// The `recent` accumulator becomes `older` after this many requests, so a long-serving model's
/// reference figures are its last 10 000–20 000 requests, not its whole life.
const RECENT_SPAN: u64 = 10_000;
/// Request ids remembered for label feedback, per model version.
pub const FEEDBACK_MEMORY: usize = 10_000;

/// Trial settings: how long a newly activated model is watched and what counts as a regression.
/// The agent's defaults; a bundle's [`HealthPolicy`] overrides any field it sets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialPolicy {
    /// Requests the new model must serve before it can be committed; also the sample size the
    /// statistical checks (latency, confidence, prediction PSI, output shift) wait for.
    pub min_requests: u64,
    /// Seconds the new model must serve before it can be committed.
    pub min_seconds: u64,
    /// Error rate (runtime errors + non-finite outputs) above the previous model's rate.
    /// Checked from [`TrialPolicy::min_error_evidence`] requests on, so a broken model goes
    /// within a tick; needs at least 3 failed requests.
    pub max_error_rate: f64,
    /// p95 latency of the new model / p95 of the previous one. Both are floored at
    /// `latency_floor_ms` first, so sub-floor jitter on a shared CPU cannot revert a tiny model.
    pub max_p95_latency_ratio: f64,
    pub latency_floor_ms: f64,
    /// Drop of mean top-1 confidence (absolute, 0–1) against the previous model.
    pub max_confidence_drop: f64,
    /// PSI of the predicted-class distribution against the previous model, in excess of the PSI
    /// two samples of the same distribution show by chance, `(k - 1)(1/n1 + 1/n2)`.
    pub max_prediction_psi: f64,
    /// Shift of the mean output statistic (regression models), in standard deviations of the
    /// previous model's statistic.
    pub max_output_shift: f64,
    /// Drop of live accuracy (from label feedback) against the previous model; needs at least
    /// `min_labels` labelled requests on both.
    pub max_accuracy_drop: f64,
    pub min_labels: u64,
    /// Input-drift PSI against the baseline that reverts. `None` (default): reported only —
    /// drift is the world changing, not the model.
    pub max_input_psi: Option<f64>,
    /// Requests before error rates are judged.
    pub min_error_evidence: u64,
    /// Requests the previous model must have served for its live figures to be the reference;
    /// with fewer, confidence and predictions are compared with the bundle baseline instead.
    pub min_reference_requests: u64,
}

impl Default for TrialPolicy {
    fn default() -> TrialPolicy {
        TrialPolicy {
            min_requests: 200,
            min_seconds: 60,
            max_error_rate: 0.01,
            max_p95_latency_ratio: 2.0,
            latency_floor_ms: 0.5,
            max_confidence_drop: 0.10,
            max_prediction_psi: 0.25,
            max_output_shift: 1.0,
            max_accuracy_drop: 0.05,
            min_labels: 50,
            max_input_psi: None,
            min_error_evidence: 20,
            min_reference_requests: 50,
        }
    }
}

impl TrialPolicy {
    /// These defaults with the bundle's overrides applied.
    pub fn with_overrides(&self, p: &HealthPolicy) -> TrialPolicy {
        let mut t = self.clone();
        if let Some(v) = p.min_requests {
            t.min_requests = v;
        }
        if let Some(v) = p.min_seconds {
            t.min_seconds = v;
        }
        if let Some(v) = p.max_error_rate {
            t.max_error_rate = v;
        }
        if let Some(v) = p.max_p95_latency_ratio {
            t.max_p95_latency_ratio = v;
        }
        if let Some(v) = p.max_confidence_drop {
            t.max_confidence_drop = v;
        }
        if let Some(v) = p.max_prediction_psi {
            t.max_prediction_psi = v;
        }
        t
    }
}

/// What health monitoring knows about the model's task.
#[derive(Debug, Clone)]
enum Kind {
    Classification {
        output: usize,
        classes: usize,
        logits: bool,
    },
    Regression {
        output: usize,
        statistic: OutputStatistic,
    },
}

/// Counts and histograms over a span of requests. Cloned for snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct Acc {
    pub requests: u64,
    /// Requests the model failed to run (runtime errors).
    pub errors: u64,
    /// Requests answered with NaN or infinite values.
    pub non_finite: u64,
    /// log10(latency in µs), see [`LATENCY_LOG10_US`].
    pub latency: Histogram,
    pub latency_sum_us: f64,
    /// Rows (samples) summarised below; a request may carry several.
    pub rows: u64,
    pub confidence: Histogram,
    pub confidence_sum: f64,
    pub classes: Vec<u64>,
    pub statistic: Histogram,
    pub statistic_sum: f64,
    pub statistic_sq: f64,
    /// One histogram per baseline input, the baseline's bins.
    pub inputs: Vec<Histogram>,
    pub labelled: u64,
    pub correct: u64,
}

impl Acc {
    fn empty_like(&self) -> Acc {
        Acc {
            requests: 0,
            errors: 0,
            non_finite: 0,
            latency: self.latency.empty_like(),
            latency_sum_us: 0.0,
            rows: 0,
            confidence: self.confidence.empty_like(),
            confidence_sum: 0.0,
            classes: vec![0; self.classes.len()],
            statistic: self.statistic.empty_like(),
            statistic_sum: 0.0,
            statistic_sq: 0.0,
            inputs: self.inputs.iter().map(Histogram::empty_like).collect(),
            labelled: 0,
            correct: 0,
        }
    }

    /// Zeroes every count in place (no allocation).
    fn clear(&mut self) {
        let counts = |h: &mut Histogram| h.counts.iter_mut().for_each(|c| *c = 0);
        (self.requests, self.errors, self.non_finite, self.rows) = (0, 0, 0, 0);
        (self.labelled, self.correct) = (0, 0);
        self.latency_sum_us = 0.0;
        self.confidence_sum = 0.0;
        (self.statistic_sum, self.statistic_sq) = (0.0, 0.0);
        counts(&mut self.latency);
        counts(&mut self.confidence);
        counts(&mut self.statistic);
        self.inputs.iter_mut().for_each(counts);
        self.classes.iter_mut().for_each(|c| *c = 0);
    }

    /// Adds `other` (same bins) to `self`.
    pub fn merge(&mut self, o: &Acc) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.non_finite += o.non_finite;
        let _ = self.latency.merge(&o.latency);
        self.latency_sum_us += o.latency_sum_us;
        self.rows += o.rows;
        let _ = self.confidence.merge(&o.confidence);
        self.confidence_sum += o.confidence_sum;
        for (a, b) in self.classes.iter_mut().zip(&o.classes) {
            *a += b;
        }
        let _ = self.statistic.merge(&o.statistic);
        self.statistic_sum += o.statistic_sum;
        self.statistic_sq += o.statistic_sq;
        for (a, b) in self.inputs.iter_mut().zip(&o.inputs) {
            let _ = a.merge(b);
        }
        self.labelled += o.labelled;
        self.correct += o.correct;
    }

    pub fn failed(&self) -> u64 {
        self.errors + self.non_finite
    }

    pub fn error_rate(&self) -> f64 {
        self.failed() as f64 / self.requests.max(1) as f64
    }

    /// Latency quantile in milliseconds.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency.quantile(q).map(|l| 10f64.powf(l) / 1e3)
    }

    pub fn mean_confidence(&self) -> Option<f64> {
        (self.rows > 0 && self.confidence.total() > 0)
            .then(|| self.confidence_sum / self.confidence.total() as f64)
    }

    pub fn statistic_mean_std(&self) -> Option<(f64, f64)> {
        let n = self.statistic.total();
        (n > 0).then(|| {
            let mean = self.statistic_sum / n as f64;
            let var = (self.statistic_sq / n as f64 - mean * mean).max(0.0);
            (mean, var.sqrt())
        })
    }

    pub fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }
}

/// One request as the watch sees it, computed outside the lock.
struct Seen {
    failed_run: bool,
    non_finite: bool,
    latency_us: f64,
}

struct Inner {
    /// What requests add to (the only accumulator the request path touches); folded into
    /// `recent` and `window` whenever either is read.
    cur: Acc,
    older: Option<Acc>,
    recent: Acc,
    window: Acc,
    /// Ring of (hash of a request id, predicted class of its first row), for label feedback:
    /// one write per request, searched only when feedback arrives. Hash 0 marks a free slot.
    predictions: Vec<(u64, u32)>,
    next_prediction: usize,
}

impl Inner {
    fn drain(&mut self) {
        if self.cur.requests == 0 && self.cur.labelled == 0 {
            return;
        }
        self.recent.merge(&self.cur);
        self.window.merge(&self.cur);
        self.cur.clear();
        if self.recent.requests >= RECENT_SPAN {
            let fresh = self.recent.empty_like();
            self.older = Some(std::mem::replace(&mut self.recent, fresh));
        }
    }
}

fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Wakes the watch before its tick: a failed request is evidence worth judging at once.
#[derive(Debug, Default)]
pub struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.pending.lock().expect("wake lock") = true;
        self.cv.notify_one();
    }

    /// Waits until notified or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let g = self.pending.lock().expect("wake lock");
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |pending| !*pending)
            .expect("wake lock");
        *g = false;
    }
}

/// A bytes-per-hour budget for sampled records, shared by every model of an agent.
pub struct SampleBudget {
    bytes_per_hour: u64,
    spent: Mutex<(Instant, u64)>,
}

impl SampleBudget {
    pub fn new(bytes_per_hour: u64) -> SampleBudget {
        SampleBudget {
            bytes_per_hour,
            spent: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Spends `bytes` if the current hour has them left.
    pub fn take(&self, bytes: u64) -> bool {
        let mut g = self.spent.lock().expect("budget lock");
        if g.0.elapsed() >= Duration::from_secs(3600) {
            *g = (Instant::now(), 0);
        }
        if g.1 + bytes > self.bytes_per_hour {
            return false;
        }
        g.1 += bytes;
        true
    }
}

/// How a [`Health`] behaves: set once per agent.
#[derive(Clone)]
pub struct HealthOptions {
    /// Off: `observe` does nothing (no watch, no telemetry figures).
    pub enabled: bool,
    pub wake: Option<Arc<Wake>>,
    /// Fraction of requests kept as sampled records.
    pub sample_rate: f64,
    pub budget: Arc<SampleBudget>,
}

impl HealthOptions {
    pub fn disabled() -> HealthOptions {
        HealthOptions {
            enabled: false,
            wake: None,
            sample_rate: 0.0,
            budget: Arc::new(SampleBudget::new(0)),
        }
    }
}

/// Sampled records waiting for the telemetry tick, at most this many per model.
const MAX_PENDING_SAMPLES: usize = 1000;

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (t ^ (&t as *const u64 as u64)) | 1
    });
}

/// Uniform in [0, 1) (xorshift64*, per thread: no lock on the request path).
fn uniform() -> f64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Live health figures of one loaded model version.
pub struct Health {
    model: String,
    version: String,
    options: HealthOptions,
    /// The bundle's `telemetry_samples`: what a sampled record of this version may carry.
    sampling: TelemetrySamples,
    samples: Mutex<Vec<SampleRecord>>,
    over_budget: AtomicU64,
    window_start: Mutex<DateTime<Utc>>,
    wake: Option<Arc<Wake>>,
    kind: Kind,
    /// Index into the request's inputs of each baseline input histogram.
    input_index: Vec<usize>,
    enabled: bool,
    input_names: Vec<String>,
    output_names: Vec<String>,
    inner: Mutex<Inner>,
}

impl Health {
    /// Figures for a model described by `manifest`; `enabled = false` makes `observe` a no-op
    /// (the benchmark's "watch off").
    pub fn new(manifest: &Manifest, options: &HealthOptions) -> Health {
        let (enabled, wake) = (options.enabled, options.wake.clone());
        let out_index = |name: &str| {
            manifest
                .outputs
                .iter()
                .position(|o| o.name == name)
                .unwrap_or(0)
        };
        let kind = match &manifest.task {
            Task::Classification {
                output,
                scores,
                classes,
            } => Kind::Classification {
                output: out_index(output),
                classes: *classes,
                logits: *scores == ScoreKind::Logits,
            },
            Task::Regression { output, statistic } => Kind::Regression {
                output: out_index(output),
                statistic: *statistic,
            },
        };
        let b = &manifest.baseline;
        let mut input_index = Vec::new();
        let mut inputs = Vec::new();
        for ib in &b.inputs {
            if let Some(i) = manifest.inputs.iter().position(|s| s.name == ib.name) {
                input_index.push(i);
                inputs.push(ib.histogram.empty_like());
            }
        }
        let (lo, hi, bins) = LATENCY_LOG10_US;
        let classes = match &kind {
            Kind::Classification { classes, .. } => *classes,
            _ => 0,
        };
        let acc = Acc {
            requests: 0,
            errors: 0,
            non_finite: 0,
            latency: Histogram::new(lo, hi, bins),
            latency_sum_us: 0.0,
            rows: 0,
            confidence: b
                .classification
                .as_ref()
                .map(|c| c.confidence.empty_like())
                .unwrap_or_else(|| Histogram::new(0.0, 1.0, CONFIDENCE_BINS)),
            confidence_sum: 0.0,
            classes: vec![0; classes],
            statistic: b
                .regression
                .as_ref()
                .map(|r| r.histogram.empty_like())
                .unwrap_or_else(|| Histogram::new(0.0, 1.0, CONFIDENCE_BINS)),
            statistic_sum: 0.0,
            statistic_sq: 0.0,
            inputs,
            labelled: 0,
            correct: 0,
        };
        Health {
            model: manifest.name.clone(),
            version: manifest.version.to_string(),
            options: options.clone(),
            sampling: manifest.telemetry_samples,
            input_names: manifest.inputs.iter().map(|s| s.name.clone()).collect(),
            output_names: manifest.outputs.iter().map(|s| s.name.clone()).collect(),
            samples: Mutex::new(Vec::new()),
            over_budget: AtomicU64::new(0),
            window_start: Mutex::new(Utc::now()),
            wake,
            kind,
            input_index,
            enabled,
            inner: Mutex::new(Inner {
                cur: acc.empty_like(),
                older: None,
                window: acc.empty_like(),
                recent: acc,
                predictions: Vec::new(),
                next_prediction: 0,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records a request the model failed to run (engine error).
    pub fn observe_failure(&self, latency: Duration) {
        if !self.enabled {
            return;
        }
        let seen = Seen {
            failed_run: true,
            non_finite: false,
            latency_us: latency.as_secs_f64() * 1e6,
        };
        let mut g = self.inner.lock().expect("health lock");
        add_seen(&mut g.cur, &seen);
        drop(g);
        if let Some(w) = &self.wake {
            w.notify();
        }
    }

    /// Records a request the model answered. Returns whether an output held a non-finite value.
    pub fn observe(
        &self,
        id: Option<&str>,
        inputs: &[Tensor],
        outputs: &[Tensor],
        latency: Duration,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let non_finite = outputs.iter().any(|t| match &t.data {
            TensorData::F32(v) => v.iter().any(|x| !x.is_finite()),
            _ => false,
        });
        let seen = Seen {
            failed_run: false,
            non_finite,
            latency_us: latency.as_secs_f64() * 1e6,
        };
        let mut first_class = None;
        let mut g = self.inner.lock().expect("health lock");
        let inner = &mut *g;
        let acc = &mut inner.cur;
        add_seen(acc, &seen);
        if !non_finite {
            match &self.kind {
                Kind::Classification {
                    output,
                    classes,
                    logits,
                } => {
                    let scores = outputs.get(*output).and_then(|t| t.as_f32());
                    for row in scores.unwrap_or(&[]).chunks_exact((*classes).max(1)) {
                        let (class, conf) = top1(row, *logits);
                        first_class.get_or_insert(class);
                        acc.rows += 1;
                        acc.classes[class] += 1;
                        acc.confidence.add(conf);
                        acc.confidence_sum += conf;
                    }
                }
                Kind::Regression { output, statistic } => {
                    let out = outputs.get(*output).and_then(|t| t.as_f32()).unwrap_or(&[]);
                    let rows = outputs
                        .get(*output)
                        .and_then(|t| t.shape.first().copied())
                        .unwrap_or(1)
                        .max(1);
                    let per = out.len() / rows;
                    let first = inputs.first().and_then(|t| t.as_f32());
                    for r in 0..rows {
                        let o = &out[r * per..(r + 1) * per];
                        let s = match (statistic, first) {
                            (OutputStatistic::ReconstructionError, Some(x))
                                if x.len() == out.len() =>
                            {
                                let x = &x[r * per..(r + 1) * per];
                                o.iter()
                                    .zip(x)
                                    .map(|(a, b)| ((a - b) as f64).powi(2))
                                    .sum::<f64>()
                                    / per.max(1) as f64
                            }
                            _ => o.iter().map(|&v| v as f64).sum::<f64>() / per.max(1) as f64,
                        };
                        acc.rows += 1;
                        acc.statistic.add(s);
                        acc.statistic_sum += s;
                        acc.statistic_sq += s * s;
                    }
                }
            }
            for (h, &i) in acc.inputs.iter_mut().zip(&self.input_index) {
                if let Some(t) = inputs.get(i) {
                    bin_strided(h, t);
                }
            }
        }
        if let (Some(id), Some(class)) = (id, first_class) {
            let entry = (id_hash(id).max(1), class as u32);
            if inner.predictions.len() < FEEDBACK_MEMORY {
                inner.predictions.push(entry);
            } else {
                let i = inner.next_prediction % FEEDBACK_MEMORY;
                inner.predictions[i] = entry;
            }
            inner.next_prediction = inner.next_prediction.wrapping_add(1);
        }
        drop(g);
        if non_finite {
            if let Some(w) = &self.wake {
                w.notify();
            }
        }
        // `none`: the bundle forbids sampled requests; nothing is drawn, nothing is counted
        // over budget.
        if self.sampling != TelemetrySamples::None
            && self.options.sample_rate > 0.0
            && uniform() < self.options.sample_rate
        {
            self.sample(id, inputs, outputs, latency);
        }
        non_finite
    }

    fn sample(&self, id: Option<&str>, inputs: &[Tensor], outputs: &[Tensor], latency: Duration) {
        let hashed = match self.sampling {
            TelemetrySamples::Full => false,
            TelemetrySamples::Hashed => true,
            TelemetrySamples::None => return,
        };
        // JSON size: ~12 bytes per value, or a 64-digit hash and its key per tensor; plus the
        // envelope.
        let bytes: usize = inputs
            .iter()
            .chain(outputs)
            .map(|t| if hashed { 96 } else { t.len() * 12 })
            .sum();
        if !self.options.budget.take(bytes as u64 + 256) {
            self.over_budget.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let tensors = |specs: &[(String, &Tensor)]| {
            specs
                .iter()
                .map(|(name, t)| {
                    let (datatype, shape) = (t.dtype().oip_name(), t.shape.clone());
                    if hashed {
                        SampleTensor::hashed(name.clone(), datatype, shape, &t.to_le_bytes())
                    } else {
                        SampleTensor::with_values(name.clone(), datatype, shape, tensor_values(t))
                    }
                })
                .collect()
        };
        let names = |n: usize, prefix: &'static str| (0..n).map(move |i| format!("{prefix}{i}"));
        let record = SampleRecord {
            schema: TELEMETRY_SCHEMA,
            model: self.model.clone(),
            version: self.version.clone(),
            time: Utc::now(),
            request_id: id.map(str::to_string),
            latency_ms: latency.as_secs_f64() * 1e3,
            inputs: tensors(
                &self
                    .input_names
                    .iter()
                    .cloned()
                    .chain(names(inputs.len(), "input"))
                    .zip(inputs)
                    .collect::<Vec<_>>(),
            ),
            outputs: tensors(
                &self
                    .output_names
                    .iter()
                    .cloned()
                    .chain(names(outputs.len(), "output"))
                    .zip(outputs)
                    .collect::<Vec<_>>(),
            ),
        };
        let mut pending = self.samples.lock().expect("samples lock");
        if pending.len() < MAX_PENDING_SAMPLES {
            pending.push(record);
        } else {
            self.over_budget.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sampled records since the last call, and how many were skipped over budget.
    pub fn take_samples(&self) -> (Vec<SampleRecord>, u64) {
        let samples = std::mem::take(&mut *self.samples.lock().expect("samples lock"));
        (samples, self.over_budget.swap(0, Ordering::Relaxed))
    }

    /// Label feedback: the true class of earlier requests. Returns (matched, correct) — ids this
    /// model version does not remember (too old, served by another version, or no id) are skipped.
    pub fn feedback(&self, labels: &[(String, usize)]) -> (u64, u64) {
        let mut g = self.inner.lock().expect("health lock");
        let inner = &mut *g;
        let (mut matched, mut correct) = (0, 0);
        // Built only when feedback arrives; an id used twice matches one of its requests.
        let mut index: HashMap<u64, usize> = HashMap::with_capacity(inner.predictions.len());
        for (i, (h, _)) in inner.predictions.iter().enumerate() {
            if *h != 0 {
                index.insert(*h, i);
            }
        }
        for (id, label) in labels {
            let key = id_hash(id).max(1);
            if let Some(&i) = index.get(&key) {
                let (h, pred) = inner.predictions[i];
                if h == key {
                    matched += 1;
                    correct += (pred as usize == *label) as u64;
                    inner.predictions[i].0 = 0;
                }
            }
        }
        inner.cur.labelled += matched;
        inner.cur.correct += correct;
        (matched, correct)
    }

    /// Figures over the recent span (the trial, or the reference once replaced).
    pub fn recent(&self) -> Acc {
        let mut g = self.inner.lock().expect("health lock");
        g.drain();
        let mut acc = g.recent.clone();
        if let Some(o) = &g.older {
            acc.merge(o);
        }
        acc
    }

    /// The figures since the last call (a telemetry window) and when it started, resetting them.
    pub fn take_window(&self) -> (DateTime<Utc>, Acc) {
        let mut g = self.inner.lock().expect("health lock");
        g.drain();
        let fresh = g.window.empty_like();
        let acc = std::mem::replace(&mut g.window, fresh);
        drop(g);
        let start = std::mem::replace(
            &mut *self.window_start.lock().expect("window lock"),
            Utc::now(),
        );
        (start, acc)
    }
}

fn tensor_values(t: &Tensor) -> Vec<Option<f64>> {
    let finite = |x: f64| x.is_finite().then_some(x);
    match &t.data {
        TensorData::F32(v) => v.iter().map(|&x| finite(x as f64)).collect(),
        TensorData::I32(v) => v.iter().map(|&x| Some(x as f64)).collect(),
        TensorData::I64(v) => v.iter().map(|&x| Some(x as f64)).collect(),
        TensorData::U8(v) => v.iter().map(|&x| Some(x as f64)).collect(),
    }
}

fn add_seen(acc: &mut Acc, s: &Seen) {
    acc.requests += 1;
    acc.errors += s.failed_run as u64;
    acc.non_finite += s.non_finite as u64;
    acc.latency.add(s.latency_us.max(1.0).log10());
    acc.latency_sum_us += s.latency_us;
}

fn bin_strided(h: &mut Histogram, t: &Tensor) {
    let n = t.len();
    let step = n.div_ceil(MAX_INPUT_VALUES).max(1);
    match &t.data {
        TensorData::F32(v) => v.iter().step_by(step).for_each(|&x| h.add(x as f64)),
        TensorData::I32(v) => v.iter().step_by(step).for_each(|&x| h.add(x as f64)),
        TensorData::I64(v) => v.iter().step_by(step).for_each(|&x| h.add(x as f64)),
        TensorData::U8(v) => v.iter().step_by(step).for_each(|&x| h.add(x as f64)),
    }
}

/// Top-1 class and its confidence (softmax probability for logits).
pub fn top1(row: &[f32], logits: bool) -> (usize, f64) {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    let top = row.get(best).copied().unwrap_or(0.0) as f64;
    if logits {
        let denom: f64 = row.iter().map(|&v| (v as f64 - top).exp()).sum();
        (best, 1.0 / denom.max(1.0))
    } else {
        (best, top.clamp(0.0, 1.0))
    }
}

/// PSI of class counts in excess of what two samples of one distribution show by chance.
pub fn excess_psi(expected: &[u64], actual: &[u64]) -> (f64, f64) {
    let raw = psi(expected, actual);
    let (n1, n2) = (
        expected.iter().sum::<u64>().max(1) as f64,
        actual.iter().sum::<u64>().max(1) as f64,
    );
    let k = expected
        .iter()
        .zip(actual)
        .filter(|(a, b)| **a + **b > 0)
        .count()
        .max(1) as f64;
    let noise = (k - 1.0) * (1.0 / n1 + 1.0 / n2);
    (raw, noise)
}

/// PSI of baseline fractions (expected) against live counts.
fn psi_vs_fractions(expected: &[f64], counts: &[u64]) -> f64 {
    let total = counts.iter().sum::<u64>();
    if total == 0 || expected.len() != counts.len() {
        return 0.0;
    }
    protocol::stats::psi_of_fractions(
        expected.iter().copied(),
        counts.iter().map(|&c| c as f64 / total as f64),
    )
}

/// The trial verdict at one tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough evidence yet (or not long enough); nothing breached.
    Continue,
    /// Passed: commit, with these figures.
    Pass(serde_json::Value),
    /// Regressed: revert for `reason`, with the figures and thresholds.
    Breach {
        reason: String,
        evidence: serde_json::Value,
    },
}

/// Judges a trial: `trial` is the new model's figures, `reference` the previous model's live
/// figures from before the swap (if any), `baseline` the new bundle's build-time figures.
pub fn judge(
    trial: &Acc,
    reference: Option<&Acc>,
    baseline: &Baseline,
    policy: &TrialPolicy,
    elapsed: Duration,
) -> Verdict {
    let reference = reference.filter(|r| r.requests >= policy.min_reference_requests);
    let figures = figures(trial, reference, baseline);
    let breach = |reason: &str, checks: serde_json::Value| Verdict::Breach {
        reason: reason.to_string(),
        evidence: json!({"check": checks, "figures": figures.clone(),
                         "elapsed_seconds": elapsed.as_secs_f64(), "policy": policy}),
    };

    // Errors: judged early, they need no statistics.
    if trial.requests >= policy.min_error_evidence && trial.failed() >= 3 {
        let reference_rate = reference.map_or(0.0, Acc::error_rate);
        let excess = trial.error_rate() - reference_rate;
        if excess > policy.max_error_rate {
            return breach(
                "error_rate",
                json!({"error_rate": trial.error_rate(), "reference_error_rate": reference_rate,
                       "errors": trial.errors, "non_finite": trial.non_finite,
                       "requests": trial.requests, "threshold": policy.max_error_rate}),
            );
        }
    }
    if trial.requests < policy.min_requests {
        return Verdict::Continue;
    }

    if let Some(r) = reference {
        if let (Some(new), Some(old)) = (trial.latency_ms(0.95), r.latency_ms(0.95)) {
            let floor = policy.latency_floor_ms;
            let ratio = new.max(floor) / old.max(floor);
            if ratio > policy.max_p95_latency_ratio {
                return breach(
                    "p95_latency",
                    json!({"p95_ms": new, "reference_p95_ms": old, "ratio": ratio,
                           "latency_floor_ms": floor, "threshold": policy.max_p95_latency_ratio}),
                );
            }
        }
    }
    // Confidence and predictions: against the previous model's live figures, or (without enough
    // of them) the bundle baseline.
    let cb = baseline.classification.as_ref();
    if let Some(new) = trial.mean_confidence() {
        let (old, against) = match reference.and_then(Acc::mean_confidence) {
            Some(c) => (Some(c), "previous"),
            None => (cb.map(|c| c.mean_confidence), "baseline"),
        };
        if let Some(old) = old {
            if old - new > policy.max_confidence_drop {
                return breach(
                    "confidence_drop",
                    json!({"mean_confidence": new, "reference_mean_confidence": old,
                           "against": against, "drop": old - new,
                           "threshold": policy.max_confidence_drop}),
                );
            }
        }
        let (psi_value, noise, against) = match reference.filter(|r| r.rows > 0) {
            Some(r) => {
                let (raw, noise) = excess_psi(&r.classes, &trial.classes);
                (raw, noise, "previous")
            }
            None => match cb {
                Some(c) => {
                    let k = c.class_distribution.len().max(1) as f64;
                    let noise = (k - 1.0) * (1.0 / trial.rows.max(1) as f64);
                    (
                        psi_vs_fractions(&c.class_distribution, &trial.classes),
                        noise,
                        "baseline",
                    )
                }
                None => (0.0, 0.0, "none"),
            },
        };
        if psi_value - noise > policy.max_prediction_psi {
            return breach(
                "prediction_psi",
                json!({"psi": psi_value, "chance_psi": noise, "against": against,
                       "threshold": policy.max_prediction_psi}),
            );
        }
    }
    if let Some((new_mean, _)) = trial.statistic_mean_std() {
        let reference_stat = match reference.and_then(Acc::statistic_mean_std) {
            Some(ms) => Some((ms, "previous")),
            None => baseline
                .regression
                .as_ref()
                .map(|r| ((r.mean, r.std), "baseline")),
        };
        if let Some(((mean, std), against)) = reference_stat {
            let shift = (new_mean - mean).abs() / std.max(1e-12);
            if shift > policy.max_output_shift {
                return breach(
                    "output_shift",
                    json!({"mean": new_mean, "reference_mean": mean, "reference_std": std,
                           "shift_std": shift, "against": against,
                           "threshold": policy.max_output_shift}),
                );
            }
        }
    }
    if let (Some(r), Some(new)) = (reference, trial.accuracy()) {
        if let Some(old) = r.accuracy() {
            if trial.labelled >= policy.min_labels
                && r.labelled >= policy.min_labels
                && old - new > policy.max_accuracy_drop
            {
                return breach(
                    "accuracy_drop",
                    json!({"accuracy": new, "reference_accuracy": old, "labelled": trial.labelled,
                           "reference_labelled": r.labelled, "threshold": policy.max_accuracy_drop}),
                );
            }
        }
    }
    if let Some(max) = policy.max_input_psi {
        if let Some(worst) = input_psi(trial, baseline)
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
        {
            if worst.1 > max {
                return breach(
                    "input_drift",
                    json!({"input": worst.0, "psi": worst.1, "threshold": max}),
                );
            }
        }
    }
    if elapsed < Duration::from_secs(policy.min_seconds) {
        return Verdict::Continue;
    }
    Verdict::Pass(
        json!({"figures": figures, "elapsed_seconds": elapsed.as_secs_f64(),
                         "policy": policy}),
    )
}

/// Input-drift PSI of each input against the baseline histogram.
pub fn input_psi(acc: &Acc, baseline: &Baseline) -> Vec<(String, f64)> {
    baseline
        .inputs
        .iter()
        .zip(&acc.inputs)
        .filter(|(b, h)| b.histogram.same_bins(h) && h.total() > 0)
        .map(|(b, h)| (b.name.clone(), psi(&b.histogram.counts, &h.counts)))
        .collect()
}

/// The figures of a trial (and its references) as evidence.
pub fn figures(trial: &Acc, reference: Option<&Acc>, baseline: &Baseline) -> serde_json::Value {
    let one = |a: &Acc| {
        json!({"requests": a.requests, "errors": a.errors, "non_finite": a.non_finite,
               "error_rate": a.error_rate(), "p50_ms": a.latency_ms(0.5), "p95_ms": a.latency_ms(0.95),
               "mean_confidence": a.mean_confidence(),
               "class_counts": (!a.classes.is_empty()).then_some(&a.classes),
               "statistic_mean": a.statistic_mean_std().map(|s| s.0),
               "statistic_std": a.statistic_mean_std().map(|s| s.1),
               "labelled": a.labelled, "accuracy": a.accuracy()})
    };
    let prediction_psi_previous =
        reference.filter(|r| r.rows > 0 && trial.rows > 0 && !trial.classes.is_empty());
    json!({
        "trial": one(trial),
        "previous": reference.map(one),
        "baseline": {"mean_confidence": baseline.classification.as_ref().map(|c| c.mean_confidence),
                     "statistic_mean": baseline.regression.as_ref().map(|r| r.mean),
                     "accuracy": baseline.accuracy, "p95_ms": baseline.latency.p95_us / 1e3},
        "prediction_psi_previous": prediction_psi_previous.map(|r| psi(&r.classes, &trial.classes)),
        "prediction_psi_baseline": baseline.classification.as_ref()
            .filter(|_| trial.rows > 0)
            .map(|c| psi_vs_fractions(&c.class_distribution, &trial.classes)),
        "input_psi": input_psi(trial, baseline).into_iter()
            .map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let mut m = protocol::testing::sample_manifest();
        m.task = Task::Classification {
            output: m.outputs[0].name.clone(),
            scores: ScoreKind::Probabilities,
            classes: 4,
        };
        m
    }

    /// Figures of `n` requests predicting classes in rotation with `confidence`, latency `us`.
    fn acc(n: u64, confidence: f64, us: f64, failed: u64) -> Acc {
        let h = Health::new(
            &manifest(),
            &HealthOptions {
                enabled: true,
                ..HealthOptions::disabled()
            },
        );
        let mut a = h.recent();
        for i in 0..n {
            add_seen(
                &mut a,
                &Seen {
                    failed_run: i < failed,
                    non_finite: false,
                    latency_us: us,
                },
            );
            a.rows += 1;
            a.classes[(i % 4) as usize] += 1;
            a.confidence.add(confidence);
            a.confidence_sum += confidence;
        }
        a
    }

    fn policy() -> TrialPolicy {
        TrialPolicy {
            min_requests: 100,
            min_seconds: 2,
            ..TrialPolicy::default()
        }
    }

    fn reason(v: Verdict) -> String {
        match v {
            Verdict::Breach { reason, .. } => reason,
            other => panic!("expected a breach, got {other:?}"),
        }
    }

    #[test]
    fn same_figures_pass_only_after_the_minimum_time_and_requests() {
        let b = manifest().baseline;
        let reference = acc(300, 0.9, 100.0, 0);
        let (secs, p) = (Duration::from_secs, policy());
        assert_eq!(
            judge(&acc(50, 0.9, 100.0, 0), Some(&reference), &b, &p, secs(5)),
            Verdict::Continue
        );
        assert_eq!(
            judge(&acc(150, 0.9, 100.0, 0), Some(&reference), &b, &p, secs(1)),
            Verdict::Continue
        );
        assert!(matches!(
            judge(&acc(150, 0.9, 100.0, 0), Some(&reference), &b, &p, secs(3)),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn each_regression_has_its_reason() {
        let b = manifest().baseline;
        let r = acc(300, 0.9, 100.0, 0);
        let (t, p) = (Duration::from_secs(1), policy());
        // Errors are judged early, before min_requests.
        assert_eq!(
            reason(judge(&acc(30, 0.9, 100.0, 5), Some(&r), &b, &p, t)),
            "error_rate"
        );
        assert_eq!(
            reason(judge(&acc(150, 0.9, 3000.0, 0), Some(&r), &b, &p, t)),
            "p95_latency"
        );
        // Below the latency floor a 3x slowdown is noise.
        assert_eq!(
            judge(&acc(150, 0.9, 300.0, 0), Some(&r), &b, &p, t),
            Verdict::Continue
        );
        assert_eq!(
            reason(judge(&acc(150, 0.5, 100.0, 0), Some(&r), &b, &p, t)),
            "confidence_drop"
        );
        let mut skewed = acc(150, 0.9, 100.0, 0);
        skewed.classes = vec![150, 0, 0, 0];
        assert_eq!(
            reason(judge(&skewed, Some(&r), &b, &p, t)),
            "prediction_psi"
        );
        let (mut r2, mut shifted) = (r.clone(), acc(150, 0.9, 100.0, 0));
        for (a, mean) in [(&mut r2, 1.0), (&mut shifted, 3.0)] {
            for i in 0..a.requests {
                let x = mean + (i % 2) as f64 * 0.2 - 0.1;
                a.statistic.add(x);
                a.statistic_sum += x;
                a.statistic_sq += x * x;
            }
        }
        assert_eq!(
            reason(judge(&shifted, Some(&r2), &b, &p, t)),
            "output_shift"
        );
        let mut reference = r.clone();
        (reference.labelled, reference.correct) = (100, 95);
        let mut worse = acc(150, 0.9, 100.0, 0);
        (worse.labelled, worse.correct) = (100, 70);
        assert_eq!(
            reason(judge(&worse, Some(&reference), &b, &p, t)),
            "accuracy_drop"
        );
    }

    #[test]
    fn chance_psi_matches_sampling_noise() {
        let (raw, noise) = excess_psi(&[50, 50, 50, 50], &[48, 52, 51, 49]);
        assert!(raw < noise, "{raw} {noise}");
        assert!((noise - 3.0 * (2.0 / 200.0)).abs() < 1e-12);
    }
}
