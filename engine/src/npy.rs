//! A small reader for NumPy `.npy` files: the format golden inputs and test vectors come in.
//!
//! Supports format versions 1.0, 2.0 and 3.0, little-endian (or byte-order-free) C-order arrays
//! of `float32`, `int32`, `int64` and `uint8`. Anything else is refused with an error that says
//! what was found and what would be accepted.

use std::path::{Path, PathBuf};

use crate::tensor::{Tensor, TensorData};

/// Why a `.npy` file could not be read.
#[derive(thiserror::Error, Debug)]
pub enum NpyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a .npy file: missing the \\x93NUMPY magic bytes at the start")]
    BadMagic,
    #[error("unsupported .npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error("truncated .npy file: {0}")]
    Truncated(String),
    #[error("malformed .npy header: {0}")]
    BadHeader(String),
    #[error(
        "unsupported .npy dtype '{0}': expected little-endian float32 ('<f4'), int32 ('<i4'), \
         int64 ('<i8') or uint8 ('|u1')"
    )]
    UnsupportedDtype(String),
    #[error(
        "unsupported .npy layout: array is stored in Fortran (column-major) order; \
         save it with np.ascontiguousarray first"
    )]
    FortranOrder,
    #[error(
        "bad .npy data: header shape {shape:?} needs {expected} bytes of data, file has {got}"
    )]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
}

/// Reads a `.npy` file into a [`Tensor`].
pub fn read_npy(path: impl AsRef<Path>) -> Result<Tensor, NpyError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_npy(&bytes)
}

/// Parses the bytes of a `.npy` file into a [`Tensor`].
pub fn parse_npy(bytes: &[u8]) -> Result<Tensor, NpyError> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(NpyError::BadMagic);
    }
    if bytes.len() < 8 {
        return Err(NpyError::Truncated(
            "file ends inside the version bytes".into(),
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_bytes, utf8) = match major {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    let header_start = 8 + len_bytes;
    if bytes.len() < header_start {
        return Err(NpyError::Truncated(
            "file ends inside the header length".into(),
        ));
    }
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_start = header_start
        .checked_add(header_len)
        .ok_or_else(|| NpyError::BadHeader("header length overflows".into()))?;
    if bytes.len() < data_start {
        return Err(NpyError::Truncated(format!(
            "header declares {header_len} bytes, file has {} after the preamble",
            bytes.len() - header_start
        )));
    }
    let raw = &bytes[header_start..data_start];
    let header = if utf8 {
        std::str::from_utf8(raw).map_err(|_| NpyError::BadHeader("header is not UTF-8".into()))?
    } else {
        if !raw.is_ascii() {
            return Err(NpyError::BadHeader("header is not ASCII".into()));
        }
        std::str::from_utf8(raw).expect("ascii")
    };
    let header = Header::parse(header)?;
    if header.fortran_order {
        return Err(NpyError::FortranOrder);
    }
    let n = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| NpyError::BadHeader(format!("shape {:?} is too large", header.shape)))?;
    let data = &bytes[data_start..];
    let elem = match header.descr.as_str() {
        "<f4" | "<i4" => 4,
        "<i8" => 8,
        "|u1" | "<u1" | "u1" => 1,
        other => return Err(NpyError::UnsupportedDtype(other.to_owned())),
    };
    let expected = n
        .checked_mul(elem)
        .ok_or_else(|| NpyError::BadHeader(format!("shape {:?} is too large", header.shape)))?;
    if data.len() < expected {
        return Err(NpyError::Truncated(format!(
            "shape {:?} needs {expected} bytes of data, file has {}",
            header.shape,
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(NpyError::DataLength {
            shape: header.shape,
            expected,
            got: data.len(),
        });
    }
    let data = match header.descr.as_str() {
        "<f4" => TensorData::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i4" => TensorData::I32(
            data.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i8" => TensorData::I64(
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => TensorData::U8(data.to_vec()),
    };
    Ok(Tensor {
        shape: header.shape,
        data,
    })
}

/// The three keys of a `.npy` header dictionary.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    /// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
    fn parse(text: &str) -> Result<Header, NpyError> {
        let bad = |what: &str| NpyError::BadHeader(format!("{what} in {:?}", text.trim_end()));
        let body = text
            .trim()
            .strip_prefix('{')
            .and_then(|t| t.trim_end().strip_suffix('}'))
            .ok_or_else(|| bad("expected a {...} dictionary"))?;
        let value_of = |key: &str| -> Result<&str, NpyError> {
            let (q1, q2) = (format!("'{key}'"), format!("\"{key}\""));
            let at = body
                .find(&q1)
                .map(|i| i + q1.len())
                .or_else(|| body.find(&q2).map(|i| i + q2.len()))
                .ok_or_else(|| bad(&format!("missing key '{key}'")))?;
            let rest = body[at..].trim_start();
            rest.strip_prefix(':')
                .map(str::trim_start)
                .ok_or_else(|| bad(&format!("missing ':' after '{key}'")))
        };
        let descr_raw = value_of("descr")?;
        let quote = descr_raw.chars().next().filter(|c| *c == '\'' || *c == '"');
        let quote = quote.ok_or_else(|| bad("'descr' is not a string"))?;
        let end = descr_raw[1..]
            .find(quote)
            .ok_or_else(|| bad("unterminated 'descr'"))?;
        let descr = descr_raw[1..1 + end].to_owned();

        let fortran_raw = value_of("fortran_order")?;
        let fortran_order = if fortran_raw.starts_with("True") {
            true
        } else if fortran_raw.starts_with("False") {
            false
        } else {
            return Err(bad("'fortran_order' is neither True nor False"));
        };

        let shape_raw = value_of("shape")?;
        let shape_raw = shape_raw
            .strip_prefix('(')
            .ok_or_else(|| bad("'shape' is not a tuple"))?;
        let end = shape_raw
            .find(')')
            .ok_or_else(|| bad("unterminated 'shape'"))?;
        let shape = shape_raw[..end]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("'shape' holds something other than non-negative integers"))?;
        Ok(Header {
            descr,
            fortran_order,
            shape,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = b"\x93NUMPY".to_vec();
        out.push(version);
        out.push(0);
        let mut h = header.as_bytes().to_vec();
        let pre = if version == 1 { 10 } else { 12 };
        while (pre + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        if version == 1 {
            out.extend((h.len() as u16).to_le_bytes());
        } else {
            out.extend((h.len() as u32).to_le_bytes());
        }
        out.extend(h);
        out.extend(data);
        out
    }

    #[test]
    fn reads_f32_v1_and_v2() {
        let data: Vec<u8> = [1.0f32, 2.5, -3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for v in [1, 2, 3] {
            let bytes = npy(
                v,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
                &data,
            );
            let t = parse_npy(&bytes).unwrap();
            assert_eq!(t.shape, vec![2, 3]);
            assert_eq!(t.as_f32().unwrap(), &[1.0, 2.5, -3.0, 4.0, 5.0, 6.0]);
        }
    }

    #[test]
    fn reads_ints_scalars_and_1d() {
        let data: Vec<u8> = [7i32, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = parse_npy(&npy(
            1,
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
            &data,
        ))
        .unwrap();
        assert_eq!(t.data, TensorData::I32(vec![7, -1]));
        let data = 9i64.to_le_bytes();
        let t = parse_npy(&npy(
            1,
            "{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
            &data,
        ))
        .unwrap();
        assert_eq!(
            (t.shape.clone(), t.data),
            (vec![], TensorData::I64(vec![9]))
        );
        let t = parse_npy(&npy(
            1,
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }",
            &[1, 2, 3],
        ))
        .unwrap();
        assert_eq!(t.data, TensorData::U8(vec![1, 2, 3]));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let err = |h: &str, d: &[u8]| parse_npy(&npy(1, h, d)).unwrap_err().to_string();
        assert!(parse_npy(b"PK\x03\x04 not numpy")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let e = err(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        assert!(e.contains("'<f8'"), "{e}");
        let e = err(
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
            &[0; 4],
        );
        assert!(e.contains("'>f4'") && e.contains("little-endian"), "{e}");
        let e = err(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
            &[0; 16],
        );
        assert!(e.contains("Fortran"), "{e}");
        let e = err(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
            &[0; 12],
        );
        assert!(e.contains("truncated") && e.contains("16 bytes"), "{e}");
        let e = err(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        assert!(e.contains("needs 4 bytes"), "{e}");
        let mut short = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &[],
        );
        short.truncate(20);
        assert!(parse_npy(&short)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let e = parse_npy(b"\x93NUMPY\x09\x00xx").unwrap_err().to_string();
        assert!(e.contains("version 9.0"), "{e}");
    }
}
