//! Telemetry kept in memory: the recent windows of every (device, model, version), the recent
//! sampled requests of every (device, model), and the cohort figures the rollout engine judges.
//!
//! Retention is bounded per key: at most [`Retention::max_windows`] windows (default 720, two
//! hours of the agent's 10 s windows) and none older than [`Retention::max_age`] (default 24 h);
//! at most [`Retention::max_samples`] sampled records (default 20) per device and model. Nothing
//! here survives a restart: telemetry is a stream, the durable copy of record is the device's
//! outbox until the broker acknowledged it, and anyone can subscribe to the topic to keep more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::RwLock;

use chrono::{DateTime, Duration, Utc};
use protocol::stats::Histogram;
use protocol::telemetry::{SampleRecord, TelemetryRecord, WindowRecord};
use serde::Serialize;

/// How much telemetry is kept per key.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_windows: usize,
    pub max_age: Duration,
    pub max_samples: usize,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_windows: 720,
            max_age: Duration::hours(24),
            max_samples: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    device: String,
    model: String,
    version: String,
}

/// Figures of a set of devices running one model version, summed over their windows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CohortFigures {
    /// Devices with at least one window in the period.
    pub devices: usize,
    pub windows: u64,
    pub requests: u64,
    pub errors: u64,
    pub non_finite: u64,
    /// Merged histogram of log10(latency µs) (None without windows).
    pub latency_log10_us: Option<Histogram>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// Mean latency weighted by requests.
    pub mean_latency_ms: Option<f64>,
    /// Merged top-1 confidence histogram (classifiers).
    pub confidence: Option<Histogram>,
    /// Mean top-1 confidence weighted by requests.
    pub mean_confidence: Option<f64>,
    /// Rows predicted as each class, summed.
    pub class_counts: Vec<u64>,
    /// Largest input PSI seen in any window, per input.
    pub max_input_psi: std::collections::BTreeMap<String, f64>,
    pub labelled: u64,
    pub correct: u64,
    /// Windows whose histograms had other bins than the first (left out of the merge).
    pub bins_mismatched: u64,
    /// Windows reported in the `trial` state.
    pub trial_windows: u64,
}

impl CohortFigures {
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    pub fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }

    fn add(&mut self, w: &WindowRecord) {
        self.windows += 1;
        if w.state == "trial" {
            self.trial_windows += 1;
        }
        let prior = self.requests;
        self.requests += w.requests;
        self.errors += w.errors;
        self.non_finite += w.non_finite;
        if !merge(&mut self.latency_log10_us, &w.latency.log10_us) {
            self.bins_mismatched += 1;
        }
        if let Some(m) = w.latency.mean_ms {
            self.mean_latency_ms = Some(weighted(self.mean_latency_ms, prior, m, w.requests));
        }
        if let Some(c) = &w.classification {
            if !merge(&mut self.confidence, &c.confidence) {
                self.bins_mismatched += 1;
            }
            if let Some(m) = c.mean_confidence {
                self.mean_confidence = Some(weighted(self.mean_confidence, prior, m, w.requests));
            }
            if self.class_counts.len() < c.class_counts.len() {
                self.class_counts.resize(c.class_counts.len(), 0);
            }
            for (a, b) in self.class_counts.iter_mut().zip(&c.class_counts) {
                *a += b;
            }
        }
        for (input, psi) in &w.input_psi {
            let e = self.max_input_psi.entry(input.clone()).or_insert(*psi);
            *e = e.max(*psi);
        }
        if let Some(f) = &w.feedback {
            self.labelled += f.labelled;
            self.correct += f.correct;
        }
    }

    fn finish(&mut self) {
        if let Some(h) = &self.latency_log10_us {
            let ms = |q| h.quantile(q).map(|l: f64| 10f64.powf(l) / 1000.0);
            self.p50_ms = ms(0.5);
            self.p95_ms = ms(0.95);
        }
    }
}

fn weighted(acc: Option<f64>, n_acc: u64, value: f64, n: u64) -> f64 {
    match acc {
        Some(a) if n_acc + n > 0 => (a * n_acc as f64 + value * n as f64) / (n_acc + n) as f64,
        _ => value,
    }
}

/// Merges `h` into `into`; false when the bins differ (the window is left out).
fn merge(into: &mut Option<Histogram>, h: &Histogram) -> bool {
    match into {
        None => {
            *into = Some(h.clone());
            true
        }
        Some(acc) => acc.merge(h).is_ok(),
    }
}

#[derive(Default)]
struct Inner {
    windows: HashMap<Key, VecDeque<WindowRecord>>,
    samples: HashMap<(String, String), VecDeque<SampleRecord>>,
}

/// The in-memory telemetry of the fleet.
#[derive(Default)]
pub struct Telemetry {
    retention: Retention,
    inner: RwLock<Inner>,
}

impl Telemetry {
    pub fn new(retention: Retention) -> Telemetry {
        Telemetry {
            retention,
            inner: RwLock::default(),
        }
    }

    /// Keeps a record from `device`.
    pub fn record(&self, device: &str, record: TelemetryRecord) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match record {
            TelemetryRecord::Window(w) => {
                let key = Key {
                    device: device.to_string(),
                    model: w.model.clone(),
                    version: w.version.clone(),
                };
                let q = inner.windows.entry(key).or_default();
                q.push_back(w);
                let horizon = Utc::now() - self.retention.max_age;
                while q.len() > self.retention.max_windows
                    || q.front().is_some_and(|w| w.end < horizon)
                {
                    q.pop_front();
                }
            }
            TelemetryRecord::Sample(s) => {
                let q = inner
                    .samples
                    .entry((device.to_string(), s.model.clone()))
                    .or_default();
                q.push_back(s);
                while q.len() > self.retention.max_samples {
                    q.pop_front();
                }
            }
        }
    }

    /// The windows of `device` (optionally only of `model`) ending after `since`, oldest first.
    pub fn windows(
        &self,
        device: &str,
        model: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Vec<WindowRecord> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<WindowRecord> = inner
            .windows
            .iter()
            .filter(|(k, _)| k.device == device && model.is_none_or(|m| m == k.model))
            .flat_map(|(_, q)| q.iter())
            .filter(|w| since.is_none_or(|s| w.end > s))
            .cloned()
            .collect();
        out.sort_by_key(|w| w.end);
        out
    }

    /// The recent sampled requests of `device` and `model`, oldest first.
    pub fn samples(&self, device: &str, model: &str) -> Vec<SampleRecord> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .samples
            .get(&(device.to_string(), model.to_string()))
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Figures of `model` at `version` on `devices`, over windows that ended after `since`.
    pub fn summary<'a>(
        &self,
        devices: impl IntoIterator<Item = &'a str>,
        model: &str,
        version: &str,
        since: DateTime<Utc>,
    ) -> CohortFigures {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut figures = CohortFigures::default();
        let mut seen = HashSet::new();
        for device in devices {
            let key = Key {
                device: device.to_string(),
                model: model.to_string(),
                version: version.to_string(),
            };
            let Some(q) = inner.windows.get(&key) else {
                continue;
            };
            for w in q.iter().filter(|w| w.end > since) {
                seen.insert(device);
                figures.add(w);
            }
        }
        figures.devices = seen.len();
        figures.finish();
        figures
    }

    /// Number of (device, model, version) keys with windows.
    pub fn keys(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .windows
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::telemetry::{ClassificationWindow, LatencyWindow, TELEMETRY_SCHEMA};

    fn window(
        version: &str,
        requests: u64,
        errors: u64,
        latency_us: f64,
        end: DateTime<Utc>,
    ) -> WindowRecord {
        let mut log10_us = Histogram::new(0.0, 7.0, 70);
        for _ in 0..requests {
            log10_us.add(latency_us.log10());
        }
        let mut confidence = Histogram::new(0.0, 1.0, 10);
        confidence.add(0.9);
        WindowRecord {
            schema: TELEMETRY_SCHEMA,
            model: "digits".into(),
            version: version.into(),
            start: end - Duration::seconds(10),
            end,
            state: "trial".into(),
            requests,
            errors,
            non_finite: 0,
            latency: LatencyWindow {
                log10_us,
                mean_ms: Some(latency_us / 1000.0),
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
            },
            classification: Some(ClassificationWindow {
                class_counts: vec![requests, 0, 1],
                confidence,
                mean_confidence: Some(0.9),
                prediction_psi_baseline: None,
            }),
            regression: None,
            input_psi: [("input".to_string(), 0.05)].into(),
            feedback: None,
            samples_over_budget: 0,
            outbox_dropped_total: 0,
        }
    }

    #[test]
    fn summary_sums_the_cohort_and_skips_other_versions_and_old_windows() {
        let t = Telemetry::default();
        let now = Utc::now();
        t.record(
            "a",
            TelemetryRecord::Window(window("2.0.0", 100, 2, 1000.0, now)),
        );
        t.record(
            "b",
            TelemetryRecord::Window(window("2.0.0", 300, 0, 1000.0, now)),
        );
        t.record(
            "b",
            TelemetryRecord::Window(window("2.0.0", 50, 50, 1000.0, now - Duration::hours(2))),
        );
        t.record(
            "c",
            TelemetryRecord::Window(window("1.0.0", 100, 0, 1000.0, now)),
        );
        let f = t.summary(
            ["a", "b", "c"],
            "digits",
            "2.0.0",
            now - Duration::minutes(5),
        );
        assert_eq!((f.devices, f.windows, f.requests, f.errors), (2, 2, 400, 2));
        assert_eq!(f.error_rate(), Some(0.005));
        let p95 = f.p95_ms.unwrap();
        assert!((0.9..1.3).contains(&p95), "p95 {p95}");
        assert_eq!(f.class_counts, vec![400, 0, 2]);
        assert_eq!(f.mean_confidence, Some(0.9));
        assert_eq!(t.windows("b", Some("digits"), None).len(), 2);
    }

    #[test]
    fn retention_caps_windows_per_key() {
        let t = Telemetry::new(Retention {
            max_windows: 3,
            ..Retention::default()
        });
        for i in 0..10 {
            t.record(
                "a",
                TelemetryRecord::Window(window("1", i, 0, 10.0, Utc::now())),
            );
        }
        let kept = t.windows("a", None, None);
        assert_eq!(
            kept.iter().map(|w| w.requests).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }
}
