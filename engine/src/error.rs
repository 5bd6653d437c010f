//! Errors of the engine. Their messages reach users as HTTP 400 bodies and CLI errors, so each
//! one names the tensor at fault, what the model expects and what it was given.

use std::path::PathBuf;

use protocol::manifest::{DType, ModelFormat};

fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Onnx => "ONNX",
        ModelFormat::Nnef => "NNEF",
    }
}

/// Everything [`crate::Model::load`] and [`crate::Model::run`] can fail with.
#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    /// The model file could not be read, parsed, typed or optimised.
    #[error("cannot load model {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },

    /// The model file is in a format this build of the engine was built without (an ONNX model
    /// on a build without the `onnx` feature: the agent's device build reads NNEF only).
    #[error(
        "cannot load model {}: it is {}, and this build cannot read {} models (built without \
         the engine's `onnx` feature, as device builds are: they load NNEF only); rebuild the \
         bundle with `bundler build --model-format nnef` (the default), or run an agent built \
         with the `onnx` feature",
        path.display(),
        format_name(*format),
        format_name(*format)
    )]
    FormatNotBuilt { path: PathBuf, format: ModelFormat },

    /// The ONNX model could not be written as NNEF (an operator NNEF cannot express).
    #[error("cannot convert model {} to NNEF: {reason}", path.display())]
    Convert { path: PathBuf, reason: String },

    /// A model input or output has an element type modelfleet does not serve.
    #[error(
        "cannot load model {}: {kind} '{name}' has element type {dtype}, \
         which modelfleet does not support (supported: FP32, INT32, INT64, UINT8)",
        path.display()
    )]
    UnsupportedDtype {
        path: PathBuf,
        kind: &'static str,
        name: String,
        dtype: String,
    },

    /// Wrong number of input tensors.
    #[error("the model takes {expected} input tensor(s), got {got}")]
    InputCount { expected: usize, got: usize },

    /// An input tensor has the wrong element type.
    #[error("input '{name}': expected element type {}, got {}", expected.oip_name(), got.oip_name())]
    InputDtype {
        name: String,
        expected: DType,
        got: DType,
    },

    /// An input tensor's shape does not fit the model (rank or a fixed dimension differs).
    #[error(
        "input '{name}': expected shape {} ({}), got {}",
        Dims(expected),
        shape_problem(expected, got),
        Dims(&got.iter().map(|d| Some(*d)).collect::<Vec<_>>())
    )]
    InputShape {
        name: String,
        expected: Vec<Option<usize>>,
        got: Vec<usize>,
    },

    /// Two inputs disagree on a free dimension they share (such as the batch size).
    #[error(
        "input '{name}': dimension {axis} is {got}, but '{first}' set that free dimension ({symbol}) to {expected}"
    )]
    InputDimMismatch {
        name: String,
        axis: usize,
        symbol: String,
        first: String,
        expected: usize,
        got: usize,
    },

    /// The tensor's element count does not match its own shape.
    #[error("input '{name}': shape {shape:?} holds {expected} element(s), but {got} value(s) were given")]
    InputData {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },

    /// tract failed while running the model.
    #[error("inference failed: {0}")]
    Run(String),
}

use protocol::manifest::Dims;

/// One phrase saying why `got` does not fit `expected`.
fn shape_problem(expected: &[Option<usize>], got: &[usize]) -> String {
    if expected.len() != got.len() {
        return format!(
            "rank {} expected, got rank {}; ? = any size",
            expected.len(),
            got.len()
        );
    }
    let bad: Vec<String> = expected
        .iter()
        .zip(got)
        .enumerate()
        .filter_map(|(axis, (e, g))| match e {
            Some(e) if e != g => Some(format!("dimension {axis} must be {e}, not {g}")),
            _ => None,
        })
        .collect();
    if bad.is_empty() {
        "? = any size".to_owned()
    } else {
        format!("{}; ? = any size", bad.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_the_problem() {
        let e = EngineError::InputShape {
            name: "input".into(),
            expected: vec![None, Some(64)],
            got: vec![1, 63],
        };
        assert_eq!(
            e.to_string(),
            "input 'input': expected shape [?, 64] (dimension 1 must be 64, not 63; ? = any size), got [1, 63]"
        );
        let e = EngineError::InputShape {
            name: "x".into(),
            expected: vec![None, Some(64)],
            got: vec![64],
        };
        assert!(e.to_string().contains("rank 2 expected, got rank 1"), "{e}");
        let e = EngineError::InputDtype {
            name: "x".into(),
            expected: DType::F32,
            got: DType::I64,
        };
        assert_eq!(
            e.to_string(),
            "input 'x': expected element type FP32, got INT64"
        );
    }
}
