//! Fully connected layers at batch 1: a matrix times a vector.
//!
//! A classifier's last layer (`fc`) multiplies one activation vector of `k` values by an `m x k`
//! weight matrix. tract runs it as a general matrix product: a node that packs the vector, the
//! product on a tile of which one column is used, and (from ONNX `Gemm`) a reshape before them —
//! about 1.2 µs on `digits_cnn`'s 1024 x 10 layer, an eighth of that model's time, and three
//! nodes of per-node overhead. Here it is one op ([`MatVec`]) whose weights are packed once in
//! panels of [`PANEL`] outputs: for each input value, one vector of each panel's weights times
//! the value broadcast, [`GROUP`] panels at once so that the multiply-adds of different outputs
//! overlap. Each output is one sum in input order — except in a layer of fewer than four panels
//! (`digits_cnn`'s 10 outputs), whose few sums would each wait on the multiply-add latency at
//! every input: there each sum runs in [`SPLIT`] interleaved chains, added pairwise at the end.
//! (Split everywhere, `mobilenetish`'s logits came 1.3e-5 from tract's: BENCHMARKS.md, session
//! 19.) The AVX2, AVX-512 and portable kernels give the same bits.
//!
//! The pass ([`install`]) takes every `EinSum` of a batch-1 plan that is such a product, in any
//! axis layout tract's ONNX and NNEF front ends leave: the contracted axes are those `x` and the
//! weights share and the output lacks; every other axis of `x` and of the output has size 1; the
//! weights have one more axis, the outputs'. Only where [`crate::pointwise::fast_kernel`] holds
//! (on other CPUs tract's own kernels are faster than the portable one).

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::einsum::EinSum;

use crate::pointwise::Kernel;

/// Outputs per panel of packed weights: one AVX-512 vector, two AVX2 ones.
const PANEL: usize = 16;

/// `y = W · x` for a batch of one: input `x` (`k` values, any shape), the weights packed by
/// [`pack`]; output `m` values in `out_shape` (the einsum's, every other axis of size 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MatVec {
    pub m: usize,
    pub k: usize,
    pub out_shape: TVec<usize>,
}

/// The row-major `m x k` weights in panels of [`PANEL`] outputs, `k`-major: output `o`'s
/// weight for input `i` at `((o / PANEL) * k + i) * PANEL + o % PANEL`, outputs past `m` zero.
fn pack(m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let mut packed = vec![0f32; m.div_ceil(PANEL) * k * PANEL];
    for (o, row) in w.chunks_exact(k).take(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            packed[((o / PANEL) * k + i) * PANEL + o % PANEL] = *v;
        }
    }
    packed
}

/// `out[o] = Σ_i w[o, i] · x[i]` for the `m` outputs, `w` packed by [`pack`]: groups of up to
/// [`GROUP`] panels at once; a layer of fewer than four panels one panel at a time, each sum
/// split into [`SPLIT`] chains.
fn run(m: usize, k: usize, w: &[f32], x: &[f32], out: &mut [f32], kernel: Kernel) {
    assert!(x.len() == k && out.len() == m && w.len() == m.div_ceil(PANEL) * k * PANEL);
    let panels = m.div_ceil(PANEL);
    let split = panels < 4;
    // AVX2 has 16 vector registers: four panels' 8 sums and the loads fit, eight spill.
    #[cfg(target_arch = "x86_64")]
    let most = if split {
        1
    } else if kernel == Kernel::Avx2Fma {
        4
    } else {
        GROUP
    };
    #[cfg(not(target_arch = "x86_64"))]
    let most = if split { 1 } else { GROUP };
    let mut p = 0;
    while p < panels {
        let group = match panels - p {
            n if n >= most => most,
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let w = &w[p * k * PANEL..(p + group) * k * PANEL];
        let out = &mut out[p * PANEL..m.min((p + group) * PANEL)];
        match kernel {
            Kernel::Portable => group_portable(w, x, out, if split { SPLIT } else { 1 }),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernels are only chosen where the CPU has their instructions
            // (`Kernel::best`); `w` holds `group` panels of `k` rows of PANEL weights and `out`
            // the group's outputs (asserted above).
            Kernel::Avx2Fma => unsafe {
                match (group, split) {
                    (_, true) => group_avx2::<1, SPLIT>(w, x, out),
                    (4, _) => group_avx2::<4, 1>(w, x, out),
                    (2, _) => group_avx2::<2, 1>(w, x, out),
                    _ => group_avx2::<1, 1>(w, x, out),
                }
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe {
                match (group, split) {
                    (_, true) => group_avx512::<1, SPLIT>(w, x, out),
                    (GROUP, _) => group_avx512::<GROUP, 1>(w, x, out),
                    (4, _) => group_avx512::<4, 1>(w, x, out),
                    (2, _) => group_avx512::<2, 1>(w, x, out),
                    _ => group_avx512::<1, 1>(w, x, out),
                }
            },
        }
        p += group;
    }
}

/// Panels run at once (four with AVX2): independent sums enough to keep the multiply-adds busy
/// through their latency (each output's own sum is one chain, in input order).
const GROUP: usize = 8;

/// Chains each output's sum is split into when the layer has fewer than four panels (input `i`
/// into chain `i mod SPLIT`; then `(c0 + c1) + (c2 + c3)`): one panel's one or two vectors of
/// sums alone would wait on the multiply-add latency at every input (`digits_cnn`'s 1024 x 10).
const SPLIT: usize = 4;

/// The sum of an output's chains, in the kernels' order.
fn combine<T: Copy>(chains: &[T], add: impl Fn(T, T) -> T) -> T {
    match chains {
        [one] => *one,
        [a, b, c, d] => add(add(*a, *b), add(*c, *d)),
        _ => unreachable!("one chain or SPLIT"),
    }
}

/// A group of panels in plain Rust, each sum in `split` chains: the kernels' sums in the
/// kernels' order.
fn group_portable(w: &[f32], x: &[f32], out: &mut [f32], split: usize) {
    let k = x.len();
    for (j, o) in out.iter_mut().enumerate() {
        let panel = &w[(j / PANEL) * k * PANEL..];
        let mut chains = [0f32; SPLIT];
        let chains = &mut chains[..split];
        for (i, x) in x.iter().enumerate() {
            chains[i % split] = panel[i * PANEL + j % PANEL].mul_add(*x, chains[i % split]);
        }
        *o = combine(chains, |a, b| a + b);
    }
}

macro_rules! group_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:ty) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const G: usize, const S: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
            use crate::lanes::Lanes;
            type L = $lanes;
            const V: usize = PANEL / <L as Lanes>::N;
            let k = x.len();
            let mut sums = [[[L::splat(0.0); V]; G]; S];
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            // SAFETY: `wp` holds G panels of `k` rows of PANEL weights, `xp` `k` values (`run`).
            // Input `i` goes into chain `i mod S`: S inputs a step, then the rest.
            macro_rules! input {
                ($i:expr, $chain:expr) => {
                    let i = $i;
                    let xv = L::splat(*xp.add(i));
                    for (g, sums) in $chain.iter_mut().enumerate() {
                        let row = wp.add((g * k + i) * PANEL);
                        for (v, s) in sums.iter_mut().enumerate() {
                            *s = L::fmadd(L::load(row.add(v * L::N)), xv, *s);
                        }
                    }
                };
            }
            let mut i = 0;
            while i + S <= k {
                for (c, chain) in sums.iter_mut().enumerate() {
                    input!(i + c, chain);
                }
                i += S;
            }
            // To `S`, skipping the chains past the inputs left: `sums` indexed by constants
            // only (`pointwise::for_each_row` says why).
            for (c, chain) in sums.iter_mut().enumerate() {
                if i + c >= k {
                    break;
                }
                input!(i + c, chain);
            }
            let op = out.as_mut_ptr();
            for g in 0..G {
                for v in 0..V {
                    let chains: [<L as Lanes>::V; S] = std::array::from_fn(|c| sums[c][g][v]);
                    let sum = combine(&chains, |a, b| L::add(a, b));
                    let at = g * PANEL + v * L::N;
                    let lanes = out.len().saturating_sub(at).min(L::N);
                    if lanes == L::N {
                        L::store(op.add(at), sum);
                    } else if lanes > 0 {
                        L::store_masked(op.add(at), L::mask(lanes), sum);
                    }
                }
            }
        }
    };
}

group_kernel!(
    /// A group of panels with AVX2: two vectors of 8 outputs a panel.
    group_avx2,
    "avx2,fma",
    crate::lanes::Avx2Lanes
);

group_kernel!(
    /// A group of panels with AVX-512: one vector of 16 outputs a panel.
    group_avx512,
    "avx512f",
    crate::lanes::Avx512Lanes
);

impl Op for MatVec {
    fn name(&self) -> StaticName {
        "EngineMatVec".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for MatVec {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, w) = (&inputs[0], &inputs[1]);
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let ws = w.try_as_plain_ram()?;
        let ws = ws.as_slice::<f32>()?;
        if xs.len() != self.k || ws.len() != self.m.div_ceil(PANEL) * self.k * PANEL {
            bail!("EngineMatVec: input sizes do not match {self:?}");
        }
        // Every element is written by `run`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.out_shape)? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            run(self.m, self.k, ws, xs, os, Kernel::best());
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for MatVec {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.out_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (self.m * self.k).into()
        )))
    }

    as_op!();
}

/// Replaces every `EinSum` that is a matrix times one vector ([the module docs](self)) with a
/// [`MatVec`]. Returns how many.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    if !crate::pointwise::fast_kernel() {
        return Ok(0);
    }
    crate::passes::patch_each(model, |model, node| {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        let Some((op, x, weights)) = candidate(model, node, einsum)? else {
            return Ok(None);
        };
        let mut patch = TypedModelPatch::new(format!("engine matvec {}", node.name));
        let x = patch.tap_model(model, x)?;
        let packed = pack(op.m, op.k, &weights);
        let packed = patch.add_const(
            format!("{}.packed", node.name),
            Tensor::from_shape(&[packed.len()], &packed)?,
        )?;
        let wire = patch.wire_node(format!("{}.engine_matvec", node.name), op, &[x, packed])?[0];
        patch.shunt_outside(model, node.id.into(), wire)?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    })
}

/// The [`MatVec`] an einsum is, its `x` and its weights as a row-major `m x k` matrix.
fn candidate(
    model: &TypedModel,
    node: &TypedNode,
    einsum: &EinSum,
) -> TractResult<Option<(MatVec, OutletId, Vec<f32>)>> {
    let Some((a, b, out)) = crate::pointwise::float_einsum_axes(node, einsum) else {
        return Ok(None);
    };
    let concrete = |f: &TypedFact| -> Option<TVec<usize>> {
        f.shape
            .iter()
            .map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok()))
            .collect()
    };
    let Some(out_shape) = concrete(&node.outputs[0].fact) else {
        return Ok(None);
    };
    for (xi, wi, xa, wa) in [(0, 1, &a, &b), (1, 0, &b, &a)] {
        let (xf, wf) = (
            model.outlet_fact(node.inputs[xi])?,
            model.outlet_fact(node.inputs[wi])?,
        );
        let (Some(weights), Some(x_shape)) = (wf.konst.as_ref(), concrete(xf)) else {
            continue;
        };
        if weights.datum_type() != f32::datum_type()
            || xf.datum_type != f32::datum_type()
            || xa.len() != x_shape.len()
            || wa.len() != weights.rank()
            || out.len() != out_shape.len()
        {
            continue;
        }
        // The contracted axes in `x`'s order, and the weights' one other axis: the outputs'.
        let contracted: Vec<char> = xa
            .iter()
            .copied()
            .filter(|c| wa.contains(c) && !out.contains(c))
            .collect();
        let outputs: Vec<char> = wa
            .iter()
            .copied()
            .filter(|c| !contracted.contains(c))
            .collect();
        let [o] = outputs[..] else {
            continue;
        };
        let size_in = |axes: &[char], shape: &[usize], c: char| {
            axes.iter().position(|a| *a == c).map(|ax| shape[ax])
        };
        let x_rest_is_one = xa
            .iter()
            .zip(&x_shape)
            .all(|(c, d)| contracted.contains(c) || *d == 1);
        let out_rest_is_one = out.iter().zip(&out_shape).all(|(c, d)| *c == o || *d == 1);
        let w_shape = weights.shape();
        let same_sizes = contracted
            .iter()
            .all(|c| size_in(xa, &x_shape, *c) == size_in(wa, w_shape, *c));
        if xa.contains(&o) || !out.contains(&o) || !x_rest_is_one || !out_rest_is_one || !same_sizes
        {
            continue;
        }
        // The weights as `[o, contracted axes in x's order]`, row-major.
        let perm: Vec<usize> = std::iter::once(o)
            .chain(contracted.iter().copied())
            .map(|c| wa.iter().position(|a| *a == c).unwrap())
            .collect();
        let matrix = weights.clone().into_tensor().permute_axes(&perm)?;
        let m = w_shape[perm[0]];
        let k: usize = contracted
            .iter()
            .map(|c| size_in(xa, &x_shape, *c).unwrap())
            .product();
        if m == 0 || k == 0 {
            continue;
        }
        let values = matrix.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let op = MatVec { m, k, out_shape };
        return Ok(Some((op, node.inputs[xi], values)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GuardedSlice;

    /// Every kernel gives the same bits as the portable one, and the product within 1e-5 of a
    /// plain sum: outputs that are and are not whole panels, inputs that are and are not whole
    /// chains.
    #[test]
    fn kernels_agree_to_the_bit_and_with_a_plain_sum() {
        let kernels = Kernel::all_available();
        for (m, k) in [(10, 1024), (1, 1), (17, 3), (33, 130), (1000, 1280)] {
            let w: Vec<f32> = (0..m * k)
                .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                .collect();
            let x: Vec<f32> = (0..k)
                .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            // Operands at a page's end: nothing is read past them.
            let (packed, x) = (GuardedSlice::new(&pack(m, k, &w)), GuardedSlice::new(&x));
            let mut portable = vec![f32::NAN; m];
            run(m, k, &packed, &x, &mut portable, Kernel::Portable);
            for (o, got) in portable.iter().enumerate() {
                let want: f64 = (0..k).map(|i| w[o * k + i] as f64 * x[i] as f64).sum();
                let tolerance =
                    1e-5 * (1.0 + (0..k).map(|i| (w[o * k + i] * x[i]).abs()).sum::<f32>());
                assert!(
                    (*got as f64 - want).abs() <= tolerance as f64,
                    "{m}x{k} output {o}: {got} vs {want}"
                );
            }
            for &kernel in &kernels[1..] {
                let mut out = vec![f32::NAN; m + 3];
                out[m..].fill(1234.5);
                run(m, k, &packed, &x, &mut out[..m], kernel);
                assert_eq!(out[..m], portable[..], "{kernel:?} {m}x{k}");
                assert_eq!(
                    out[m..],
                    [1234.5; 3],
                    "{kernel:?} {m}x{k}: past the outputs"
                );
            }
        }
    }
}
