//! A plain owned tensor: the unit the engine runs on and the inference API decodes into.

use protocol::manifest::DType;

/// Element storage of a [`Tensor`], one variant per [`DType`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

/// An owned, row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// A tensor from row-major data; `None` when `data.len()` is not the product of `shape`.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Option<Tensor> {
        let t = Tensor { shape, data };
        (t.shape.iter().product::<usize>() == t.len()).then_some(t)
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Option<Tensor> {
        Tensor::new(shape, TensorData::F32(data))
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The float values of each tensor of `ts`, empty for a tensor of another element type.
    pub fn f32_slices(ts: &[Tensor]) -> Vec<&[f32]> {
        ts.iter().map(|t| t.as_f32().unwrap_or(&[])).collect()
    }

    /// Number of samples: the size of axis 0, the batch axis of every sample tensor (1 for a
    /// scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Samples `start..end` (axis 0). Panics when the range is outside `0..=rows()`.
    pub fn slice_rows(&self, start: usize, end: usize) -> Tensor {
        let per: usize = self.shape.iter().skip(1).product();
        let (a, b) = (start * per, end * per);
        let data = match &self.data {
            TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[a..b].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[a..b].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = end - start;
        }
        Tensor { shape, data }
    }

    /// Concatenates sample tensors along axis 0. Panics on an empty list or on parts of
    /// different element types (the outputs of one model never are).
    pub fn concat_rows(parts: Vec<Tensor>) -> Tensor {
        let mut parts = parts.into_iter();
        let mut acc = parts.next().expect("at least one part");
        for t in parts {
            if let Some(first) = acc.shape.first_mut() {
                *first += t.rows();
            }
            match (&mut acc.data, t.data) {
                (TensorData::F32(a), TensorData::F32(b)) => a.extend(b),
                (TensorData::I32(a), TensorData::I32(b)) => a.extend(b),
                (TensorData::I64(a), TensorData::I64(b)) => a.extend(b),
                (TensorData::U8(a), TensorData::U8(b)) => a.extend(b),
                _ => panic!("concatenating tensors of different element types"),
            }
        }
        acc
    }

    /// The elements as little-endian bytes (the layout of golden payloads and of the binary
    /// tensor extension of the inference protocol).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U8(v) => v.clone(),
        }
    }

    /// A tensor from little-endian bytes; `None` when the byte count does not match the shape.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Option<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n.checked_mul(dtype.size())? {
            return None;
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I32 => TensorData::I32(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I64 => TensorData::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::U8 => TensorData::U8(bytes.to_vec()),
        };
        Some(Tensor { shape, data })
    }
}

/// The input and output tensors of a golden payload (layout: `protocol::manifest::Golden`).
/// The bundler writes this payload and the agent self-tests with it; both read it here.
pub fn golden_tensors(
    golden: &protocol::manifest::Golden,
    bytes: &[u8],
) -> Result<(Vec<Tensor>, Vec<Tensor>), String> {
    let (inputs, outputs) = golden.split(bytes)?;
    let tensors = |specs: &[protocol::manifest::GoldenTensor], slices: Vec<&[u8]>| {
        specs
            .iter()
            .zip(slices)
            .map(|(t, b)| {
                Tensor::from_le_bytes(t.dtype, t.shape.clone(), b)
                    .ok_or_else(|| format!("golden tensor '{}' has the wrong size", t.name))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok((
        tensors(&golden.inputs, inputs)?,
        tensors(&golden.outputs, outputs)?,
    ))
}
