//! The layout pass: a model's depthwise convolutions and the pointwise ones around them run on
//! channels-last (NHWC) activations, the last of the engine's passes (`passes`).
//!
//! ONNX and tract work channels-first (NCHW): each channel's plane is contiguous. That suits
//! a pointwise convolution (a matrix product over the planes) but not a depthwise one on the
//! small planes of a network's later layers, where each plane is padded into a scratch copy and
//! each 7- or 14-point row ends in a partial vector (BENCHMARKS.md, session 16: `mobilenetish`'s
//! stride-2 depthwise layers at 2–5× onnxruntime's time). Channels-last, the depthwise kernel
//! vectorises across channels with no copy ([`crate::depthwise_cl`]) and the pointwise one is
//! a plain matrix product of points by channels ([`crate::pointwise::Layout::ChannelsLast`]).
//!
//! Which layout is faster depends on the CPU's caches as much as on its vectors: with AVX-512
//! (Sapphire Rapids, 2 MiB of L2) channels-last took a third less time in all; on an AVX2-only
//! AMD EPYC (Zen 3, 512 KiB of L2) its layers took 1.3–2× their channels-first time
//! (BENCHMARKS.md, sessions 17 and 18). So the engine runs the pass where the AVX-512 kernels
//! run ([`channels_last_by_default`]), and the tests run it wherever the engine's kernels run.
//!
//! The pass, on a model with at least one depthwise convolution of multiplier 1 on the
//! engine's kernels (nothing changes otherwise):
//! 1. switches every [`DepthwiseConv`] (multiplier 1) and [`Pointwise`] to channels-last,
//!    with a [`Transpose`] to channels-last before each input that was not and one back after
//!    each output that was not, so the graph computes what it did;
//! 2. removes the transposes that meet: a transpose back to channels-first followed by one to
//!    channels-last is nothing, also across a reshape that only regroups the spatial axes
//!    (which tract's NNEF reading puts after each pointwise convolution); an element-wise
//!    binary op (the residual `Add`) of two transposed values is the op on the values,
//!    transposed; a sum over the spatial axes of a transposed value is [`SpatialSum`] of the
//!    value, whose `[.., C, 1, 1]` output is channels-first already;
//! 3. repeats 2 until nothing changes.
//!
//! On `mobilenetish`, from ONNX and from NNEF, no transpose is left: the first convolution
//! (im2col) writes channels-last and the global average pool reads it
//! (`passes::tests::passes_rewrite_nnef_models_as_onnx_ones`); where a channels-first op sits
//! between depthwise convolutions (a max pool) transposes stay around it
//! (`tests::transposes_left_where_layouts_meet`). After the pass the residual additions fold into
//! the products before them (`pointwise::fuse_residual`), and the expanding products into the
//! depthwise convolutions they feed ([`crate::pointwise_depthwise`]), in either layout.
//!
//! Invariant: the pass changes where values lie in memory, never what is computed: every
//! switched op sums the same products in the same order as before (results to the bit), and
//! the model's inputs and outputs keep their shapes.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::change_axes::AxisOp;
use tract_nnef::tract_core::ops::nn::{Reduce, Reducer};

use crate::depthwise::DepthwiseConv;
use crate::im2col::EngineIm2col;
use crate::pointwise::{Layout, Pointwise};

/// What the pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LayoutRewrites {
    /// Depthwise and pointwise convolutions switched to channels-last.
    pub switched: usize,
    /// Transposes left in the model (where channels-last and channels-first values meet).
    pub transposes: usize,
}

/// `[batch.., C, spatial..]` to `[batch.., spatial.., C]` (`to_last`), or back: each batch
/// element's `C x S` matrix transposed (`S` the product of `spatial`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Transpose {
    pub channels: usize,
    pub spatial: TVec<usize>,
    pub to_last: bool,
}

impl Transpose {
    fn points(&self) -> usize {
        self.spatial.iter().product()
    }

    /// The transpose undoing this one.
    fn inverse(&self) -> Transpose {
        Transpose {
            to_last: !self.to_last,
            ..self.clone()
        }
    }

    fn output_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let batch = input.len() - 1 - self.spatial.len();
        let mut shape: TVec<D> = input[..batch].iter().cloned().collect();
        let spatial = self.spatial.iter().map(|d| D::from(*d));
        if self.to_last {
            shape.extend(spatial);
            shape.push(self.channels.into());
        } else {
            shape.push(self.channels.into());
            shape.extend(spatial);
        }
        shape
    }
}

impl Op for Transpose {
    fn name(&self) -> StaticName {
        "EngineTranspose".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    op_as_typed_op!();
}

impl EvalOp for Transpose {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let (c, s) = (self.channels, self.points());
        if c * s == 0 || xs.len() % (c * s) != 0 {
            bail!("EngineTranspose: {} values do not match {self:?}", xs.len());
        }
        // Every element is written below.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape(x.shape()))? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            let (rows, cols) = if self.to_last { (c, s) } else { (s, c) };
            for (from, to) in xs.chunks_exact(c * s).zip(os.chunks_exact_mut(c * s)) {
                transpose(from, rows, cols, to);
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Transpose {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape))))
    }

    as_op!();
}

/// `to[j * rows + i] = from[i * cols + j]`, by 8 x 8 blocks.
fn transpose(from: &[f32], rows: usize, cols: usize, to: &mut [f32]) {
    const B: usize = 8;
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            for i in i0..rows.min(i0 + B) {
                for j in j0..cols.min(j0 + B) {
                    to[j * rows + i] = from[i * cols + j];
                }
            }
        }
    }
}

/// The sum over the points of a channels-last `[batch.., spatial.., C]` value, as the
/// channels-first `[batch.., C, 1..]` (one 1 per spatial axis: the same memory as `[batch..,
/// 1.., C]`). What a global pool sums, in the order tract sums a channels-first plane
/// ([`spatial_sum`]), so the results are the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SpatialSum {
    pub channels: usize,
    /// Points (the product of the input's spatial axes).
    pub points: usize,
    /// Spatial axes of the input.
    pub input_spatial_rank: usize,
    /// Spatial axes of the output (each 1): those of the channels-first value summed.
    pub output_spatial_rank: usize,
}

impl Op for SpatialSum {
    fn name(&self) -> StaticName {
        "EngineSpatialSum".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    op_as_typed_op!();
}

impl EvalOp for SpatialSum {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let (c, s) = (self.channels, self.points);
        if c * s == 0 || xs.len() % (c * s) != 0 {
            bail!(
                "EngineSpatialSum: {} values do not match {self:?}",
                xs.len()
            );
        }
        let batch = xs.len() / (c * s);
        let mut sums = vec![0f32; batch * c];
        for (from, to) in xs.chunks_exact(c * s).zip(sums.chunks_exact_mut(c)) {
            spatial_sum(from, c, s, to);
        }
        let shape = self.output_shape(x.shape());
        Ok(tvec!(Tensor::from_shape(&shape, &sums)?.into_tvalue()))
    }
}

/// `to[ch] = Σ_p x[p, ch]` over the `s` points of `x` (`s x c`), each channel summed as tract
/// sums a contiguous plane (`Reduce<Sum>` over a channels-first value's spatial axes reaches
/// ndarray's `unrolled_fold`): eight running sums over the points by eights, combined as
/// `((p0 + p4) + (p1 + p5)) + ...`, then the last `s % 8` points in order. Vectorised across
/// channels, by chunks that stay in L1.
fn spatial_sum(x: &[f32], c: usize, s: usize, to: &mut [f32]) {
    const CHUNK: usize = 64;
    let eights = s / 8 * 8;
    for c0 in (0..c).step_by(CHUNK) {
        let width = CHUNK.min(c - c0);
        let mut partial = [[0f32; CHUNK]; 8];
        for base in (0..eights).step_by(8) {
            for (j, partial) in partial.iter_mut().enumerate() {
                let point = &x[(base + j) * c + c0..][..width];
                for (a, v) in partial.iter_mut().zip(point) {
                    *a += *v;
                }
            }
        }
        let mut acc = [0f32; CHUNK];
        for (a, b) in [(0, 4), (1, 5), (2, 6), (3, 7)] {
            for (i, acc) in acc.iter_mut().enumerate().take(width) {
                *acc += partial[a][i] + partial[b][i];
            }
        }
        for p in eights..s {
            let point = &x[p * c + c0..][..width];
            for (acc, v) in acc.iter_mut().zip(point) {
                *acc += *v;
            }
        }
        to[c0..c0 + width].copy_from_slice(&acc[..width]);
    }
}

impl SpatialSum {
    fn output_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let batch = input.len() - 1 - self.input_spatial_rank;
        let mut shape: TVec<D> = input[..batch].iter().cloned().collect();
        shape.push(self.channels.into());
        shape.extend((0..self.output_spatial_rank).map(|_| D::from(1)));
        shape
    }
}

impl TypedOp for SpatialSum {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape))))
    }

    as_op!();
}

/// Whether the engine runs its depthwise and pointwise convolutions channels-last on this CPU
/// by default: where its AVX-512 kernels run. On the AVX2-only CPU measured (an AMD EPYC, Zen
/// 3, 512 KiB of L2), the channels-last layers took 1.3 to 2 times their channels-first time,
/// layer by layer; on an AVX-512 CPU (Sapphire Rapids) they took a third less in all
/// (BENCHMARKS.md, sessions 17 and 18). `MODELFLEET_ENGINE_LAYOUT=channels-last` or
/// `channels-first` in the environment overrides it (to compare the two on one machine).
pub(crate) fn channels_last_by_default() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(
        || match std::env::var("MODELFLEET_ENGINE_LAYOUT").as_deref() {
            Ok("channels-last") => true,
            Ok("channels-first") => false,
            #[cfg(target_arch = "x86_64")]
            _ => crate::window::avx512_detected(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        },
    )
}

/// Runs the pass on `model` (the engine's other passes done) if `channels_last` (see
/// [`channels_last_by_default`]) and the engine's matrix product runs on this CPU.
pub(crate) fn install(model: &mut TypedModel, channels_last: bool) -> TractResult<LayoutRewrites> {
    let wanted = channels_last
        && crate::pointwise::fast_kernel()
        && model.nodes().iter().any(|n| {
            n.op_as::<DepthwiseConv>()
                .is_some_and(|dw| dw.multiplier == 1 && !dw.channels_last)
        });
    if !wanted {
        return Ok(LayoutRewrites::default());
    }
    let switched = crate::passes::patch_each(model, switch)?;
    while crate::passes::patch_each(model, cancel)? > 0 {}
    let transposes = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Transpose>())
        .count();
    Ok(LayoutRewrites {
        switched,
        transposes,
    })
}

/// Step 1: `node` switched to channels-last, with transposes around it.
fn switch(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
    if let Some(dw) = node.op_as::<DepthwiseConv>() {
        if dw.multiplier != 1 || dw.channels_last {
            return Ok(None);
        }
        let Some(kernel) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
            return Ok(None);
        };
        let taps = dw.kh * dw.kw;
        let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let packed = crate::depthwise_cl::pack_kernel(&kernel, dw.c, taps);
        let mut patch = TypedModelPatch::new(format!("engine channels-last {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let b = patch.tap_model(model, node.inputs[2])?;
        let to_last = Transpose {
            channels: dw.c,
            spatial: tvec![dw.h, dw.w],
            to_last: true,
        };
        let x = patch.wire_node(format!("{}.to_last", node.name), to_last, &[x])?[0];
        let k = patch.add_const(
            format!("{}.engine_kernel_hwc", node.name),
            Tensor::from_shape(&[dw.kh, dw.kw, dw.c], &packed)?,
        )?;
        let op = DepthwiseConv {
            channels_last: true,
            ..dw.clone()
        };
        let y = patch.wire_node(format!("{}.channels_last", node.name), op, &[x, k, b])?[0];
        let back = Transpose {
            channels: dw.c,
            spatial: tvec![dw.oh, dw.ow],
            to_last: false,
        };
        let y = patch.wire_node(format!("{}.to_first", node.name), back, &[y])?[0];
        patch.shunt_outside(model, node.id.into(), y)?;
        patch.obliterate(node.id)?;
        return Ok(Some(patch));
    }
    let Some(pw) = node.op_as::<Pointwise>() else {
        return Ok(None);
    };
    // The column matrix of an im2col convolution is no activation: it stays as it is, and
    // only the output turns channels-last.
    let from_im2col = model.node(node.inputs[0].node).op_is::<EngineIm2col>();
    let layout = if from_im2col {
        Layout::OutChannelsLast
    } else {
        Layout::ChannelsLast
    };
    if pw.layout == layout {
        return Ok(None);
    }
    let Some(packed) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
        return Ok(None);
    };
    let weights = crate::pointwise::unpack_weights(
        pw.layout,
        pw.m,
        pw.k,
        packed.try_as_plain_ram()?.as_slice::<f32>()?,
    );
    let bias = model.outlet_fact(node.inputs[2])?.konst.clone();
    let Some(bias) = bias else {
        return Ok(None);
    };
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let mut patch = TypedModelPatch::new(format!("engine channels-last {}", node.name));
    let mut x = patch.tap_model(model, node.inputs[0])?;
    let k_axis = if from_im2col {
        pw.k_axis
    } else {
        if !pw.layout.input_channels_last() {
            let to_last = Transpose {
                channels: pw.k,
                spatial: pw.spatial.clone(),
                to_last: true,
            };
            x = patch.wire_node(format!("{}.to_last", node.name), to_last, &[x])?[0];
        }
        pw.batch_rank() + pw.spatial.len()
    };
    let op = Pointwise {
        layout,
        k_axis,
        ..pw.clone()
    };
    let mut y = crate::pointwise::wire(&mut patch, &node.name, op, x, &weights, Some(bias))?;
    if !pw.layout.output_channels_last() {
        let back = Transpose {
            channels: pw.m,
            spatial: pw.out_spatial.clone(),
            to_last: false,
        };
        y = patch.wire_node(format!("{}.to_first", node.name), back, &[y])?[0];
    }
    patch.shunt_outside(model, node.id.into(), y)?;
    patch.obliterate(node.id)?;
    Ok(Some(patch))
}

/// A transpose to channels-last of a reshape that only regroups the spatial axes of a value
/// transposed back to channels-first (tract's NNEF reading gives each pointwise convolution's
/// output `[1, C, H·W]` then reshapes it to `[1, C, H, W]`): the same regrouping of the
/// channels-last value (the same memory either way).
fn cancel_through_reshape(
    model: &TypedModel,
    node: &TypedNode,
    t: &Transpose,
) -> TractResult<Option<TypedModelPatch>> {
    let reshape = model.node(node.inputs[0].node);
    if !matches!(reshape.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) {
        return Ok(None);
    }
    let prev = model.node(reshape.inputs[0].node);
    let Some(f) = prev.op_as::<Transpose>() else {
        return Ok(None);
    };
    if f.to_last || f.channels != t.channels || f.points() != t.points() {
        return Ok(None);
    }
    let before = model.outlet_fact(reshape.inputs[0])?.shape.to_tvec();
    let after = model.outlet_fact(node.inputs[0])?.shape.to_tvec();
    let (kept_before, kept_after) = (
        before.len() - f.spatial.len(),
        after.len() - t.spatial.len(),
    );
    // Batch axes and channels untouched: only the trailing spatial axes regrouped.
    if kept_before != kept_after || before[..kept_before] != after[..kept_after] {
        return Ok(None);
    }
    let batch_rank = kept_before - 1;
    let original = prev.inputs[0];
    let dims = |d: &[usize]| d.iter().map(|d| TDim::from(*d)).collect::<TVec<_>>();
    let regroup = AxisOp::Reshape(batch_rank, dims(&f.spatial), dims(&t.spatial));
    let mut patch = TypedModelPatch::new(format!("engine layout reshape {}", node.name));
    let x = patch.tap_model(model, original)?;
    let y = patch.wire_node(format!("{}.channels_last", reshape.name), regroup, &[x])?[0];
    patch.shunt_outside(model, node.id.into(), y)?;
    Ok(Some(patch))
}

/// Step 2: one rewrite removing or moving a transpose at `node`.
fn cancel(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
    // The transpose back to channels-first feeding input `slot` of `node`, if any.
    let to_first = |slot: usize| -> Option<&Transpose> {
        let prev = model.node(node.inputs.get(slot)?.node);
        prev.op_as::<Transpose>().filter(|t| !t.to_last)
    };
    if let Some(t) = node.op_as::<Transpose>() {
        if !t.to_last {
            return Ok(None);
        }
        if let Some(patch) = cancel_through_reshape(model, node, t)? {
            return Ok(Some(patch));
        }
        // A transpose undoing the one before it.
        let Some(prev) = to_first(0) else {
            return Ok(None);
        };
        if *prev != t.inverse() {
            return Ok(None);
        }
        let original = model.node(node.inputs[0].node).inputs[0];
        let mut patch = TypedModelPatch::new(format!("engine layout cancel {}", node.name));
        let wire = patch.tap_model(model, original)?;
        patch.shunt_outside(model, node.id.into(), wire)?;
        return Ok(Some(patch));
    }
    if let Some(bin) = node.op_as::<TypedBinOp>() {
        // An element-wise op of two values transposed alike (same shapes: no broadcast).
        let (Some(a), Some(b)) = (to_first(0), to_first(1)) else {
            return Ok(None);
        };
        let (ia, ib) = (
            model.node(node.inputs[0].node).inputs[0],
            model.node(node.inputs[1].node).inputs[0],
        );
        if a != b || model.outlet_fact(ia)?.shape != model.outlet_fact(ib)?.shape {
            return Ok(None);
        }
        let back = a.clone();
        let mut patch = TypedModelPatch::new(format!("engine layout through {}", node.name));
        let (ia, ib) = (patch.tap_model(model, ia)?, patch.tap_model(model, ib)?);
        let y = patch.wire_node(
            format!("{}.channels_last", node.name),
            bin.clone(),
            &[ia, ib],
        )?;
        let y = patch.wire_node(format!("{}.to_first", node.name), back, &y)?[0];
        patch.shunt_outside(model, node.id.into(), y)?;
        patch.obliterate(node.id)?;
        return Ok(Some(patch));
    }
    if let Some(reduce) = node.op_as::<Reduce>() {
        // A sum over exactly the spatial axes of a transposed value, or of a regrouping of
        // its spatial axes (tract's NNEF reading reshapes `[1, C, H·W]` to `[1, C, H, W]`).
        let input = model.outlet_fact(node.inputs[0])?.shape.to_tvec();
        let mut from = model.node(node.inputs[0].node);
        if matches!(from.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) {
            from = model.node(from.inputs[0].node);
        }
        let Some(t) = from.op_as::<Transpose>().filter(|t| !t.to_last) else {
            return Ok(None);
        };
        let transposed = model.outlet_fact(from.id.into())?.shape.to_tvec();
        let kept = transposed.len() - t.spatial.len();
        let spatial_rank = input.len().saturating_sub(kept);
        let mut axes = reduce.axes.clone();
        axes.sort();
        if !matches!(reduce.reducer, Reducer::Sum)
            || input.len() < kept
            || input[..kept] != transposed[..kept]
            || axes.iter().copied().ne(kept..input.len())
        {
            return Ok(None);
        }
        let op = SpatialSum {
            channels: t.channels,
            points: t.points(),
            input_spatial_rank: t.spatial.len(),
            output_spatial_rank: spatial_rank,
        };
        let original = from.inputs[0];
        let mut patch = TypedModelPatch::new(format!("engine layout sum {}", node.name));
        let x = patch.tap_model(model, original)?;
        let y = patch.wire_node(format!("{}.channels_last", node.name), op, &[x])?[0];
        patch.shunt_outside(model, node.id.into(), y)?;
        patch.obliterate(node.id)?;
        return Ok(Some(patch));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize) -> Vec<f32> {
        (0..len)
            .map(|v| ((v * 37 % 101) as f32 - 50.0) / 7.0)
            .collect()
    }

    /// `op` evaluated on `x` (`shape`): the output's shape and values.
    fn run(op: impl EvalOp, shape: &[usize], x: &[f32]) -> (TVec<usize>, Vec<f32>) {
        let x = Tensor::from_shape(shape, x).unwrap();
        let out = op
            .eval_out_of_plan(tvec!(x.into_tvalue()))
            .unwrap()
            .expect("stateless op");
        let values = out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        (out[0].shape().into(), values)
    }

    /// Both directions, a batch of 2, sizes that are not multiples of the 8 x 8 blocks; the
    /// two directions undo each other.
    #[test]
    fn transposes_move_channels_last_and_back() {
        let (n, c, h, w) = (2, 11, 5, 3);
        let x = values(n * c * h * w);
        let to_last = Transpose {
            channels: c,
            spatial: tvec![h, w],
            to_last: true,
        };
        let back = to_last.inverse();
        let (shape, got) = run(to_last, &[n, c, h, w], &x);
        assert_eq!(&shape[..], &[n, h, w, c]);
        for b in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    assert_eq!(got[(b * h * w + p) * c + ch], x[(b * c + ch) * h * w + p]);
                }
            }
        }
        let (shape, first) = run(back, &[n, h, w, c], &got);
        assert_eq!(&shape[..], &[n, c, h, w]);
        assert_eq!(first, x);
    }

    /// Where channels-last and channels-first values meet (a max pool, which runs
    /// channels-first, between depthwise convolutions; the model's input and output), the pass
    /// leaves transposes, and the model computes what stock tract computes.
    /// `engine/testdata/depthwise_maxpool.onnx` is made by `scripts/make_layout_test_model.py`.
    #[cfg(feature = "onnx")]
    #[test]
    fn transposes_left_where_layouts_meet() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/depthwise_maxpool.onnx");
        let stock = crate::testing::onnx_batch_fixed(&path, 1);
        let mut ours = stock.clone();
        let rewrites = crate::passes::apply(&mut ours, true).unwrap();
        let fast = usize::from(crate::pointwise::fast_kernel());
        // Both depthwise convolutions and the pointwise one between them.
        assert_eq!(rewrites.channels_last, 3 * fast);
        // To channels-last after the input and before the pointwise convolution (after the
        // pool), back before the pool and before the output (the addition, both of whose
        // operands were the last depthwise convolution's output, moved before it).
        assert_eq!(rewrites.layout_transposes, 4 * fast);
        let x = Tensor::from_shape(&[1, 8, 12, 12], &values(8 * 12 * 12)).unwrap();
        let want = crate::testing::first_output(stock, &x);
        let got = crate::testing::first_output(ours, &x);
        assert_eq!(got.len(), 16 * 3 * 3);
        crate::testing::assert_close(&got, &want, "depthwise around a max pool");
    }

    /// A model whose batch size is fixed above one (2 here) runs channels-last with the batch
    /// axis kept through every switched op, transpose and sum: `mobilenetish` against stock
    /// tract on two different images.
    #[cfg(feature = "onnx")]
    #[test]
    fn fixed_batch_of_two_runs_channels_last_like_stock() {
        let stock = crate::testing::onnx_batch_fixed(&crate::testing::mobilenetish_onnx(), 2);
        let mut ours = stock.clone();
        let rewrites = crate::passes::apply(&mut ours, true).unwrap();
        if !crate::pointwise::fast_kernel() {
            return;
        }
        assert_eq!(
            (
                rewrites.channels_last,
                rewrites.layout_transposes,
                rewrites.fused_pointwise_depthwise
            ),
            (52, 0, 3)
        );
        let x = crate::testing::mobilenetish_images(2);
        let want = crate::testing::first_output(stock, &x);
        let got = crate::testing::first_output(ours, &x);
        assert_eq!(got.len(), 2 * 1000);
        assert_ne!(got[..1000], got[1000..], "two images, two answers");
        crate::testing::assert_close(&got, &want, "mobilenetish logits, batch 2");
    }

    /// `mobilenetish` read back from the NNEF archive a device loads, channels-last (whatever
    /// this CPU's default), against stock tract on the same graph: the products fused into
    /// the depthwise convolutions across the reshapes tract's NNEF reading keeps between them.
    #[cfg(feature = "onnx")]
    #[test]
    fn nnef_model_runs_channels_last_like_stock() {
        let path = crate::testing::mobilenetish_onnx();
        let (archive, names) = crate::onnx_to_nnef(&path, &std::fs::read(&path).unwrap()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let nnef_path = tmp.path().join("mobilenetish.nnef.tar");
        std::fs::write(&nnef_path, archive).unwrap();
        let typed = crate::nnef::read(&nnef_path).unwrap();
        let stock = crate::testing::batch_fixed(typed, &names, &path, 1);
        let mut ours = stock.clone();
        let rewrites = crate::passes::apply(&mut ours, true).unwrap();
        if !crate::pointwise::fast_kernel() {
            return;
        }
        assert_eq!(
            (rewrites.channels_last, rewrites.fused_pointwise_depthwise),
            (52, 3)
        );
        let x = crate::testing::mobilenetish_images(1);
        let want = crate::testing::first_output(stock, &x);
        let got = crate::testing::first_output(ours, &x);
        assert_eq!(got.len(), 1000);
        crate::testing::assert_close(&got, &want, "mobilenetish logits from NNEF");
    }

    /// The layout is a per-CPU choice ([`channels_last_by_default`]), so a bundle's golden
    /// outputs may be computed in one layout and checked on a device in the other: both give
    /// `mobilenetish`'s logits to the bit (each channels-last kernel, the fused product and
    /// depthwise op included, sums what its channels-first one sums, in the same order; the
    /// residual additions and the expansions into the depthwise layers after them fused in
    /// both, the first layer a direct convolution in both: by bands channels-first).
    #[cfg(feature = "onnx")]
    #[test]
    fn both_layouts_give_the_same_logits_to_the_bit() {
        let stock = crate::testing::onnx_batch_fixed(&crate::testing::mobilenetish_onnx(), 1);
        let (mut first, mut last) = (stock.clone(), stock);
        let fast = usize::from(crate::pointwise::fast_kernel());
        let first_rewrites = crate::passes::apply(&mut first, false).unwrap();
        assert_eq!(
            (
                first_rewrites.channels_last,
                first_rewrites.fused_residuals,
                first_rewrites.fused_pointwise_depthwise,
                first_rewrites.direct_convolutions
            ),
            (0, 10 * fast, 3 * fast, fast)
        );
        let rewrites = crate::passes::apply(&mut last, true).unwrap();
        assert_eq!(
            (
                rewrites.channels_last,
                rewrites.fused_residuals,
                rewrites.fused_pointwise_depthwise,
                rewrites.direct_convolutions
            ),
            (52 * fast, 10 * fast, 3 * fast, fast)
        );
        let x = crate::testing::mobilenetish_images(1);
        let first = crate::testing::first_output(first, &x);
        let last = crate::testing::first_output(last, &x);
        assert_eq!(first.len(), 1000);
        assert_eq!(first, last);
    }

    /// The channels-last sum gives what tract's `Reduce<Sum>` gives on the channels-first value
    /// over its spatial axes, to the bit (its summation order), for point counts below, at and
    /// past multiples of 8.
    #[test]
    fn spatial_sum_matches_tract_reduce_to_the_bit() {
        for (c, h, w) in [(3, 1, 5), (70, 2, 4), (130, 7, 7), (9, 3, 5)] {
            let n = 2;
            let x = values(n * c * h * w);
            let reduce = Reduce::new(tvec![2, 3], Reducer::Sum);
            let want = run(reduce, &[n, c, h, w], &x);
            let to_last = Transpose {
                channels: c,
                spatial: tvec![h, w],
                to_last: true,
            };
            let (_, last) = run(to_last, &[n, c, h, w], &x);
            let sum = SpatialSum {
                channels: c,
                points: h * w,
                input_spatial_rank: 2,
                output_spatial_rank: 2,
            };
            let got = run(sum, &[n, h, w, c], &last);
            assert_eq!(got, want, "{c}x{h}x{w}");
        }
    }
}
