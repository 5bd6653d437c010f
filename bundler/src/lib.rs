//! # modelfleet-bundler: from a trained model to a bundle a device will trust
//!
//! A build pipeline ends with an ONNX file. Before that file may run on a device in the field,
//! someone has to answer three questions on the device's behalf: *is this the model we meant to
//! ship* (signatures and hashes), *does it still compute what it computed here* (golden vectors),
//! and *what does healthy look like* (baselines). The bundler answers them at build time and
//! writes the answers into the signed manifest of a `.mfb` bundle, whose format is defined in
//! the `protocol` crate and described in `docs/bundle-format.md`.
//!
//! [`build()`] loads the model with the same engine the agent serves with (so the numbers recorded
//! here are the numbers a device reproduces), reads its input/output schema, runs it on the
//! golden inputs batch by batch, keeps a bounded golden set (inputs and the outputs produced for
//! them), computes baseline statistics — per-input moments and histograms, the class
//! distribution and confidence of a classifier or the per-sample statistic of a regression
//! model, accuracy when labels are given, reference latency on this machine — and then
//! compresses, signs and writes the bundle through a temp file, an fsync, a read-back through
//! the verifying reader and a rename. A build that fails for any reason leaves no output file.
//!
//! [`verify()`] runs the full check a device runs: archive structure, signatures against a
//! keyring, format version, expiry, and every payload's size and hash after streamed,
//! size-bounded decompression. [`inspect()`] prints what a bundle says about itself without
//! trusting any of it. [`keygen`] makes the ed25519 key pair that signs bundles.
//!
//! The `bundler` binary is a thin command-line layer over these functions ([`cli`]); tests and
//! the in-process demo call the library directly.
//!
//! ## A short tour
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//!
//! let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/digits_mlp");
//! let dir = tempfile::tempdir()?;
//!
//! // A signing key: dir/ci.key (mode 0600) and dir/ci.pub.
//! let key_id = bundler::keygen(dir.path(), "ci")?;
//!
//! // Build: evaluate on the test set, store 16 golden samples, record accuracy.
//! let mut opts = bundler::BuildOptions::new(
//!     models.join("digits_mlp.onnx"),
//!     "digits",
//!     "1.0.0",
//!     1,
//!     dir.path().join("ci.key"),
//!     dir.path().join("digits.mfb"),
//! );
//! opts.golden_inputs = Some(models.join("test_input.npy"));
//! opts.golden_labels = Some(models.join("test_labels.npy"));
//! opts.golden_max = 16;
//! opts.latency_runs = 5;
//! let report = bundler::build(&opts)?;
//! assert_eq!(report.key_id, key_id);
//! assert!((report.accuracy.unwrap() - 0.98).abs() < 1e-4);
//!
//! // Verify against the public key, as a device would.
//! let keyring = bundler::load_keyring(&[dir.path().join("ci.pub")])?;
//! let verified = bundler::verify(&dir.path().join("digits.mfb"), &keyring)?;
//! assert_eq!(verified.signed_by, vec![key_id]);
//!
//! // Inspect: what `bundler inspect --json` prints.
//! let info = bundler::inspect(&dir.path().join("digits.mfb"))?;
//! assert_eq!(info.golden.count, 16);
//! assert_eq!(info.version, "1.0.0");
//! # Ok(())
//! # }
//! ```
//!
//! ## Map
//! - [`keys`]: `keygen` and reading key / keyring files.
//! - [`golden`]: loading `.npy` samples against the model's spec, batched evaluation, the
//!   golden payload.
//! - [`baseline`]: task detection, baseline statistics, accuracy, reference latency.
//! - [`build`](mod@build): the build pipeline and its options and report.
//! - [`verify`](mod@verify) and [`inspect`](mod@inspect).
//! - [`cli`]: the clap definitions of the command line.
//! - [`error`]: one typed error per command.

pub mod baseline;
pub mod build;
pub mod cli;
pub mod error;
pub mod golden;
pub mod half;
pub mod inspect;
pub mod keyring_update;
pub mod keys;
mod narrow;
#[allow(clippy::all, missing_docs)]
mod onnx_pb;
mod progress;
pub mod quality;
pub mod quantize;
pub mod verify;

pub use baseline::{machine_name, TaskKind};
pub use build::{build, BuildOptions, BuildReport, BuildTimings, Expiry};
pub use error::{BuildError, InspectError, KeyFileError, KeygenError, VerifyError};
pub use inspect::{inspect, InspectReport};
pub use keys::{keygen, keygen_files, load_keyring, load_secret_key, KeyFiles};
pub use protocol::bundle::VerifiedBundle;
pub use quality::Gate;
pub use quantize::{Int8Form, QuantizeMode, RangeMethod, Selection};
pub use verify::{verify, verify_with, VerifyReport};

/// Name of the model payload of an ONNX bundle (`--model-format onnx`; stored compressed as
/// `model.onnx.zst`).
pub const MODEL_FILE: &str = "model.onnx";
/// Name of the model payload of an NNEF bundle (`--model-format nnef`, the default; stored
/// compressed as `model.nnef.tar.zst`).
pub const NNEF_MODEL_FILE: &str = "model.nnef.tar";
/// Name of the narrow-weights payload of an NNEF bundle built with `--quantize int8-weights`
/// or `f16` (stored compressed as `model.weights.bin.zst`; see `protocol::narrow_weights`).
pub const NARROW_WEIGHTS_FILE: &str = "model.weights.bin";
/// Name of the golden payload inside a bundle (stored compressed as `golden.bin.zst`).
pub const GOLDEN_FILE: &str = "golden.bin";
