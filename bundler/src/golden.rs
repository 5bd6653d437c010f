//! Sample tensors: loading `.npy` files against the model's input spec, running the model on
//! them batch by batch, and the golden payload (`golden.bin`).
//!
//! Every sample tensor has the batch on axis 0. The golden payload is the layout documented on
//! [`protocol::manifest::Golden`]: each input then each output, row-major little-endian, the
//! first `count` samples of each.

use std::path::Path;

use engine::{Model, Tensor, TensorData};
use protocol::manifest::{DType, Golden, GoldenTensor, TensorSpec};

use crate::error::BuildError;
use crate::progress::Progress;

/// Samples evaluated per model run when the batch dimension is free.
pub const EVAL_BATCH: usize = 32;

/// Loads `path` as samples for `spec`: dtype and shape must fit (batch on axis 0, at least one
/// sample).
pub(crate) fn load_samples(
    path: &Path,
    what: &'static str,
    spec: &TensorSpec,
) -> Result<Tensor, BuildError> {
    let t = engine::npy::read_npy(path).map_err(|source| BuildError::Npy {
        what,
        path: path.into(),
        source,
    })?;
    if t.dtype() != spec.dtype {
        return Err(BuildError::Dtype {
            what,
            path: path.into(),
            input: spec.name.clone(),
            expected: spec.dtype.oip_name(),
            got: t.dtype().oip_name(),
        });
    }
    if !spec.accepts_shape(&t.shape) {
        return Err(BuildError::Shape {
            what,
            path: path.into(),
            input: spec.name.clone(),
            expected: spec.shape.clone(),
            got: t.shape.clone(),
        });
    }
    if t.shape.first().copied().unwrap_or(0) == 0 {
        return Err(BuildError::Samples {
            what,
            path: path.into(),
            reason: "holds no samples (batch dimension 0 is empty)".into(),
        });
    }
    Ok(t)
}

/// Loads integer class labels, one per sample: shape `[count]` or `[count, 1]`, int32 or int64.
pub(crate) fn load_labels(path: &Path, count: usize) -> Result<Vec<i64>, BuildError> {
    let t = engine::npy::read_npy(path).map_err(|source| BuildError::Npy {
        what: "golden labels",
        path: path.into(),
        source,
    })?;
    let bad = |reason: String| BuildError::Labels {
        path: path.into(),
        reason,
    };
    let rows_ok = matches!(t.shape.as_slice(), [n] | [n, 1] if *n == count);
    if !rows_ok {
        return Err(bad(format!(
            "shape {:?} does not match the {count} golden inputs (expected [{count}] or [{count}, 1])",
            t.shape
        )));
    }
    match t.data {
        TensorData::I32(v) => Ok(v.into_iter().map(i64::from).collect()),
        TensorData::I64(v) => Ok(v),
        _ => Err(bad(format!(
            "element type {} is not an integer class label type (INT32 or INT64)",
            t.dtype().oip_name()
        ))),
    }
}

/// Deterministic stand-in inputs for a model built without `--golden-inputs`: `count` samples,
/// free non-batch dimensions set to 1, floats uniform in [0, 1), integers 0, bytes uniform.
pub(crate) fn synthetic_inputs(specs: &[TensorSpec], count: usize) -> Vec<Tensor> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    specs
        .iter()
        .map(|spec| {
            let mut shape: Vec<usize> = spec.shape.iter().map(|d| d.unwrap_or(1)).collect();
            if let Some(first) = shape.first_mut() {
                if spec.shape[0].is_none() {
                    *first = count;
                }
            }
            let n: usize = shape.iter().product();
            let data = match spec.dtype {
                DType::F32 => TensorData::F32(
                    (0..n)
                        .map(|_| (next() >> 40) as f32 / 16_777_216.0)
                        .collect(),
                ),
                DType::I32 => TensorData::I32(vec![0; n]),
                DType::I64 => TensorData::I64(vec![0; n]),
                DType::U8 => TensorData::U8((0..n).map(|_| (next() >> 56) as u8).collect()),
            };
            Tensor { shape, data }
        })
        .collect()
}

/// Runs `model` on all samples of `inputs`, `batch` samples at a time (the last batch may be
/// smaller), and returns each output with all samples concatenated.
pub(crate) fn evaluate(
    model: &Model,
    inputs: &[Tensor],
    batch: usize,
    what: &'static str,
    progress: &Progress,
) -> Result<Vec<Tensor>, BuildError> {
    let count = inputs.first().map(Tensor::rows).unwrap_or(0);
    let bar = progress.bar(count as u64, &format!("evaluating {what}"));
    let mut per_output: Vec<Vec<Tensor>> = vec![Vec::new(); model.outputs().len()];
    let mut start = 0;
    while start < count {
        let end = (start + batch).min(count);
        let batch_inputs: Vec<Tensor> = inputs.iter().map(|t| t.slice_rows(start, end)).collect();
        let outputs = model
            .run(&batch_inputs)
            .map_err(|source| BuildError::Run { what, source })?;
        for (acc, out) in per_output.iter_mut().zip(outputs) {
            acc.push(out);
        }
        bar.set_position(end as u64);
        start = end;
    }
    bar.finish_and_clear();
    Ok(per_output.into_iter().map(Tensor::concat_rows).collect())
}

/// How far re-runs of the golden samples strayed from the stored outputs: the absolute
/// tolerance they need (on top of the relative one) and the worst element.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reproducibility {
    /// The smallest `atol` with which every re-run value is within `atol + rtol * |want|`.
    pub needed_atol: f32,
    /// The worst element: (output, sample, got, want).
    pub worst: Option<(String, usize, String, String)>,
}

/// Reruns the first `count` samples the ways a device may run them — one batch (of 1, or the
/// fixed batch size) at a time, and all `count` at once as the install self-test does — and
/// measures how far every output value is from the batched evaluation, given `rtol`.
pub(crate) fn reproducibility(
    model: &Model,
    inputs: &[Tensor],
    outputs: &[Tensor],
    output_specs: &[TensorSpec],
    batch_fixed: Option<usize>,
    count: usize,
    rtol: f32,
) -> Result<Reproducibility, BuildError> {
    let step = batch_fixed.unwrap_or(1);
    let mut runs: Vec<(usize, usize)> = (0..count)
        .step_by(step)
        .map(|start| (start, (start + step).min(count)))
        .collect();
    if count > step && batch_fixed.is_none() {
        runs.push((0, count));
    }
    let mut result = Reproducibility {
        needed_atol: 0.0,
        worst: None,
    };
    for (start, end) in runs {
        let batch: Vec<Tensor> = inputs.iter().map(|t| t.slice_rows(start, end)).collect();
        let again = model.run(&batch).map_err(|source| BuildError::Run {
            what: "golden inputs (reproducibility check)",
            source,
        })?;
        for ((spec, want), got) in output_specs.iter().zip(outputs).zip(&again) {
            let (need, worst) = needed_atol(&want.slice_rows(start, end), got, rtol);
            if need > result.needed_atol {
                result.needed_atol = need;
                result.worst =
                    worst.map(|(row, got, want)| (spec.name.clone(), start + row, got, want));
            }
        }
    }
    Ok(result)
}

/// The smallest `atol` with which every value of `got` is within `atol + rtol * |want|` of
/// `want` (infinite for a NaN, a different shape or non-float values that differ), and the
/// worst element: (sample row, got, want).
pub(crate) fn needed_atol(
    want: &Tensor,
    got: &Tensor,
    rtol: f32,
) -> (f32, Option<(usize, String, String)>) {
    let per: usize = want.shape.iter().skip(1).product::<usize>().max(1);
    if got.shape != want.shape {
        let shapes = (
            format!("shape {:?}", got.shape),
            format!("shape {:?}", want.shape),
        );
        return (f32::INFINITY, Some((0, shapes.0, shapes.1)));
    }
    match (want.as_f32(), got.as_f32()) {
        (Some(w), Some(g)) => {
            let mut worst = (0.0f32, None);
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                // NaN never matches.
                let need = if (g - w).is_nan() {
                    f32::INFINITY
                } else {
                    ((g - w).abs() - rtol * w.abs()).max(0.0)
                };
                if need > worst.0 {
                    worst = (need, Some((i / per, g.to_string(), w.to_string())));
                }
            }
            worst
        }
        _ if want.data != got.data => (f32::INFINITY, Some((0, "other values".into(), "-".into()))),
        _ => (0.0, None),
    }
}

/// How many of the `evaluated` golden samples the bundle stores: at most `max`, and no more
/// than fit in `max_bytes` of golden payload (inputs and outputs, decompressed) — but always
/// at least one, so every bundle has a self-test.
pub(crate) fn stored_count(
    tensors: &[&Tensor],
    evaluated: usize,
    max: usize,
    max_bytes: u64,
) -> usize {
    let per_sample: u64 = tensors
        .iter()
        .map(|t| (t.len() / t.rows().max(1) * t.dtype().size()) as u64)
        .sum();
    let fit = max_bytes.checked_div(per_sample).unwrap_or(u64::MAX);
    let fit = usize::try_from(fit).unwrap_or(usize::MAX);
    evaluated.min(max).min(fit.max(1))
}

/// The `golden.bin` bytes and its manifest description for the first `count` samples.
pub(crate) fn golden_payload(
    input_specs: &[TensorSpec],
    inputs: &[Tensor],
    output_specs: &[TensorSpec],
    outputs: &[Tensor],
    count: usize,
    atol: f32,
    rtol: f32,
) -> (Vec<u8>, Golden) {
    let mut bytes = Vec::new();
    let mut describe = |specs: &[TensorSpec], tensors: &[Tensor]| -> Vec<GoldenTensor> {
        specs
            .iter()
            .zip(tensors)
            .map(|(spec, t)| {
                let part = t.slice_rows(0, count);
                bytes.extend_from_slice(&part.to_le_bytes());
                GoldenTensor {
                    name: spec.name.clone(),
                    dtype: part.dtype(),
                    shape: part.shape,
                }
            })
            .collect()
    };
    let golden_inputs = describe(input_specs, inputs);
    let golden_outputs = describe(output_specs, outputs);
    let golden = Golden {
        file: crate::GOLDEN_FILE.into(),
        count,
        inputs: golden_inputs,
        outputs: golden_outputs,
        atol,
        rtol,
        f16_compute: None,
    };
    (bytes, golden)
}

/// Splits a decompressed `golden.bin` back into its input and output tensors, checking that the
/// byte count matches the manifest's description exactly.
pub fn decode_golden(golden: &Golden, bytes: &[u8]) -> Option<(Vec<Tensor>, Vec<Tensor>)> {
    engine::tensor::golden_tensors(golden, bytes).ok()
}
