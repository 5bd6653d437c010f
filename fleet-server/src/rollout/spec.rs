//! What an operator asks for: `POST /api/v1/rollouts`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gates::Gates;

/// A rollout request. Only `bundle_id` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub bundle_id: String,
    /// Which devices take part; `{}` selects every device.
    #[serde(default)]
    pub selector: Selector,
    #[serde(default = "default_stages")]
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// After the bake time, how long a stage may stay inconclusive (too little traffic) before
    /// the rollout pauses for a person.
    #[serde(default = "default_inconclusive_timeout")]
    pub inconclusive_timeout_seconds: u64,
    /// How long a staged device may stay silent (no install, no refusal) before it counts as an
    /// install failure.
    #[serde(default = "default_install_timeout")]
    pub install_timeout_seconds: u64,
    /// At most this many devices are staged and not yet settled (installed, failed, reverted)
    /// at once; a stage's further canaries are staged as earlier ones settle, and the stage
    /// bakes once all of them have. Bounds the burst a stage puts on the broker and the
    /// server's chunk serving (BENCHMARKS.md, "Fleet scale").
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

/// Devices whose labels include all of these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Share of the selected devices running the new version once this stage is staged.
    pub percent: u32,
    /// How long the canaries run before the stage is judged.
    #[serde(default)]
    pub bake_seconds: u64,
}

/// What a failed gate does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop staging; devices keep what they have.
    Pause,
    /// Stop staging and tell every device that got the new version to revert.
    #[default]
    Rollback,
}

fn default_stages() -> Vec<Stage> {
    vec![
        Stage {
            percent: 10,
            bake_seconds: 300,
        },
        Stage {
            percent: 50,
            bake_seconds: 600,
        },
        Stage {
            percent: 100,
            bake_seconds: 0,
        },
    ]
}

fn default_inconclusive_timeout() -> u64 {
    3600
}

fn default_install_timeout() -> u64 {
    1800
}

/// The default of [`RolloutSpec::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;

fn default_max_in_flight() -> u32 {
    DEFAULT_MAX_IN_FLIGHT
}

impl RolloutSpec {
    /// Names the first thing wrong with the request.
    pub fn validate(&self) -> Result<(), String> {
        if self.stages.is_empty() {
            return Err("stages: at least one stage is needed".into());
        }
        let mut last = 0;
        for (i, s) in self.stages.iter().enumerate() {
            if s.percent == 0 || s.percent > 100 {
                return Err(format!(
                    "stages[{i}].percent = {} is outside 1..=100",
                    s.percent
                ));
            }
            if s.percent <= last {
                return Err(format!(
                    "stages[{i}].percent = {} does not grow (previous stage {last})",
                    s.percent
                ));
            }
            last = s.percent;
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight = 0 would never stage a device: use 1 or more".into());
        }
        self.gates.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_and_defaults_fill_the_rest() {
        let spec: RolloutSpec = serde_json::from_str(
            r#"{"bundle_id": "abc", "selector": {"labels": {"site": "berlin"}},
                "stages": [{"percent": 10, "bake_seconds": 120}, {"percent": 50, "bake_seconds": 300},
                           {"percent": 100, "bake_seconds": 0}],
                "gates": {"max_error_rate_delta": 0.01, "max_p95_latency_ratio": 1.3},
                "on_failure": "rollback"}"#,
        )
        .unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.gates.max_p95_latency_ratio, 1.3);
        assert_eq!(
            spec.gates.min_requests_per_cohort,
            Gates::default().min_requests_per_cohort
        );
        let minimal: RolloutSpec = serde_json::from_str(r#"{"bundle_id": "abc"}"#).unwrap();
        assert_eq!(minimal.stages.len(), 3);
        assert_eq!(minimal.on_failure, OnFailure::Rollback);
        assert!(minimal.selector.matches(&BTreeMap::new()));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let parse = |s: &str| serde_json::from_str::<RolloutSpec>(s).unwrap();
        let err = parse(r#"{"bundle_id": "a", "stages": [{"percent": 50}, {"percent": 20}]}"#)
            .validate()
            .unwrap_err();
        assert!(err.contains("stages[1].percent"), "{err}");
        let err = parse(r#"{"bundle_id": "a", "stages": [{"percent": 0}]}"#)
            .validate()
            .unwrap_err();
        assert!(err.contains("stages[0].percent"), "{err}");
        let err = parse(r#"{"bundle_id": "a", "max_in_flight": 0}"#)
            .validate()
            .unwrap_err();
        assert!(err.contains("max_in_flight"), "{err}");
        assert_eq!(parse(r#"{"bundle_id": "a"}"#).max_in_flight, 1000);
        assert!(
            serde_json::from_str::<RolloutSpec>(r#"{"bundle_id": "a", "stagez": []}"#).is_err()
        );
    }

    #[test]
    fn selectors_need_every_label() {
        let sel = Selector {
            labels: [("site".to_string(), "berlin".to_string())].into(),
        };
        let mut labels = BTreeMap::new();
        assert!(!sel.matches(&labels));
        labels.insert("site".into(), "berlin".into());
        labels.insert("hw".into(), "pi5".into());
        assert!(sel.matches(&labels));
    }
}
