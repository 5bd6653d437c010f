//! Pointwise (1x1) convolutions, and the im2col convolutions' matrix products, as a matrix
//! product over the channels-first activation as it lies in memory, and the passes installing it.
//!
//! In NCHW a 1x1 convolution is `out[o, p] = bias[o] + Σ_i W[o, i] · x[i, p]`, and the input
//! plane `x` is already the `K x N` row-major right-hand operand (`K` input channels, `N` points).
//! tract 0.23.9 packs that operand into panels on every call (`OptMatMulPack`: 11 % of a
//! `mobilenetish` inference, BENCHMARKS.md) and then runs its kernel over the packed copy.
//! [`Pointwise`] packs only the constant weights, once at load (panels of [`MR`] output channels,
//! `k`-major), and reads `x` in place, [`NR`] points at a time; the bias and a clamp (ReLU,
//! ReLU6: `depthwise::fuse_clamp`) are applied in the store. The sum over `i` runs in order with
//! fused multiply-adds from zero, then the bias is added: what tract's matrix product followed
//! by its bias addition computes.
//!
//! The kernel is AVX2 + FMA (x86_64, detected at run time); every other CPU gets a portable
//! kernel (same tiles, plain multiply and add). The passes install the op only where the AVX2
//! kernel runs ([`fast_kernel`]): on ARM tract's hand-written NEON kernels stay in charge, as
//! nothing here was measured there (BENCHMARKS.md). The portable kernel is checked against a
//! naive product in the tests below on every CPU.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::einsum::EinSum;
use tract_nnef::tract_core::ops::math::Add;

use crate::depthwise::Clamp;

/// Output channels per tile (rows of the packed weight panels).
pub(crate) const MR: usize = 6;
/// Points per tile (two AVX2 vectors).
pub(crate) const NR: usize = 16;

/// `out[b, o, p] = clamp(Σ_i W[o, i] · x[b, i, p] + bias[o])` for an input `x` read as
/// `[batch, k, n]` (`batch`: the product of the axes before `k_axis`, `n`: of those after it).
/// Inputs: `x`, the weights packed by [`pack_weights`], the bias `[m]`. Output: the axes before
/// `k_axis` if `keep_batch` (else none: they are all 1), then `m`, then `spatial` (whose product
/// is `n`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Pointwise {
    pub m: usize,
    pub k: usize,
    pub k_axis: usize,
    pub keep_batch: bool,
    pub spatial: TVec<usize>,
    pub clamp: Clamp,
}

impl Pointwise {
    fn n(&self) -> usize {
        self.spatial.iter().product()
    }

    fn output_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let mut shape: TVec<D> = if self.keep_batch {
            input[..self.k_axis].iter().cloned().collect()
        } else {
            tvec![]
        };
        shape.push(self.m.into());
        shape.extend(self.spatial.iter().map(|d| D::from(*d)));
        shape
    }

    /// The axis of the output holding the output channels.
    fn channel_axis(&self) -> usize {
        if self.keep_batch {
            self.k_axis
        } else {
            0
        }
    }
}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        "EnginePointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Pointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, w, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let ws = w.try_as_plain_ram()?;
        let ws = ws.as_slice::<f32>()?;
        let bs = b.try_as_plain_ram()?;
        let bs = bs.as_slice::<f32>()?;
        let (k, n) = (self.k, self.n());
        if xs.len() % (k * n) != 0 || bs.len() != self.m || ws.len() != packed_len(self.m, k) {
            bail!("EnginePointwise: input sizes do not match {self:?}");
        }
        // Every element is written by `gemm`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape(x.shape()))? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            for (x, out) in xs.chunks_exact(k * n).zip(os.chunks_exact_mut(self.m * n)) {
                gemm(self.m, k, n, ws, x, bs, self.clamp, out, Kernel::best());
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Pointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape))))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let batch: TDim = inputs[0].shape[..self.k_axis].iter().product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            batch * (self.m * self.k * self.n())
        )))
    }

    as_op!();
}

/// Length of the packed weights of an `m x k` matrix: `ceil(m / MR)` panels of `k x MR`.
pub(crate) fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * k * MR
}

/// Packs the row-major `m x k` weights into panels of [`MR`] rows, `k`-major (element `(r, i)`
/// of panel `p` at `(p * k + i) * MR + r`), rows past `m` zero.
pub(crate) fn pack_weights(m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let mut packed = vec![0f32; packed_len(m, k)];
    for (o, row) in w.chunks_exact(k).take(m).enumerate() {
        let (panel, r) = (o / MR, o % MR);
        for (i, v) in row.iter().enumerate() {
            packed[(panel * k + i) * MR + r] = *v;
        }
    }
    packed
}

/// Which tile kernel [`gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA intrinsics; only where the CPU has both.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this CPU runs the AVX2 + FMA kernel: the passes install [`Pointwise`] only then.
pub(crate) fn fast_kernel() -> bool {
    Kernel::best() != Kernel::Portable
}

/// `out (m x n) = clamp(W · x + bias)`, `W` packed by [`pack_weights`], `x` row-major `k x n`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    x: &[f32],
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    kernel: Kernel,
) {
    assert!(w.len() >= packed_len(m, k) && x.len() >= k * n && out.len() >= m * n);
    assert!(bias.len() >= m);
    let panels = m.div_ceil(MR);
    let tile = |panel: usize, col: usize, out: &mut [f32]| {
        let rows = MR.min(m - panel * MR);
        let cols = NR.min(n - col);
        let wp = &w[panel * k * MR..(panel + 1) * k * MR];
        let mut b = [0f32; MR];
        b[..rows].copy_from_slice(&bias[panel * MR..panel * MR + rows]);
        let out = &mut out[panel * MR * n + col..];
        match kernel {
            Kernel::Portable => tile_portable(k, wp, &x[col..], n, cols, out, n, rows, &b, clamp),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2Fma` is only chosen when the CPU has AVX2 and FMA
            // (`Kernel::best`); the slices cover every element the tile reads and writes
            // (asserted above: `k` rows of `x` from `col`, `rows` rows of `out`).
            Kernel::Avx2Fma => unsafe {
                // A block of at most 8 points (the last one of a 7x7 or 14x14 plane): one
                // vector per row, not two half-empty ones.
                if cols <= NR / 2 {
                    tile_avx2::<1>(k, wp, &x[col..], n, cols, out, n, rows, &b, clamp)
                } else {
                    tile_avx2::<2>(k, wp, &x[col..], n, cols, out, n, rows, &b, clamp)
                }
            },
        }
    };
    // Small right-hand operand (in L2): each weight panel against every column block, the
    // panel staying in L1. Large one (the 112x112 and 56x56 planes): each column block (`k x
    // NR`, in L1) against every panel, so `x` is read from memory once.
    if k * n * 4 <= 192 * 1024 {
        for panel in 0..panels {
            for col in (0..n).step_by(NR) {
                tile(panel, col, out);
            }
        }
    } else {
        for col in (0..n).step_by(NR) {
            for panel in 0..panels {
                tile(panel, col, out);
            }
        }
    }
}

/// One tile: `rows` (≤ MR) output rows by `cols` (≤ NR) points; `x` and `out` start at the
/// tile's first point, rows `ldx` and `ldo` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_portable(
    k: usize,
    w: &[f32],
    x: &[f32],
    ldx: usize,
    cols: usize,
    out: &mut [f32],
    ldo: usize,
    rows: usize,
    bias: &[f32; MR],
    clamp: Clamp,
) {
    let mut acc = [[0f32; NR]; MR];
    let mut xr = [0f32; NR];
    for i in 0..k {
        xr[..cols].copy_from_slice(&x[i * ldx..i * ldx + cols]);
        let wr = &w[i * MR..(i + 1) * MR];
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] += wr[r] * xr[j];
            }
        }
    }
    let (low, high) = (clamp.low(), clamp.high());
    for r in 0..rows {
        let to = &mut out[r * ldo..r * ldo + cols];
        for (t, a) in to.iter_mut().zip(&acc[r]) {
            let v = *a + bias[r];
            *t = if clamp == Clamp::NONE {
                v
            } else {
                v.max(low).min(high)
            };
        }
    }
}

/// One tile of `V` vectors (8 points each) per row: `V = 2` for up to [`NR`] points, `V = 1`
/// for up to 8.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const V: usize>(
    k: usize,
    w: &[f32],
    x: &[f32],
    ldx: usize,
    cols: usize,
    out: &mut [f32],
    ldo: usize,
    rows: usize,
    bias: &[f32; MR],
    clamp: Clamp,
) {
    use std::arch::x86_64::*;
    debug_assert!(cols >= 1 && cols <= 8 * V && rows >= 1 && rows <= MR);
    debug_assert!(w.len() >= k * MR && x.len() >= (k - 1) * ldx + cols);
    debug_assert!(out.len() >= (rows - 1) * ldo + cols);
    // Lanes of the vectors inside the tile: loads and stores past `cols` are masked off.
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut mask = [_mm256_setzero_si256(); V];
    for (v, m) in mask.iter_mut().enumerate() {
        *m = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32 - 8 * v as i32), lane);
    }
    let full = cols == 8 * V;
    let mut acc = [[_mm256_setzero_ps(); V]; MR];
    let mut xp = x.as_ptr();
    let mut wp = w.as_ptr();
    // SAFETY (pointer arithmetic and loads): `xp` walks `k` rows of `x`, reading `cols` points
    // of each (masked past them); `wp` walks the `k * MR` packed weights.
    // One loop, written once, expanded twice: with plain loads for a full tile and masked ones
    // otherwise, so the choice is not made again in the inner loop.
    macro_rules! accumulate {
        (|$p:ident, $v:ident| $load:expr) => {
            for _ in 0..k {
                let mut xv = [_mm256_setzero_ps(); V];
                for ($v, xv) in xv.iter_mut().enumerate() {
                    let $p = xp.add(8 * $v);
                    *xv = $load;
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*wp.add(r));
                    for v in 0..V {
                        acc[v] = _mm256_fmadd_ps(b, xv[v], acc[v]);
                    }
                }
                xp = xp.add(ldx);
                wp = wp.add(MR);
            }
        };
    }
    if full {
        accumulate!(|p, _v| _mm256_loadu_ps(p));
    } else {
        accumulate!(|p, v| _mm256_maskload_ps(p, mask[v]));
    }
    let clamped = clamp != Clamp::NONE;
    let (low, high) = (_mm256_set1_ps(clamp.low()), _mm256_set1_ps(clamp.high()));
    let op = out.as_mut_ptr();
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let b = _mm256_set1_ps(bias[r]);
        let to = op.add(r * ldo);
        for v in 0..V {
            let mut y = _mm256_add_ps(acc[v], b);
            if clamped {
                // `max(y, low)` gives `low` for a NaN `y`, as `f32::max` (tract's `Max`) does.
                y = _mm256_min_ps(_mm256_max_ps(y, low), high);
            }
            if full {
                _mm256_storeu_ps(to.add(8 * v), y);
            } else {
                _mm256_maskstore_ps(to.add(8 * v), mask[v], y);
            }
        }
    }
}

/// Replaces every `EinSum` that is a pointwise convolution — a constant f32 `[O, I]` matrix
/// times an activation `[(1 or batch), I, spatial...]` summed over `I`, giving `[(batch), O,
/// spatial...]` — with [`Pointwise`], where the AVX2 kernel runs ([`fast_kernel`]). Returns how
/// many were replaced.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    if !fast_kernel() {
        return Ok(0);
    }
    crate::passes::patch_each(model, |model, node| {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        let Some((op, x, weights)) = candidate(model, node, einsum)? else {
            return Ok(None);
        };
        let mut patch = TypedModelPatch::new(format!("engine pointwise {}", node.name));
        let x = patch.tap_model(model, x)?;
        let wire = wire(&mut patch, &node.name, op, x, &weights, None)?;
        patch.shunt_outside(model, node.id.into(), wire)?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    })
}

/// Adds [`Pointwise`] to `patch` on `x`, its weights (`[m, k]` row-major, packed here) and bias
/// (`[m]`, zero when `None`) as constants.
pub(crate) fn wire(
    patch: &mut TypedModelPatch,
    name: &str,
    op: Pointwise,
    x: OutletId,
    weights: &[f32],
    bias: Option<Vec<f32>>,
) -> TractResult<OutletId> {
    let packed = pack_weights(op.m, op.k, weights);
    let packed_len = packed.len();
    let packed = patch.add_const(
        format!("{name}.engine_packed_weights"),
        Tensor::from_shape(&[packed_len], &packed)?,
    )?;
    let bias = bias.unwrap_or_else(|| vec![0.0; op.m]);
    let bias = patch.add_const(
        format!("{name}.engine_bias"),
        Tensor::from_shape(&[op.m], &bias)?,
    )?;
    Ok(patch.wire_node(format!("{name}.engine_pointwise"), op, &[x, packed, bias])?[0])
}

/// The op, activation input and row-major `[m, k]` weights of an `EinSum` [`install`] takes.
fn candidate(
    model: &TypedModel,
    node: &TypedNode,
    einsum: &EinSum,
) -> TractResult<Option<(Pointwise, OutletId, Vec<f32>)>> {
    if node.inputs.len() != 2
        || einsum.operating_dt != f32::datum_type()
        || einsum.q_params.is_some()
    {
        return Ok(None);
    }
    // "xaxes,waxes->outaxes", one letter per axis.
    let expr = einsum.axes.to_string();
    let Some((ins, out)) = expr.split_once("->") else {
        return Ok(None);
    };
    let Some((a, b)) = ins.split_once(',') else {
        return Ok(None);
    };
    let (a, b, out): (Vec<char>, Vec<char>, Vec<char>) = (
        a.chars().collect(),
        b.chars().collect(),
        out.chars().collect(),
    );
    for (xi, wi, xa, wa) in [(0, 1, &a, &b), (1, 0, &b, &a)] {
        let (xf, wf) = (
            model.outlet_fact(node.inputs[xi])?,
            model.outlet_fact(node.inputs[wi])?,
        );
        let Some(weights) = wf.konst.as_ref() else {
            continue;
        };
        if weights.datum_type() != f32::datum_type()
            || xf.datum_type != f32::datum_type()
            || wa.len() != 2
            || xa.len() != xf.rank()
        {
            continue;
        }
        // Weights `[o, i]`; `x` = batch axes, `i`, spatial axes; out = (batch axes), o, spatial.
        let (o, i) = (wa[0], wa[1]);
        let Some(k_axis) = xa.iter().position(|c| *c == i) else {
            continue;
        };
        let (batch, spatial) = (&xa[..k_axis], &xa[k_axis + 1..]);
        let keep_batch = out.len() == xa.len();
        let mut want: Vec<char> = if keep_batch { batch.to_vec() } else { vec![] };
        want.push(o);
        want.extend(spatial);
        if out != want || out.contains(&i) || xa.contains(&o) {
            continue;
        }
        // Dropped batch axes are summed over: only size 1 makes that the identity.
        if !keep_batch
            && batch
                .iter()
                .enumerate()
                .any(|(ax, _)| xf.shape[ax] != 1.into())
        {
            continue;
        }
        let Some(spatial_dims) = xf.shape[k_axis + 1..]
            .iter()
            .map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<TVec<usize>>>()
        else {
            continue;
        };
        let (m, k) = (weights.shape()[0], weights.shape()[1]);
        if xf.shape[k_axis] != k.into() || m == 0 || k == 0 || spatial_dims.contains(&0) {
            continue;
        }
        let values = weights.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let op = Pointwise {
            m,
            k,
            k_axis,
            keep_batch,
            spatial: spatial_dims,
            clamp: Clamp::NONE,
        };
        return Ok(Some((op, node.inputs[xi], values)));
    }
    Ok(None)
}

/// Folds the addition of a constant per-output-channel (or scalar) bias that follows a
/// [`Pointwise`] with a zero bias and no clamp into its bias, when the product feeds nothing
/// else. Returns how many were folded.
pub(crate) fn fuse_bias(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(bin) = node.op_as::<TypedBinOp>() else {
            return Ok(None);
        };
        if !bin.0.is::<Add>() || node.inputs.len() != 2 {
            return Ok(None);
        }
        for (pw_input, bias_input) in [(0, 1), (1, 0)] {
            let prev = model.node(node.inputs[pw_input].node);
            let Some(op) = prev.op_as::<Pointwise>() else {
                continue;
            };
            let bias = model.outlet_fact(node.inputs[bias_input])?;
            let old_bias = model.outlet_fact(prev.inputs[2])?;
            let Some(value) = bias.konst.as_ref() else {
                continue;
            };
            let out_fact = model.outlet_fact(node.inputs[pw_input])?;
            let zero_bias = old_bias.konst.as_ref().is_some_and(|b| {
                b.try_as_plain_ram()
                    .ok()
                    .and_then(|b| {
                        b.as_slice::<f32>()
                            .ok()
                            .map(|s| s.iter().all(|v| *v == 0.0))
                    })
                    .unwrap_or(false)
            });
            let rank = out_fact.rank();
            // Broadcast over everything but the channel axis.
            let per_channel = value.rank() <= rank
                && value.shape().iter().enumerate().all(|(ax, d)| {
                    let out_ax = ax + rank - value.rank();
                    *d == 1 || (out_ax == op.channel_axis() && *d == op.m)
                });
            if value.datum_type() != f32::datum_type()
                || !per_channel
                || !zero_bias
                || op.clamp != Clamp::NONE
                || model.single_succ(prev.id)?.map(|s| s.id) != Some(node.id)
                || model.outputs.contains(&node.inputs[pw_input])
                || model.outlet_fact(node.id.into())?.shape != out_fact.shape
            {
                continue;
            }
            let values = value.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            let bias: Vec<f32> = (0..op.m)
                .map(|o| values[if values.len() == 1 { 0 } else { o }])
                .collect();
            let mut patch = TypedModelPatch::new(format!("engine pointwise bias {}", node.name));
            let x = patch.tap_model(model, prev.inputs[0])?;
            let w = patch.tap_model(model, prev.inputs[1])?;
            let b = patch.add_const(
                format!("{}.engine_bias", node.name),
                Tensor::from_shape(&[op.m], &bias)?,
            )?;
            let wire = patch.wire_node(
                format!("{}.engine_pointwise", node.name),
                op.clone(),
                &[x, w, b],
            )?[0];
            patch.shunt_outside(model, node.id.into(), wire)?;
            patch.obliterate(node.id)?;
            patch.obliterate(prev.id)?;
            return Ok(Some(patch));
        }
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, w: &[f32], x: &[f32], b: &[f32], c: Clamp) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for o in 0..m {
            for p in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    s += w[o * k + i] as f64 * x[i * n + p] as f64;
                }
                let v = s as f32 + b[o];
                out[o * n + p] = if c == Clamp::NONE {
                    v
                } else {
                    v.max(c.low()).min(c.high())
                };
            }
        }
        out
    }

    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            kernels.push(Kernel::Avx2Fma);
        }
        kernels
    }

    #[test]
    fn matches_naive_product() {
        let relu6 = Clamp::new(0.0, 6.0);
        // (m, k, n): whole tiles, partial row panels and column blocks, one point, the large-x
        // loop order (k * n * 4 > 192 KiB), digits_cnn's conv2 and mobilenetish's 7x7 layers.
        let cases = [
            (6, 4, 16),
            (16, 32, 49),
            (7, 3, 1),
            (1, 1, 5),
            (13, 9, 33),
            (64, 288, 16),
            (24, 16, 3136),
            (20, 17, 200),
        ];
        for kernel in kernels() {
            for &(m, k, n) in &cases {
                for clamp in [Clamp::NONE, relu6] {
                    let w: Vec<f32> = (0..m * k)
                        .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                        .collect();
                    let x: Vec<f32> = (0..k * n)
                        .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    let b: Vec<f32> = (0..m).map(|v| v as f32 * 0.5 - 2.0).collect();
                    let packed = pack_weights(m, k, &w);
                    // Sentinels past the output must survive (masked stores).
                    let mut out = vec![f32::NAN; m * n + 3];
                    out[m * n..].fill(1234.5);
                    gemm(m, k, n, &packed, &x, &b, clamp, &mut out, kernel);
                    assert_eq!(&out[m * n..], &[1234.5; 3], "{kernel:?} {m}x{k}x{n}");
                    let want = naive(m, k, n, &w, &x, &b, clamp);
                    for (j, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{kernel:?} {m}x{k}x{n} {clamp:?} element {j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// The portable kernel is the one ARM devices would run; on x86 it must agree with AVX2.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_and_avx2_agree() {
        if !avx2_fma() {
            return;
        }
        let (m, k, n) = (20, 40, 37);
        let w: Vec<f32> = (0..m * k).map(|v| (v % 7) as f32 - 3.0).collect();
        let x: Vec<f32> = (0..k * n).map(|v| (v % 5) as f32 * 0.25).collect();
        let b = vec![0.5; m];
        let packed = pack_weights(m, k, &w);
        let mut a = vec![0f32; m * n];
        let mut c = vec![0f32; m * n];
        gemm(
            m,
            k,
            n,
            &packed,
            &x,
            &b,
            Clamp::NONE,
            &mut a,
            Kernel::Portable,
        );
        gemm(
            m,
            k,
            n,
            &packed,
            &x,
            &b,
            Clamp::NONE,
            &mut c,
            Kernel::Avx2Fma,
        );
        // Small integers and quarters: exact in both.
        assert_eq!(a, c);
    }
}
