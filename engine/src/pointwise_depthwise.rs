//! A pointwise convolution and the depthwise convolution after it, run band by band so the
//! wide activation between them never leaves the cache.
//!
//! In an inverted-residual block the pointwise layer expands the channels (16 to 96 on
//! `mobilenetish`'s first block) and the depthwise layer reads the result once. On a 112x112
//! plane that activation is 4.8 MB: the product writes it out to memory and the depthwise
//! convolution reads it back, and on a CPU whose L2 holds 512 KiB both layers wait on memory
//! (BENCHMARKS.md, session 18: on an AMD EPYC the two layers took 1.3–1.7× their
//! channels-first time, and fused 0.5× their unfused channels-last time). Here
//! the product computes only the rows of the activation that a band of the depthwise layer's
//! output rows reads, into a scratch buffer of about [`BAND_BYTES`], and the depthwise kernel
//! runs on the band at once. The rows two bands share (a 3x3 window's overlap) are moved to
//! the front of the buffer rather than computed twice, so every row is computed once.
//!
//! Both layouts: channels-last a band is one block of rows of points by channels
//! ([`run_channels_last`]); channels-first each channel's rows of the band lie in a slot of the
//! buffer, the product writes them with its rows a slot apart
//! ([`crate::pointwise::gemm_channels_first`]) and the depthwise kernel reads its planes a
//! slot apart ([`crate::depthwise::run_planes`]) ([`run_channels_first`]).
//!
//! The sums are those of the two ops run apart: each point's product is a sum over its own
//! input channels, whatever rows are computed with it, and the depthwise kernel sees a band as
//! a plane whose top padding is the rows above it ([`band_op`]). The pass ([`install`]) fuses
//! a [`Pointwise`] into the [`DepthwiseConv`] it feeds when both are in the same layout
//! (channels-last or channels-first), the product feeds nothing else (directly, or through a
//! reshape of the spatial axes), and the activation between them is [`FUSE_MIN_BYTES`] or
//! more.

use std::ops::Range;

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;

use crate::depthwise::{DepthwiseConv, Planes};
use crate::pointwise::{gemm, gemm_channels_first, packed_len, Kernel, Layout, Pointwise};

/// The scratch rows of one band: a band holds as many activation rows as fit here (at least
/// the kernel's height). Half of a 512 KiB L2.
pub(crate) const BAND_BYTES: usize = 256 * 1024;

/// The smallest activation between the two ops that is worth fusing: twice a 512 KiB L2.
/// Smaller ones stay mostly in L2 between the two layers anyway; on `mobilenetish` fusing the
/// 451–602 KB ones (28x28 and 14x14 planes) measured no faster (BENCHMARKS.md, session 18),
/// the 1.8 and 4.8 MB ones (56x56 and 112x112) faster.
pub(crate) const FUSE_MIN_BYTES: usize = 1024 * 1024;

thread_local! {
    /// The band buffer, kept between calls (allocating 256 KiB on every call would map and
    /// fault in fresh pages each time).
    static BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `depthwise(pointwise(x))`: inputs `x` (the pointwise op's), its packed weights and bias,
/// then the depthwise kernel (`[kh, kw, C]`) and bias; output the depthwise op's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PointwiseDepthwise {
    pub pointwise: Pointwise,
    pub depthwise: DepthwiseConv,
}

/// The depthwise op over the activation rows `ya..yb` of a plane, computing output rows
/// `oa..ob`: the rows above `ya` become padding (none of them are read: `ya` is the first row
/// the output rows' windows read, or 0).
pub(crate) fn band_op(
    dw: &DepthwiseConv,
    ya: usize,
    yb: usize,
    oa: usize,
    ob: usize,
) -> DepthwiseConv {
    DepthwiseConv {
        h: yb - ya,
        oh: ob - oa,
        pad_top: dw.pad_top + ya - oa * dw.stride.0,
        has_n: false,
        ..dw.clone()
    }
}

/// Runs both ops on one batch element in the ops' layout ([`run_channels_last`],
/// [`run_channels_first`]), by bands of at most `rows` activation rows (at least the kernel's
/// height) in `buffer`.
#[allow(clippy::too_many_arguments)]
fn run(
    op: &PointwiseDepthwise,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dk: &[f32],
    db: &[f32],
    rows: usize,
    buffer: &mut Vec<f32>,
    out: &mut [f32],
) {
    if op.depthwise.channels_last {
        run_channels_last(op, x, w, b, dk, db, rows, buffer, out)
    } else {
        run_channels_first(op, x, w, b, dk, db, rows, buffer, out)
    }
}

/// One band of [`bands`].
struct Band {
    /// The depthwise op's output rows.
    out: Range<usize>,
    /// The activation rows they read (those in the padding left out).
    rows: Range<usize>,
    /// Where the rows the band before also held are among its rows (from its first): moved to
    /// the front of the buffer, not computed again. Empty for the first band.
    moved: Range<usize>,
}

impl Band {
    /// The activation rows the product computes for the band: those not moved.
    fn new_rows(&self) -> Range<usize> {
        self.rows.start + self.moved.len()..self.rows.end
    }
}

/// The bands of at most `rows` activation rows (at least the kernel's height) over `dw`'s
/// output, and the most rows a band holds.
fn bands(dw: &DepthwiseConv, rows: usize) -> (usize, impl Iterator<Item = Band> + '_) {
    let (sh, rows) = (dw.stride.0, rows.max(dw.kh));
    let out_rows = ((rows - dw.kh) / sh + 1).min(dw.oh);
    let mut held = 0..0;
    let bands = (0..dw.oh).step_by(out_rows).map(move |oa| {
        let ob = dw.oh.min(oa + out_rows);
        let ya = (oa * sh).saturating_sub(dw.pad_top);
        let yb = dw.h.min((ob - 1) * sh + dw.kh - dw.pad_top);
        let kept = ya.max(held.start)..held.end.max(ya);
        let moved = kept.start - held.start..kept.end - held.start;
        held = ya..yb;
        Band {
            out: oa..ob,
            rows: ya..yb,
            moved,
        }
    });
    ((out_rows - 1) * sh + dw.kh, bands)
}

/// Channels-first, on one batch element: `x` `[k, h·w]`, `out` `[c, oh·ow]`. `buffer` holds
/// each channel's rows of the band in a slot of the most rows a band has; the rows two bands
/// share move to the front of each slot.
#[allow(clippy::too_many_arguments)]
fn run_channels_first(
    op: &PointwiseDepthwise,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dk: &[f32],
    db: &[f32],
    rows: usize,
    buffer: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (pw, dw) = (&op.pointwise, &op.depthwise);
    let (most, bands) = bands(dw, rows);
    let slot = most * dw.w;
    if buffer.len() < dw.c * slot {
        buffer.resize(dw.c * slot, 0.0);
    }
    let buffer = &mut buffer[..dw.c * slot];
    let planes = Planes {
        input: slot,
        output: dw.oh * dw.ow,
    };
    for band in bands {
        let Range { start: ya, end: yb } = band.rows.clone();
        if !band.moved.is_empty() {
            let from = band.moved.start * dw.w..band.moved.end * dw.w;
            for channel in buffer.chunks_exact_mut(slot) {
                channel.copy_within(from.clone(), 0);
            }
        }
        let new = band.new_rows();
        if !new.is_empty() {
            gemm_channels_first(
                pw.m,
                pw.k,
                new.len() * dw.w,
                dw.h * dw.w,
                slot,
                w,
                &x[new.start * dw.w..],
                b,
                pw.clamp,
                None,
                &mut buffer[(new.start - ya) * dw.w..],
                Kernel::best(),
            );
        }
        let sub = band_op(dw, ya, yb, band.out.start, band.out.end);
        let out = &mut out[band.out.start * dw.ow..];
        crate::depthwise::run_planes(&sub, buffer, dk, db, out, planes);
    }
}

/// Channels-last, on one batch element: `x` `[h·w, k]`, `out` `[oh·ow, c]`.
#[allow(clippy::too_many_arguments)]
fn run_channels_last(
    op: &PointwiseDepthwise,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dk: &[f32],
    db: &[f32],
    rows: usize,
    buffer: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (pw, dw) = (&op.pointwise, &op.depthwise);
    let (k, c) = (pw.k, dw.c);
    let row = dw.w * c;
    let (most, bands) = bands(dw, rows);
    if buffer.len() < most * row {
        buffer.resize(most * row, 0.0);
    }
    for band in bands {
        let Range { start: ya, end: yb } = band.rows.clone();
        if !band.moved.is_empty() {
            buffer.copy_within(band.moved.start * row..band.moved.end * row, 0);
        }
        let new = band.new_rows();
        if !new.is_empty() {
            gemm(
                Layout::ChannelsLast,
                pw.m,
                k,
                new.len() * dw.w,
                w,
                &x[new.start * dw.w * k..new.end * dw.w * k],
                b,
                pw.clamp,
                None,
                &mut buffer[(new.start - ya) * row..(yb - ya) * row],
                Kernel::best(),
            );
        }
        let (oa, ob) = (band.out.start, band.out.end);
        let sub = band_op(dw, ya, yb, oa, ob);
        let out = &mut out[oa * dw.ow * c..ob * dw.ow * c];
        crate::depthwise_cl::run(&sub, &buffer[..(yb - ya) * row], dk, db, out);
    }
}

impl Op for PointwiseDepthwise {
    fn name(&self) -> StaticName {
        "EnginePointwiseDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for PointwiseDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (pw, dw) = (&self.pointwise, &self.depthwise);
        let slices = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let s = slices
            .iter()
            .map(|r| r.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        let (x, w, b, dk, db) = (s[0], s[1], s[2], s[3], s[4]);
        let plane = dw.h * dw.w;
        let n = self.depthwise.batch(inputs[0].shape());
        if x.len() != n * plane * pw.k
            || w.len() != packed_len(pw.layout, pw.m, pw.k)
            || b.len() != pw.m
            || dk.len() != dw.kh * dw.kw * dw.c
            || !(db.len() == 1 || db.len() == dw.c)
        {
            bail!("EnginePointwiseDepthwise: input sizes do not match {self:?}");
        }
        let out_shape = dw.output_shape(n);
        // Every element is written by `run`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            BAND.with_borrow_mut(|buffer| {
                let per_batch = x
                    .chunks_exact(plane * pw.k)
                    .zip(os.chunks_exact_mut(dw.oh * dw.ow * dw.c));
                let rows = BAND_BYTES / (dw.w * dw.c * 4);
                for (x, out) in per_batch {
                    run(self, x, w, b, dk, db, rows, buffer, out);
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PointwiseDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = self.depthwise.batch(&inputs[0].shape);
        Ok(tvec!(f32::fact(self.depthwise.output_shape(n))))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (pw, dw) = (&self.pointwise, &self.depthwise);
        let n = self.depthwise.batch(&inputs[0].shape);
        let fmas = pw.m * pw.k * dw.h * dw.w + dw.c * dw.oh * dw.ow * dw.kh * dw.kw;
        Ok(tvec!((Cost::FMA(f32::datum_type()), n * fmas)))
    }

    as_op!();
}

/// Fuses each [`Pointwise`] into the [`DepthwiseConv`] it alone feeds, in the same layout,
/// where the activation between them exceeds [`FUSE_MIN_BYTES`]. Returns how many.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(dw) = node.op_as::<DepthwiseConv>() else {
            return Ok(None);
        };
        // The product, or a reshape of its spatial axes in between.
        let (prev, reshape) = crate::passes::producer_through_reshape(model, node);
        let Some(pw) = prev.op_as::<Pointwise>() else {
            return Ok(None);
        };
        // The product's batch axes as the depthwise op reads them: one axis kept, or none.
        let same_batch = if dw.has_n {
            pw.keep_batch && pw.batch_rank() == 1
        } else {
            pw.batch_rank() == 0
        };
        let activation_bytes = dw.h * dw.w * dw.c * 4;
        let same_layout = match pw.layout {
            Layout::ChannelsLast => dw.channels_last,
            Layout::ChannelsFirst => !dw.channels_last,
            Layout::InChannelsLast | Layout::OutChannelsLast => false,
        };
        if !same_layout
            || dw.multiplier != 1
            || dw.pad_top >= dw.kh
            || pw.residual
            || pw.m != dw.c
            || pw.spatial.iter().product::<usize>() != dw.h * dw.w
            || !same_batch
            || activation_bytes < FUSE_MIN_BYTES
        {
            return Ok(None);
        }
        // The nodes the fused op replaces, product first.
        let path: TVec<&TypedNode> = std::iter::once(prev).chain(reshape).chain([node]).collect();
        let inputs: TVec<OutletId> = prev.inputs[..3]
            .iter()
            .chain(&node.inputs[1..3])
            .copied()
            .collect();
        let op = PointwiseDepthwise {
            pointwise: pw.clone(),
            depthwise: dw.clone(),
        };
        crate::passes::fuse_path(model, &path, &inputs, op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depthwise::Clamp;
    use crate::pointwise::pack_weights;
    use crate::testing::{values, GuardedSlice};

    /// The fused op gives the two ops' outputs to the bit, in both layouts, for bands of every
    /// height from the kernel's to the whole plane (rows kept from one band to the next, or
    /// none), strides 1 and 2, with and without padding, channel counts that are and are not
    /// whole vectors; its input ends at an inaccessible page (nothing is read past it).
    #[test]
    fn bands_give_the_two_ops_outputs_to_the_bit() {
        let cases = [
            (9, 5, 3, 16, 1, 1),
            (10, 7, 5, 12, 2, 1),
            (11, 6, 4, 24, 2, 0),
            (7, 7, 8, 40, 1, 0),
            (12, 17, 6, 9, 2, 1),
        ];
        for channels_last in [true, false] {
            for (h, w, k, c, stride, pad) in cases {
                let oh = (h + 2 * pad - 3) / stride + 1;
                let ow = (w + 2 * pad - 3) / stride + 1;
                let layout = if channels_last {
                    Layout::ChannelsLast
                } else {
                    Layout::ChannelsFirst
                };
                let pointwise = Pointwise {
                    m: c,
                    k,
                    k_axis: if channels_last { 2 } else { 0 },
                    keep_batch: false,
                    spatial: tvec![h, w],
                    out_spatial: tvec![h, w],
                    layout,
                    clamp: Clamp::new(0.0, 6.0),
                    residual: false,
                };
                let depthwise = DepthwiseConv {
                    has_n: false,
                    c,
                    multiplier: 1,
                    clamp: Clamp::new(0.0, 6.0),
                    h,
                    w,
                    kh: 3,
                    kw: 3,
                    stride: (stride, stride),
                    pad_top: pad,
                    pad_left: pad,
                    oh,
                    ow,
                    channels_last,
                };
                let x = GuardedSlice::new(&values(h * w * k, 1));
                let weights = pack_weights(layout, c, k, &values(c * k, 2));
                let bias = values(c, 3);
                let kernel = if channels_last {
                    crate::depthwise_cl::pack_kernel(&values(c * 9, 4), c, 9)
                } else {
                    values(c * 9, 4)
                };
                let dw_bias = values(c, 5);
                let mut mid = vec![0f32; h * w * c];
                let (clamp, best) = (pointwise.clamp, Kernel::best());
                gemm(
                    layout,
                    c,
                    k,
                    h * w,
                    &weights,
                    &x,
                    &bias,
                    clamp,
                    None,
                    &mut mid,
                    best,
                );
                let mut want = vec![0f32; oh * ow * c];
                if channels_last {
                    crate::depthwise_cl::run(&depthwise, &mid, &kernel, &dw_bias, &mut want);
                } else {
                    let planes = Planes {
                        input: h * w,
                        output: oh * ow,
                    };
                    let (dw, out) = (&depthwise, &mut want);
                    crate::depthwise::run_planes(dw, &mid, &kernel, &dw_bias, out, planes);
                }
                let op = PointwiseDepthwise {
                    pointwise,
                    depthwise,
                };
                for rows in 3..=h {
                    let mut band = vec![];
                    let mut got = vec![f32::NAN; oh * ow * c];
                    run(
                        &op, &x, &weights, &bias, &kernel, &dw_bias, rows, &mut band, &mut got,
                    );
                    assert_eq!(
                        got, want,
                        "{layout:?} {h}x{w}x{k} -> {c}, stride {stride}, bands of {rows} rows"
                    );
                }
            }
        }
    }
}
