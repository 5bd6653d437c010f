//! [`Model`]: load a model file (ONNX or NNEF) once, run it many times from many threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::manifest::{ModelFormat, TensorSpec};
use tract_nnef::prelude::*;
use tract_nnef::tract_core::floats::FloatPrecisionTranslator;
use tract_nnef::tract_core::internal::translator::Translate;

use crate::convert;
use crate::error::EngineError;
use crate::runner::Runner;
use crate::spec::{IoNames, Signature};
use crate::tensor::Tensor;

/// How a [`Model`] is prepared.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Threads one inference may use for its matrix products. `1` (the default) runs each
    /// request on the calling thread only, which is what a server already running requests
    /// side by side wants. More than 1 needs the `multithread` feature ([`crate::MULTITHREAD`]);
    /// without it [`Model::load`] refuses the options rather than run on one thread.
    pub threads: usize,
    /// Directory where a preprocessed copy of the model may be cached to speed up later
    /// loads of the same file. `None`: no cache is read or written.
    pub cache_dir: Option<PathBuf>,
    /// The float precision the model computes in. [`Precision::F16`] is for CPUs with native
    /// half-precision arithmetic ([`native_f16`]); elsewhere tract runs it on portable kernels,
    /// correct but slow (the bundler does so on purpose, to judge its own float16 path before it
    /// offers half precision to devices).
    pub precision: Precision,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 1,
            cache_dir: None,
            precision: Precision::F32,
        }
    }
}

/// What a model's float operations compute in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// As the model was written: float32 (every model modelfleet serves is float32 at its
    /// boundary, whatever its weights were stored as).
    #[default]
    F32,
    /// Every float32 operation and constant of the graph translated to float16 (tract's
    /// `FloatPrecisionTranslator`) before it is optimised; inputs are rounded to float16 on the
    /// way in and outputs widened back to float32 on the way out, so the model's signature does
    /// not change. The engine's own rewrite passes (float32 kernels) are not applied; constants
    /// are still folded. Outputs differ from float32 ones by half-precision rounding, by how
    /// much depends on the kernels (native float16 matrix products sum in float16, tract's
    /// portable route in float32): a caller judges them by what it accepts (the agent: the
    /// bundle's `golden.f16_compute` gate).
    F16,
}

impl Precision {
    /// `f32` or `f16`, as the agent reports it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

/// Whether this CPU has native half-precision arithmetic that tract's kernels use (ARMv8.2
/// FP16, detected by tract-linalg) and this build of the engine has those kernels (not built
/// with `no-fp16`): where [`Precision::F16`] pays. Always false on x86_64, whose tract kernels
/// have no native f16 matrix product.
pub fn native_f16() -> bool {
    cfg!(all(target_arch = "aarch64", not(feature = "no-fp16"))) && tract_linalg::has_fp16()
}

/// A loaded, optimised model, ready to run.
///
/// `Model` is `Send + Sync`: share it as `Arc<Model>` and call [`Model::run`] from any number
/// of threads at once. Each call borrows a private execution state from a small pool.
pub struct Model {
    signature: Signature,
    plans: Plans,
    from_cache: bool,
    precision: Precision,
}

/// The optimised plans of a [`Model`], and which batch sizes each runs.
enum Plans {
    /// No free batch dimension: one plan for every request.
    Single(Runner),
    /// A batch of 1 (the common serving case) on a plan with the batch dimension fixed to 1,
    /// every other batch size on the plan for a symbolic batch dimension.
    OneAndGeneral { one: Runner, general: Runner },
    /// Every batch run sample by sample on the batch-1 plan. For graphs with integer
    /// activations (static `int8`): tract 0.23.9 optimises their batch-1 plan into other
    /// integer kernels than the symbolic-batch plan, which round differently, so the two plans
    /// disagree on the same sample — by more than 1.0 on `mobilenetish`'s logits — and a
    /// sample's result would depend on the batch it came in. Sample by sample it cannot.
    OneBySample(Runner),
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plans = match self.plans {
            Plans::Single(_) => "single",
            Plans::OneAndGeneral { .. } => "batch one and general",
            Plans::OneBySample(_) => "batch one, sample by sample",
        };
        f.debug_struct("Model")
            .field("inputs", &self.signature.inputs)
            .field("outputs", &self.signature.outputs)
            .field("plans", &plans)
            .finish()
    }
}

impl Model {
    /// Loads an ONNX model, checks that its inputs and outputs are of types modelfleet serves,
    /// and optimises it for inference.
    ///
    /// Needs the `onnx` feature ([`crate::ONNX`]); a build without it (the agent's device build)
    /// refuses with [`EngineError::FormatNotBuilt`].
    pub fn load(onnx_path: &Path, opts: &EngineOptions) -> Result<Model, EngineError> {
        check_threads(onnx_path, opts)?;
        #[cfg(feature = "onnx")]
        {
            let (typed, names, from_cache) = crate::cache::load_decluttered(onnx_path, opts)?;
            Model::prepare(typed, &names, onnx_path, opts, from_cache)
        }
        #[cfg(not(feature = "onnx"))]
        Err(format_not_built(onnx_path, ModelFormat::Onnx))
    }

    /// Loads an NNEF archive (as [`onnx_to_nnef`] writes it) whose inputs and outputs are called
    /// `names`, in order (NNEF does not keep ONNX names), and prepares it exactly as
    /// [`Model::load`] prepares an ONNX model. Every build of the engine can do this.
    pub fn load_nnef(
        nnef_path: &Path,
        names: &IoNames,
        opts: &EngineOptions,
    ) -> Result<Model, EngineError> {
        check_threads(nnef_path, opts)?;
        let typed = crate::nnef::read(nnef_path)?;
        Model::prepare(typed, names, nnef_path, opts, false)
    }

    /// Loads a model file in `format`: [`Model::load_nnef`] with `names`, or [`Model::load`]
    /// (an ONNX file names its own inputs and outputs; `names` is not used, so a caller that
    /// has expectations compares them with [`Model::inputs`] and [`Model::outputs`], as the
    /// agent's install does with the manifest). A format this build cannot read
    /// ([`can_load`]) is refused with [`EngineError::FormatNotBuilt`] before the file is read.
    pub fn load_as(
        path: &Path,
        format: ModelFormat,
        names: &IoNames,
        opts: &EngineOptions,
    ) -> Result<Model, EngineError> {
        if !can_load(format) {
            return Err(format_not_built(path, format));
        }
        match format {
            ModelFormat::Onnx => Model::load(path, opts),
            ModelFormat::Nnef => Model::load_nnef(path, names, opts),
        }
    }

    /// Signature check and the two optimised plans of a typed model.
    fn prepare(
        typed: TypedModel,
        names: &IoNames,
        path: &Path,
        opts: &EngineOptions,
        from_cache: bool,
    ) -> Result<Model, EngineError> {
        let load_err = |reason: String| EngineError::Load {
            path: path.to_owned(),
            reason,
        };
        let signature = Signature::of(&typed, names, path)?;
        let typed = match opts.precision {
            Precision::F32 => typed,
            Precision::F16 => FloatPrecisionTranslator::new(DatumType::F32, DatumType::F16)
                .translate_model(&typed)
                .map_err(|e| load_err(format!("translating to half precision: {e:#}")))?,
        };

        let run_options = run_options(opts.threads);
        let optimised = |typed: TypedModel, what: &str| {
            optimize_in(typed, opts.precision)
                .and_then(|m| m.into_runnable_with_options(&run_options))
                .map(Runner::new)
                .map_err(|e| load_err(format!("optimising{what}: {e:#}")))
        };
        let plans = match signature.batch_symbol(&typed) {
            None => Plans::Single(optimised(typed, "")?),
            Some(sym) => {
                let by_sample = integer_activations(&typed) && batch_leads(&typed, &sym);
                let subs = [(sym, TDim::Val(1))].into_iter().collect();
                let fixed = typed
                    .set_symbols(&subs)
                    .map_err(|e| load_err(format!("fixing the batch size to 1: {e:#}")))?;
                let one = optimised(fixed, " for batch size 1")?;
                if by_sample {
                    Plans::OneBySample(one)
                } else {
                    let general = optimised(typed, "")?;
                    Plans::OneAndGeneral { one, general }
                }
            }
        };
        Ok(Model {
            signature,
            plans,
            from_cache,
            precision: opts.precision,
        })
    }

    /// The model's inputs, in the order [`Model::run`] takes them. Free (symbolic) dimensions
    /// such as the batch size are `None`.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.signature.inputs
    }

    /// The model's outputs, in the order [`Model::run`] returns them.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.signature.outputs
    }

    /// Whether this load was served from the optimised-model cache in
    /// [`EngineOptions::cache_dir`].
    pub fn loaded_from_cache(&self) -> bool {
        self.from_cache
    }

    /// Runs the model on `inputs`, given in model input order.
    ///
    /// Count, element type, rank, fixed dimensions and element counts are checked first, and
    /// free dimensions shared between inputs must agree; any batch size the model allows is
    /// accepted.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let batch_one = self.signature.validate(inputs)?;
        match (&self.plans, batch_one) {
            (Plans::Single(runner), _)
            | (
                Plans::OneAndGeneral {
                    general: runner, ..
                },
                false,
            ) => self.run_on(runner, inputs),
            (Plans::OneAndGeneral { one, .. } | Plans::OneBySample(one), true) => {
                self.run_on(one, inputs)
            }
            (Plans::OneBySample(one), false) => {
                let samples = inputs.first().map_or(0, Tensor::rows);
                if samples == 0 {
                    return Err(EngineError::Run(
                        "an empty batch (0 samples): this model runs batches sample by sample"
                            .into(),
                    ));
                }
                let mut per_output: Vec<Vec<Tensor>> = vec![vec![]; self.signature.outputs.len()];
                for i in 0..samples {
                    let sample: Vec<Tensor> =
                        inputs.iter().map(|t| t.slice_rows(i, i + 1)).collect();
                    for (acc, out) in per_output.iter_mut().zip(self.run_on(one, &sample)?) {
                        acc.push(out);
                    }
                }
                Ok(per_output.into_iter().map(Tensor::concat_rows).collect())
            }
        }
    }

    fn run_on(&self, runner: &Runner, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let run_err = |e: TractError| EngineError::Run(format!("{e:#}"));
        let tract_inputs = inputs
            .iter()
            .map(|t| {
                let t = convert::to_tract(t);
                match self.precision {
                    Precision::F16 if t.datum_type() == DatumType::F32 => {
                        Ok(t.cast_to_dt(DatumType::F16)?.into_owned().into())
                    }
                    _ => Ok(t.into()),
                }
            })
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(run_err)?;
        let outputs = runner.run(tract_inputs).map_err(run_err)?;
        outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(t, spec)| {
                if t.datum_type() == DatumType::F16 {
                    let wide = t.cast_to_dt(DatumType::F32).map_err(run_err)?;
                    convert::from_tract(&wide, &spec.name)
                } else {
                    convert::from_tract(t, &spec.name)
                }
            })
            .collect()
    }

    /// The float precision this model computes in ([`EngineOptions::precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether batches of more than one sample run sample by sample on the batch-1 plan
    /// (graphs with integer activations, see `Plans::OneBySample`), so that a sample's outputs
    /// do not depend on the batch it comes in.
    pub fn runs_sample_by_sample(&self) -> bool {
        matches!(self.plans, Plans::OneBySample(_))
    }
}

/// Whether some value computed at run time is an 8-bit integer: the activations of a static
/// `int8` graph (its `QuantizeLinear` outputs). Model inputs (a `UINT8` image) and constants
/// (int8 weights before they are dequantized) do not count.
fn integer_activations(model: &TypedModel) -> bool {
    model.nodes().iter().any(|node| {
        !model.inputs.iter().any(|i| i.node == node.id)
            && node.outputs.iter().any(|o| {
                o.fact.konst.is_none()
                    && matches!(
                        o.fact.datum_type.unquantized(),
                        DatumType::I8 | DatumType::U8
                    )
            })
    })
}

/// Whether `batch` is axis 0 of every input and output and appears nowhere else in them, so a
/// batch can be cut into samples and their outputs put back together.
fn batch_leads(model: &TypedModel, batch: &Symbol) -> bool {
    let leads = |shape: &ShapeFact| {
        let dims = shape.dims();
        matches!(dims.first(), Some(TDim::Sym(s)) if s == batch)
            && dims[1..].iter().all(|d| d.to_i64().is_ok())
    };
    let facts = (0..model.inputs.len())
        .map(|i| model.input_fact(i))
        .chain((0..model.outputs.len()).map(|i| model.output_fact(i)));
    facts
        .into_iter()
        .all(|f| f.map(|f| leads(&f.shape)).unwrap_or(false))
}

/// Whether this build of the engine can load models in `format`: NNEF always, ONNX with the
/// `onnx` feature ([`crate::ONNX`]).
pub fn can_load(format: ModelFormat) -> bool {
    format_supported(format, crate::ONNX)
}

fn format_supported(format: ModelFormat, onnx_built: bool) -> bool {
    match format {
        ModelFormat::Onnx => onnx_built,
        ModelFormat::Nnef => true,
    }
}

fn format_not_built(path: &Path, format: ModelFormat) -> EngineError {
    EngineError::FormatNotBuilt {
        path: path.to_owned(),
        format,
    }
}

fn check_threads(path: &Path, opts: &EngineOptions) -> Result<(), EngineError> {
    if opts.threads > 1 && !crate::MULTITHREAD {
        return Err(EngineError::Load {
            path: path.to_owned(),
            reason: threads_unsupported(opts.threads),
        });
    }
    Ok(())
}

/// Converts the ONNX model in `onnx` (its bytes; `path` only names it in errors) into what a
/// device loads: the model parsed, typed and decluttered exactly as [`Model::load`] does it,
/// written as an NNEF archive (tar; [`Model::load_nnef`] reads it). Returns the archive and the
/// ONNX input and output names, which the archive does not keep.
///
/// Whether the converted model computes what the ONNX one does is the caller's to check (the
/// bundler evaluates both on the golden inputs): the conversion refuses only graphs NNEF cannot
/// express.
#[cfg(feature = "onnx")]
pub fn onnx_to_nnef(path: &Path, onnx: &[u8]) -> Result<(Vec<u8>, IoNames), EngineError> {
    let (typed, names) = crate::cache::from_onnx_bytes(path, onnx)?;
    let convert_err = |e: TractError| EngineError::Convert {
        path: path.to_owned(),
        reason: format!("{e:#}"),
    };
    let archive = crate::nnef::write(&typed).map_err(convert_err)?;
    Ok((archive, names))
}

/// Declutter, the engine's own passes (`passes`), then tract's optimisation.
pub fn optimize(model: TypedModel) -> TractResult<TypedModel> {
    optimize_in(model, Precision::F32)
}

/// [`optimize`] for a model computing in `precision`: a half-precision model gets only the
/// constant fold of the engine's passes (the rewrites install float32 kernels).
fn optimize_in(mut model: TypedModel, precision: Precision) -> TractResult<TypedModel> {
    model.declutter()?;
    match precision {
        Precision::F32 => {
            crate::passes::apply(&mut model, crate::layout::channels_last_by_default())?;
        }
        Precision::F16 => {
            crate::fold::fold_constants(&mut model)?;
        }
    }
    model.into_optimized()
}

/// Why `threads` cannot be honoured by a build without the `multithread` feature.
pub fn threads_unsupported(threads: usize) -> String {
    format!(
        "{threads} engine threads asked for, but this build of the engine has no multithreaded \
         executor (built without the `multithread` feature, as device builds are); \
         use 1 thread, or rebuild with `--features multithread`"
    )
}

#[cfg(feature = "multithread")]
fn run_options(threads: usize) -> RunOptions {
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread_with_name(
            threads,
            "modelfleet-engine",
        ));
    }
    options
}

#[cfg(not(feature = "multithread"))]
fn run_options(_threads: usize) -> RunOptions {
    // `Model::load` refused threads > 1 already.
    RunOptions::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnef_loads_everywhere_and_onnx_only_with_the_front_end() {
        assert!(format_supported(ModelFormat::Nnef, false));
        assert!(format_supported(ModelFormat::Nnef, true));
        assert!(!format_supported(ModelFormat::Onnx, false));
        assert!(format_supported(ModelFormat::Onnx, true));
        assert_eq!(can_load(ModelFormat::Onnx), cfg!(feature = "onnx"));
    }

    #[test]
    fn an_unbuilt_format_is_refused_by_name() {
        let e = format_not_built(Path::new("/slot/model.onnx"), ModelFormat::Onnx).to_string();
        assert!(e.contains("/slot/model.onnx"), "{e}");
        assert!(e.contains("ONNX"), "{e}");
        assert!(e.contains("`onnx` feature"), "{e}");
        assert!(e.contains("--model-format nnef"), "{e}");
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Model>();
    is::<Arc<Model>>();
}
