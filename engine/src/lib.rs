//! # modelfleet-engine: the one place modelfleet runs a model
//!
//! A model is trained somewhere else and arrives as an ONNX file. Two programs need to run it:
//! the **bundler**, at build time, to compute the golden outputs and baseline statistics that go
//! into the bundle manifest; and the **device agent**, at serving time, to answer inference
//! requests and to run the golden self-test before activating a new model. Both go through this
//! crate, with the same loading and the same optimisation passes, so that the numbers recorded
//! at build time are the numbers reproduced on the device: a golden self-test compares the
//! engine with itself, not two runtimes that happen to agree most of the time.
//!
//! The engine wraps [tract](https://github.com/sonos/tract). [`Model::load`] parses the ONNX
//! graph ([`Model::load_nnef`] reads the NNEF archive [`onnx_to_nnef`] writes, which is what
//! bundles carry for devices: see `nnef`), reads its input and output signature ([`Model::inputs`], [`Model::outputs`]: names,
//! element types, shapes with free dimensions such as the batch size left open), declutters it,
//! and builds two optimised plans: one with the batch dimension fixed to 1, the common case when
//! serving single requests, where tract can specialise every kernel for known shapes; and one
//! with the batch dimension left symbolic, for every other batch size. A graph with integer
//! activations (static `int8`) gets only the first, and a batch of several samples runs on it
//! sample by sample: tract optimises the two plans of such a graph into integer kernels that
//! round differently, so otherwise a sample's outputs would depend on the batch it came in
//! ([`Model::runs_sample_by_sample`]). Before tract optimises a
//! plan, the engine's own passes (`passes`) replace the tract operators that are slow on the
//! small inputs of edge models: small convolutions (`im2col`), depthwise convolutions and
//! convolutions of one input channel, with the ReLU/ReLU6 after them fused (`depthwise`), and
//! max pools (`maxpool`), over the window geometry of `window`. Their outputs
//! stay within 1e-5 relative (plus 1e-6 of the output's largest value) of tract's own (float
//! rounding; tested on every reference model, from ONNX and from NNEF). [`Model::run`] checks the
//! inputs against the signature (errors name the tensor, and say what was expected and what was
//! given, because they end up in HTTP 400 bodies and CLI messages), picks the plan, and runs it
//! on an execution state borrowed from a small pool, so a `Model` behind an `Arc` serves
//! concurrent requests from a thread pool without re-allocating state on every call.
//!
//! What the engine must not know: HTTP, the inference protocol, bundles, manifests beyond the
//! [`TensorSpec`](protocol::manifest::TensorSpec) type, signatures, MQTT, telemetry, slots.
//! It takes a path to a model file (ONNX or NNEF) and plain [`Tensor`]s and gives back plain
//! [`Tensor`]s.
//! Everything about where the file came from and where the answer goes belongs to its callers.
//!
//! Modules are small: [`tensor`] (the owned tensor type), [`npy`] (reading NumPy files of test
//! vectors), `spec` (signature and validation), `convert` (tensor copies to and from tract),
//! `runner` (plan + state pool), `cache` (loading ONNX, optionally from a cache of the
//! decluttered model), `nnef` (reading and writing NNEF archives), `passes` and the operators
//! they install (`im2col`, `direct_conv`, `depthwise`, `depthwise_cl`, `maxpool`, `pointwise`,
//! `pointwise_depthwise`, `depthwise_pointwise`, `layout`, `matvec`, over `window` and
//! `lanes`), `model` (the public
//! entry point)
//! and `error`.
//!
//! Precision: a model computes in float32 unless [`EngineOptions::precision`] asks for
//! [`Precision::F16`], which translates the graph to float16 behind the same float32 signature
//! (where [`native_f16`] says the CPU and the build have tract's native float16 kernels, the agent
//! does so for `f16` bundles that offer it).
//!
//! Features: `onnx` (default) is the ONNX front end (tract-onnx, tract-hir, protobuf); without it
//! ([`ONNX`] is false) the engine reads NNEF only and refuses ONNX with
//! [`EngineError::FormatNotBuilt`] — the agent's device build, which is what makes it small.
//! `multithread` (default) allows more than one thread per inference.

#[cfg(feature = "onnx")]
mod cache;
mod convert;
mod depthwise;
mod depthwise_cl;
mod depthwise_pointwise;
mod direct_conv;
mod error;
mod fold;
mod im2col;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod layout;
mod matvec;
mod maxpool;
mod model;
mod nnef;
pub mod npy;
mod passes;
mod pointwise;
mod pointwise_depthwise;
mod runner;
mod spec;
pub mod tensor;
#[cfg(test)]
mod testing;
mod window;

pub use error::EngineError;
#[cfg(feature = "onnx")]
pub use model::onnx_to_nnef;
pub use model::{can_load, native_f16, threads_unsupported, EngineOptions, Model, Precision};
pub use protocol::manifest::ModelFormat;
pub use spec::IoNames;

/// Whether this build can load ONNX files: the `onnx` feature, on by default, off in the agent's
/// device builds (which load NNEF only; see [`Model::load_as`], BENCHMARKS.md "Agent footprint").
pub const ONNX: bool = cfg!(feature = "onnx");

/// Whether this build can run one inference on several threads (`EngineOptions::threads > 1`):
/// the `multithread` feature, on by default, off in device builds (it links rayon; see
/// BENCHMARKS.md, "Agent footprint").
pub const MULTITHREAD: bool = cfg!(feature = "multithread");
pub use tensor::{Tensor, TensorData};

/// Internals for the engine's own examples (`engine_profile` builds the batch-1 plan exactly as
/// a load does); not part of the API.
#[doc(hidden)]
pub mod internals {
    pub use crate::model::optimize;
}
