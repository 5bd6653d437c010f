//! Command-line arguments (clap). `main.rs` parses these and calls the library; nothing here
//! does work beyond turning flags into [`BuildOptions`].

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use protocol::manifest::{HealthPolicy, ModelFormat, TelemetrySamples};

use crate::baseline::TaskKind;
use crate::build::{BuildOptions, Expiry};
use crate::quality::Gate;
use crate::quantize::{Int8Form, QuantizeMode, RangeMethod, Selection, DEFAULT_OP_TYPES};

#[derive(Debug, Parser)]
#[command(
    name = "bundler",
    version,
    about = "Build, sign, verify and inspect modelfleet bundles (.mfb)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a signing key pair: DIR/NAME.key (mode 0600) and DIR/NAME.pub; prints the key id.
    Keygen(KeygenArgs),
    /// Evaluate an ONNX model, record golden vectors and baselines, pack and sign a bundle.
    Build(Box<BuildArgs>),
    /// Check a bundle's structure, signatures, payload hashes and expiry (exit 0 valid, 1 invalid).
    Verify(VerifyArgs),
    /// Print what a bundle says about itself (nothing is verified).
    Inspect(InspectArgs),
    /// Write a keyring update (the new keyring's keys, threshold and version) signed by current
    /// keys, or add signatures to one (--cosign); post it to the fleet server's /api/v1/keyring.
    KeyringUpdate(KeyringUpdateArgs),
}

#[derive(Debug, Args)]
pub struct KeyringUpdateArgs {
    /// Version of the new keyring: higher than the fleet's current one (GET /api/v1/keyring).
    #[arg(long, required_unless_present = "cosign")]
    pub version: Option<u64>,
    /// Signatures of the new keyring's keys that its own next update will need.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// Public key file(s) making up the new keyring (repeatable).
    #[arg(
        long = "key",
        value_name = "FILE.pub",
        required_unless_present = "cosign"
    )]
    pub keys: Vec<PathBuf>,
    /// Add signatures to this update file instead of writing a new one.
    #[arg(long, value_name = "UPDATE.json", conflicts_with_all = ["version", "keys"])]
    pub cosign: Option<PathBuf>,
    /// Secret key(s) of the current keyring to sign with (repeatable).
    #[arg(long = "sign", value_name = "FILE.key", required = true)]
    pub signers: Vec<PathBuf>,
    /// Where to write the signed update (may be the --cosign file).
    #[arg(short = 'o', long = "output", value_name = "UPDATE.json")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    #[arg(long, value_name = "NAME", default_value = crate::keys::DEFAULT_KEY_NAME)]
    pub name: String,
    /// Print the key id and file paths as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    Auto,
    Classification,
    Regression,
}

#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct BuildArgs {
    /// The ONNX model file.
    #[arg(value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Model name (a plain word; devices track versions per name).
    #[arg(long)]
    pub name: String,
    /// Semantic version of this build, e.g. 1.4.0.
    #[arg(long, value_name = "SEMVER")]
    pub version: String,
    /// Monotonic per model name: devices refuse anything lower than what they accepted.
    #[arg(long, value_name = "N")]
    pub security_version: u64,
    /// Secret signing key (NAME.key from `bundler keygen`).
    #[arg(long, value_name = "FILE.key")]
    pub key: PathBuf,
    /// Output bundle.
    #[arg(short = 'o', long = "output", value_name = "OUT.mfb")]
    pub output: PathBuf,
    /// Golden inputs (.npy, batch on axis 0) for a single-input model.
    #[arg(long, value_name = "X.npy")]
    pub golden_inputs: Option<PathBuf>,
    /// Integer labels (.npy, int32 or int64) for the golden inputs: class labels of a
    /// classifier (records accuracy), or anomaly labels (1 anomalous, 0 normal) of a model that
    /// reconstructs its input (records the ROC AUC of the reconstruction error).
    #[arg(long, value_name = "Y.npy")]
    pub golden_labels: Option<PathBuf>,
    /// Inputs the baseline statistics are computed on (default: the golden inputs); with
    /// `--quantize int8`, also the samples the activation ranges are calibrated on.
    #[arg(long, value_name = "C.npy")]
    pub calibration: Option<PathBuf>,
    /// Rust target triple the bundle is meant for (repeatable; none means any).
    #[arg(long = "target", value_name = "TRIPLE")]
    pub targets: Vec<String>,
    /// Expiry instant (RFC 3339, e.g. 2027-01-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339, conflicts_with = "expires_in")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Expiry relative to now (e.g. 90days, 12h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expires_in: Option<std::time::Duration>,
    /// Quantization: none, int8-weights (per-channel int8 weights, dequantized at load),
    /// int8 (static, calibrated on --calibration; see --int8-form) or f16 (half-precision
    /// weights).
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub quantize: QuantizeMode,
    /// Op types whose nodes are quantized (comma-separated or repeated).
    #[arg(long, value_name = "OP,...", value_delimiter = ',', default_values_t = DEFAULT_OP_TYPES.map(String::from))]
    pub op_types: Vec<String>,
    /// A node (by name) to keep in float; repeatable.
    #[arg(long = "exclude-node", value_name = "NODE")]
    pub exclude_nodes: Vec<String>,
    /// int8 activation ranges: minmax, percentile (99.99) or percentile:P.
    #[arg(long, value_name = "METHOD", default_value = "minmax")]
    pub calibration_method: RangeMethod,
    /// How `--quantize int8` writes the model: qdq (float operators between
    /// QuantizeLinear/DequantizeLinear pairs) or qoperator (the integer operators QLinearConv /
    /// QLinearMatMul, int8 tensors between them). Both are standard ONNX; see BENCHMARKS.md
    /// for which one tract runs faster.
    /// Given with another `--quantize` mode, the build is refused. [default: qdq]
    #[arg(long, value_name = "FORM")]
    pub int8_form: Option<Int8Form>,
    /// Quality gate: refuse the quantized bundle if accuracy drops by more than this many
    /// percentage points (against the labels, else the float model's top-1 classes).
    #[arg(long, value_name = "POINTS", default_value_t = 1.0)]
    pub max_accuracy_drop: f64,
    /// Quality gate for models without a class output: smallest SNR (dB) of the quantized
    /// output against the float output.
    #[arg(long, value_name = "DB", default_value_t = 20.0)]
    pub min_snr_db: f64,
    /// What the model computes; `auto` detects it from labels and outputs.
    #[arg(long, value_enum, default_value = "auto")]
    pub task: TaskArg,
    /// Golden samples stored in the bundle (all golden inputs are evaluated).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub golden_max: usize,
    /// And no more than fit in this many bytes of golden payload (inputs and outputs,
    /// decompressed); at least one sample is always stored.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub golden_max_bytes: u64,
    /// Absolute tolerance of the device's golden self-test.
    #[arg(long, value_name = "ATOL", default_value_t = 1e-4)]
    pub golden_atol: f32,
    /// Relative tolerance of the device's golden self-test.
    #[arg(long, value_name = "RTOL", default_value_t = 1e-3)]
    pub golden_rtol: f32,
    /// zstd compression level of the payloads.
    #[arg(long, value_name = "LEVEL", default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_level: i32,
    /// Timed batch-1 runs for the reference latency.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub latency_runs: usize,
    #[command(flatten)]
    pub health: HealthArgs,
    /// What the device's sampled-request telemetry may carry for this model: full (input and
    /// output values), hashed (sha256 of each tensor instead of its values) or none (no sampled
    /// requests; aggregate figures only). Use hashed or none when inputs can be personal data.
    #[arg(long, value_name = "MODE", default_value_t = TelemetrySamples::Full,
          value_parser = parse_telemetry_samples)]
    pub telemetry_samples: TelemetrySamples,
    /// Format of the model inside the bundle: nnef (the model typed and decluttered by tract,
    /// checked against the ONNX model on the golden inputs; what device builds of the agent,
    /// which have no ONNX parser, load) or onnx (the input file byte for byte; only agents built
    /// with the `onnx` feature, and agents that predate NNEF bundles, load it). Default: nnef,
    /// except onnx for --quantize int8 (tract's NNEF writer cannot write static int8 graphs).
    #[arg(long, value_name = "FORMAT", value_parser = parse_model_format)]
    pub model_format: Option<ModelFormat>,
    /// Print the build report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Health policy overrides recorded in the manifest (left out: the agent's defaults).
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Health policy: requests the trial window needs before judging (default: agent's).
    #[arg(long, value_name = "N")]
    pub min_requests: Option<u64>,
    /// Health policy: minimum trial window length.
    #[arg(long, value_name = "SECONDS")]
    pub min_seconds: Option<u64>,
    /// Health policy: highest tolerated error rate.
    #[arg(long, value_name = "FRACTION")]
    pub max_error_rate: Option<f64>,
    /// Health policy: highest tolerated p95 latency, relative to the previous model.
    #[arg(long, value_name = "RATIO")]
    pub max_p95_latency_ratio: Option<f64>,
    /// Health policy: largest tolerated drop of mean top-1 confidence.
    #[arg(long, value_name = "FRACTION")]
    pub max_confidence_drop: Option<f64>,
    /// Health policy: largest tolerated PSI of the prediction distribution.
    #[arg(long, value_name = "PSI")]
    pub max_prediction_psi: Option<f64>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub bundle: PathBuf,
    /// Trusted public keys (NAME.pub or a keyring file); repeatable.
    #[arg(long = "keyring", value_name = "FILE.pub", required = true)]
    pub keyrings: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub bundle: PathBuf,
    #[arg(long)]
    pub json: bool,
}

fn parse_telemetry_samples(s: &str) -> Result<TelemetrySamples, String> {
    s.parse()
}

fn parse_model_format(s: &str) -> Result<ModelFormat, String> {
    s.parse()
}

fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time such as 2027-01-01T00:00:00Z: {e}"))
}

impl BuildArgs {
    /// The library options these flags stand for.
    pub fn to_options(&self, progress: bool) -> BuildOptions {
        let mut o = BuildOptions::new(
            &self.model,
            &self.name,
            &self.version,
            self.security_version,
            &self.key,
            &self.output,
        );
        o.golden_inputs = self.golden_inputs.clone();
        o.golden_labels = self.golden_labels.clone();
        o.calibration = self.calibration.clone();
        o.targets = self.targets.clone();
        o.expiry = match (self.expires_at, self.expires_in) {
            (Some(at), _) => Some(Expiry::At(at)),
            (None, Some(d)) => Some(Expiry::In(d)),
            (None, None) => None,
        };
        o.quantize = self.quantize;
        o.quantize_selection = Selection {
            op_types: self.op_types.clone(),
            exclude_nodes: self.exclude_nodes.clone(),
        };
        o.calibration_method = self.calibration_method;
        o.int8_form = self.int8_form;
        o.quality_gate = Gate {
            max_accuracy_drop: self.max_accuracy_drop,
            min_snr_db: self.min_snr_db,
        };
        o.task = match self.task {
            TaskArg::Auto => None,
            TaskArg::Classification => Some(TaskKind::Classification),
            TaskArg::Regression => Some(TaskKind::Regression),
        };
        o.golden_max = self.golden_max;
        o.golden_max_bytes = self.golden_max_bytes;
        o.golden_atol = self.golden_atol;
        o.golden_rtol = self.golden_rtol;
        o.zstd_level = self.zstd_level;
        o.latency_runs = self.latency_runs;
        let h = &self.health;
        o.health_policy = HealthPolicy {
            min_requests: h.min_requests,
            min_seconds: h.min_seconds,
            max_error_rate: h.max_error_rate,
            max_p95_latency_ratio: h.max_p95_latency_ratio,
            max_confidence_drop: h.max_confidence_drop,
            max_prediction_psi: h.max_prediction_psi,
            ..HealthPolicy::default()
        };
        o.telemetry_samples = self.telemetry_samples;
        o.model_format = self.model_format;
        o.progress = progress;
        o
    }
}
