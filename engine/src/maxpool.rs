//! A 2-D max pool for channels-first f32 inputs, and the pass that puts it in place of tract's.
//!
//! tract 0.23.9 runs a 2x2 stride-2 NCHW max pool (the classic downsampling, `digits_cnn`'s)
//! through a per-output-point loop that bounds-checks every tap: 10 µs, 40 % of a `digits_cnn`
//! inference, for 512 outputs (BENCHMARKS.md, "Engine latency (batch 1)"). This op walks one
//! output row per input row and kernel tap over the columns where the tap is inside the input
//! ([`Window2d::tap_columns`]), so its inner loop is a plain compare over a row. Padding is
//! skipped, as ONNX and tract define it; a NaN is never picked (tract's comparison), so the
//! outputs are the same values tract computes, exactly.

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

/// Pools every channel plane of `x` into `out` (both whole tensors, planes back to back).
fn pool(win: &Window2d, x: &[f32], out: &mut [f32]) {
    out.fill(f32::MIN);
    let tap_rows = win.tap_rows();
    let tap_columns: TVec<_> = win
        .tap_columns()
        .into_iter()
        .filter(|s| s.lo < s.hi)
        .collect();
    let sw = win.stride.1;
    let plane_in = win.h * win.w;
    let plane_out = win.oh * win.ow;
    for (xin, xout) in x
        .chunks_exact(plane_in)
        .zip(out.chunks_exact_mut(plane_out))
    {
        for in_rows in &tap_rows {
            for &(oy, y) in in_rows {
                let row_out = &mut xout[oy * win.ow..(oy + 1) * win.ow];
                let row_in = &xin[y * win.w..(y + 1) * win.w];
                for span in &tap_columns {
                    let taps = &row_in[span.first_input..];
                    for (j, o) in row_out[span.lo..span.hi].iter_mut().enumerate() {
                        let v = taps[j * sw];
                        if v > *o {
                            *o = v;
                        }
                    }
                }
            }
        }
    }
}

/// Replaces every tract `MaxPool` this op can run (f32, channels-first 2-D, known channels and
/// spatial size, no index output) with [`EngineMaxPool`]. Returns how many were replaced.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else {
            continue;
        };
        if pool.with_index_outputs.is_some() {
            continue;
        }
        let Some(window) = Window2d::of(&pool.pool_spec, model.outlet_fact(node.inputs[0])?) else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(
            model,
            node,
            &node.inputs,
            EngineMaxPool { window },
        )?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cases = [
            (8, 8, 2, 2, (2, 2), (1, 1), 0, 0, 4, 4),
            (7, 9, 3, 3, (2, 2), (1, 1), 1, 1, 4, 5),
            (5, 6, 2, 3, (1, 1), (1, 1), 0, 1, 4, 6),
            (9, 9, 3, 2, (3, 2), (2, 1), 1, 0, 3, 4),
            (4, 4, 2, 2, (2, 2), (1, 1), 1, 1, 3, 3),
        ];
        for (i, &(h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow)) in
            cases.iter().enumerate()
        {
            let (n, c) = (2, 3);
            let win = Window2d {
                has_n: true,
                c,
                h,
                w,
                kh,
                kw,
                stride,
                dilation,
                pad_top,
                pad_left,
                oh,
                ow,
            };
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut out = vec![0.0; n * c * oh * ow];
            pool(&win, &x, &mut out);
            assert_eq!(out, naive(&win, n, &x), "case {i}");
        }
    }
}
