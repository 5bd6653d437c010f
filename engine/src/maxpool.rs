//! A 2-D max pool for channels-first f32 inputs, and the pass that puts it in place of tract's.
//!
//! tract 0.23.9 runs a 2x2 stride-2 NCHW max pool (the classic downsampling, `digits_cnn`'s)
//! through a per-output-point loop that bounds-checks every tap: 10 µs, 40 % of a `digits_cnn`
//! inference, for 512 outputs (BENCHMARKS.md, "Engine latency (batch 1)"). This op takes, for
//! each output row, the maximum down the input rows of its window for every column (one
//! contiguous pass per input row, which the compiler vectorises), then across the columns of
//! each output point's window ([`Window2d::row_windows`], [`Window2d::column_windows`]: the
//! in-bounds parts of the windows, so no tap is bounds-checked). Padding is
//! skipped, as ONNX and tract define it; a NaN is never picked (as in tract), so the outputs are
//! the same values tract computes, exactly.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::cnn::MaxPool;

use crate::window::Window2d;

/// Max pool over a [`Window2d`], without the index output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EngineMaxPool {
    window: Window2d,
}

impl Op for EngineMaxPool {
    fn name(&self) -> StaticName {
        "EngineMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.window)])
    }

    op_as_typed_op!();
}

impl EvalOp for EngineMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let win = &self.window;
        let n = win.batch(x.shape());
        let x_ram = x.try_as_plain_ram()?;
        let xs = x_ram.as_slice::<f32>()?;
        let mut out = unsafe { Tensor::uninitialized::<f32>(&win.output_shape(n, win.c))? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            pool(win, xs, out_ram.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for EngineMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = if self.window.has_n {
            inputs[0].shape[0].clone()
        } else {
            1.into()
        };
        Ok(tvec!(f32::fact(self.window.output_shape(n, self.window.c))))
    }

    as_op!();
}

/// Pools every channel plane of `x` into `out` (both whole tensors, planes back to back): for
/// each output row, the maximum down the input rows of its window first, column by column (a
/// contiguous, vectorised pass), then across each output point's columns.
fn pool(win: &Window2d, x: &[f32], out: &mut [f32]) {
    if (
        win.kh,
        win.kw,
        win.stride,
        win.dilation,
        win.pad_top,
        win.pad_left,
    ) == (2, 2, (2, 2), (1, 1), 0, 0)
        && 2 * win.oh <= win.h
        && 2 * win.ow <= win.w
    {
        return pool_2x2(win, x, out);
    }
    let row_windows = win.row_windows();
    let column_windows = win.column_windows();
    let (dh, dw) = (win.dilation.0, win.dilation.1);
    let mut column_max = vec![f32::MIN; win.w];
    for (plane, plane_out) in x
        .chunks_exact(win.h * win.w)
        .zip(out.chunks_exact_mut(win.oh * win.ow))
    {
        for (row_out, &(from, to)) in plane_out.chunks_exact_mut(win.ow).zip(&row_windows) {
            column_max.fill(f32::MIN);
            for y in (from..to).step_by(dh) {
                for (m, &v) in column_max
                    .iter_mut()
                    .zip(&plane[y * win.w..(y + 1) * win.w])
                {
                    *m = max(*m, v);
                }
            }
            for (o, &(from, to)) in row_out.iter_mut().zip(&column_windows) {
                let taps = &column_max[from..to];
                *o = if dw == 1 {
                    taps.iter().fold(f32::MIN, |m, &v| max(m, v))
                } else {
                    taps.iter().step_by(dw).fold(f32::MIN, |m, &v| max(m, v))
                };
            }
        }
    }
}

/// The classic 2x2 stride-2 pool without padding (`digits_cnn`'s), every window inside the
/// input: each output point the maximum of its four taps, as [`pool`] computes it (from
/// `f32::MIN`, a NaN never picked), without its per-row window tables. 47.7k → 14.1k
/// instructions per `digits_cnn` request (callgrind, BENCHMARKS.md session 15).
fn pool_2x2(win: &Window2d, x: &[f32], out: &mut [f32]) {
    let (w, ow) = (win.w, win.ow);
    for (plane, plane_out) in x
        .chunks_exact(win.h * w)
        .zip(out.chunks_exact_mut(win.oh * ow))
    {
        for (oy, row_out) in plane_out.chunks_exact_mut(ow).enumerate() {
            let top = &plane[2 * oy * w..][..2 * ow];
            let bottom = &plane[(2 * oy + 1) * w..][..2 * ow];
            for ((o, t), b) in row_out
                .iter_mut()
                .zip(top.chunks_exact(2))
                .zip(bottom.chunks_exact(2))
            {
                let m = max(max(f32::MIN, t[0]), b[0]);
                *o = max(max(m, t[1]), b[1]);
            }
        }
    }
}

/// The larger of `m` and `v`, `m` when `v` is NaN (tract's choice). A select, not a branch: it
/// compiles to `maxss`/`maxps`, where a branch would mispredict on every other value.
#[inline(always)]
fn max(m: f32, v: f32) -> f32 {
    if v > m {
        v
    } else {
        m
    }
}

/// Replaces every tract `MaxPool` this op can run (f32, channels-first 2-D, known channels and
/// spatial size, no index output) with [`EngineMaxPool`]. Returns how many were replaced.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(pool) = node.op_as::<MaxPool>() else {
            return Ok(None);
        };
        if pool.with_index_outputs.is_some() {
            return Ok(None);
        }
        let Some(window) = Window2d::of(&pool.pool_spec, model.outlet_fact(node.inputs[0])?) else {
            return Ok(None);
        };
        let op = EngineMaxPool { window };
        TypedModelPatch::replace_single_op(model, node, &node.inputs, op).map(Some)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowCase;

    /// Every tap bounds-checked, padding skipped.
    fn naive(win: &Window2d, n: usize, x: &[f32]) -> Vec<f32> {
        let mut out = vec![];
        for plane in x.chunks_exact(win.h * win.w).take(n * win.c) {
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let mut m = f32::MIN;
                    for ky in 0..win.kh {
                        for kx in 0..win.kw {
                            let y = (oy * win.stride.0 + ky * win.dilation.0) as isize
                                - win.pad_top as isize;
                            let xx = (ox * win.stride.1 + kx * win.dilation.1) as isize
                                - win.pad_left as isize;
                            if y >= 0 && xx >= 0 && (y as usize) < win.h && (xx as usize) < win.w {
                                m = m.max(plane[y as usize * win.w + xx as usize]);
                            }
                        }
                    }
                    out.push(m);
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_pooling() {
        // (h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow)
        let cases: [WindowCase; _] = [
            (8, 8, 2, 2, (2, 2), (1, 1), 0, 0, 4, 4),
            (7, 9, 3, 3, (2, 2), (1, 1), 1, 1, 4, 5),
            (5, 6, 2, 3, (1, 1), (1, 1), 0, 1, 4, 6),
            (9, 9, 3, 2, (3, 2), (2, 1), 1, 0, 3, 4),
            (4, 4, 2, 2, (2, 2), (1, 1), 1, 1, 3, 3),
            // The 2x2 path with an odd input (its last row and column dropped), and a NaN.
            (7, 9, 2, 2, (2, 2), (1, 1), 0, 0, 3, 4),
        ];
        for (i, &case) in cases.iter().enumerate() {
            let (n, c) = (2, 3);
            let win = Window2d::of_case(c, case);
            let (h, w, oh, ow) = (win.h, win.w, win.oh, win.ow);
            let mut x: Vec<f32> = (0..n * c * h * w)
                .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            x[w + 1] = f32::NAN;
            let mut out = vec![0.0; n * c * oh * ow];
            pool(&win, &x, &mut out);
            let want = naive(&win, n, &x);
            assert!(
                out.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "case {i}: {out:?} vs {want:?}"
            );
        }
    }
}
