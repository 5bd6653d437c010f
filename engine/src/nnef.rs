//! NNEF: the model format devices load (`model_format: nnef` bundles), and the ONNX → NNEF
//! conversion the bundler runs.
//!
//! tract splits its own build time from its run time this way: the ONNX front end (protobuf
//! parsing, `tract-hir`'s shape and type inference, the translation of every ONNX operator) turns
//! a graph into a typed, decluttered `TypedModel`; NNEF is that model written out with tract's
//! extensions (`tract_core`, and `tract_onnx` from `tract-onnx-opl` for the few ONNX operators
//! tract-core lacks). Reading it back needs `tract-core` + `tract-nnef` + `tract-onnx-opl` only,
//! which is what a device build of the agent links (BENCHMARKS.md, "Agent footprint").
//!
//! NNEF does not keep ONNX tensor names (identifiers are sanitised), so whoever loads an NNEF
//! archive supplies the input and output names in order: the bundle's manifest records them.
//!
//! Two limits of tract 0.23.9's NNEF writer, found on the bundler's quantized models:
//! - Every wire whose value is known at write time becomes an f32 `variable`: the weights of an
//!   `int8-weights` or `f16` model, folded to f32 when tract types the ONNX graph, are written as
//!   f32 (rewriting them as int8 + cast + scale in the graph does not help: the writer folds that
//!   back). The bundler therefore stores such weights narrow beside the archive and the agent
//!   puts the exact f32 bytes back before loading (`protocol::narrow_weights`,
//!   docs/bundle-format.md "Narrow weights"): this module always reads a complete archive.
//! - `QuantizeLinearU8` (static `int8`, QDQ form) has no NNEF serializer: such a model cannot be
//!   converted (`EngineError::Convert`); it ships as ONNX, for agents with the ONNX front end.

use std::path::Path;

use tract_nnef::prelude::*;
use tract_onnx_opl::WithOnnx;

use crate::error::EngineError;

/// tract's NNEF framework with the `tract_onnx` extension registered.
pub(crate) fn framework() -> tract_nnef::internal::Nnef {
    tract_nnef::nnef().with_onnx()
}

/// Reads an NNEF archive (uncompressed tar, or a directory) into a typed model.
pub(crate) fn read(path: &Path) -> Result<TypedModel, EngineError> {
    framework()
        .model_for_path(path)
        .map_err(|e| EngineError::Load {
            path: path.to_owned(),
            reason: format!("reading NNEF: {e:#}"),
        })
}

/// `model` as an NNEF tar archive (the conversion needs the ONNX front end to have a model).
/// Deterministic: fixed tar timestamps (tract's default stamps the time of writing), so the same
/// model always gives the same bytes — the bundle's model hash, which the simulated fleet's
/// model cache keys on, names the model, not the build.
#[cfg(feature = "onnx")]
pub(crate) fn write(model: &TypedModel) -> TractResult<Vec<u8>> {
    framework().write_to_tar_with_config(model, Vec::new(), false, true)
}
