//! Copies between the engine's [`Tensor`] and tract's tensor type.

use tract_nnef::prelude::{DatumType, Tensor as TractTensor};

use crate::error::EngineError;
use crate::tensor::{Tensor, TensorData};

/// A tract tensor holding a copy of `t`. `t` must have been validated (length = shape product).
pub(crate) fn to_tract(t: &Tensor) -> TractTensor {
    let built = match &t.data {
        TensorData::F32(v) => TractTensor::from_shape(&t.shape, v),
        TensorData::I32(v) => TractTensor::from_shape(&t.shape, v),
        TensorData::I64(v) => TractTensor::from_shape(&t.shape, v),
        TensorData::U8(v) => TractTensor::from_shape(&t.shape, v),
    };
    built.expect("input validated before conversion")
}

/// Copies a tract output into a [`Tensor`].
pub(crate) fn from_tract(t: &TractTensor, name: &str) -> Result<Tensor, EngineError> {
    let err = |e: String| EngineError::Run(format!("reading output '{name}': {e}"));
    let view = t.try_as_plain_ram().map_err(|e| err(format!("{e:#}")))?;
    let data = match t.datum_type() {
        DatumType::F32 => TensorData::F32(
            view.as_slice::<f32>()
                .map_err(|e| err(e.to_string()))?
                .to_vec(),
        ),
        DatumType::I32 => TensorData::I32(
            view.as_slice::<i32>()
                .map_err(|e| err(e.to_string()))?
                .to_vec(),
        ),
        DatumType::I64 => TensorData::I64(
            view.as_slice::<i64>()
                .map_err(|e| err(e.to_string()))?
                .to_vec(),
        ),
        DatumType::U8 => TensorData::U8(
            view.as_slice::<u8>()
                .map_err(|e| err(e.to_string()))?
                .to_vec(),
        ),
        other => return Err(err(format!("unsupported element type {other:?}"))),
    };
    Ok(Tensor {
        shape: t.shape().to_vec(),
        data,
    })
}
