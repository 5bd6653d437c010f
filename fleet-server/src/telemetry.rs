//! Telemetry kept in memory: the recent windows of every (device, model, version), the recent
//! sampled requests of every (device, model). The rollout engine sums a cohort's windows itself
//! (`rollout::gates::CohortFigures`).
//!
//! Retention is bounded per key and for the whole fleet, so the server's memory does not grow
//! with its uptime nor, beyond a set budget, with the fleet's size:
//! - per (device, model, version): at most [`Retention::max_windows`] windows (default 720, two
//!   hours of the agent's 10 s windows), none older than [`Retention::max_age`] (default 24 h);
//! - over every key: about [`Retention::max_windows_total`] windows (default 50,000, ≈ 50–80
//!   MB; a window with its latency and confidence histograms takes ≈ 1–1.6 KB: the server's RSS
//!   grew by 0.9 MB a second while it took in 1,000 windows a second with no fleet-wide bound).
//!   Each key keeps at most `max_windows_total / keys` of its newest windows (at least one), so a
//!   fleet of 1,000 devices keeps 50 windows per device (8 minutes of 10 s windows) and one of
//!   10,000 keeps 5 (50 s). The rollout gates judge a bake on the windows still held: a bake
//!   longer than that is judged on its newest part, canaries and control over the same span
//!   (docs/rollouts.md). Measured in BENCHMARKS.md, "Fleet scale": 720 windows per key with no
//!   fleet-wide bound took the server past 900 MB within minutes at 10,000 devices;
//! - at most [`Retention::max_samples`] sampled records (default 20) per device and model, and
//!   about [`Retention::max_samples_total`] over every key (default 20,000, ≈ 30 MB: a sampled
//!   `digits_cnn` request holds ≈ 1.5 KB, by its fields), shared the same way: 2 per device at
//!   10,000 devices. Without that bound they could take ≈ 300 MB at 10,000 devices (20 each).
//!
//! Nothing here survives a restart: telemetry is a stream, the durable copy of record is the
//! device's outbox until the broker acknowledged it, and anyone can subscribe to the topic to
//! keep more.
//!
//! Windows are indexed by device (a rollout tick looks up every device of the rollout) and held
//! behind [`Arc`], so a rollout's observation of ten thousand devices shares them instead of
//! copying them every tick.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, Utc};
use protocol::telemetry::{SampleRecord, TelemetryRecord, WindowRecord};

/// How much telemetry is kept per key and in all.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_windows: usize,
    pub max_age: Duration,
    pub max_samples: usize,
    /// Windows kept over every (device, model, version); see the module docs.
    pub max_windows_total: usize,
    /// Sampled requests kept over every (device, model).
    pub max_samples_total: usize,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_windows: 720,
            max_age: Duration::hours(24),
            max_samples: 20,
            max_windows_total: 50_000,
            max_samples_total: 20_000,
        }
    }
}

impl Retention {
    /// Windows one key may keep when `keys` keys share the fleet-wide budget.
    fn per_key(&self, keys: usize) -> usize {
        (self.max_windows_total / keys.max(1)).clamp(1, self.max_windows.max(1))
    }

    /// Sampled requests one (device, model) may keep when `keys` share the budget.
    fn samples_per_key(&self, keys: usize) -> usize {
        (self.max_samples_total / keys.max(1)).clamp(1, self.max_samples.max(1))
    }
}

/// A device's windows by (model, version), oldest first.
type DeviceWindows = HashMap<(String, String), VecDeque<Arc<WindowRecord>>>;

#[derive(Default)]
struct Inner {
    windows: HashMap<String, DeviceWindows>,
    /// Number of (device, model, version) keys in `windows`.
    keys: usize,
    /// Number of windows in `windows`.
    kept: usize,
    /// Windows recorded since the last sweep of keys that stopped receiving.
    since_sweep: usize,
    samples: HashMap<(String, String), VecDeque<SampleRecord>>,
    /// Number of sampled requests in `samples`.
    samples_kept: usize,
}

impl Inner {
    /// Drops windows older than `horizon` and trims every key to `per_key`, then drops empty
    /// keys: what a key that no longer receives windows (a version a device left) would
    /// otherwise hold forever.
    fn sweep(&mut self, horizon: DateTime<Utc>, per_key: usize) {
        let mut kept = 0;
        let mut keys = 0;
        self.windows.retain(|_, device| {
            device.retain(|_, q| {
                trim(q, horizon, per_key);
                kept += q.len();
                keys += usize::from(!q.is_empty());
                !q.is_empty()
            });
            !device.is_empty()
        });
        self.kept = kept;
        self.keys = keys;
        self.since_sweep = 0;
    }
}

/// Drops the oldest windows of `q` while there are more than `cap` or they ended before
/// `horizon`; returns how many.
fn trim(q: &mut VecDeque<Arc<WindowRecord>>, horizon: DateTime<Utc>, cap: usize) -> usize {
    let before = q.len();
    while q.len() > cap || q.front().is_some_and(|w| w.end < horizon) {
        q.pop_front();
    }
    before - q.len()
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
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        match record {
            TelemetryRecord::Window(w) => {
                let horizon = Utc::now() - self.retention.max_age;
                let key = (w.model.clone(), w.version.clone());
                let q = inner
                    .windows
                    .entry(device.to_string())
                    .or_default()
                    .entry(key)
                    .or_default();
                // Newest first: a re-sent window is among the last few received.
                if q.iter().rev().any(|kept| kept.start == w.start) {
                    return false;
                }
                if q.is_empty() {
                    inner.keys += 1;
                }
                q.push_back(Arc::new(w));
                let dropped = trim(q, horizon, self.retention.per_key(inner.keys));
                if q.is_empty() {
                    // The window itself was too old: the key holds nothing.
                    inner.keys -= 1;
                }
                inner.kept = inner.kept + 1 - dropped;
                inner.since_sweep += 1;
                if inner.kept > self.retention.max_windows_total
                    && inner.since_sweep >= self.retention.max_windows_total / 10
                {
                    let per_key = self.retention.per_key(inner.keys);
                    inner.sweep(horizon, per_key);
                }
            }
            TelemetryRecord::Sample(s) => {
                let key = (device.to_string(), s.model.clone());
                let keys = inner.samples.len() + usize::from(!inner.samples.contains_key(&key));
                let cap = self.retention.samples_per_key(keys);
                let q = inner.samples.entry(key).or_default();
                q.push_back(s);
                let dropped = q.len().saturating_sub(cap);
                q.drain(..dropped);
                inner.samples_kept = inner.samples_kept + 1 - dropped;
                if inner.samples_kept > self.retention.max_samples_total + cap {
                    // Keys that stopped receiving still hold their share of a smaller fleet.
                    let mut kept = 0;
                    for q in inner.samples.values_mut() {
                        let dropped = q.len().saturating_sub(cap);
                        q.drain(..dropped);
                        kept += q.len();
                    }
                    inner.samples_kept = kept;
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
    ) -> Vec<Arc<WindowRecord>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(by_key) = inner.windows.get(device) else {
            return Vec::new();
        };
        let mut out: Vec<Arc<WindowRecord>> = by_key
            .iter()
            .filter(|((m, _), _)| model.is_none_or(|model| model == m))
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
        for (device, by_key) in &inner.windows {
            for ((m, _), q) in by_key {
                if m != model {
                    continue;
                }
                for w in q.iter().filter(|w| since.is_none_or(|s| w.end > s)) {
                    f(device, w);
                }
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
        self.inner.read().unwrap_or_else(|p| p.into_inner()).keys
    }

    /// Number of windows kept, over every key.
    pub fn windows_kept(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).kept
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

    /// The fleet-wide budget: each key keeps its newest `max_windows_total / keys` windows, and
    /// a key that stops receiving (a version its device left) is trimmed by the next sweep.
    #[test]
    fn the_fleet_wide_budget_shares_windows_between_keys() {
        let t = Telemetry::new(Retention {
            max_windows_total: 20,
            ..Retention::default()
        });
        let now = Utc::now();
        let at = |i: i64| now + Duration::seconds(10 * i);
        // One device alone may keep all 20.
        for i in 0..30 {
            t.record(
                "d0",
                TelemetryRecord::Window(window("1", 1, 0, 10.0, at(i))),
            );
        }
        assert_eq!(t.windows("d0", None, None).len(), 20);
        // Four more devices: 20 / 5 = 4 each, the newest.
        for d in 1..5 {
            for i in 0..10 {
                t.record(
                    &format!("d{d}"),
                    TelemetryRecord::Window(window("1", i as u64, 0, 10.0, at(i))),
                );
            }
        }
        let d1: Vec<u64> = t
            .windows("d1", None, None)
            .iter()
            .map(|w| w.requests)
            .collect();
        assert_eq!(d1, vec![6, 7, 8, 9]);
        assert_eq!(t.keys(), 5);
        // d0 received nothing since: the sweep (due once the total is over budget) trimmed it.
        assert_eq!(t.windows("d0", None, None).len(), 4);
        assert_eq!(t.windows_kept(), 20);
        // A new version on d1: the old version's key shrinks with the new key count.
        for i in 10..20 {
            t.record(
                "d1",
                TelemetryRecord::Window(window("2", 1, 0, 10.0, at(i))),
            );
        }
        assert_eq!(t.keys(), 6);
        assert!(t.windows_kept() <= 20 + 20 / 10, "{}", t.windows_kept());
        assert_eq!(
            t.windows("d1", None, None)
                .iter()
                .filter(|w| w.version == "2")
                .count(),
            20 / 6
        );
    }

    #[test]
    fn sampled_requests_share_a_fleet_wide_budget() {
        let t = Telemetry::new(Retention {
            max_samples: 5,
            max_samples_total: 8,
            ..Retention::default()
        });
        let sample = |i: i64| SampleRecord {
            schema: TELEMETRY_SCHEMA,
            model: "digits".into(),
            version: "1".into(),
            time: Utc::now() + Duration::seconds(i),
            request_id: Some(i.to_string()),
            latency_ms: 1.0,
            inputs: vec![],
            outputs: vec![],
        };
        let ids = |d: &str| -> Vec<String> {
            t.samples(d, "digits")
                .into_iter()
                .filter_map(|s| s.request_id)
                .collect()
        };
        for i in 0..10 {
            t.record("a", TelemetryRecord::Sample(sample(i)));
        }
        assert_eq!(ids("a"), ["5", "6", "7", "8", "9"], "per-key cap");
        for d in ["b", "c", "d"] {
            for i in 0..10 {
                t.record(d, TelemetryRecord::Sample(sample(i)));
            }
        }
        // Four keys share 8: two each, the newest; "a" was trimmed once the total ran over.
        assert_eq!(ids("d"), ["8", "9"]);
        assert_eq!(ids("a").len(), 2);
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
