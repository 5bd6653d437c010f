//! Judging a stage: the canary cohort against the control cohort, gate by gate, with evidence.
//!
//! Both cohorts are summed over the same window of telemetry ([`CohortFigures::add_window`]) and
//! device events (installs refused, local reverts). Then each gate gives a verdict:
//!
//! | gate | fails when |
//! |---|---|
//! | `install_failures` | more canaries refused the bundle than allowed |
//! | `reverts` | more canaries reverted locally (their health watch) than allowed |
//! | `error_rate` | the canary error rate (failed + non-finite answers) exceeds the control's by more than `max_error_rate_delta`, *significantly* (one-sided two-proportion test at `alpha`) |
//! | `p95_latency` | canary p95 / control p95 > `max_p95_latency_ratio`, both floored at `latency_floor_ms` first (sub-floor jitter on a busy CPU is not a regression) |
//! | `confidence` | control mean top-1 confidence − canary's > `max_confidence_drop` |
//! | `prediction_psi` | PSI of the canary's predicted classes against the control's > `max_prediction_psi` |
//!
//! The comparative gates (the last four) need `min_requests_per_cohort` requests on *each* side;
//! with fewer they are inconclusive, and so is the whole judgement unless a gate already failed —
//! a stage is never promoted on no data. The first two fail at once, whatever the traffic.

use serde::{Deserialize, Serialize};

use protocol::stats::{proportion_excess, psi, saturating_sum, Histogram};
use protocol::telemetry::WindowRecord;

/// Thresholds of the gates. Every field has a default, so `{}` is a valid value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    pub max_error_rate_delta: f64,
    pub max_p95_latency_ratio: f64,
    /// Both p95s are raised to at least this (ms) before the ratio: a 0.2 ms model jittering to
    /// 0.4 ms on a shared CPU is not a regression.
    pub latency_floor_ms: f64,
    pub max_confidence_drop: f64,
    pub max_prediction_psi: f64,
    pub max_reverts: u64,
    pub max_install_failures: u64,
    pub min_requests_per_cohort: u64,
    /// Significance level of the error-rate test.
    pub alpha: f64,
}

impl Default for Gates {
    fn default() -> Gates {
        Gates {
            max_error_rate_delta: 0.01,
            max_p95_latency_ratio: 1.5,
            latency_floor_ms: 1.0,
            max_confidence_drop: 0.05,
            max_prediction_psi: 0.2,
            max_reverts: 0,
            max_install_failures: 0,
            min_requests_per_cohort: 200,
            alpha: 0.05,
        }
    }
}

impl Gates {
    /// Names the first threshold that makes no sense.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            ("max_error_rate_delta", self.max_error_rate_delta, 0.0, 1.0),
            (
                "max_p95_latency_ratio",
                self.max_p95_latency_ratio,
                1.0,
                f64::MAX,
            ),
            ("latency_floor_ms", self.latency_floor_ms, 0.0, 60_000.0),
            ("max_confidence_drop", self.max_confidence_drop, 0.0, 1.0),
            ("max_prediction_psi", self.max_prediction_psi, 0.0, f64::MAX),
            ("alpha", self.alpha, 1e-9, 0.5),
        ];
        for (name, value, lo, hi) in checks {
            if !(value.is_finite() && value >= lo && value <= hi) {
                return Err(format!("gates.{name} = {value} is outside [{lo}, {hi}]"));
            }
        }
        Ok(())
    }
}

/// One cohort's figures over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CohortFigures {
    pub devices: usize,
    pub requests: u64,
    /// Failed requests plus requests answered with non-finite values.
    pub errors: u64,
    /// Latency, as log10 of microseconds.
    pub latency_log10_us: Option<Histogram>,
    pub confidence_sum: f64,
    pub confidence_requests: u64,
    pub class_counts: Vec<u64>,
    pub reverts: u64,
    pub install_failures: u64,
}

impl CohortFigures {
    /// Adds one device's telemetry window. Every count in it is the device's word, so sums
    /// saturate rather than overflow (a debug build would panic, a release build wrap).
    pub fn add_window(&mut self, w: &WindowRecord) {
        self.requests = self.requests.saturating_add(w.requests);
        self.errors = self
            .errors
            .saturating_add(w.errors.saturating_add(w.non_finite));
        match &mut self.latency_log10_us {
            Some(h) if h.same_bins(&w.latency.log10_us) => {
                let _ = h.merge(&w.latency.log10_us);
            }
            Some(_) => {} // a different agent build with other bins: left out rather than mixed
            None => self.latency_log10_us = Some(w.latency.log10_us.clone()),
        }
        if let Some(c) = &w.classification {
            let answered = saturating_sum(&c.class_counts);
            if let Some(mean) = c.mean_confidence {
                self.confidence_sum += mean * answered as f64;
                self.confidence_requests = self.confidence_requests.saturating_add(answered);
            }
            if self.class_counts.len() < c.class_counts.len() {
                self.class_counts.resize(c.class_counts.len(), 0);
            }
            for (sum, n) in self.class_counts.iter_mut().zip(&c.class_counts) {
                *sum = sum.saturating_add(*n);
            }
        }
    }

    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// p95 latency in milliseconds.
    pub fn p95_ms(&self) -> Option<f64> {
        let log10_us = self.latency_log10_us.as_ref()?.quantile(0.95)?;
        Some(10f64.powf(log10_us) / 1000.0)
    }

    pub fn mean_confidence(&self) -> Option<f64> {
        (self.confidence_requests > 0)
            .then(|| self.confidence_sum / self.confidence_requests as f64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Inconclusive,
    Fail,
}

/// One gate's outcome and the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: String,
    pub verdict: Verdict,
    pub canary: Option<f64>,
    pub control: Option<f64>,
    /// The compared quantity (difference, ratio, drop, PSI, count) and its threshold.
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub note: String,
}

/// A stage's judgement: the overall verdict and every gate's evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub gates: Vec<GateResult>,
    pub canary: CohortFigures,
    pub control: Option<CohortFigures>,
}

impl Judgement {
    /// The failed gates in one line, for logs and event details.
    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .gates
            .iter()
            .filter(|g| g.verdict == Verdict::Fail)
            .map(|g| format!("{}: {}", g.gate, g.note))
            .collect();
        if failed.is_empty() {
            format!("{:?}", self.verdict).to_lowercase()
        } else {
            failed.join("; ")
        }
    }
}

/// Judges the canaries against the control cohort (`None` when no device is left on the old
/// version: the comparative gates are then inconclusive).
pub fn judge(canary: &CohortFigures, control: Option<&CohortFigures>, gates: &Gates) -> Judgement {
    let mut results = vec![
        count_gate(
            "install_failures",
            canary.install_failures,
            gates.max_install_failures,
        ),
        count_gate("reverts", canary.reverts, gates.max_reverts),
    ];
    // At least one request even when a spec sets the minimum to 0: the comparison divides by it.
    let enough = |f: &CohortFigures| f.requests >= gates.min_requests_per_cohort.max(1);
    match control {
        Some(control) if enough(canary) && enough(control) => {
            results.extend(compare(canary, control, gates))
        }
        _ => {
            let note = match control {
                None => "no control cohort left to compare with".to_string(),
                Some(c) => format!(
                    "too few requests to compare: canary {}, control {}, need {} each",
                    canary.requests, c.requests, gates.min_requests_per_cohort
                ),
            };
            for gate in ["error_rate", "p95_latency", "confidence", "prediction_psi"] {
                results.push(GateResult {
                    gate: gate.to_string(),
                    verdict: Verdict::Inconclusive,
                    canary: None,
                    control: None,
                    value: None,
                    threshold: None,
                    note: note.clone(),
                });
            }
        }
    }
    let verdict = if results.iter().any(|r| r.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if results.iter().any(|r| r.verdict == Verdict::Inconclusive) {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    };
    Judgement {
        verdict,
        gates: results,
        canary: canary.clone(),
        control: control.cloned(),
    }
}

fn count_gate(gate: &'static str, count: u64, max: u64) -> GateResult {
    GateResult {
        gate: gate.to_string(),
        verdict: if count > max {
            Verdict::Fail
        } else {
            Verdict::Pass
        },
        canary: Some(count as f64),
        control: None,
        value: Some(count as f64),
        threshold: Some(max as f64),
        note: format!("{count} on the canaries (at most {max})"),
    }
}

fn compare(canary: &CohortFigures, control: &CohortFigures, gates: &Gates) -> Vec<GateResult> {
    let mut out = Vec::new();

    let test = proportion_excess(
        canary.errors,
        canary.requests,
        control.errors,
        control.requests,
        gates.max_error_rate_delta,
    )
    .expect("both cohorts have requests");
    let fail = test.difference > gates.max_error_rate_delta && test.significant(gates.alpha);
    out.push(GateResult {
        gate: "error_rate".into(),
        verdict: if fail { Verdict::Fail } else { Verdict::Pass },
        canary: Some(test.rate_a),
        control: Some(test.rate_b),
        value: Some(test.difference),
        threshold: Some(gates.max_error_rate_delta),
        note: format!(
            "canary {:.4} vs control {:.4} (difference {:+.4}, z {:.2}, p {:.4})",
            test.rate_a, test.rate_b, test.difference, test.z, test.p_value
        ),
    });

    let (a, b) = (canary.p95_ms(), control.p95_ms());
    out.push(match (a, b) {
        (Some(a), Some(b)) if b.max(gates.latency_floor_ms) > 0.0 => {
            let ratio = a.max(gates.latency_floor_ms) / b.max(gates.latency_floor_ms);
            GateResult {
                gate: "p95_latency".into(),
                verdict: if ratio > gates.max_p95_latency_ratio {
                    Verdict::Fail
                } else {
                    Verdict::Pass
                },
                canary: Some(a),
                control: Some(b),
                value: Some(ratio),
                threshold: Some(gates.max_p95_latency_ratio),
                note: format!(
                    "p95 {a:.3} ms vs {b:.3} ms (ratio {ratio:.2}, floor {} ms)",
                    gates.latency_floor_ms
                ),
            }
        }
        _ => skipped(
            "p95_latency",
            "no latency figures",
            gates.max_p95_latency_ratio,
        ),
    });

    out.push(
        match (canary.mean_confidence(), control.mean_confidence()) {
            (Some(a), Some(b)) => {
                let drop = b - a;
                GateResult {
                    gate: "confidence".into(),
                    verdict: if drop > gates.max_confidence_drop {
                        Verdict::Fail
                    } else {
                        Verdict::Pass
                    },
                    canary: Some(a),
                    control: Some(b),
                    value: Some(drop),
                    threshold: Some(gates.max_confidence_drop),
                    note: format!("mean top-1 confidence {a:.4} vs {b:.4} (drop {drop:+.4})"),
                }
            }
            _ => skipped("confidence", "not a classifier", gates.max_confidence_drop),
        },
    );

    out.push(
        if canary.class_counts.is_empty() || control.class_counts.is_empty() {
            skipped(
                "prediction_psi",
                "not a classifier",
                gates.max_prediction_psi,
            )
        } else {
            let n = canary.class_counts.len().max(control.class_counts.len());
            let pad = |v: &[u64]| {
                let mut v = v.to_vec();
                v.resize(n, 0);
                v
            };
            let value = psi(&pad(&control.class_counts), &pad(&canary.class_counts));
            GateResult {
                gate: "prediction_psi".into(),
                verdict: if value > gates.max_prediction_psi {
                    Verdict::Fail
                } else {
                    Verdict::Pass
                },
                canary: None,
                control: None,
                value: Some(value),
                threshold: Some(gates.max_prediction_psi),
                note: format!("PSI of predicted classes {value:.3}"),
            }
        },
    );
    out
}

/// A gate that does not apply to this model (e.g. confidence for a regressor).
fn skipped(gate: &'static str, why: &str, threshold: f64) -> GateResult {
    GateResult {
        gate: gate.to_string(),
        verdict: Verdict::Pass,
        canary: None,
        control: None,
        value: None,
        threshold: Some(threshold),
        note: format!("not applicable: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cohort of classifier traffic: `requests` answers, `errors` failures, latency around
    /// `ms`, confidence `conf`, classes spread as `classes`.
    fn cohort(requests: u64, errors: u64, ms: f64, conf: f64, classes: &[u64]) -> CohortFigures {
        let mut latency = Histogram::new(1.0, 7.0, 60);
        for _ in 0..requests {
            latency.add((ms * 1000.0).log10());
        }
        let answered: u64 = classes.iter().sum();
        CohortFigures {
            devices: 3,
            requests,
            errors,
            latency_log10_us: Some(latency),
            confidence_sum: conf * answered as f64,
            confidence_requests: answered,
            class_counts: classes.to_vec(),
            reverts: 0,
            install_failures: 0,
        }
    }

    fn healthy() -> CohortFigures {
        cohort(1000, 2, 2.0, 0.95, &[250, 250, 250, 250])
    }

    #[test]
    fn equal_cohorts_pass_every_gate() {
        let j = judge(&healthy(), Some(&healthy()), &Gates::default());
        assert_eq!(j.verdict, Verdict::Pass, "{j:#?}");
        assert_eq!(j.gates.len(), 6);
    }

    #[test]
    fn each_comparative_gate_fails_on_its_own_regression() {
        let g = Gates::default();
        let cases = [
            (
                "error_rate",
                cohort(1000, 80, 2.0, 0.95, &[250, 250, 250, 250]),
            ),
            (
                "p95_latency",
                cohort(1000, 2, 4.0, 0.95, &[250, 250, 250, 250]),
            ),
            (
                "confidence",
                cohort(1000, 2, 2.0, 0.70, &[250, 250, 250, 250]),
            ),
            (
                "prediction_psi",
                cohort(1000, 2, 2.0, 0.95, &[700, 100, 100, 100]),
            ),
        ];
        for (gate, canary) in cases {
            let j = judge(&canary, Some(&healthy()), &g);
            assert_eq!(j.verdict, Verdict::Fail, "{gate}");
            let failed: Vec<_> = j
                .gates
                .iter()
                .filter(|r| r.verdict == Verdict::Fail)
                .map(|r| r.gate.as_str())
                .collect();
            assert_eq!(failed, vec![gate], "{}", j.summary());
        }
    }

    #[test]
    fn latency_below_the_floor_is_not_compared() {
        // 0.2 ms against 0.1 ms: twice as slow, but both under the 1 ms floor.
        let fast = |ms| cohort(1000, 2, ms, 0.95, &[250, 250, 250, 250]);
        let j = judge(&fast(0.2), Some(&fast(0.1)), &Gates::default());
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary());
        // Without the floor the same figures fail the latency gate.
        let no_floor = Gates {
            latency_floor_ms: 0.0,
            ..Gates::default()
        };
        let j = judge(&fast(0.2), Some(&fast(0.1)), &no_floor);
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.summary());
    }

    #[test]
    fn a_small_error_difference_is_not_evidence() {
        // 4 vs 2 errors in 250: a raw difference of 0.8 points is within noise.
        let canary = cohort(250, 4, 2.0, 0.95, &[60, 60, 60, 70]);
        let control = cohort(250, 2, 2.0, 0.95, &[60, 60, 60, 70]);
        let j = judge(
            &canary,
            Some(&control),
            &Gates {
                max_error_rate_delta: 0.0,
                ..Gates::default()
            },
        );
        let error = j.gates.iter().find(|g| g.gate == "error_rate").unwrap();
        assert_eq!(error.verdict, Verdict::Pass, "{}", error.note);
    }

    #[test]
    fn too_little_traffic_is_inconclusive_but_reverts_fail_at_once() {
        let quiet = cohort(10, 0, 2.0, 0.95, &[3, 3, 2, 2]);
        let j = judge(&quiet, Some(&healthy()), &Gates::default());
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.summary().contains("inconclusive"));
        let j = judge(&healthy(), None, &Gates::default());
        assert_eq!(j.verdict, Verdict::Inconclusive);

        let mut reverted = quiet.clone();
        reverted.reverts = 1;
        let j = judge(&reverted, Some(&healthy()), &Gates::default());
        assert_eq!(j.verdict, Verdict::Fail);
        assert!(j.summary().starts_with("reverts"), "{}", j.summary());
    }

    #[test]
    fn gates_default_from_empty_json_and_refuse_nonsense() {
        let g: Gates = serde_json::from_str("{}").unwrap();
        assert_eq!(g, Gates::default());
        assert!(serde_json::from_str::<Gates>(r#"{"max_eror_rate_delta": 1}"#).is_err());
        let bad = Gates {
            max_p95_latency_ratio: 0.5,
            ..Gates::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("max_p95_latency_ratio"));
    }

    /// Fuzzing finding (`fuzz/fuzz_targets/telemetry.rs`): a device's window with counts near
    /// `u64::MAX`, added to a cohort twice, overflowed `requests` (a panic in debug builds, a
    /// wrapped count that could pass a failing canary in release builds).
    #[test]
    fn windows_with_huge_counts_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let payload = format!(
            r#"{{"type":"window","schema":1,"model":"m","version":"1","start":"2027-01-15T08:00:00Z",
            "end":"2027-01-15T08:00:10Z","state":"trial","requests":{max},"errors":{max},
            "non_finite":{max},"latency":{{"log10_us":{{"lo":1.0,"hi":6.0,"counts":[0,{max},{max}]}},
            "mean_ms":null,"p50_ms":null,"p95_ms":null,"p99_ms":null}},
            "classification":{{"class_counts":[{max},{max}],"confidence":{{"lo":0.0,"hi":1.0,
            "counts":[0,{max},0]}},"mean_confidence":0.9,"prediction_psi_baseline":null}},
            "input_psi":{{}},"samples_over_budget":0,"outbox_dropped_total":0}}"#
        );
        let record = crate::ingest::decode_telemetry(payload.as_bytes()).unwrap();
        let protocol::telemetry::TelemetryRecord::Window(w) = record else {
            panic!("a window")
        };
        let mut canary = CohortFigures::default();
        canary.add_window(&w);
        canary.add_window(&w);
        assert_eq!((canary.requests, canary.errors), (max, max));
        assert_eq!(canary.class_counts, vec![max, max]);
        assert_eq!(canary.latency_log10_us.as_ref().unwrap().total(), max);
        let control = cohort(1000, 0, 2.0, 0.9, &[500, 500]);
        let j = judge(&canary, Some(&control), &Gates::default());
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.summary());
        judge(&canary, Some(&canary), &Gates::default());
    }

    /// Found while writing the telemetry fuzz target: a spec with `min_requests_per_cohort: 0`
    /// (which `validate` lets through) made `judge` panic on two cohorts without requests.
    #[test]
    fn a_zero_request_minimum_does_not_compare_empty_cohorts() {
        let gates = Gates {
            min_requests_per_cohort: 0,
            ..Gates::default()
        };
        let empty = CohortFigures::default();
        let j = judge(&empty, Some(&empty), &gates);
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.summary());
    }
}
