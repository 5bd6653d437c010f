//! The quantization step of `build`: rewrite the float model, load the result with the engine,
//! evaluate it on the golden inputs, compare with the float model and apply the gate. What
//! comes out replaces the float model for the rest of the build (golden outputs, baseline and
//! latency all describe the model the device will run).

use std::path::PathBuf;

use engine::{EngineOptions, Model, Tensor};
use protocol::manifest::{CalibrationRecord, Quantization, QuantizationRecord, Task};
use sha2::{Digest, Sha256};

use super::{
    calibrate, qoperator, static_int8, weights_only, Int8Form, QuantizeMode, RangeMethod, Selection,
};
use crate::error::BuildError;
use crate::golden;
use crate::progress::Progress;
use crate::quality::{self, Gate};

/// What the step needs from the build.
pub(crate) struct StepInputs<'a> {
    pub float_bytes: &'a [u8],
    pub mode: QuantizeMode,
    pub selection: &'a Selection,
    pub method: RangeMethod,
    pub form: Int8Form,
    pub gate: Gate,
    pub task: &'a Task,
    pub output_names: Vec<String>,
    pub golden_inputs: &'a [Tensor],
    pub float_golden_outputs: &'a [Tensor],
    pub labels: Option<&'a [i64]>,
    /// Calibration inputs and where they came from (`int8` needs them).
    pub calibration: Option<(&'a [Tensor], String)>,
    pub eval_batch: usize,
}

/// The quantized model, loaded, with its golden outputs and the manifest record.
pub(crate) struct Quantized {
    pub bytes: Vec<u8>,
    pub model: Model,
    pub golden_outputs: Vec<Tensor>,
    pub record: Quantization,
}

pub(crate) fn quantize_and_gate(
    s: &StepInputs<'_>,
    progress: &Progress,
) -> Result<Quantized, BuildError> {
    let spinner = progress.spinner(&format!("quantizing ({})", s.mode));
    let (rewritten, form, calibration) = match s.mode {
        QuantizeMode::Int8Weights | QuantizeMode::F16 => (
            weights_only(s.float_bytes, s.mode, s.selection)?,
            None,
            None,
        ),
        QuantizeMode::Int8 => {
            let (inputs, source) = s.calibration.clone().ok_or(BuildError::CalibrationNeeded)?;
            let tensors = match s.form {
                Int8Form::Qdq => static_int8::activation_tensors(s.float_bytes, s.selection)?,
                Int8Form::QOperator => qoperator::activation_tensors(s.float_bytes, s.selection)?,
            };
            let ranges =
                calibrate::observe(s.float_bytes, &tensors, &inputs[0], s.eval_batch, s.method)?;
            let (rewritten, activations) = match s.form {
                Int8Form::Qdq => static_int8::qdq(s.float_bytes, s.selection, &ranges)?,
                Int8Form::QOperator => qoperator::qoperator(s.float_bytes, s.selection, &ranges)?,
            };
            let record = CalibrationRecord {
                method: match s.method {
                    RangeMethod::MinMax => "minmax".into(),
                    RangeMethod::Percentile(_) => "percentile".into(),
                },
                percentile: match s.method {
                    RangeMethod::Percentile(p) => Some(p),
                    RangeMethod::MinMax => None,
                },
                samples: inputs[0].rows(),
                source,
                activations,
            };
            (rewritten, Some(s.form.to_string()), Some(record))
        }
        QuantizeMode::None => unreachable!("the step runs only when quantizing"),
    };
    spinner.finish_and_clear();

    let model = load_bytes(&rewritten.bytes)?;
    let golden_outputs = golden::evaluate(
        &model,
        s.golden_inputs,
        s.eval_batch,
        "golden inputs (quantized model)",
        progress,
    )?;
    let figures = quality::compare(
        s.task,
        &s.output_names,
        s.golden_inputs,
        s.float_golden_outputs,
        &golden_outputs,
        s.labels,
        s.gate,
    );
    quality::check(&figures).map_err(|reason| BuildError::QualityGate {
        mode: s.mode.to_string(),
        reason,
        figures: quality::summary(&figures),
    })?;
    let record = QuantizationRecord {
        op_types: s.selection.op_types.clone(),
        excluded_nodes: s.selection.exclude_nodes.clone(),
        tensors: rewritten.tensors,
        parameters: rewritten.parameters,
        form,
        calibration,
        float_model_size: s.float_bytes.len() as u64,
        float_model_sha256: hex::encode(Sha256::digest(s.float_bytes)),
        quality: figures,
    };
    let record = match s.mode {
        QuantizeMode::Int8Weights => Quantization::Int8Weights(record),
        QuantizeMode::Int8 => Quantization::Int8(record),
        QuantizeMode::F16 => Quantization::F16(record),
        QuantizeMode::None => unreachable!(),
    };
    Ok(Quantized {
        bytes: rewritten.bytes,
        model,
        golden_outputs,
        record,
    })
}

/// Loads model bytes with the engine (through a temporary file: the engine reads paths).
pub(crate) fn load_bytes(bytes: &[u8]) -> Result<Model, BuildError> {
    let path = PathBuf::from("<quantized model>");
    let io = |source| BuildError::Write {
        path: std::env::temp_dir(),
        source,
    };
    let file = tempfile::Builder::new()
        .suffix(".onnx")
        .tempfile()
        .map_err(io)?;
    std::fs::write(file.path(), bytes).map_err(io)?;
    Model::load(file.path(), &EngineOptions::default())
        .map_err(|source| BuildError::Model { path, source })
}
