//! A channels-last depthwise convolution and the pointwise convolution (the projection) after
//! it, run band by band so the activation between them never leaves the cache: the mirror of
//! [`crate::pointwise_depthwise`], which fuses an expansion into the depthwise layer after it.
//!
//! On `mobilenetish` the first depthwise layer (`l02`, 112x112, 32 channels) is not fused with
//! an expansion (the layer before it is the first, a full convolution), so its 1.6 MB output
//! was written out of L2 and read back by the projection after it (`l03`, 32 → 16 channels),
//! which waited on that read: 158 µs where its arithmetic takes 32 (BENCHMARKS.md, session 20).
//! Here the depthwise kernel computes a band of its output rows into a scratch buffer of about
//! [`BAND_BYTES`], and the product projects the band while it is in cache. Every output row is
//! computed once (bands of output rows do not overlap; their input rows do, and are read in
//! place).
//!
//! The sums are those of the two ops run apart: the depthwise kernel sees a band as a plane
//! whose top padding is the rows above it ([`band_op`]), and each point's product is a sum over
//! its own channels, whatever points are computed with it. The pass ([`install`]) fuses a
//! [`DepthwiseConv`] into the [`Pointwise`] it alone feeds when both are channels-last, the
//! product adds no residual, and the activation between them is [`FUSE_MIN_BYTES`] or more.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;

use crate::depthwise::DepthwiseConv;
use crate::pointwise::{gemm, packed_len, Kernel, Layout, Pointwise};
use crate::pointwise_depthwise::{band_op, BAND_BYTES, FUSE_MIN_BYTES};

thread_local! {
    /// The band buffer, kept between calls.
    static BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `pointwise(depthwise(x))`: inputs `x` (the depthwise op's), its kernel (`[kh, kw, C]`) and
/// bias, then the pointwise op's packed weights and bias; output the pointwise op's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DepthwisePointwise {
    pub depthwise: DepthwiseConv,
    pub pointwise: Pointwise,
}

impl DepthwisePointwise {
    fn output_shape<D: DimLike>(&self, x: &[D]) -> TVec<D> {
        let n = self.depthwise.batch(x);
        self.pointwise.output_shape(&self.depthwise.output_shape(n))
    }
}

/// Runs both ops on one batch element: `x` `[h·w, C]`, `out` `[oh·ow, m]`, by bands of at
/// most `rows` output rows of the depthwise op in `band`.
#[allow(clippy::too_many_arguments)]
fn run(
    op: &DepthwisePointwise,
    x: &[f32],
    dk: &[f32],
    db: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    band: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (dw, pw) = (&op.depthwise, &op.pointwise);
    let (c, m, sh) = (dw.c, pw.m, dw.stride.0);
    let rows = rows.clamp(1, dw.oh);
    if band.len() < rows * dw.ow * c {
        band.resize(rows * dw.ow * c, 0.0);
    }
    for oa in (0..dw.oh).step_by(rows) {
        let ob = dw.oh.min(oa + rows);
        // The input rows the band's windows read (the rows above are its top padding).
        let ya = (oa * sh).saturating_sub(dw.pad_top);
        let yb = dw.h.min((ob - 1) * sh + dw.kh - dw.pad_top);
        let sub = band_op(dw, ya, yb, oa, ob);
        let band = &mut band[..(ob - oa) * dw.ow * c];
        crate::depthwise_cl::run(&sub, &x[ya * dw.w * c..yb * dw.w * c], dk, db, band);
        let out = &mut out[oa * dw.ow * m..ob * dw.ow * m];
        let points = (ob - oa) * dw.ow;
        let kernel = Kernel::best();
        gemm(
            Layout::ChannelsLast,
            m,
            c,
            points,
            w,
            band,
            b,
            pw.clamp,
            None,
            out,
            kernel,
        );
    }
}

impl Op for DepthwisePointwise {
    fn name(&self) -> StaticName {
        "EngineDepthwisePointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwisePointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (dw, pw) = (&self.depthwise, &self.pointwise);
        let slices = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let s = slices
            .iter()
            .map(|r| r.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        let (x, dk, db, w, b) = (s[0], s[1], s[2], s[3], s[4]);
        let plane = dw.h * dw.w * dw.c;
        let images = dw.batch(inputs[0].shape());
        if x.len() != images * plane
            || dk.len() != dw.kh * dw.kw * dw.c
            || !(db.len() == 1 || db.len() == dw.c)
            || w.len() != packed_len(pw.layout, pw.m, pw.k)
            || b.len() != pw.m
        {
            bail!("EngineDepthwisePointwise: input sizes do not match {self:?}");
        }
        // Every element is written by `run`.
        let shape = self.output_shape(inputs[0].shape());
        let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            BAND.with_borrow_mut(|band| {
                let per_image = x
                    .chunks_exact(plane)
                    .zip(os.chunks_exact_mut(dw.oh * dw.ow * pw.m));
                let rows = BAND_BYTES / (dw.ow * dw.c * 4);
                for (x, out) in per_image {
                    run(self, x, dk, db, w, b, rows, band, out);
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DepthwisePointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape))))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (dw, pw) = (&self.depthwise, &self.pointwise);
        let n = dw.batch(&inputs[0].shape);
        let fmas = dw.c * dw.oh * dw.ow * dw.kh * dw.kw + pw.m * pw.k * dw.oh * dw.ow;
        Ok(tvec!((Cost::FMA(f32::datum_type()), n * fmas)))
    }

    as_op!();
}

/// Fuses each channels-last [`DepthwiseConv`] into the channels-last [`Pointwise`] it alone
/// feeds, where the activation between them is [`FUSE_MIN_BYTES`] or more. Returns how many.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(pw) = node.op_as::<Pointwise>() else {
            return Ok(None);
        };
        // The depthwise op, or a reshape of its spatial axes in between.
        let (prev, reshape) = crate::passes::producer_through_reshape(model, node);
        let Some(dw) = prev.op_as::<DepthwiseConv>() else {
            return Ok(None);
        };
        // The product reads the depthwise op's batch axis (one, or none) as its batch axes;
        // whether it keeps them in its output is its own (`Pointwise::output_shape`).
        let same_batch = pw.batch_rank() == usize::from(dw.has_n);
        let activation_bytes = dw.oh * dw.ow * dw.c * 4;
        if !dw.channels_last
            || dw.multiplier != 1
            || dw.pad_top >= dw.kh
            || pw.layout != Layout::ChannelsLast
            || pw.residual
            || pw.k != dw.c
            || pw.spatial.iter().product::<usize>() != dw.oh * dw.ow
            || !same_batch
            || activation_bytes < FUSE_MIN_BYTES
        {
            return Ok(None);
        }
        // The nodes the fused op replaces, depthwise first.
        let path: TVec<&TypedNode> = std::iter::once(prev).chain(reshape).chain([node]).collect();
        let inputs: TVec<OutletId> = prev.inputs[..3]
            .iter()
            .chain(&node.inputs[1..3])
            .copied()
            .collect();
        let op = DepthwisePointwise {
            depthwise: dw.clone(),
            pointwise: pw.clone(),
        };
        crate::passes::fuse_path(model, &path, &inputs, op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depthwise::Clamp;
    use crate::pointwise::pack_weights;
    use crate::testing::values;

    /// The fused op gives the two ops' outputs to the bit, for bands of every height from one
    /// row to the whole plane, strides 1 and 2, with and without padding, channel counts that
    /// are and are not whole vectors.
    #[test]
    fn bands_give_the_two_ops_outputs_to_the_bit() {
        for (h, w, c, m, stride, pad) in [
            (9, 5, 16, 8, 1, 1),
            (10, 7, 12, 5, 2, 1),
            (11, 6, 24, 40, 2, 0),
            (7, 7, 40, 16, 1, 0),
        ] {
            let oh = (h + 2 * pad - 3) / stride + 1;
            let ow = (w + 2 * pad - 3) / stride + 1;
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
                channels_last: true,
            };
            let pointwise = Pointwise {
                m,
                k: c,
                k_axis: 2,
                keep_batch: false,
                spatial: tvec![oh, ow],
                out_spatial: tvec![oh, ow],
                layout: Layout::ChannelsLast,
                clamp: Clamp::NONE,
                residual: false,
            };
            let x = values(h * w * c, 1);
            let kernel = crate::depthwise_cl::pack_kernel(&values(c * 9, 4), c, 9);
            let dw_bias = values(c, 5);
            let weights = pack_weights(Layout::ChannelsLast, m, c, &values(m * c, 2));
            let bias = values(m, 3);
            let mut mid = vec![0f32; oh * ow * c];
            crate::depthwise_cl::run(&depthwise, &x, &kernel, &dw_bias, &mut mid);
            let mut want = vec![0f32; oh * ow * m];
            gemm(
                Layout::ChannelsLast,
                m,
                c,
                oh * ow,
                &weights,
                &mid,
                &bias,
                pointwise.clamp,
                None,
                &mut want,
                Kernel::best(),
            );
            let op = DepthwisePointwise {
                depthwise,
                pointwise,
            };
            for rows in 1..=oh {
                let mut band = vec![];
                let mut got = vec![f32::NAN; oh * ow * m];
                run(
                    &op, &x, &kernel, &dw_bias, &weights, &bias, rows, &mut band, &mut got,
                );
                assert_eq!(
                    got, want,
                    "{h}x{w}x{c} -> {m}, stride {stride}, bands of {rows} rows"
                );
            }
        }
    }
}
