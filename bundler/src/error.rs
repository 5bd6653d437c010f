//! Typed errors of the library. Each message names the file, tensor or flag at fault and says
//! what was expected, because it is what a build pipeline's log shows.

use std::io;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use engine::npy::NpyError;
use engine::EngineError;
use protocol::bundle::BundleError;
use protocol::keys::KeyError;

/// Why `keygen` failed.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("key name '{name}' is not usable as a file name: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("refusing to overwrite the existing key file {}", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot generate a key")]
    Key(#[from] KeyError),
}

/// A key or keyring file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid {what} file", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: KeyError,
    },
}

/// Why `build` refused or failed. Nothing is written at `--output` when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid --version '{version}': not a semantic version such as 1.2.3")]
    Version {
        version: String,
        #[source]
        source: semver::Error,
    },
    #[error("invalid --name '{name}': {reason}")]
    Name { name: String, reason: &'static str },
    #[error(
        "invalid --target '{0}': a target triple is a plain word such as aarch64-unknown-linux-gnu"
    )]
    Target(String),
    #[error("cannot quantize the model")]
    Quantize(#[from] crate::quantize::QuantizeError),
    #[error("--quantize int8 needs --calibration inputs (samples the activation ranges are measured on)")]
    CalibrationNeeded,
    #[error("--int8-form {0} applies to --quantize int8 only (the mode is {1})")]
    Int8FormWithoutInt8(crate::quantize::Int8Form, crate::quantize::QuantizeMode),
    #[error(
        "quality gate: the {mode} model is refused, no bundle written: {reason} ({figures}); \
         keep sensitive layers in float with --exclude-node / --op-types, try another \
         --quantize mode, or raise the limit"
    )]
    QualityGate {
        mode: String,
        reason: String,
        figures: String,
    },
    #[error("--expires-at {expires_at} is in the past (now {now})")]
    ExpiryInPast {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error("--expires-in {0:?} is too far in the future")]
    ExpiryRange(std::time::Duration),
    #[error("{0} must be finite and non-negative")]
    Tolerance(&'static str),
    #[error("--golden-max must be at least 1")]
    GoldenMax,
    #[error("signing key")]
    Key(#[from] KeyFileError),
    #[error("output directory {} does not exist or is not a directory", .0.display())]
    OutputDir(PathBuf),
    #[error("cannot read model file {}", path.display())]
    ReadModel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a loadable ONNX model", path.display())]
    Model {
        path: PathBuf,
        #[source]
        source: EngineError,
    },
    #[error("cannot read {what} {}", path.display())]
    Npy {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: NpyError,
    },
    #[error(
        "{what} {} do not fit the model: input '{input}' expects shape {} (? = any size), the file has shape {}",
        path.display(), Dims(expected), Dims(&got.iter().map(|&d| Some(d)).collect::<Vec<_>>())
    )]
    Shape {
        what: &'static str,
        path: PathBuf,
        input: String,
        expected: Vec<Option<usize>>,
        got: Vec<usize>,
    },
    #[error(
        "{what} {} do not fit the model: input '{input}' has element type {expected}, the file holds {got}",
        path.display()
    )]
    Dtype {
        what: &'static str,
        path: PathBuf,
        input: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{what} {}: {reason}", path.display())]
    Samples {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "the model has {0} inputs; --golden-inputs and --calibration take one .npy and so only \
         fit single-input models (leave them out to use synthetic golden inputs)"
    )]
    MultiInput(usize),
    #[error("--golden-labels needs --golden-inputs")]
    LabelsWithoutInputs,
    #[error("golden labels {}: {reason}", path.display())]
    Labels { path: PathBuf, reason: String },
    #[error("running the model on the {what} failed")]
    Run {
        what: &'static str,
        #[source]
        source: EngineError,
    },
    #[error(
        "golden outputs are not reproducible within the tolerance: output '{output}' of sample \
         {sample} is {got} at another batch size, {want} in the evaluation batch (atol {atol}, \
         rtol {rtol}; it needs atol {needed_atol}): the runtime's results depend on the batch \
         size, so a device's self-test would depend on it too; if the difference is acceptable, \
         raise --golden-atol / --golden-rtol"
    )]
    GoldenUnstable {
        output: String,
        sample: usize,
        got: String,
        want: String,
        atol: f32,
        rtol: f32,
        needed_atol: f32,
    },
    #[error(
        "{} cannot be shipped as NNEF (--model-format nnef{}); \
         --model-format onnx ships the ONNX file instead, for agents built with the `onnx` feature",
        path.display(),
        if *format_given { "" } else { ", the default" }
    )]
    Convert {
        path: PathBuf,
        /// Whether `--model-format nnef` was given (else NNEF was the default).
        format_given: bool,
        #[source]
        source: EngineError,
    },
    /// Narrowing the NNEF archive's weights failed its own check (a bug, not a bad model).
    #[error("cannot narrow the NNEF weights of {}: {reason}", path.display())]
    Narrow { path: PathBuf, reason: String },
    #[error(
        "the NNEF model does not reproduce the ONNX model: output '{output}' of sample {sample} \
         is {got} from NNEF, {want} from ONNX (atol {atol}, rtol {rtol}); \
         --model-format onnx ships the ONNX file instead"
    )]
    ConvertMismatch {
        output: String,
        sample: usize,
        got: String,
        want: String,
        atol: f32,
        rtol: f32,
    },
    #[error("cannot use task '{requested}': {reason}")]
    Task {
        requested: &'static str,
        reason: String,
    },
    #[error("cannot pack the bundle")]
    Pack(#[source] BundleError),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the bundle just written does not verify (this is a bug)")]
    SelfCheck(#[source] BundleError),
}

/// Why `verify` found a bundle invalid (or could not read it).
#[derive(Debug, thiserror::Error)]
#[error("bundle {} is not valid", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

/// Why `inspect` could not read a bundle.
#[derive(Debug, thiserror::Error)]
#[error("cannot inspect bundle {}", path.display())]
pub struct InspectError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

pub(crate) use protocol::manifest::Dims;
