//! The inference backend: what the agent runs a model with.
//!
//! Everything else in the agent — verifying and installing bundles, slots, the golden
//! self-test, serving over OIP, the health watch, telemetry — deals in a [`LoadedModel`]: a
//! signature (input and output [`TensorSpec`]s) and a `run` from plain [`Tensor`]s to plain
//! [`Tensor`]s. A [`Backend`] turns a slot's model file into one. The only backend that ships is
//! [`Tract`], the CPU runtime the bundler also uses (through the `engine` crate), so the golden
//! self-test compares the engine with itself.
//!
//! ## Adding an accelerator backend
//! A second backend (for example onnxruntime with a CUDA or TensorRT execution provider on a
//! Jetson, loaded dynamically with `dlopen` so the agent still starts where the library is
//! missing) is one more `impl Backend` here and one more arm in [`by_name`]:
//! - `load` reads the slot's model file in the format the manifest names ([`ModelFile`]: ONNX,
//!   or the NNEF archive the bundler writes by default), prepares it for the device and returns
//!   the model behind an `Arc<dyn LoadedModel>` that is `Send + Sync` and runs with `&self` from
//!   the inference pool's threads at once. A format the backend cannot read is refused with an
//!   error that says so (as [`Tract`] refuses ONNX in a build without the `onnx` feature).
//! - `inputs`/`outputs` must report the ONNX signature as the bundler recorded it in the
//!   manifest (the install path refuses a bundle whose manifest and loaded model disagree).
//! - `run` validates inputs as [`engine::Model::run`] does and maps its failures to
//!   [`EngineError`]: a bad request is one of the input variants (HTTP 400), a runtime failure is
//!   [`EngineError::Run`] (HTTP 500, counted as an error by the health watch).
//! - The golden self-test then runs on it at install: an accelerator's numbers differ from the
//!   CPU's, so the bundle's tolerance (`bundler build --atol/--rtol`) must cover that difference,
//!   or the device refuses the bundle — which is the point.
//!
//! A device chooses its backend with `backend = "…"` in `agent.toml`; the target profiles in
//! `targets/` say which one each device class uses. Backends are not faked: until a second one is
//! built and tested on its hardware, [`by_name`] knows only `tract`.

use std::path::Path;
use std::sync::Arc;

use engine::{EngineError, EngineOptions, IoNames, Precision, Tensor};
use protocol::manifest::{Manifest, ModelFormat, TensorSpec};

/// A slot's model file and what the verified manifest says about it.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile<'a> {
    pub path: &'a Path,
    /// `manifest.model_format`.
    pub format: ModelFormat,
    /// `manifest.inputs` / `outputs`: the signature the bundler recorded, whose names an NNEF
    /// archive does not keep.
    pub inputs: &'a [TensorSpec],
    pub outputs: &'a [TensorSpec],
}

impl<'a> ModelFile<'a> {
    /// The model of `manifest`, stored at `path`.
    pub fn of(manifest: &'a Manifest, path: &'a Path) -> ModelFile<'a> {
        ModelFile {
            path,
            format: manifest.model_format,
            inputs: &manifest.inputs,
            outputs: &manifest.outputs,
        }
    }
}

/// A model loaded by a [`Backend`], ready to run from many threads at once.
pub trait LoadedModel: Send + Sync {
    /// The model's inputs, in the order [`LoadedModel::run`] takes them; free dimensions such
    /// as the batch size are `None`.
    fn inputs(&self) -> &[TensorSpec];
    /// The model's outputs, in the order [`LoadedModel::run`] returns them.
    fn outputs(&self) -> &[TensorSpec];
    /// Runs the model on `inputs` (model input order), checking them against the signature.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError>;
    /// The float precision the model computes in ([`EngineOptions::precision`] as loaded).
    fn precision(&self) -> Precision {
        Precision::F32
    }
}

/// Turns a model file into a [`LoadedModel`].
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The name `agent.toml` and the target profiles use.
    fn name(&self) -> &'static str;
    /// Loads and prepares `model`, in the format it names.
    fn load(
        &self,
        model: &ModelFile<'_>,
        opts: &EngineOptions,
    ) -> Result<Arc<dyn LoadedModel>, EngineError>;
}

/// tract on the CPU, through the `engine` crate: the bundler's runtime too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    /// NNEF in every build; ONNX only with the `onnx` feature (on by default, off in device
    /// builds), otherwise [`EngineError::FormatNotBuilt`].
    fn load(
        &self,
        model: &ModelFile<'_>,
        opts: &EngineOptions,
    ) -> Result<Arc<dyn LoadedModel>, EngineError> {
        let names = |specs: &[TensorSpec]| specs.iter().map(|s| s.name.clone()).collect();
        let names = IoNames {
            inputs: names(model.inputs),
            outputs: names(model.outputs),
        };
        Ok(Arc::new(engine::Model::load_as(
            model.path,
            model.format,
            &names,
            opts,
        )?))
    }
}

impl LoadedModel for engine::Model {
    fn inputs(&self) -> &[TensorSpec] {
        engine::Model::inputs(self)
    }

    fn outputs(&self) -> &[TensorSpec] {
        engine::Model::outputs(self)
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        engine::Model::run(self, inputs)
    }

    fn precision(&self) -> Precision {
        engine::Model::precision(self)
    }
}

/// Names of the backends this build of the agent has.
pub const AVAILABLE: &[&str] = &["tract"];

/// `backend = "…"` named a backend this agent does not have.
#[derive(Debug, thiserror::Error)]
#[error("unknown inference backend '{name}': this agent has {available:?}")]
pub struct UnknownBackend {
    pub name: String,
    pub available: &'static [&'static str],
}

/// The backend called `name`.
pub fn by_name(name: &str) -> Result<Arc<dyn Backend>, UnknownBackend> {
    match name {
        "tract" => Ok(Arc::new(Tract)),
        _ => Err(UnknownBackend {
            name: name.to_string(),
            available: AVAILABLE,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_name_knows_tract_and_names_what_it_has_otherwise() {
        assert_eq!(by_name("tract").unwrap().name(), "tract");
        let err = by_name("onnxruntime").unwrap_err().to_string();
        assert!(err.contains("'onnxruntime'"), "{err}");
        assert!(err.contains("\"tract\""), "{err}");
    }
}
