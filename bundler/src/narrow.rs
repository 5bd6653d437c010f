//! Narrowing an NNEF archive's weights for the bundle (`protocol::narrow_weights`).
//!
//! tract writes every constant of the model as an f32 `.dat` tensor, so the weights of an
//! `int8-weights` or `f16` model, folded back to float when tract typed the graph, take 4 bytes
//! each in the archive. Here each large f32 tensor of the archive is checked bit for bit: if
//! every value is `q * scale` for q in -127..=127 with one f32 scale per slice along some axis
//! (`int8-weights`), or is a float16 value (`f16`), its f32 bytes are cut out of the archive and
//! stored narrow in a payload of their own. Anything that does not check out stays f32, so the
//! archive the device rebuilds is the archive tract wrote, byte for byte (the build checks it,
//! and the manifest carries its sha256 for the device to check).

use std::io::Cursor;

use protocol::narrow_weights::{self, Encoding, NarrowTensor};

use crate::quantize::QuantizeMode;

/// The NNEF tensor file header (`.dat`): 128 bytes before the values.
const DAT_HEADER: usize = 128;

/// What narrowing an archive gave.
#[derive(Debug, Clone)]
pub(crate) struct Narrowed {
    /// The archive without the narrowed tensors' f32 bytes (the model payload).
    pub stripped: Vec<u8>,
    /// The narrow-weights payload.
    pub payload: Vec<u8>,
    pub tensors: usize,
    pub values: u64,
}

/// An f32 tensor stored in the archive.
struct F32Tensor {
    /// Byte offset of its first value in the archive.
    offset: u64,
    shape: Vec<u64>,
    values: Vec<f32>,
}

/// The f32 `.dat` tensors of a tract NNEF tar archive, in archive order.
fn f32_tensors(archive: &[u8]) -> Result<Vec<F32Tensor>, String> {
    let mut tar = tar::Archive::new(Cursor::new(archive));
    let mut found = Vec::new();
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if !entry.header().entry_type().is_file() || path.extension().is_none_or(|e| e != "dat") {
            continue;
        }
        let start = entry.raw_file_position() as usize;
        let size = entry.size() as usize;
        let Some(dat) = archive.get(start..start + size) else {
            return Err(format!("{} lies beyond the archive", path.display()));
        };
        if let Some(t) = f32_dat(dat, start as u64) {
            found.push(t);
        }
    }
    Ok(found)
}

/// The tensor of a `.dat` file at `start` in the archive, if it is a plain little-endian f32
/// tensor (NNEF item type 0, 32 bits, no vendor type) whose data is exactly its values.
fn f32_dat(dat: &[u8], start: u64) -> Option<F32Tensor> {
    let header = dat.get(..DAT_HEADER)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let u16_at = |at: usize| u16::from_le_bytes(header[at..at + 2].try_into().unwrap());
    let (magic, data_size, rank) = (&header[0..2], u32_at(4) as usize, u32_at(8) as usize);
    let (bits, item_type, vendor) = (u32_at(44), u16_at(48), u16_at(50));
    if magic != [0x4e, 0xef] || rank > 8 || (bits, item_type, vendor) != (32, 0, 0) {
        return None;
    }
    let shape: Vec<u64> = (0..rank).map(|i| u32_at(12 + 4 * i) as u64).collect();
    let n: u64 = shape.iter().product();
    if rank == 0 || data_size as u64 != n * 4 || dat.len() != DAT_HEADER + data_size {
        return None;
    }
    let values = dat[DAT_HEADER..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some(F32Tensor {
        offset: start + DAT_HEADER as u64,
        shape,
        values,
    })
}

/// The scale of one channel, if every value of it is `q * scale` bit for bit with q in
/// -127..=127. Candidates: `max|v| / 127` and its neighbours a few ulps away (the quantizer's
/// scale `s` gives a largest value `127 * s` rounded, so `max|v| / 127` may be an ulp off).
fn channel_scale(values: &[f32]) -> Option<f32> {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() {
        return None;
    }
    if amax == 0.0 {
        // Only +0.0 is 0 * scale; a -0.0 must stay f32.
        return values.iter().all(|v| v.to_bits() == 0).then_some(1.0);
    }
    let mid = amax / 127.0;
    let mut candidates = vec![mid];
    let (mut up, mut down) = (mid, mid);
    for _ in 0..2 {
        up = up.next_up();
        down = down.next_down();
        candidates.extend([up, down]);
    }
    candidates.into_iter().find(|&s| {
        s > 0.0
            && s.is_finite()
            && values.iter().all(|&v| {
                let q = (v / s).round();
                // As the agent rebuilds it: from the stored i8, where a -0.0 quotient is 0.
                (-127.0..=127.0).contains(&q) && ((q as i8) as f32 * s).to_bits() == v.to_bits()
            })
    })
}

/// The tensor as per-channel symmetric int8 along the first axis where every channel checks out.
fn as_int8(t: &F32Tensor) -> Option<Encoding> {
    (0..t.shape.len()).find_map(|axis| {
        let channels = t.shape[axis] as usize;
        let inner: usize = t.shape[axis + 1..].iter().product::<u64>() as usize;
        let channel_of = |e: usize| (e / inner) % channels;
        let mut per_channel = vec![Vec::new(); channels];
        for (e, &v) in t.values.iter().enumerate() {
            per_channel[channel_of(e)].push(v);
        }
        let scales = per_channel
            .iter()
            .map(|c| channel_scale(c))
            .collect::<Option<Vec<f32>>>()?;
        let values = t
            .values
            .iter()
            .enumerate()
            .map(|(e, &v)| (v / scales[channel_of(e)]).round() as i8)
            .collect();
        Some(Encoding::Int8 {
            axis,
            scales,
            values,
        })
    })
}

/// The tensor as float16, if every value is one.
fn as_f16(t: &F32Tensor) -> Option<Encoding> {
    let bits = t
        .values
        .iter()
        .map(|&v| {
            let h = half::f16::from_f32(v);
            (h.to_f32().to_bits() == v.to_bits()).then_some(h.to_bits())
        })
        .collect::<Option<Vec<u16>>>()?;
    Some(Encoding::F16 { bits })
}

/// Narrows the weights of the NNEF `archive` of a model quantized in `mode` (`int8-weights`:
/// int8 per channel; `f16`: float16; other modes: nothing). `None` when no tensor qualifies.
/// The build checks the result the way a device uses it (`narrow_weights::expand` against the
/// archive's sha256).
pub(crate) fn narrow_archive(
    archive: &[u8],
    mode: QuantizeMode,
) -> Result<Option<Narrowed>, String> {
    let narrow: fn(&F32Tensor) -> Option<Encoding> = match mode {
        QuantizeMode::Int8Weights => as_int8,
        QuantizeMode::F16 => as_f16,
        QuantizeMode::None | QuantizeMode::Int8 => return Ok(None),
    };
    let tensors: Vec<NarrowTensor> = f32_tensors(archive)?
        .iter()
        .filter_map(|t| {
            let narrowed = NarrowTensor {
                offset: t.offset,
                shape: t.shape.clone(),
                encoding: narrow(t)?,
            };
            (narrowed.encoded_len() < narrowed.f32_bytes()).then_some(narrowed)
        })
        .collect();
    if tensors.is_empty() {
        return Ok(None);
    }
    Ok(Some(Narrowed {
        stripped: narrow_weights::strip(archive, &tensors),
        payload: narrow_weights::encode(&tensors),
        tensors: tensors.len(),
        values: tensors.iter().map(NarrowTensor::elements).sum(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[u64], values: Vec<f32>) -> F32Tensor {
        F32Tensor {
            offset: 0,
            shape: shape.to_vec(),
            values,
        }
    }

    #[test]
    fn quantizer_output_is_recognised_on_its_axis_and_rebuilt_exactly() {
        // What the quantizer writes: per-channel scales along axis 1 of a [3, 4] MatMul weight.
        let w: Vec<f32> = (0..12)
            .map(|i| (i as f32 * 0.37).sin() * (1 + i % 4) as f32)
            .collect();
        let (q, s) = crate::quantize::weights::quantize_per_channel(&w, &[3, 4], 1);
        let deq: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(e, &q)| q as f32 * s[e % 4])
            .collect();
        let t = tensor(&[3, 4], deq.clone());
        let Some(Encoding::Int8 {
            axis,
            scales,
            values,
        }) = as_int8(&t)
        else {
            panic!("not recognised as int8");
        };
        assert_eq!(axis, 1);
        let narrow = NarrowTensor {
            offset: 0,
            shape: vec![3, 4],
            encoding: Encoding::Int8 {
                axis,
                scales,
                values,
            },
        };
        let widened = narrow.widen();
        assert!(widened
            .iter()
            .zip(&deq)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn float_values_stay_float() {
        let t = tensor(&[2, 2], vec![0.1, 0.2, 0.3, 0.4]);
        assert!(as_int8(&t).is_none());
        assert!(as_f16(&t).is_none());
        let t = tensor(&[2], vec![0.5, -0.0]);
        assert!(as_int8(&t).is_none(), "-0.0 is not q * scale");
        // Next to a non-zero value in one channel, too (the stored 0 comes back as +0.0).
        assert!(as_int8(&tensor(&[1, 2], vec![0.5, -0.0])).is_none());
        assert!(as_f16(&tensor(&[2], vec![0.5, -0.0])).is_some());
    }
}
