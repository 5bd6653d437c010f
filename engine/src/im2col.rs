//! Convolutions as a plain im2col copy followed by tract's matrix product, and the pass that
//! rewrites tract's `Conv` into that form.
//!
//! tract 0.23.9 lowers a small-batch convolution with a 3x3 kernel to an explicit `Pad` (a
//! generic n-dimensional copy through ndarray) and a "lazy" im2col whose matrix product gathers
//! its operand through an offset table panel by panel; its eager `Im2col` writes the packed
//! operand one element at a time. On `digits_cnn` the two `Pad`s and the gathers cost more than
//! the arithmetic (BENCHMARKS.md, "Engine latency (batch 1)"). Here a convolution becomes:
//!
//! ```text
//! x [N, C, H, W] ─ EngineIm2col ─ [N, C·kh·kw, oh·ow] ─ EinSum with the kernel [M, C·kh·kw]
//!   ─ [N, M, oh·ow] ─ + bias [1, M, 1] ─ reshape ─ [N, M, oh, ow]
//! ```
//!
//! `EngineIm2col` copies each channel plane into a small zero-padded scratch plane, then each
//! kernel tap's row of the column matrix out of it, `ow` points per output row (inline moves,
//! not a `memcpy` call per row: the rows of small feature maps are 4 or 8 points). The rest is
//! tract's own: the `EinSum` with a constant kernel becomes its optimised matrix product (the
//! kernel packed once at load, the column matrix packed per call by its packing kernel), with
//! the bias addition fused into it. The sums are tract's matrix-product kernels over the same
//! products, so outputs differ from tract's own convolution by float rounding only.
//!
//! Where the engine's AVX2 matrix product runs (`pointwise::fast_kernel`), the `EinSum`, bias
//! and reshape are instead one [`crate::pointwise::Pointwise`] op reading the column matrix in
//! place, bias and output shape in it (so the ReLU after it fuses too).
//!
//! Pointwise convolutions (1x1 kernel, stride 1, no padding) are left to [`crate::pointwise`]
//! (or tract), which run them as a plain matrix product; so are grouped ones (depthwise:
//! `depthwise`) and large ones ([`MAX_COLUMN_MATRIX`]).

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_nnef::tract_core::ops::einsum::EinSum;

use crate::window::{split_by_phase, Avx2, Window2d};

/// The column matrix of a convolution window: one row per input channel and kernel tap (in the
/// kernel's OIHW order), one column per output point.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EngineIm2col {
    window: Window2d,
}

impl EngineIm2col {
    fn rows(&self) -> usize {
        self.window.c * self.window.kh * self.window.kw
    }

    fn columns(&self) -> usize {
        self.window.oh * self.window.ow
    }

    fn output_shape<D: From<usize>>(&self, n: D) -> TVec<D> {
        let mut shape: TVec<D> = tvec![self.rows().into(), self.columns().into()];
        if self.window.has_n {
            shape.insert(0, n);
        }
        shape
    }
}

impl Op for EngineIm2col {
    fn name(&self) -> StaticName {
        "EngineIm2col".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.window)])
    }

    op_as_typed_op!();
}

impl EvalOp for EngineIm2col {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let n = self.window.batch(x.shape());
        let x_ram = x.try_as_plain_ram()?;
        let xs = x_ram.as_slice::<f32>()?;
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape(n))? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            im2col(&self.window, xs, out_ram.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for EngineIm2col {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = if self.window.has_n {
            inputs[0].shape[0].clone()
        } else {
            1.into()
        };
        Ok(tvec!(f32::fact(self.output_shape(n))))
    }

    as_op!();
}

/// The padded plane both column-matrix copies read taps from: `ph` x `pw`, every row and
/// column any tap reads; `rows_in` x `cols_in` of an input plane land in it; `plane` values per
/// input plane, `columns` per column-matrix row.
struct Padded {
    ph: usize,
    pw: usize,
    rows_in: usize,
    cols_in: usize,
    plane: usize,
    columns: usize,
}

impl Padded {
    fn of(win: &Window2d) -> Padded {
        let (sh, sw) = win.stride;
        let (dh, dw) = win.dilation;
        let ph = (win.oh - 1) * sh + (win.kh - 1) * dh + 1;
        let pw = (win.ow - 1) * sw + (win.kw - 1) * dw + 1;
        Padded {
            ph,
            pw,
            rows_in: win.h.min(ph.saturating_sub(win.pad_top)),
            cols_in: win.w.min(pw.saturating_sub(win.pad_left)),
            plane: win.h * win.w,
            columns: win.oh * win.ow,
        }
    }
}

/// Writes the column matrix of every image of `x` into `out` (every element written): each
/// channel plane is first copied into a zero-padded plane, from which every tap's row of the
/// column matrix is `oh` slices of `ow` points (every `stride_w`-th point).
fn im2col(win: &Window2d, x: &[f32], out: &mut [f32]) {
    let (sh, sw) = win.stride;
    let (dh, dw) = win.dilation;
    if sw > 1 && dw == 1 {
        return im2col_by_phase(win, x, out);
    }
    let Padded {
        ph,
        pw,
        rows_in,
        cols_in,
        plane,
        columns,
    } = Padded::of(win);
    let mut padded = vec![0f32; ph * pw];
    let mut rows = out.chunks_exact_mut(columns);
    for channel in x.chunks_exact(plane) {
        for y in 0..rows_in {
            let at = (y + win.pad_top) * pw + win.pad_left;
            padded[at..at + cols_in].copy_from_slice(&channel[y * win.w..][..cols_in]);
        }
        for ky in 0..win.kh {
            for kx in 0..win.kw {
                let row = rows.next().expect("output sized for every tap");
                for (oy, to) in row.chunks_exact_mut(win.ow).enumerate() {
                    let from = &padded[(oy * sh + ky * dh) * pw + kx * dw..];
                    if sw == 1 {
                        copy_short(to, &from[..win.ow]);
                    } else {
                        for (o, v) in to.iter_mut().zip(from.iter().step_by(sw)) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] for a column stride `sw` > 1 (no column dilation): the padded plane is stored by
/// column phase (phase `p` holds padded columns `p`, `p + sw`, ...; as `depthwise` does), so a
/// tap's output row is a contiguous run of `ow` points in it, copied whole instead of point by
/// point (`mobilenetish`'s 224x224 stride-2 first layer: 202 → 144 µs, the copy alone, min of 100;
/// BENCHMARKS.md, session 15).
fn im2col_by_phase(win: &Window2d, x: &[f32], out: &mut [f32]) {
    let (sh, sw) = win.stride;
    let dh = win.dilation.0;
    let Padded {
        ph,
        pw,
        rows_in,
        cols_in,
        plane,
        columns,
    } = Padded::of(win);
    let phase_len = pw.div_ceil(sw);
    let row_len = phase_len * sw;
    let mut padded = vec![0f32; ph * row_len];
    let mut rows = out.chunks_exact_mut(columns);
    let avx2 = Avx2::detect();
    for channel in x.chunks_exact(plane) {
        for y in 0..rows_in {
            let row = &mut padded[(y + win.pad_top) * row_len..][..row_len];
            let src = &channel[y * win.w..][..cols_in];
            split_by_phase(src, row, phase_len, sw, win.pad_left, avx2);
        }
        for ky in 0..win.kh {
            for kx in 0..win.kw {
                let row = rows.next().expect("output sized for every tap");
                let start = ky * dh * row_len + (kx % sw) * phase_len + kx / sw;
                for (oy, to) in row.chunks_exact_mut(win.ow).enumerate() {
                    to.copy_from_slice(&padded[start + oy * sh * row_len..][..win.ow]);
                }
            }
        }
    }
}

/// `to.copy_from_slice(from)` for the short rows of small feature maps: blocks of eight and
/// four as fixed-size moves, inline, where `copy_from_slice` calls `memcpy` for every row (a
/// call costs more than moving a 4-point row).
#[inline(always)]
fn copy_short(to: &mut [f32], from: &[f32]) {
    let n = to.len();
    let from = &from[..n];
    let mut i = 0;
    while i + 8 <= n {
        let t: &mut [f32; 8] = (&mut to[i..i + 8]).try_into().unwrap();
        *t = from[i..i + 8].try_into().unwrap();
        i += 8;
    }
    if i + 4 <= n {
        let t: &mut [f32; 4] = (&mut to[i..i + 4]).try_into().unwrap();
        *t = from[i..i + 4].try_into().unwrap();
        i += 4;
    }
    while i < n {
        to[i] = from[i];
        i += 1;
    }
}

/// Largest column matrix (elements) the rewrite builds for tract's matrix product (where the
/// engine's does not run: [`MAX_COLUMN_MATRIX_FAST`] otherwise): 256 KiB, which stays in cache
/// between the copy and the packing. Above it tract's lazy im2col, which packs from the (padded) input
/// directly, keeps two large buffers out of the agent's memory (the column matrix and its packed
/// copy: 1.35 MB each for `mobilenetish`'s 224x224 first layer), for about the same time there
/// (1.9 ms rewritten, 2.0-2.3 ms as tract runs it, dev build, `engine_profile`).
const MAX_COLUMN_MATRIX: usize = 1 << 16;

/// The same limit where the engine's matrix product takes the product
/// (`pointwise::fast_kernel`): it reads the column matrix in place (no packed copy) and fuses
/// the bias and clamp, so even `mobilenetish`'s 224x224 first layer (1.35 MB of column matrix)
/// is faster rewritten than as tract's lazy im2col + `Pad` + clip (BENCHMARKS.md, "Engine
/// latency (batch 1)", session 15). 16 MiB.
const MAX_COLUMN_MATRIX_FAST: usize = 1 << 22;

/// Rewrites every tract `Conv` this form applies to (f32, channels-first 2-D, one group,
/// constant OIHW kernel and bias, known channels and spatial size, not pointwise, column matrix
/// at most [`MAX_COLUMN_MATRIX`]) as
/// [`EngineIm2col`] + `EinSum` + bias + reshape. Returns how many were rewritten.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let Some((window, kernel, bias)) = candidate(model, node, conv)? else {
            return Ok(None);
        };
        rewrite(model, node, window, kernel, bias).map(Some)
    })
}

/// The window, kernel `[M, K]` and bias (`[M]`, or `None` when all zero) of a convolution the
/// rewrite takes.
fn candidate(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> TractResult<Option<(Window2d, Tensor, Option<Tensor>)>> {
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let Some(window) = Window2d::of(&conv.pool_spec, model.outlet_fact(node.inputs[0])?) else {
        return Ok(None);
    };
    let pointwise = window.kh * window.kw == 1
        && window.stride == (1, 1)
        && window.oh == window.h
        && window.ow == window.w;
    let m = conv.pool_spec.output_channels;
    let (kernel_fact, bias_fact) = (
        model.outlet_fact(node.inputs[1])?,
        model.outlet_fact(node.inputs[2])?,
    );
    let (Some(kernel), Some(bias)) = (&kernel_fact.konst, &bias_fact.konst) else {
        return Ok(None);
    };
    let column_matrix = window.c * window.kh * window.kw * window.oh * window.ow;
    if pointwise
        || column_matrix
            > if crate::pointwise::fast_kernel() {
                MAX_COLUMN_MATRIX_FAST
            } else {
                MAX_COLUMN_MATRIX
            }
        || window.c != conv.pool_spec.input_channels
        || kernel.datum_type() != f32::datum_type()
        || bias.datum_type() != f32::datum_type()
        || kernel.shape() != [m, window.c, window.kh, window.kw]
        || !(bias.len() == 1 || bias.len() == m)
    {
        return Ok(None);
    }
    let kernel = kernel
        .clone()
        .into_tensor()
        .into_shape(&[m, window.c * window.kh * window.kw])?;
    let bias_values = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = if bias_values.iter().all(|b| *b == 0.0) {
        None
    } else {
        let per_channel: Vec<f32> = (0..m)
            .map(|o| bias_values[if bias_values.len() == 1 { 0 } else { o }])
            .collect();
        let shape: &[usize] = if window.has_n { &[1, m, 1] } else { &[m, 1] };
        Some(Tensor::from_shape(shape, &per_channel)?)
    };
    Ok(Some((window, kernel, bias)))
}

fn rewrite(
    model: &TypedModel,
    node: &TypedNode,
    window: Window2d,
    kernel: Tensor,
    bias: Option<Tensor>,
) -> TractResult<TypedModelPatch> {
    let name = &node.name;
    let mut patch = TypedModelPatch::new(format!("engine im2col {name}"));
    let x = patch.tap_model(model, node.inputs[0])?;
    let has_n = window.has_n;
    let (oh, ow) = (window.oh, window.ow);
    let columns = patch.wire_node(
        format!("{name}.engine_im2col"),
        EngineIm2col { window },
        &[x],
    )?;
    if crate::pointwise::fast_kernel() {
        // The engine's matrix product reads the column matrix in place, bias and shape in it.
        let (m, k) = (kernel.shape()[0], kernel.shape()[1]);
        let op = crate::pointwise::Pointwise {
            m,
            k,
            k_axis: if has_n { 1 } else { 0 },
            keep_batch: true,
            spatial: tvec![oh, ow],
            out_spatial: tvec![oh, ow],
            layout: crate::pointwise::Layout::ChannelsFirst,
            clamp: crate::depthwise::Clamp::NONE,
            residual: false,
        };
        let weights = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let bias = match bias {
            Some(b) => Some(b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()),
            None => None,
        };
        let wire = crate::pointwise::wire(&mut patch, name, op, columns[0], &weights, bias)?;
        patch.shunt_outside(model, node.id.into(), wire)?;
        patch.obliterate(node.id)?;
        return Ok(patch);
    }
    let kernel = patch.add_const(format!("{name}.engine_kernel"), kernel)?;
    let axes = if has_n { "mk,nkp->nmp" } else { "mk,kp->mp" };
    let mut wire = patch.wire_node(
        format!("{name}.engine_matmul"),
        EinSum::new(axes.parse()?, f32::datum_type()),
        &[kernel, columns[0]],
    )?;
    if let Some(bias) = bias {
        let bias = patch.add_const(format!("{name}.engine_bias"), bias)?;
        wire = patch.wire_node(
            format!("{name}.engine_add_bias"),
            tract_nnef::tract_core::ops::math::add(),
            &[wire[0], bias],
        )?;
    }
    let spatial_axis = if has_n { 2 } else { 1 };
    wire = patch.wire_node(
        format!("{name}.engine_reshape"),
        AxisOp::Reshape(
            spatial_axis,
            tvec![(oh * ow).to_dim()],
            tvec![oh.to_dim(), ow.to_dim()],
        ),
        &wire,
    )?;
    patch.shunt_outside(model, node.id.into(), wire[0])?;
    patch.obliterate(node.id)?;
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowCase;

    /// Every element computed on its own, zero in the padding.
    fn naive(win: &Window2d, n: usize, x: &[f32]) -> Vec<f32> {
        let mut out = vec![];
        for image in x.chunks_exact(win.c * win.h * win.w).take(n) {
            for c in 0..win.c {
                for ky in 0..win.kh {
                    for kx in 0..win.kw {
                        for oy in 0..win.oh {
                            for ox in 0..win.ow {
                                let y = (oy * win.stride.0 + ky * win.dilation.0) as isize
                                    - win.pad_top as isize;
                                let xx = (ox * win.stride.1 + kx * win.dilation.1) as isize
                                    - win.pad_left as isize;
                                let inside = y >= 0
                                    && xx >= 0
                                    && (y as usize) < win.h
                                    && (xx as usize) < win.w;
                                out.push(if inside {
                                    image[(c * win.h + y as usize) * win.w + xx as usize]
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_column_matrix() {
        // (h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow)
        let cases: [WindowCase; _] = [
            (8, 8, 3, 3, (1, 1), (1, 1), 1, 1, 8, 8),
            (4, 4, 3, 3, (1, 1), (1, 1), 1, 1, 4, 4),
            (9, 7, 3, 3, (2, 2), (1, 1), 1, 1, 5, 4),
            (10, 11, 5, 5, (2, 1), (1, 1), 2, 1, 5, 11),
            (9, 9, 3, 3, (1, 2), (2, 2), 2, 0, 9, 3),
            (6, 6, 1, 1, (2, 2), (1, 1), 0, 0, 3, 3),
            (3, 3, 3, 3, (1, 1), (1, 1), 2, 2, 5, 5),
            // By column phase: stride 2 and 3 with padding, mobilenetish's first layer's form.
            (12, 13, 3, 3, (2, 2), (1, 1), 1, 1, 6, 7),
            (11, 14, 3, 4, (1, 3), (1, 1), 0, 2, 9, 5),
            (10, 10, 3, 3, (2, 2), (1, 1), 0, 0, 4, 4),
        ];
        for (i, &case) in cases.iter().enumerate() {
            let (n, c) = (2, 3);
            let win = Window2d::of_case(c, case);
            let (h, w, kh, kw, oh, ow) = (win.h, win.w, win.kh, win.kw, win.oh, win.ow);
            let x: Vec<f32> = (0..n * c * h * w).map(|v| v as f32 + 1.0).collect();
            let mut out = vec![f32::NAN; n * c * kh * kw * oh * ow];
            im2col(&win, &x, &mut out);
            assert_eq!(out, naive(&win, n, &x), "case {i}");
        }
    }
}
