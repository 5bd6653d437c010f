//! Telemetry kept in memory: the recent windows of every (device, model, version), the recent
//! sampled requests of every (device, model). The rollout engine sums a cohort's windows itself
//! (`rollout::gates::CohortFigures`).
//!
//! Retention is bounded per key: at most [`Retention::max_windows`] windows (default 720, two
//! hours of the agent's 10 s windows) and none older than [`Retention::max_age`] (default 24 h);
//! at most [`Retention::max_samples`] sampled records (default 20) per device and model. Nothing
//! here survives a restart: telemetry is a stream, the durable copy of record is the device's
//! outbox until the broker acknowledged it, and anyone can subscribe to the topic to keep more.

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use chrono::{DateTime, Duration, Utc};
use protocol::telemetry::{SampleRecord, TelemetryRecord, WindowRecord};

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

    /// Keeps a record from `device`. Returns false for a window already kept (same model,
    /// version and `start`): QoS 1 delivers again what a device re-sends after a reconnect, and
    /// a window counted twice would count its requests and errors twice in the rollout gates.
    pub fn record(&self, device: &str, record: TelemetryRecord) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match record {
            TelemetryRecord::Window(w) => {
                let key = Key {
                    device: device.to_string(),
                    model: w.model.clone(),
                    version: w.version.clone(),
                };
                let q = inner.windows.entry(key).or_default();
                // Newest first: a re-sent window is among the last few received.
                if q.iter().rev().any(|kept| kept.start == w.start) {
                    return false;
                }
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
        true
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

    /// Calls `f(device, window)` for every device's windows of `model` ending after `since`, in
    /// one pass over the keys and without copying a window (the dashboard's cohort series: one
    /// call whatever the fleet size). Unordered; holds the read lock while it runs.
    pub fn for_each_window(
        &self,
        model: &str,
        since: Option<DateTime<Utc>>,
        mut f: impl FnMut(&str, &WindowRecord),
    ) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        for (k, q) in inner.windows.iter().filter(|(k, _)| k.model == model) {
            for w in q.iter().filter(|w| since.is_none_or(|s| w.end > s)) {
                f(&k.device, w);
            }
        }
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
    use protocol::stats::Histogram;
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
    fn windows_are_kept_per_device_and_filtered_by_model_and_time() {
        let t = Telemetry::default();
        let now = Utc::now();
        t.record(
            "b",
            TelemetryRecord::Window(window("2.0.0", 300, 0, 1000.0, now)),
        );
        t.record(
            "b",
            TelemetryRecord::Window(window("2.0.0", 50, 50, 1000.0, now - Duration::hours(2))),
        );
        t.record(
            "b",
            TelemetryRecord::Window(window("1.0.0", 100, 0, 1000.0, now - Duration::hours(1))),
        );
        t.record(
            "c",
            TelemetryRecord::Window(window("1.0.0", 100, 0, 1000.0, now)),
        );
        let all = t.windows("b", Some("digits"), None);
        let requests: Vec<u64> = all.iter().map(|w| w.requests).collect();
        assert_eq!(requests, vec![50, 100, 300], "oldest first, every version");
        let recent = t.windows("b", Some("digits"), Some(now - Duration::minutes(90)));
        assert_eq!(recent.len(), 2);
        assert!(t.windows("b", Some("other"), None).is_empty());
        assert_eq!(t.keys(), 3);
    }

    /// Window timestamps are the device's clock (docs/faults.md, "Clock skew"): a device whose
    /// clock runs a day or more behind has its windows dropped on arrival as too old, and behind
    /// by less they fall before a bake that began meanwhile; a clock ahead is kept.
    #[test]
    fn window_times_are_the_device_clock() {
        let t = Telemetry::default();
        let now = Utc::now();
        let bake_started = now - Duration::minutes(5);
        t.record(
            "behind-2d",
            TelemetryRecord::Window(window("2.0.0", 10, 0, 1.0, now - Duration::days(2))),
        );
        t.record(
            "behind-1h",
            TelemetryRecord::Window(window("2.0.0", 10, 0, 1.0, now - Duration::hours(1))),
        );
        t.record(
            "ahead-1h",
            TelemetryRecord::Window(window("2.0.0", 10, 0, 1.0, now + Duration::hours(1))),
        );
        assert!(t.windows("behind-2d", None, None).is_empty(), "dropped");
        assert_eq!(t.windows("behind-1h", None, None).len(), 1, "kept");
        assert!(
            t.windows("behind-1h", None, Some(bake_started)).is_empty(),
            "not counted in a bake that began after its (device) end time"
        );
        assert_eq!(t.windows("ahead-1h", None, Some(bake_started)).len(), 1);
    }

    #[test]
    fn retention_caps_windows_per_key() {
        let t = Telemetry::new(Retention {
            max_windows: 3,
            ..Retention::default()
        });
        let now = Utc::now();
        for i in 0..10 {
            t.record(
                "a",
                TelemetryRecord::Window(window("1", i, 0, 10.0, now + Duration::seconds(i as i64))),
            );
        }
        let kept = t.windows("a", None, None);
        assert_eq!(
            kept.iter().map(|w| w.requests).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }

    #[test]
    fn a_window_received_again_is_kept_once() {
        let t = Telemetry::default();
        let now = Utc::now();
        let first = window("1", 10, 1, 10.0, now);
        let next = window("1", 20, 0, 10.0, now + Duration::seconds(10));
        assert!(t.record("a", TelemetryRecord::Window(first.clone())));
        assert!(t.record("a", TelemetryRecord::Window(next)));
        // Re-sent after a reconnect, behind a newer one: not counted again.
        assert!(!t.record("a", TelemetryRecord::Window(first.clone())));
        let kept = t.windows("a", None, None);
        assert_eq!(kept.iter().map(|w| w.requests).sum::<u64>(), 30);
        // The same start on another device or version is another window.
        assert!(t.record("b", TelemetryRecord::Window(first.clone())));
        assert!(t.record("a", TelemetryRecord::Window(window("2", 5, 0, 10.0, now))));
    }
}
