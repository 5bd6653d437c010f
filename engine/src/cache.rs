//! Loading the decluttered model, from the ONNX file or from the cache.

use std::path::Path;

use tract_onnx::prelude::*;

use crate::error::EngineError;
use crate::model::EngineOptions;
use crate::spec::{names_of, Names};

/// The typed, decluttered model with its input/output names, and whether it came from cache.
pub(crate) fn load_decluttered(
    path: &Path,
    _opts: &EngineOptions,
) -> Result<(TypedModel, Names, bool), EngineError> {
    let (model, names) = from_onnx(path)?;
    Ok((model, names, false))
}

fn from_onnx(path: &Path) -> Result<(TypedModel, Names), EngineError> {
    let load_err = |reason: String| EngineError::Load {
        path: path.to_owned(),
        reason,
    };
    let inference = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| load_err(format!("{e:#}")))?;
    let names = names_of(&inference).map_err(|e| load_err(format!("{e:#}")))?;
    let typed = inference
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| load_err(format!("{e:#}")))?;
    Ok((typed, names))
}
