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
//! Where that product's output is channels-last (after the layout pass) or small,
//! [`crate::direct_conv`] later replaces the copy and the product with one op that reads the
//! padded plane ([`PaddedPlane`]) in place.
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
    #[cfg(test)]
    pub(crate) fn new(window: Window2d) -> EngineIm2col {
        EngineIm2col { window }
    }

    pub(crate) fn window(&self) -> &Window2d {
        &self.window
    }

    fn rows(&self) -> usize {
        self.window.c * self.window.kh * self.window.kw
    }

    fn columns(&self) -> usize {
        self.window.oh * self.window.ow
    }

    pub(crate) fn output_shape<D: From<usize>>(&self, n: D) -> TVec<D> {
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

/// One input channel's plane, zero-padded, as the column-matrix copy and
/// [`crate::direct_conv`] read taps from it: `rows` rows of `row_len` values, every row and
/// column any tap reads. With a column stride `sw` > 1 (and no column dilation) each row is
/// stored by column phase (`phases` = `sw`: phase `p` holds padded columns `p`, `p + sw`, ...,
/// from `p * phase_len`; as `depthwise` does), so the points of an output row that one tap reads
/// are a contiguous run of the plane, as they are with stride 1 (`phases` = 1). Copied whole, a
/// tap's run is one move instead of a point-by-point gather (`mobilenetish`'s 224x224 stride-2
/// first layer: 202 → 144 µs, the column-matrix copy alone, min of 100; BENCHMARKS.md,
/// session 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PaddedPlane {
    rows: usize,
    phases: usize,
    phase_len: usize,
    pub row_len: usize,
    /// The input rows and columns that land in the plane.
    rows_in: usize,
    cols_in: usize,
}

impl PaddedPlane {
    pub(crate) fn of(win: &Window2d) -> PaddedPlane {
        let (sh, sw) = win.stride;
        let (dh, dw) = win.dilation;
        let rows = (win.oh - 1) * sh + (win.kh - 1) * dh + 1;
        let pw = (win.ow - 1) * sw + (win.kw - 1) * dw + 1;
        let phases = if sw > 1 && dw == 1 { sw } else { 1 };
        let phase_len = pw.div_ceil(phases);
        PaddedPlane {
            rows,
            phases,
            phase_len,
            row_len: phase_len * phases,
            rows_in: win.h.min(rows.saturating_sub(win.pad_top)),
            cols_in: win.w.min(pw.saturating_sub(win.pad_left)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows * self.row_len
    }

    /// Whether the points of an output row are consecutive values of the plane for every tap:
    /// stored by phase, or a column stride of 1.
    pub(crate) fn runs_are_contiguous(&self, win: &Window2d) -> bool {
        self.phases > 1 || win.stride.1 == 1
    }

    /// Where tap `(ky, kx)` of output point `(oy, 0)` is in the plane.
    pub(crate) fn tap_at(&self, win: &Window2d, oy: usize, ky: usize, kx: usize) -> usize {
        let px = kx * win.dilation.1;
        (oy * win.stride.0 + ky * win.dilation.0) * self.row_len
            + (px % self.phases) * self.phase_len
            + px / self.phases
    }

    /// Writes every value of `plane` (at least [`PaddedPlane::len`]): the input plane
    /// `channel` (`h x w`) where it lands, zero elsewhere.
    pub(crate) fn fill(
        &self,
        win: &Window2d,
        channel: &[f32],
        plane: &mut [f32],
        avx2: Option<Avx2>,
    ) {
        let (row_len, pad_left) = (self.row_len, win.pad_left);
        let plane = &mut plane[..self.len()];
        let (top, rest) = plane.split_at_mut(win.pad_top.min(self.rows) * row_len);
        top.fill(0.0);
        let (inside, bottom) = rest.split_at_mut(self.rows_in * row_len);
        bottom.fill(0.0);
        for (y, row) in inside.chunks_exact_mut(row_len).enumerate() {
            let src = &channel[y * win.w..][..self.cols_in];
            // The padding one value at a time: a few per row, where `fill` calls `memset`.
            let pads = (0..pad_left).chain(pad_left + src.len()..row_len);
            if self.phases == 1 {
                copy_short(&mut row[pad_left..pad_left + src.len()], src);
                for px in pads {
                    row[px] = 0.0;
                }
            } else {
                split_by_phase(src, row, self.phase_len, self.phases, pad_left, avx2);
                for px in pads {
                    row[(px % self.phases) * self.phase_len + px / self.phases] = 0.0;
                }
            }
        }
    }
}

/// Writes the column matrix of every image of `x` into `out` (every element written): each
/// channel plane is first copied into a [`PaddedPlane`], from which every tap's row of the
/// column matrix is `oh` runs of `ow` points (or, with a column stride and dilation, every
/// `stride_w`-th point).
pub(crate) fn im2col(win: &Window2d, x: &[f32], out: &mut [f32]) {
    let padded = PaddedPlane::of(win);
    let contiguous = padded.runs_are_contiguous(win);
    let mut plane = vec![0f32; padded.len()];
    let mut rows = out.chunks_exact_mut(win.oh * win.ow);
    let avx2 = Avx2::detect();
    for channel in x.chunks_exact(win.h * win.w) {
        padded.fill(win, channel, &mut plane, avx2);
        for ky in 0..win.kh {
            for kx in 0..win.kw {
                let row = rows.next().expect("output sized for every tap");
                for (oy, to) in row.chunks_exact_mut(win.ow).enumerate() {
                    let from = &plane[padded.tap_at(win, oy, ky, kx)..];
                    if contiguous {
                        copy_short(to, &from[..win.ow]);
                    } else {
                        for (o, v) in to.iter_mut().zip(from.iter().step_by(win.stride.1)) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// `to.copy_from_slice(from)`, where the rows of small feature maps are short: blocks of eight
/// and four as fixed-size moves, inline, where `copy_from_slice` calls `memcpy` for every row (a
/// call costs more than moving a 4-point row); long rows by `copy_from_slice`.
#[inline(always)]
pub(crate) fn copy_short(to: &mut [f32], from: &[f32]) {
    let n = to.len();
    let from = &from[..n];
    if n >= 32 {
        return to.copy_from_slice(from);
    }
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
