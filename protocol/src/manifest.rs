//! The bundle manifest: everything a device needs to know about a model before it runs it.
//!
//! The manifest is JSON (`manifest.json` inside the bundle). It is the only signed object: every
//! payload is bound to it by size and sha256, so verifying the manifest's signature and then each
//! payload's hash proves the whole bundle. Field meanings are documented in `docs/bundle-format.md`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::stats::Histogram;

/// The bundle format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Element type of a tensor. Serialised with the Open Inference Protocol names (`FP32`, `INT64`, …)
/// so the manifest and the device's inference API speak the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "FP32")]
    F32,
    #[serde(rename = "INT32")]
    I32,
    #[serde(rename = "INT64")]
    I64,
    #[serde(rename = "UINT8")]
    U8,
}

impl DType {
    /// The Open Inference Protocol datatype name.
    pub fn oip_name(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::U8 => "UINT8",
        }
    }

    /// Parses an Open Inference Protocol datatype name; `None` for types modelfleet does not serve.
    pub fn from_oip_name(name: &str) -> Option<DType> {
        Some(match name {
            "FP32" => DType::F32,
            "INT32" => DType::I32,
            "INT64" => DType::I64,
            "UINT8" => DType::U8,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }
}

/// Name, element type and shape of one model input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// One entry per dimension; `None` is a free (symbolic) dimension such as the batch size.
    pub shape: Vec<Option<usize>>,
    /// Observed `[min, max]` of the values on the golden/calibration set, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f32; 2]>,
}

impl TensorSpec {
    /// Does a concrete shape fit this spec (same rank, fixed dimensions equal)?
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(want, got)| want.is_none_or(|w| w == *got))
    }

    /// The shape as the Open Inference Protocol prints it: `-1` for a free dimension.
    pub fn oip_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| d.map_or(-1, |d| d as i64))
            .collect()
    }
}

/// Prints a spec shape as `[?, 1, 8, 8]`, `?` standing for a free dimension (error messages).
pub struct Dims<'a>(pub &'a [Option<usize>]);

impl std::fmt::Display for Dims<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match d {
                Some(d) => write!(f, "{d}")?,
                None => f.write_str("?")?,
            }
        }
        f.write_str("]")
    }
}

/// One payload file of the bundle, bound to the signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadEntry {
    /// Plain file name inside the bundle (no `/`, no `..`), e.g. `model.onnx.zst`.
    pub file: String,
    /// Size in bytes of the zstd-compressed file as stored in the bundle.
    pub compressed_size: u64,
    /// Hex sha256 of the compressed file, so no byte of the bundle is unbound to the signature.
    pub compressed_sha256: String,
    /// Size in bytes after decompression; decompression stops here.
    pub size: u64,
    /// Hex sha256 of the decompressed bytes.
    pub sha256: String,
}

/// What the model computes, as far as health monitoring cares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// The named output holds per-class scores along its last axis.
    Classification {
        output: String,
        scores: ScoreKind,
        classes: usize,
    },
    /// Anything else: health watches a scalar statistic of the named output per sample.
    Regression {
        output: String,
        statistic: OutputStatistic,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// Scores are probabilities already (rows sum to 1).
    Probabilities,
    /// Scores are logits; confidence is computed with a softmax.
    Logits,
}

/// The per-sample scalar that summarises a regression output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStatistic {
    /// Mean squared difference between the output and the first input (autoencoders:
    /// reconstruction error). Only valid when both have the same number of elements per sample.
    ReconstructionError,
    /// Mean of the output's elements.
    Mean,
}

/// The golden set: inputs with the outputs the bundler's engine produced for them. A device runs
/// the inputs after install and refuses the model if an output differs beyond the tolerance.
///
/// Payload layout (`golden.bin`, decompressed): for each input in `inputs` order, then each output
/// in `outputs` order, the tensor's values in row-major order, little-endian, dtype as declared,
/// shape `[count, ...]` with the spec's free dimensions after the batch taken from `shapes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Golden {
    pub file: String,
    /// Number of samples (the batch dimension of every golden tensor).
    pub count: usize,
    /// Concrete shapes (batch first) of each input then each output, in payload order.
    pub inputs: Vec<GoldenTensor>,
    pub outputs: Vec<GoldenTensor>,
    /// A device output `y` matches the golden `g` when `|y - g| <= atol + rtol * |g|`.
    pub atol: f32,
    pub rtol: f32,
    /// `f16` bundles: devices with native float16 arithmetic may compute the model in it, on
    /// the conditions given ([`F16Compute`]). Absent: every device computes in float32. Added
    /// within format version 1: readers from before it ignore it (unknown fields inside
    /// `golden` are not refused) and compute in float32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f16_compute: Option<F16Compute>,
}

/// Half-precision compute, offered by an `f16` bundle to devices whose CPU computes in float16
/// natively (ARMv8.2 FP16). Such a device loads the model computing in float16 and runs the
/// golden inputs through it. Its outputs differ from the golden ones by more than a float32
/// tolerance — by how much depends on the device's kernels (native float16 matrix products sum
/// in float16), which a build machine cannot reproduce — so they are judged as the bundler
/// judges a quantized model against the float one: every output finite, and on the task's
/// output the top-1 agreement (classification) or the SNR (regression) at least what is given
/// here. If the judgement passes the device serves the float16 model; otherwise it loads the
/// model in float32 and self-tests it within `atol`/`rtol` as every other device does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct F16Compute {
    /// Classification: the smallest fraction of golden samples whose top-1 class must be the
    /// golden outputs' one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_agreement: Option<f64>,
    /// Regression: the smallest signal-to-noise ratio of the task's output against the golden
    /// one, in dB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_db: Option<f64>,
}

impl F16Compute {
    /// Judges outputs computed in half precision (`got`, one float slice per output of
    /// `golden`, in its order) against the golden outputs (`expected`). `Ok` carries the
    /// figures, `Err` the reason, both for people to read.
    pub fn judge(
        &self,
        task: &Task,
        golden: &Golden,
        expected: &[&[f32]],
        got: &[&[f32]],
    ) -> Result<String, String> {
        for ((spec, e), g) in golden.outputs.iter().zip(expected).zip(got) {
            if e.len() != g.len() || g.iter().any(|v| !v.is_finite()) {
                return Err(format!(
                    "output '{}' in float16 is not finite or has another shape",
                    spec.name
                ));
            }
        }
        let (name, classes) = match task {
            Task::Classification {
                output, classes, ..
            } => (output, Some(*classes)),
            Task::Regression { output, .. } => (output, None),
        };
        let ix = golden
            .outputs
            .iter()
            .position(|o| &o.name == name)
            .ok_or_else(|| format!("the task's output '{name}' is not in the golden set"))?;
        let (e, g) = (expected[ix], got[ix]);
        let snr = crate::quality::snr_db(e, g);
        let snr_text = snr.map_or("identical".to_string(), |s| format!("SNR {s:.1} dB"));
        if let (Some(min), Some(classes)) = (self.min_top1_agreement, classes) {
            let agreement = crate::quality::top1_agreement(e, g, classes);
            let figures = format!("'{name}': top-1 agreement {agreement:.4}, {snr_text}");
            if agreement + 1e-9 < min {
                return Err(format!("{figures}: agreement below {min}"));
            }
            return Ok(figures);
        }
        let figures = format!("'{name}': {snr_text}");
        match (self.min_snr_db, snr) {
            (Some(min), Some(s)) if s < min => Err(format!("{figures} < {min} dB")),
            _ => Ok(figures),
        }
    }
}

impl Golden {
    /// Cuts a decompressed golden payload into the little-endian bytes of each input tensor and
    /// each output tensor, in manifest order. Fails if the payload is shorter or longer than the
    /// shapes declare.
    pub fn split<'a>(&self, bytes: &'a [u8]) -> Result<(Vec<&'a [u8]>, Vec<&'a [u8]>), String> {
        let mut at = 0usize;
        let mut take = |t: &GoldenTensor| -> Result<&'a [u8], String> {
            let n = t
                .shape
                .iter()
                .try_fold(t.dtype.size(), |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_add(at))
                .filter(|&end| end <= bytes.len())
                .ok_or_else(|| {
                    format!("golden payload too short for '{}' {:?}", t.name, t.shape)
                })?;
            let slice = &bytes[at..n];
            at = n;
            Ok(slice)
        };
        let inputs = self
            .inputs
            .iter()
            .map(&mut take)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = self
            .outputs
            .iter()
            .map(&mut take)
            .collect::<Result<Vec<_>, _>>()?;
        if at != bytes.len() {
            return Err(format!(
                "golden payload has {} unexpected trailing bytes",
                bytes.len() - at
            ));
        }
        Ok((inputs, outputs))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Statistics of the model's behaviour at build time, the reference for on-device health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Samples the statistics were computed on (calibration inputs if given, else golden inputs).
    pub samples: usize,
    pub source: String,
    pub inputs: Vec<InputBaseline>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<ClassificationBaseline>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<RegressionBaseline>,
    /// Accuracy on the golden labels, when labels were given to a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// ROC AUC of the reconstruction error against the golden labels read as anomaly labels
    /// (1 anomalous, 0 normal), when labels were given to a reconstruction model
    /// ([`OutputStatistic::ReconstructionError`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    pub latency: LatencyBaseline,
}

/// Moments and a histogram of all elements of one input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputBaseline {
    pub name: String,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub histogram: Histogram,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationBaseline {
    /// Fraction of samples predicted as each class (top-1).
    pub class_distribution: Vec<f64>,
    pub mean_confidence: f64,
    /// Histogram of top-1 confidence over [0, 1].
    pub confidence: Histogram,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionBaseline {
    pub mean: f64,
    pub std: f64,
    pub histogram: Histogram,
}

/// Reference latency measured by the bundler on its build machine (informational: devices differ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyBaseline {
    pub batch: usize,
    pub p50_us: f64,
    pub p95_us: f64,
    pub machine: String,
}

/// How the model was quantized (`bundler build --quantize`). `none`: weights stored as trained.
/// The other modes carry a [`QuantizationRecord`] beside the `mode` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Quantization {
    None,
    /// Per-channel symmetric int8 weights, dequantized by the runtime when it loads the model.
    Int8Weights(QuantizationRecord),
    /// Static post-training quantization: int8 weights, uint8 activations from calibration.
    Int8(QuantizationRecord),
    /// Half-precision weights, widened to float by the runtime when it loads the model.
    F16(QuantizationRecord),
}

impl Quantization {
    /// The mode as written in the manifest (`none`, `int8_weights`, `int8`, `f16`).
    pub fn mode(&self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8Weights(_) => "int8_weights",
            Quantization::Int8(_) => "int8",
            Quantization::F16(_) => "f16",
        }
    }

    pub fn record(&self) -> Option<&QuantizationRecord> {
        match self {
            Quantization::None => None,
            Quantization::Int8Weights(r) | Quantization::Int8(r) | Quantization::F16(r) => Some(r),
        }
    }
}

/// What the bundler quantized and how the result compares with the float model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationRecord {
    /// Op types whose nodes were eligible (`--op-types`).
    pub op_types: Vec<String>,
    /// Nodes kept in float on request (`--exclude-node`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_nodes: Vec<String>,
    /// Initializers converted, and their element count.
    pub tensors: usize,
    pub parameters: u64,
    /// Form of the quantized graph (`int8`: `qdq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form: Option<String>,
    /// Activation ranges (`int8` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
    /// Size and sha256 of the float model the bundle was made from.
    pub float_model_size: u64,
    pub float_model_sha256: String,
    pub quality: QuantizationQuality,
}

/// How activation ranges were calibrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// `minmax` or `percentile`.
    pub method: String,
    /// For `percentile`: the percentile kept, e.g. 99.99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    pub samples: usize,
    pub source: String,
    /// Activation tensors given a quantize/dequantize pair.
    pub activations: usize,
}

/// The quantized model against the float model on the golden inputs (all of them, not only
/// the stored ones), and the gate the bundler applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationQuality {
    /// Samples compared.
    pub samples: usize,
    /// Output the figures are about (the task's output).
    pub output: String,
    /// Signal-to-noise ratio of the quantized output against the float output, in dB;
    /// `null` when they are identical.
    pub snr_db: Option<f64>,
    pub max_abs_diff: f64,
    /// Classification: fraction of samples whose top-1 class is the float model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argmax_agreement: Option<f64>,
    /// Accuracy on the golden labels, float and quantized, when labels were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// ROC AUC of the reconstruction error against anomaly labels, float and quantized, when
    /// labels were given to a reconstruction model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float_auc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    /// Quality lost, in percentage points: accuracy against the labels when given to a
    /// classifier, ROC AUC (× 100) when given to a reconstruction model, else the share of
    /// samples whose top-1 class differs from the float model's (classification only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_drop: Option<f64>,
    /// The gate: largest accuracy drop accepted (points), and for models without a class
    /// output the smallest SNR accepted.
    pub max_accuracy_drop: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_db: Option<f64>,
}

/// Thresholds for the device's trial window after activation. Every field is optional: a field
/// left out takes the agent's configured default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_latency_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_confidence_drop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prediction_psi: Option<f64>,
}

/// What the device may report of the requests it samples for telemetry (manifest field
/// `telemetry_samples`). A model that sees personal data (faces, voices, health readings, …)
/// should not have its requests copied off the device. The mode covers a sampled request's
/// inputs **and** outputs: outputs of such a model can be personal too (an autoencoder's output
/// is its input, an embedding identifies a person, a class can be a diagnosis).
///
/// Aggregate figures (window records: counts, latency, confidence and class histograms,
/// output statistics, input drift) are sent in every mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TelemetrySamples {
    /// Sampled requests carry their input and output values (the behaviour of bundles made
    /// before this field existed, hence the default).
    #[default]
    Full,
    /// Sampled requests carry, per tensor, name, datatype, shape and the sha256 of its
    /// little-endian row-major bytes instead of the values: equal tensors can be matched up,
    /// their content is not revealed (unless it is guessable: see `docs/security.md`).
    Hashed,
    /// No sampled requests at all; only aggregate figures leave the device.
    None,
}

impl TelemetrySamples {
    pub const ALL: [TelemetrySamples; 3] = [
        TelemetrySamples::Full,
        TelemetrySamples::Hashed,
        TelemetrySamples::None,
    ];

    /// The mode as written in the manifest (`full`, `hashed`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            TelemetrySamples::Full => "full",
            TelemetrySamples::Hashed => "hashed",
            TelemetrySamples::None => "none",
        }
    }

    pub fn is_full(&self) -> bool {
        *self == TelemetrySamples::Full
    }
}

impl std::fmt::Display for TelemetrySamples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TelemetrySamples {
    type Err = String;

    fn from_str(s: &str) -> Result<TelemetrySamples, String> {
        TelemetrySamples::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not a telemetry sample mode (full, hashed, none)"))
    }
}

/// The file format of a bundle's model payload (manifest field `model_format`).
///
/// `onnx`: the ONNX file given to `bundler build`, byte for byte (every bundle made before the
/// field existed, hence the default). `nnef`: the model as tract's NNEF archive (an uncompressed
/// tar of `graph.nnef` and tensor `.dat` files, with tract's `tract_core` / `tract_onnx`
/// extensions where the graph needs them), written by the bundler from the ONNX model after
/// typing and decluttering. NNEF does not keep ONNX tensor names: a reader takes the input and
/// output names, in order, from the manifest's `inputs` and `outputs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    #[default]
    Onnx,
    Nnef,
}

impl ModelFormat {
    pub const ALL: [ModelFormat; 2] = [ModelFormat::Onnx, ModelFormat::Nnef];

    /// The format as written in the manifest (`onnx`, `nnef`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
        }
    }

    pub fn is_onnx(&self) -> bool {
        *self == ModelFormat::Onnx
    }
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<ModelFormat, String> {
        ModelFormat::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not a model format (onnx, nnef)"))
    }
}

/// The signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub version: semver::Version,
    /// Monotonic per model name; devices refuse anything lower than the highest they accepted.
    pub security_version: u64,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Rust target triples the bundle is meant for; empty means any target.
    #[serde(default)]
    pub targets: Vec<String>,
    /// The model file among the payloads (decompressed name without `.zst`), e.g. `model.onnx`
    /// or `model.nnef.tar`.
    pub model_file: String,
    /// The format of `model_file`. Left out when `onnx` (the default), so manifests signed
    /// before the field existed re-serialise to the same bytes; an agent that predates the
    /// field refuses a manifest that sets it (unknown field) instead of feeding NNEF to an ONNX
    /// parser.
    #[serde(default, skip_serializing_if = "ModelFormat::is_onnx")]
    pub model_format: ModelFormat,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub task: Task,
    pub quantization: Quantization,
    pub golden: Golden,
    pub baseline: Baseline,
    #[serde(default)]
    pub health_policy: HealthPolicy,
    /// What sampled-request telemetry may carry for this model. Left out when `full` (the
    /// default), so manifests signed before the field existed re-serialise to the same bytes;
    /// an agent that predates the field refuses a manifest that sets it (unknown field), so a
    /// restriction is never silently ignored.
    #[serde(default, skip_serializing_if = "TelemetrySamples::is_full")]
    pub telemetry_samples: TelemetrySamples,
    /// Weights stored narrower than the model file holds them (NNEF bundles built with
    /// `--quantize int8-weights` or `f16`): the model payload is the model file without them,
    /// and a reader puts them back ([`crate::narrow_weights::expand`]) before loading. Left out
    /// when absent, so manifests signed before the field existed re-serialise to the same
    /// bytes; an agent that predates it refuses the manifest (unknown field) instead of loading
    /// a model file with holes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub narrow_weights: Option<NarrowWeights>,
    /// sha256 of the bundle this one patches (delta bundles; not produced yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_base: Option<String>,
    pub payloads: Vec<PayloadEntry>,
}

/// Manifest field `narrow_weights`: where the narrowed tensors are and what the model file is
/// once they are back in it (format: [`crate::narrow_weights`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NarrowWeights {
    /// The payload holding them (decompressed name), e.g. `model.weights.bin`.
    pub file: String,
    /// Tensors narrowed, and their element count.
    pub tensors: usize,
    pub values: u64,
    /// Size and sha256 of the model file with the tensors put back: what is loaded.
    pub model_size: u64,
    pub model_sha256: String,
}

impl Manifest {
    /// The sha256 of the model file a reader loads: the model payload's, or with
    /// [`Manifest::narrow_weights`] the expanded file's. `None` when the manifest lists no
    /// model payload (a verified manifest always does).
    pub fn loaded_model_sha256(&self) -> Option<&str> {
        match &self.narrow_weights {
            Some(n) => Some(&n.model_sha256),
            None => self.payload(&self.model_file).map(|p| p.sha256.as_str()),
        }
    }

    /// The payload entry whose decompressed content is `name` (stored as `name.zst`).
    pub fn payload(&self, name: &str) -> Option<&PayloadEntry> {
        self.payloads
            .iter()
            .find(|p| p.file.strip_suffix(".zst") == Some(name))
    }
}
