//! Narrow weights: the f32 tensors of a model file stored as int8 with per-channel scales, or as
//! float16, in a payload of their own, and widened back to the exact f32 bytes on the device.
//!
//! Why: tract's NNEF writer stores every constant as f32, so an NNEF bundle of an
//! `int8-weights` (or `f16`) model would carry 4 bytes per weight although each weight is one
//! of 255 multiples of its channel's scale (or a float16). The bundler cuts those tensors' f32
//! values out of the model file and stores them here instead; the manifest's
//! [`NarrowWeights`](crate::manifest::NarrowWeights) names the payload and the size and sha256
//! of the model file once they are put back. The agent puts them back once, at install
//! ([`expand`]), and loads, self-tests and serves the result, which is byte for byte the file
//! the bundler evaluated (the sha256 check makes it so, or the install is refused).
//!
//! The format knows nothing of NNEF or tar: a tensor is a run of little-endian f32 values at a
//! byte offset of the expanded file. Payload layout (little-endian):
//!
//! ```text
//! magic  "MFNW"                   4 bytes
//! count  u32                      tensors that follow, in increasing offset order
//! per tensor:
//!   offset    u64                 byte offset of its first f32 value in the expanded file
//!   encoding  u8                  1: int8 per-channel symmetric, 2: float16
//!   rank      u8                  1..=8
//!   axis      u8                  int8: the channel axis (< rank); float16: 0
//!   dims      rank × u64          its shape; elements n = product of dims (> 0)
//!   int8:     dims[axis] × f32    the channel scales (finite, > 0), then n × i8 values in
//!                                 -127..=127; value = (q as f32) * scale[channel], channel =
//!                                 (element / product(dims[axis+1..])) % dims[axis]
//!   float16:  n × u16             IEEE binary16 bits, widened exactly
//! ```
//!
//! The stripped model file (the model payload of such a bundle) is the expanded file with each
//! tensor's `4 n` bytes removed; [`expand`] splices them back.

use sha2::{Digest, Sha256};

use crate::manifest::NarrowWeights;

const MAGIC: &[u8; 4] = b"MFNW";
const INT8: u8 = 1;
const F16: u8 = 2;
const MAX_RANK: usize = 8;

/// How one tensor's values are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    /// Per-channel symmetric int8: `value = q as f32 * scales[channel]` along `axis`.
    Int8 {
        axis: usize,
        scales: Vec<f32>,
        values: Vec<i8>,
    },
    /// IEEE binary16 bits, widened exactly to f32.
    F16 { bits: Vec<u16> },
}

/// One tensor cut out of the model file.
#[derive(Debug, Clone, PartialEq)]
pub struct NarrowTensor {
    /// Byte offset of its first f32 value in the expanded model file.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub encoding: Encoding,
}

impl NarrowTensor {
    /// Number of elements (product of the shape).
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes this tensor takes in the expanded file (4 per element).
    pub fn f32_bytes(&self) -> u64 {
        self.elements() * 4
    }

    /// Bytes this tensor takes in the payload [`encode`] writes: offset, encoding, rank and
    /// axis, shape, then the scales and int8 values, or the float16 values.
    pub fn encoded_len(&self) -> u64 {
        let data = match &self.encoding {
            Encoding::Int8 { scales, values, .. } => 4 * scales.len() + values.len(),
            Encoding::F16 { bits } => 2 * bits.len(),
        };
        (8 + 3 + 8 * self.shape.len() + data) as u64
    }

    /// The f32 values, widened exactly.
    pub fn widen(&self) -> Vec<f32> {
        match &self.encoding {
            Encoding::Int8 {
                axis,
                scales,
                values,
            } => {
                let inner: u64 = self.shape[axis + 1..].iter().product();
                let channels = self.shape[*axis];
                values
                    .iter()
                    .enumerate()
                    .map(|(e, &q)| {
                        let c = ((e as u64 / inner) % channels) as usize;
                        q as f32 * scales[c]
                    })
                    .collect()
            }
            Encoding::F16 { bits } => bits.iter().map(|&h| f16_to_f32(h)).collect(),
        }
    }
}

/// Why a narrow-weights payload was refused. Each message names the tensor (by index and
/// offset) and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NarrowWeightsError {
    #[error("narrow weights: {0}")]
    Malformed(String),
    #[error("narrow weights: tensor {index} (offset {offset}): {reason}")]
    Tensor {
        index: usize,
        offset: u64,
        reason: String,
    },
    #[error(
        "narrow weights: the expanded model is {actual_size} bytes with sha256 {actual_sha256}, \
         the manifest says {expected_size} bytes with sha256 {expected_sha256}"
    )]
    Mismatch {
        expected_size: u64,
        expected_sha256: String,
        actual_size: u64,
        actual_sha256: String,
    },
}

/// The payload bytes of `tensors` (which must be in increasing offset order and well-formed:
/// [`decode`] checks what this writes).
pub fn encode(tensors: &[NarrowTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        out.extend_from_slice(&t.offset.to_le_bytes());
        let (code, axis) = match &t.encoding {
            Encoding::Int8 { axis, .. } => (INT8, *axis as u8),
            Encoding::F16 { .. } => (F16, 0),
        };
        out.push(code);
        out.push(t.shape.len() as u8);
        out.push(axis);
        for d in &t.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        match &t.encoding {
            Encoding::Int8 { scales, values, .. } => {
                for s in scales {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                out.extend(values.iter().map(|&q| q as u8));
            }
            Encoding::F16 { bits } => {
                for h in bits {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
    }
    out
}

/// A cursor over the payload that refuses to read past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(format!(
                "{what}: needs {n} bytes, {left} left in the payload"
            ));
        }
        let s = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

/// Parses and checks a narrow-weights payload: magic, every tensor's encoding, rank, axis,
/// shape, scales (finite, positive), int8 values (no -128), offsets increasing without overlap,
/// and no trailing bytes. Allocations are bounded by the payload's length.
pub fn decode(bytes: &[u8]) -> Result<Vec<NarrowTensor>, NarrowWeightsError> {
    let mut c = Cursor { bytes, at: 0 };
    let malformed = NarrowWeightsError::Malformed;
    if c.take(4, "magic").map_err(malformed)? != MAGIC {
        return Err(NarrowWeightsError::Malformed(
            "not a narrow-weights payload (magic is not \"MFNW\")".into(),
        ));
    }
    let count = c.u32("tensor count").map_err(malformed)? as usize;
    let mut tensors = Vec::new();
    let mut end = 0u64; // end of the previous tensor in the expanded file
    for index in 0..count {
        let offset = c
            .u64("tensor offset")
            .map_err(NarrowWeightsError::Malformed)?;
        let bad = |reason: String| NarrowWeightsError::Tensor {
            index,
            offset,
            reason,
        };
        let code = c.u8("encoding").map_err(bad)?;
        let rank = c.u8("rank").map_err(bad)? as usize;
        let axis = c.u8("axis").map_err(bad)? as usize;
        if !(1..=MAX_RANK).contains(&rank) {
            return Err(bad(format!("rank {rank} is not in 1..={MAX_RANK}")));
        }
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(c.u64("dimension").map_err(bad)?);
        }
        let n = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0 && n <= u64::MAX / 4)
            .ok_or_else(|| bad(format!("shape {shape:?} holds no elements or too many")))?;
        if offset < end {
            return Err(bad(format!(
                "starts before the end of the previous tensor ({end}): offsets must increase \
                 without overlap"
            )));
        }
        end = offset
            .checked_add(n * 4)
            .ok_or_else(|| bad("ends beyond 2^64 bytes".into()))?;
        let encoding = match code {
            INT8 => {
                if axis >= rank {
                    return Err(bad(format!(
                        "axis {axis} is not an axis of shape {shape:?}"
                    )));
                }
                let channels = shape[axis];
                let raw = c.take(channels * 4, "scales").map_err(bad)?;
                let scales: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                if let Some((ch, s)) = scales
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !(s.is_finite() && **s > 0.0))
                {
                    return Err(bad(format!(
                        "scale of channel {ch} is {s}: scales must be finite and positive"
                    )));
                }
                let values: Vec<i8> = c
                    .take(n, "int8 values")
                    .map_err(bad)?
                    .iter()
                    .map(|&b| b as i8)
                    .collect();
                if let Some(e) = values.iter().position(|&q| q == i8::MIN) {
                    return Err(bad(format!(
                        "element {e} is -128: symmetric int8 values are in -127..=127"
                    )));
                }
                Encoding::Int8 {
                    axis,
                    scales,
                    values,
                }
            }
            F16 => {
                if axis != 0 {
                    return Err(bad(format!(
                        "axis {axis} given for a float16 tensor (must be 0)"
                    )));
                }
                let bits = c
                    .take(n * 2, "float16 values")
                    .map_err(bad)?
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                Encoding::F16 { bits }
            }
            other => {
                return Err(bad(format!(
                    "unknown encoding {other} (1: int8 per-channel, 2: float16)"
                )))
            }
        };
        tensors.push(NarrowTensor {
            offset,
            shape,
            encoding,
        });
    }
    if c.at != bytes.len() {
        return Err(NarrowWeightsError::Malformed(format!(
            "{} unexpected trailing bytes after {count} tensors",
            bytes.len() - c.at
        )));
    }
    Ok(tensors)
}

/// Puts the tensors of the narrow-weights payload `narrow` back into the stripped model file
/// `stripped`, and checks the result against the manifest's `expected` size and sha256: what
/// comes back is byte for byte the model file the bundler evaluated, or an error.
pub fn expand(
    stripped: &[u8],
    narrow: &[u8],
    expected: &NarrowWeights,
) -> Result<Vec<u8>, NarrowWeightsError> {
    let tensors = decode(narrow)?;
    let expanded = splice(stripped, &tensors)?;
    let actual_sha256 = hex::encode(Sha256::digest(&expanded));
    if expanded.len() as u64 != expected.model_size || actual_sha256 != expected.model_sha256 {
        return Err(NarrowWeightsError::Mismatch {
            expected_size: expected.model_size,
            expected_sha256: expected.model_sha256.clone(),
            actual_size: expanded.len() as u64,
            actual_sha256,
        });
    }
    Ok(expanded)
}

/// `stripped` with each tensor's f32 values inserted at its offset (offsets in the expanded
/// file, increasing: as [`decode`] checked).
pub fn splice(stripped: &[u8], tensors: &[NarrowTensor]) -> Result<Vec<u8>, NarrowWeightsError> {
    let total: u64 = tensors.iter().map(NarrowTensor::f32_bytes).sum();
    let mut out = Vec::with_capacity(stripped.len() + total as usize);
    let mut taken = 0usize; // bytes of `stripped` copied so far
    for (index, t) in tensors.iter().enumerate() {
        let Some(gap) = t.offset.checked_sub(out.len() as u64) else {
            return Err(NarrowWeightsError::Tensor {
                index,
                offset: t.offset,
                reason: format!(
                    "starts before the end of the previous tensor ({})",
                    out.len()
                ),
            });
        };
        if gap > (stripped.len() - taken) as u64 {
            return Err(NarrowWeightsError::Tensor {
                index,
                offset: t.offset,
                reason: format!(
                    "lies beyond the end of the model file ({} bytes once expanded up to here)",
                    out.len() + stripped.len() - taken
                ),
            });
        }
        out.extend_from_slice(&stripped[taken..taken + gap as usize]);
        taken += gap as usize;
        for v in t.widen() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&stripped[taken..]);
    Ok(out)
}

/// `tensors` cut out of `expanded` (the inverse of [`splice`]): the stripped model file.
pub fn strip(expanded: &[u8], tensors: &[NarrowTensor]) -> Vec<u8> {
    let mut out = Vec::with_capacity(expanded.len());
    let mut at = 0usize;
    for t in tensors {
        out.extend_from_slice(&expanded[at..t.offset as usize]);
        at = (t.offset + t.f32_bytes()) as usize;
    }
    out.extend_from_slice(&expanded[at..]);
    out
}

/// IEEE binary16 bits widened to f32 (exact: every binary16 value is an f32 value).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise.
            let shift = frac.leading_zeros() - 21; // bring the top bit to bit 10
            let frac = (frac << shift) & 0x3ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (frac << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int8_tensor(offset: u64) -> NarrowTensor {
        NarrowTensor {
            offset,
            shape: vec![2, 3],
            encoding: Encoding::Int8 {
                axis: 0,
                scales: vec![0.5, 0.25],
                values: vec![1, -2, 127, 4, 0, -127],
            },
        }
    }

    fn f16_tensor(offset: u64) -> NarrowTensor {
        NarrowTensor {
            offset,
            shape: vec![3],
            // 1.0, -2.0, the smallest subnormal
            encoding: Encoding::F16 {
                bits: vec![0x3c00, 0xc000, 0x0001],
            },
        }
    }

    fn expanded_file() -> (Vec<u8>, Vec<NarrowTensor>) {
        let tensors = vec![int8_tensor(5), f16_tensor(5 + 24 + 3)];
        let mut file = b"head!".to_vec();
        for v in [0.5f32, -1.0, 63.5, 1.0, 0.0, -31.75] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        file.extend_from_slice(b"mid");
        for v in [1.0f32, -2.0, 2f32.powi(-24)] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        file.extend_from_slice(b"tail");
        (file, tensors)
    }

    fn entry(file: &[u8]) -> NarrowWeights {
        NarrowWeights {
            file: "model.weights.bin".into(),
            tensors: 2,
            values: 9,
            model_size: file.len() as u64,
            model_sha256: hex::encode(Sha256::digest(file)),
        }
    }

    #[test]
    fn strip_encode_expand_gives_back_the_same_bytes() {
        let (file, tensors) = expanded_file();
        let stripped = strip(&file, &tensors);
        assert_eq!(stripped, b"head!midtail");
        let payload = encode(&tensors);
        // The payload header (magic, count), then each tensor's encoded length.
        let lengths: u64 = tensors.iter().map(NarrowTensor::encoded_len).sum();
        assert_eq!(payload.len() as u64, 8 + lengths);
        assert_eq!(decode(&payload).unwrap(), tensors);
        assert_eq!(expand(&stripped, &payload, &entry(&file)).unwrap(), file);
    }

    /// What the `narrow_weights` fuzz target checks, on every truncation of a valid payload and
    /// every single-byte change of it (each byte xor'ed with 1, 0x80 and 0xff): no panic, and a
    /// payload that decodes re-encodes to its exact bytes and splices into a model file of the
    /// size its tensors say, which `strip` cuts back to what was spliced into.
    #[test]
    fn truncated_and_altered_payloads_decode_to_an_error_or_round_trip() {
        let (file, tensors) = expanded_file();
        let stripped = strip(&file, &tensors);
        let payload = encode(&tensors);
        let mut cases: Vec<Vec<u8>> = (0..payload.len()).map(|n| payload[..n].to_vec()).collect();
        for at in 0..payload.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut p = payload.clone();
                p[at] ^= flip;
                cases.push(p);
            }
        }
        let mut decoded = 0;
        for case in &cases {
            let Ok(ts) = decode(case) else { continue };
            decoded += 1;
            assert_eq!(&encode(&ts), case, "decode then encode is the identity");
            if let Ok(spliced) = splice(&stripped, &ts) {
                let added: u64 = ts.iter().map(NarrowTensor::f32_bytes).sum();
                assert_eq!(spliced.len() as u64, stripped.len() as u64 + added);
                assert_eq!(strip(&spliced, &ts), stripped);
            }
        }
        // Changed values and scales still decode (the sha256 in the manifest catches them).
        assert!(decoded > 10, "{decoded}");
        assert!(decode(&payload[..payload.len() - 1]).is_err());
    }

    #[test]
    fn f16_widening_is_exact_everywhere() {
        for h in 0..=u16::MAX {
            let want = half_reference(h);
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    /// binary16 by its definition, in f64.
    fn half_reference(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = ((h >> 10) & 0x1f) as i32;
        let frac = (h & 0x3ff) as f64;
        let v = match exp {
            0 => frac * 2f64.powi(-24),
            0x1f if frac == 0.0 => f64::INFINITY,
            0x1f => f64::NAN,
            _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
        };
        (sign * v) as f32
    }

    #[test]
    fn inconsistent_payloads_are_refused_by_what_is_wrong() {
        let (file, tensors) = expanded_file();
        let stripped = strip(&file, &tensors);
        let good = encode(&tensors);
        let err = |bytes: &[u8]| {
            expand(&stripped, bytes, &entry(&file))
                .unwrap_err()
                .to_string()
        };

        assert!(err(b"XXXX\0\0\0\0").contains("magic"), "{}", err(b"XXXX"));
        // Truncated.
        let e = err(&good[..good.len() - 1]);
        assert!(
            e.contains("tensor 1") && e.contains("float16 values"),
            "{e}"
        );
        // Trailing byte.
        let mut long = good.clone();
        long.push(0);
        assert!(err(&long).contains("trailing"), "{}", err(&long));
        // A -128, a zero scale, an axis out of range, an unknown encoding, overlapping tensors.
        let mut t = tensors.clone();
        if let Encoding::Int8 { values, .. } = &mut t[0].encoding {
            values[2] = -128;
        }
        assert!(
            err(&encode(&t)).contains("element 2 is -128"),
            "{}",
            err(&encode(&t))
        );
        let mut t = tensors.clone();
        if let Encoding::Int8 { scales, .. } = &mut t[0].encoding {
            scales[1] = 0.0;
        }
        assert!(err(&encode(&t)).contains("scale of channel 1 is 0"));
        let mut bad_axis = good.clone();
        bad_axis[8 + 8 + 2] = 2; // tensor 0: offset, encoding, rank, axis
        assert!(err(&bad_axis).contains("axis 2 is not an axis of shape [2, 3]"));
        let mut bad_code = good.clone();
        bad_code[8 + 8] = 9;
        assert!(err(&bad_code).contains("unknown encoding 9"));
        let mut t = tensors.clone();
        t[1].offset = 20;
        assert!(err(&encode(&t)).contains("tensor 1 (offset 20): starts before"));
        // Beyond the end of the file.
        let mut t = tensors.clone();
        t[1].offset = 500;
        assert!(err(&encode(&t)).contains("beyond the end of the model file"));
        // Well-formed but different values: the expanded hash does not match.
        let mut t = tensors.clone();
        if let Encoding::Int8 { values, .. } = &mut t[0].encoding {
            values[0] = 2;
        }
        let e = err(&encode(&t));
        assert!(
            e.contains("expanded model") && e.contains("the manifest says"),
            "{e}"
        );
    }
}
