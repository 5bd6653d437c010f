//! Telemetry records: what an agent reports about the models it serves.
//!
//! Two kinds, both JSON, both published on `{prefix}/devices/{id}/telemetry` and held in the
//! agent's durable outbox until then: a [`WindowRecord`] per model version per window (counts,
//! latency, confidence or output statistic, input drift, trial state) and a [`SampleRecord`] for a
//! sampled request (its inputs, outputs and latency, for replay and debugging). What a sample may
//! carry is the bundle's choice (`Manifest::telemetry_samples`): values, hashes, or no samples.
//!
//! The JSON Schema is `docs/telemetry.schema.json`, the field guide `docs/telemetry.md`. Changes
//! are additive; `schema` is bumped on anything else.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::stats::Histogram;

/// The telemetry format version these types write.
pub const TELEMETRY_SCHEMA: u32 = 1;

/// One telemetry record, tagged by `"type"`.
// A window is much larger than a sample; records are built once and serialised, never kept in
// bulk, so boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TelemetryRecord {
    Window(WindowRecord),
    Sample(SampleRecord),
}

impl TelemetryRecord {
    pub fn model(&self) -> &str {
        match self {
            TelemetryRecord::Window(w) => &w.model,
            TelemetryRecord::Sample(s) => &s.model,
        }
    }
}

/// Figures of one model version over one window of time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub schema: u32,
    pub model: String,
    pub version: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// `trial`, `committed` or `reverted` (the model's state at the end of the window).
    pub state: String,
    pub requests: u64,
    /// Requests the model failed to run.
    pub errors: u64,
    /// Requests answered with NaN or infinite values.
    pub non_finite: u64,
    pub latency: LatencyWindow,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<ClassificationWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<RegressionWindow>,
    /// PSI of each input's values against the bundle baseline (inputs seen this window).
    pub input_psi: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackWindow>,
    /// Sampled requests not recorded this window because the bytes-per-hour budget was spent.
    pub samples_over_budget: u64,
    /// Records the outbox has dropped (oldest first, at its cap) since it was created.
    pub outbox_dropped_total: u64,
}

/// Request latency (decode, run, encode on the inference worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyWindow {
    /// Histogram of log10(latency in microseconds).
    pub log10_us: Histogram,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationWindow {
    /// Rows predicted as each class (top-1).
    pub class_counts: Vec<u64>,
    /// Top-1 confidence, bins as in the bundle baseline.
    pub confidence: Histogram,
    pub mean_confidence: Option<f64>,
    /// PSI of the class counts against the baseline class distribution.
    pub prediction_psi_baseline: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionWindow {
    /// The manifest's output statistic per row, bins as in the bundle baseline.
    pub statistic: Histogram,
    pub mean: Option<f64>,
    pub std: Option<f64>,
}

/// Label feedback received this window for this version's requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackWindow {
    pub labelled: u64,
    pub correct: u64,
    pub accuracy: Option<f64>,
}

/// One sampled request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub schema: u32,
    pub model: String,
    pub version: String,
    pub time: DateTime<Utc>,
    /// The request's OIP `id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub latency_ms: f64,
    pub inputs: Vec<SampleTensor>,
    pub outputs: Vec<SampleTensor>,
}

/// A tensor of a sampled request: its values (`data`), or, when the bundle's
/// [`TelemetrySamples`](crate::manifest::TelemetrySamples) mode is `hashed`, the sha256 of its
/// bytes instead (`sha256`). Exactly one of the two is present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleTensor {
    pub name: String,
    /// OIP datatype name (`FP32`, `INT64`, …).
    pub datatype: String,
    pub shape: Vec<usize>,
    /// Row-major values; `None` (JSON `null`) for NaN or an infinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Option<f64>>>,
    /// Lowercase hex sha256 of the tensor's elements as little-endian bytes of `datatype`, in
    /// row-major order (the OIP binary tensor layout), without shape or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl SampleTensor {
    /// A tensor reported with its values.
    pub fn with_values(
        name: String,
        datatype: &str,
        shape: Vec<usize>,
        data: Vec<Option<f64>>,
    ) -> SampleTensor {
        SampleTensor {
            name,
            datatype: datatype.to_string(),
            shape,
            data: Some(data),
            sha256: None,
        }
    }

    /// A tensor reported by the sha256 of `le_bytes` (its elements, little-endian, row-major).
    pub fn hashed(
        name: String,
        datatype: &str,
        shape: Vec<usize>,
        le_bytes: &[u8],
    ) -> SampleTensor {
        SampleTensor {
            name,
            datatype: datatype.to_string(),
            shape,
            data: None,
            sha256: Some(crate::link::sha256_hex(le_bytes)),
        }
    }
}
