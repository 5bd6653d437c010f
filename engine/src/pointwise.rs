//! Pointwise (1x1) convolutions, and the im2col convolutions' matrix products, as a matrix
//! product over the channels-first activation as it lies in memory, and the passes installing it.
//!
//! In NCHW a 1x1 convolution is `out[o, p] = bias[o] + Σ_i W[o, i] · x[i, p]`, and the input
//! plane `x` is already the `K x N` row-major right-hand operand (`K` input channels, `N` points).
//! tract 0.23.9 packs that operand into panels on every call (`OptMatMulPack`: 11 % of a
//! `mobilenetish` inference, BENCHMARKS.md) and then runs its kernel over the packed copy.
//! [`Pointwise`] packs only the constant weights, once at load (panels of [`MR`] output channels,
//! `k`-major), and reads `x` in place, [`NR`] points at a time (with 256 input channels or more
//! it first copies a stripe of `x` into contiguous `k x NR` blocks, which L1 holds better; a
//! last block of at most 4 points runs a narrow kernel, one multiply-add per point and input
//! channel instead of [`MR`]); the bias and a clamp (ReLU,
//! ReLU6: `depthwise::fuse_clamp`) are applied in the store. The sum over `i` runs in order with
//! fused multiply-adds from zero, then the bias is added: what tract's matrix product followed
//! by its bias addition computes.
//!
//! Models read from NNEF reach the pass with channels-last operands: tract's NNEF writer emits
//! each 1x1 convolution as a 2-D matrix product between axis moves, and its declutter folds
//! those into the `EinSum` (`akbm,nk->bmn`, `kam,nk->amn`, `mk,nk->nm`, and with a symbolic
//! batch `akbm,nk->abmn`, `amk,nk->anm`). [`Layout`] says which operand is channels-last. A
//! channels-first output runs the tile above (a channels-last input is transposed, 16 points at
//! a time, into a `k x 16` block buffer first). A channels-last output — those forms, and every
//! pointwise convolution once the layout pass (`crate::layout`) has switched a model to
//! channels-last — is a plain product of points by channels ([`gemm_channels_last`]): tiles of
//! points broadcast from `x` by output channels loaded from weights packed in panels of
//! [`NR_LAST`], by blocks of [`KC`] input channels, on AVX-512 where the CPU has it (tiles of 12
//! points by 32 channels) and AVX2 otherwise. A reshape after the product is folded into the
//! op's output shape, and the residual addition after a projection into the product: into
//! its store channels-last, a stripe at a time after it channels-first ([`fuse_residual`]).
//!
//! The kernels are AVX2 + FMA and AVX-512 (x86_64, detected at run time); every other CPU gets
//! a portable kernel (same tiles, plain multiply and add). The passes install the op only where
//! the AVX2 kernel runs ([`fast_kernel`]): on ARM tract's hand-written NEON kernels stay in
//! charge, as nothing here was measured there (BENCHMARKS.md). Every kernel is checked against
//! a naive product in the tests below, on every CPU that runs it. The AVX2 and AVX-512 kernels
//! of every layout sum the same products in the same order with fused multiply-adds, so they
//! agree to the bit; the portable kernel rounds each product.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::change_axes::AxisOp;
use tract_nnef::tract_core::ops::einsum::EinSum;
use tract_nnef::tract_core::ops::math::Add;

use std::ops::Range;

use crate::depthwise::Clamp;
#[cfg(target_arch = "x86_64")]
use crate::lanes::{Avx2Lanes, Avx512Lanes, Lanes};

/// Output channels per tile (rows of the packed weight panels).
pub(crate) const MR: usize = 6;
/// Points per tile (two AVX2 vectors).
pub(crate) const NR: usize = 16;
/// Output channels per weight panel of [`Layout::ChannelsLast`]: two AVX-512 vectors, or two
/// AVX2 tiles of [`NR`].
pub(crate) const NR_LAST: usize = 32;
/// Points per [`Layout::ChannelsLast`] tile with AVX-512 (32 registers: 24 sums, 2 weights).
#[cfg(target_arch = "x86_64")]
const MR_AVX512: usize = 12;
/// The most points a [`RowTile`] of any kernel takes.
const MAX_ROW_TILE: usize = 12;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(MR_AVX512 <= MAX_ROW_TILE && MR <= MAX_ROW_TILE);

/// `out[b, o, p] = clamp(Σ_i W[o, i] · x[b, i, p] + bias[o])` for an input `x` read as
/// `[batch, k, n]` (`batch`: the product of the axes before `k_axis`, `n`: of those after it).
/// Inputs: `x`, the weights packed by [`pack_weights`], the bias `[m]`. Output: the axes before
/// `k_axis` if `keep_batch` (else none: they are all 1), then `m`, then `spatial` (whose product
/// is `n`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Pointwise {
    pub m: usize,
    pub k: usize,
    /// The axis of `x` holding the input channels: after the batch axes, before the spatial
    /// ones, or last ([`Layout::InChannelsLast`]).
    pub k_axis: usize,
    pub keep_batch: bool,
    /// The spatial axes of `x` (product `n`).
    pub spatial: TVec<usize>,
    /// The spatial axes of the output (product `n`): `spatial`, or a reshape of it folded in.
    pub out_spatial: TVec<usize>,
    pub layout: Layout,
    pub clamp: Clamp,
    /// A fourth input, the output's shape, is added to the output after the clamp (the
    /// residual addition of an inverted-residual block: [`fuse_residual`]);
    /// [`Layout::ChannelsLast`] only.
    pub residual: bool,
}

/// Where the channels lie in the activation and in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    /// `x` `[batch.., k, spatial..]`, output `[(batch..), m, spatial..]` (ONNX's NCHW forms).
    ChannelsFirst,
    /// `x` `[batch.., spatial.., k]`, output `[(batch..), m, spatial..]` (NNEF's `mk,nk->nm`,
    /// `amk,nk->anm`): each block of [`NR`] points is transposed into a `k x NR` buffer.
    InChannelsLast,
    /// `x` `[batch.., k, spatial..]`, output `[(batch..), spatial.., m]` (NNEF's
    /// `akbm,nk->bmn`, `kam,nk->amn`, `akbm,nk->abmn`): the operands' roles in the tile are
    /// swapped (points broadcast from `x` in place, output channels as vectors from the
    /// transposed weights), the bias added per column.
    OutChannelsLast,
    /// `x` `[batch.., spatial.., k]`, output `[(batch..), spatial.., m]`: both channels-last,
    /// as the layout pass (`crate::layout`) runs the layers between depthwise convolutions.
    /// A plain matrix product `x · Wᵀ`: tiles of points (rows of `x`, broadcast) by output
    /// channels (vectors of the weights, packed in panels of [`NR_LAST`] columns).
    ChannelsLast,
}

impl Layout {
    /// Whether `x` holds its channels on its last axis.
    pub(crate) fn input_channels_last(self) -> bool {
        matches!(self, Layout::InChannelsLast | Layout::ChannelsLast)
    }

    /// Whether the output holds its channels on its last axis.
    pub(crate) fn output_channels_last(self) -> bool {
        matches!(self, Layout::OutChannelsLast | Layout::ChannelsLast)
    }

    /// Whether [`gemm`] adds a residual in this layout ([`fuse_residual`]).
    pub(crate) fn takes_residual(self) -> bool {
        matches!(self, Layout::ChannelsLast | Layout::ChannelsFirst)
    }
}

impl Pointwise {
    fn n(&self) -> usize {
        self.spatial.iter().product()
    }

    /// How many leading axes of `x` are batch axes.
    pub(crate) fn batch_rank(&self) -> usize {
        if self.layout.input_channels_last() {
            self.k_axis - self.spatial.len()
        } else {
            self.k_axis
        }
    }

    pub(crate) fn output_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let mut shape: TVec<D> = if self.keep_batch {
            input[..self.batch_rank()].iter().cloned().collect()
        } else {
            tvec![]
        };
        if !self.layout.output_channels_last() {
            shape.push(self.m.into());
        }
        shape.extend(self.out_spatial.iter().map(|d| D::from(*d)));
        if self.layout.output_channels_last() {
            shape.push(self.m.into());
        }
        shape
    }

    /// The axis of the output holding the output channels.
    fn channel_axis(&self) -> usize {
        let prefix = if self.keep_batch {
            self.batch_rank()
        } else {
            0
        };
        if self.layout.output_channels_last() {
            prefix + self.out_spatial.len()
        } else {
            prefix
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
        if xs.len() % (k * n) != 0
            || bs.len() != self.m
            || ws.len() != packed_len(self.layout, self.m, k)
        {
            bail!("EnginePointwise: input sizes do not match {self:?}");
        }
        // Every element is written by `gemm`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape(x.shape()))? };
        let residual_ram = match (self.residual, inputs.get(3)) {
            (false, _) => None,
            (true, Some(r)) if r.shape() == out.shape() => Some(r.try_as_plain_ram()?),
            (true, _) => bail!("EnginePointwise: no residual input of the output's shape"),
        };
        let residual = residual_ram
            .as_ref()
            .map(|r| r.as_slice::<f32>())
            .transpose()?;
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            let per_batch = xs.chunks_exact(k * n).zip(os.chunks_exact_mut(self.m * n));
            for (b, (x, out)) in per_batch.enumerate() {
                let residual = residual.map(|r| &r[b * self.m * n..(b + 1) * self.m * n]);
                gemm(
                    self.layout,
                    self.m,
                    k,
                    n,
                    ws,
                    x,
                    bs,
                    self.clamp,
                    residual,
                    out,
                    Kernel::best(),
                );
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
        let batch: TDim = inputs[0].shape[..self.batch_rank()].iter().product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            batch * (self.m * self.k * self.n())
        )))
    }

    as_op!();
}

/// Length of the packed weights of an `m x k` matrix: `ceil(m / MR)` panels of `k x MR`, or
/// for the channels-last outputs ([`Layout::OutChannelsLast`], [`Layout::ChannelsLast`])
/// `ceil(m / NR_LAST)` panels of `k x NR_LAST`.
pub(crate) fn packed_len(layout: Layout, m: usize, k: usize) -> usize {
    match layout {
        Layout::ChannelsLast | Layout::OutChannelsLast => m.div_ceil(NR_LAST) * k * NR_LAST,
        _ => m.div_ceil(MR) * k * MR,
    }
}

/// Where element `(o, i)` of the row-major `m x k` weights lies once packed for `layout`:
/// panels of [`MR`] rows, `k`-major (element `(r, i)` of panel `p` at `(p * k + i) * MR + r`,
/// rows past `m` zero); for the channels-last outputs ([`Layout::OutChannelsLast`],
/// [`Layout::ChannelsLast`]) panels of [`NR_LAST`] columns of the transposed matrix,
/// `k`-major (element `(i, c)` of panel `p` at `(p * k + i) * NR_LAST + c`, columns past `m`
/// zero).
fn packed_index(layout: Layout, k: usize, o: usize, i: usize) -> usize {
    match layout {
        Layout::ChannelsLast | Layout::OutChannelsLast => {
            ((o / NR_LAST) * k + i) * NR_LAST + o % NR_LAST
        }
        _ => ((o / MR) * k + i) * MR + o % MR,
    }
}

/// Packs the row-major `m x k` weights for `layout` ([`packed_index`]).
pub(crate) fn pack_weights(layout: Layout, m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let mut packed = vec![0f32; packed_len(layout, m, k)];
    for (o, row) in w.chunks_exact(k).take(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            packed[packed_index(layout, k, o, i)] = *v;
        }
    }
    packed
}

/// The row-major `m x k` weights back from [`pack_weights`] (the layout pass repacks them).
pub(crate) fn unpack_weights(layout: Layout, m: usize, k: usize, packed: &[f32]) -> Vec<f32> {
    let mut w = vec![0f32; m * k];
    for (o, row) in w.chunks_exact_mut(k).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = packed[packed_index(layout, k, o, i)];
        }
    }
    w
}

/// The most of a channels-first `x` (`k` rows of a stripe of columns) [`gemm`] runs every
/// weight panel over before moving on: 192 KiB, in L2.
const STRIPE_BYTES: usize = 192 * 1024;

/// From this many input channels on, [`gemm`] copies a channels-first `x` into contiguous
/// blocks before the tiles read it (below 256 the strided reads are as fast: BENCHMARKS.md,
/// session 16).
const PACK_K_MIN: usize = 256;

thread_local! {
    /// The packed blocks of [`gemm`] (up to [`STRIPE_BYTES`] plus a block), kept between calls:
    /// allocating and zeroing them on every call cost as much as the copy.
    static PACKED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which tile kernel [`gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA intrinsics; only where the CPU has both.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX-512 (F), and AVX2 + FMA where a tile is too narrow for 16 lanes (the channels-first
    /// tiles of at most [`NARROW`] points); only where the CPU has all three.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// Whether the channels-first tiles run two weight panels at once ([`Tile::run_pair`]).
    fn pairs_panels(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512 {
            return true;
        }
        false
    }

    /// Every kernel this CPU runs, the portable one first.
    #[cfg(test)]
    pub(crate) fn all_available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if crate::window::Avx2::detect().is_some() {
            kernels.push(Kernel::Avx2Fma);
            if crate::window::avx512_detected() {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }

    /// The fastest kernel this CPU runs.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if crate::window::Avx2::detect().is_some() {
            if crate::window::avx512_detected() {
                return Kernel::Avx512;
            }
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }
}

impl Kernel {
    /// The points and channels of this kernel's [`RowTile`]s.
    fn row_tile(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => (MR_AVX512, NR_LAST),
            _ => (MR, NR),
        }
    }
}

/// The bias of the channels-last products, zero-padded to whole panels of [`NR_LAST`] (the
/// kernels load a panel's biases as whole vectors).
fn panel_biases(bias: &[f32], m: usize) -> Vec<f32> {
    let mut biases = vec![0f32; m.div_ceil(NR_LAST) * NR_LAST];
    biases[..m].copy_from_slice(&bias[..m]);
    biases
}

/// Whether this CPU runs the AVX2 + FMA kernel: the passes install [`Pointwise`] only then.
pub(crate) fn fast_kernel() -> bool {
    Kernel::best() != Kernel::Portable
}

/// The rows of each weight panel of [`MR`] (the last may be short) and their biases,
/// zero-padded to [`MR`], made once per product (not once per tile).
fn panel_biases_by_rows(bias: &[f32], m: usize) -> Vec<(usize, [f32; MR])> {
    bias[..m]
        .chunks(MR)
        .map(|rows| {
            let mut b = [0f32; MR];
            b[..rows.len()].copy_from_slice(rows);
            (rows.len(), b)
        })
        .collect()
}

/// `out = clamp(W · x + bias)` for one batch element in `layout`: `W` packed by
/// [`pack_weights`]; [`Layout::ChannelsFirst`]: `x` row-major `k x n`, `out` `m x n`;
/// [`Layout::InChannelsLast`]: `x` `n x k`, `out` `m x n` (the same tile for these two);
/// [`Layout::ChannelsLast`]: `x` `n x k`, `out` `n x m` ([`gemm_channels_last`]);
/// [`Layout::OutChannelsLast`]: `x` `k x n`, `out` `n x m` ([`gemm_out_channels_last`], on
/// the same tiles). A `residual` (the output's size; [`Layout::ChannelsLast`] and
/// [`Layout::ChannelsFirst`]) is added after the clamp.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    layout: Layout,
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    x: &[f32],
    bias: &[f32],
    clamp: Clamp,
    residual: Option<&[f32]>,
    out: &mut [f32],
    kernel: Kernel,
) {
    assert!(w.len() >= packed_len(layout, m, k) && x.len() >= k * n && out.len() >= m * n);
    assert!(bias.len() >= m);
    assert!(residual.is_none_or(|r| layout.takes_residual() && r.len() >= m * n));
    match layout {
        Layout::ChannelsLast => {
            gemm_channels_last(m, k, n, w, x, bias, clamp, residual, out, kernel)
        }
        Layout::OutChannelsLast => gemm_out_channels_last(m, k, n, w, x, bias, clamp, out, kernel),
        Layout::ChannelsFirst => {
            gemm_channels_first(m, k, n, n, n, w, x, bias, clamp, residual, out, kernel)
        }
        Layout::InChannelsLast => {
            // Each block of NR points (rows of `x`) transposed into `k x NR`, then every panel.
            let mut block = vec![0f32; k * NR];
            let biases = panel_biases_by_rows(bias, m);
            for col in (0..n).step_by(NR) {
                let cols = NR.min(n - col);
                transpose_block(&x[col * k..(col + cols) * k], k, cols, &mut block);
                for (panel, (rows, b)) in biases.iter().enumerate() {
                    let t = Tile {
                        k,
                        w: &w[panel * k * MR..(panel + 1) * k * MR],
                        ldw: MR,
                        x: &block,
                        ldx: NR,
                        tiles: 1,
                        x_step: 0,
                        cols,
                        ldo: n,
                        rows: *rows,
                        bias: b,
                        clamp,
                    };
                    t.run(&mut out[panel * MR * n + col..], kernel);
                }
            }
        }
    }
}

/// [`gemm`]'s [`Layout::ChannelsFirst`] product into part of larger matrices: `x` rows
/// (input channels) `ldx` apart, `out` rows (output channels) `ldo` apart, `n` points of each.
/// A band of rows of a plane is such a part ([`crate::pointwise_depthwise`]). A `residual` is
/// laid out as `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_channels_first(
    m: usize,
    k: usize,
    n: usize,
    ldx: usize,
    ldo: usize,
    w: &[f32],
    x: &[f32],
    bias: &[f32],
    clamp: Clamp,
    residual: Option<&[f32]>,
    out: &mut [f32],
    kernel: Kernel,
) {
    assert!(n >= 1 && ldx >= n && ldo >= n && k >= 1 && m >= 1);
    assert!(w.len() >= packed_len(Layout::ChannelsFirst, m, k) && bias.len() >= m);
    assert!(x.len() >= (k - 1) * ldx + n && out.len() >= (m - 1) * ldo + n);
    assert!(residual.is_none_or(|r| r.len() >= (m - 1) * ldo + n));
    let panels = m.div_ceil(MR);
    // The tiles of weight panels `panel..panel + panel_step` (as many as there are) and
    // `count` blocks of `cols` points from point `col`, the first read from `xb` (its first
    // column) with rows `ldx` apart, the next `x_step` further on. AVX-512 runs two panels at
    // once ([`Tile::run_pair`]), a block at a time.
    let panel_step = if kernel.pairs_panels() { 2 } else { 1 };
    let biases = panel_biases_by_rows(bias, m);
    let tile = |xb: &[f32],
                ldx: usize,
                x_step: usize,
                panel: usize,
                (col, cols, count): (usize, usize, usize),
                out: &mut [f32]| {
        let (rows, b) = &biases[panel];
        let t = Tile {
            k,
            w: &w[panel * k * MR..(panel + 1) * k * MR],
            ldw: MR,
            x: xb,
            ldx,
            tiles: count,
            x_step,
            cols,
            ldo,
            rows: *rows,
            bias: b,
            clamp,
        };
        let out = &mut out[panel * MR * ldo + col..];
        if panel_step == 2 && panel + 1 < panels {
            let (rows, b) = &biases[panel + 1];
            for j in 0..count {
                let first = Tile {
                    x: &xb[j * x_step..],
                    tiles: 1,
                    ..t
                };
                let next = Tile {
                    w: &w[(panel + 1) * k * MR..(panel + 2) * k * MR],
                    rows: *rows,
                    bias: b,
                    ..first
                };
                Tile::run_pair(&first, &next, &mut out[j * NR..], kernel);
            }
        } else {
            t.run(out, kernel);
        }
    };
    // Each weight panel (in L1) against every column block of a stripe of `x` small
    // enough to stay in L2 ([`STRIPE_BYTES`]; all of `x` when it fits), so `x` is read
    // from memory once and each panel writes runs of `stripe` points to its rows. (A
    // stripe of one column block, as before session 15, had every block of a 112x112
    // layer store into all `m` output rows, 50 KB apart: `m` streams, as many pages.)
    let stripe = (STRIPE_BYTES / (k * 4)).max(1).div_ceil(NR) * NR;
    // A last block of at most NARROW points (a 7x7 or 14x14 plane's) runs every panel
    // at once ([`narrow_panels`]), after its stripe's other blocks.
    let narrow_from = match n % NR {
        tail @ 1..=NARROW if kernel != Kernel::Portable => n - tail,
        _ => n,
    };
    // The stripe of points `points`, read from `xs` (at its first point) with rows `ld`
    // apart, its block `b` `b * step` further on: every panel over its blocks, then its narrow
    // last block, then its residual.
    let run_stripe = |xs: &[f32], ld: usize, step: usize, points: Range<usize>, out: &mut [f32]| {
        let at = |col: usize| (col - points.start) / NR * step;
        for panel in (0..panels).step_by(panel_step) {
            by_blocks(
                points.start..points.end.min(narrow_from),
                NR,
                |col, cols, count| tile(&xs[at(col)..], ld, step, panel, (col, cols, count), out),
            );
        }
        if points.contains(&narrow_from) {
            narrow_panels(
                k,
                w,
                &xs[at(narrow_from)..],
                ld,
                n - narrow_from,
                &biases,
                clamp,
                &mut out[narrow_from..],
                ldo,
                kernel,
            );
        }
        add_residual_columns(out, residual, m, ldo, points);
    };
    if k < PACK_K_MIN {
        for start in (0..n).step_by(stripe) {
            run_stripe(&x[start..], ldx, NR, start..n.min(start + stripe), out);
        }
        return;
    }
    // Many input channels: a block's `k` rows of `x`, `ldx` apart, are more cache lines
    // (two per row when unaligned) than L1 holds, re-read from L2 for every panel. The
    // stripe's blocks are first copied into contiguous `k x NR` blocks.
    PACKED_X.with_borrow_mut(|packed| {
        let len = stripe.min(n.div_ceil(NR) * NR) * k;
        if packed.len() < len {
            packed.resize(len, 0.0);
        }
        for start in (0..n).step_by(stripe) {
            let end = n.min(start + stripe);
            let blocks = packed.chunks_exact_mut(k * NR);
            for (block, col) in blocks.zip((start..end).step_by(NR)) {
                let cols = NR.min(n - col);
                for (i, to) in block.chunks_exact_mut(NR).enumerate() {
                    let from = &x[i * ldx + col..];
                    if cols == NR {
                        to.copy_from_slice(&from[..NR]);
                    } else {
                        to[..cols].copy_from_slice(&from[..cols]);
                    }
                }
            }
            run_stripe(packed, NR, k * NR, start..end, out);
        }
    });
}

/// `out[o, p] += residual[o, p]` for the points `cols` of every output channel of a
/// channels-first `out` (`m` rows `ldo` apart, as the residual's): the residual addition of a
/// stripe that [`gemm_channels_first`] has just written, while it is in cache (after the bias
/// and clamp, as the separate addition was).
fn add_residual_columns(
    out: &mut [f32],
    residual: Option<&[f32]>,
    m: usize,
    ldo: usize,
    cols: std::ops::Range<usize>,
) {
    let Some(residual) = residual else { return };
    for o in 0..m {
        let row = o * ldo + cols.start..o * ldo + cols.end;
        for (v, r) in out[row.clone()].iter_mut().zip(&residual[row]) {
            *v += *r;
        }
    }
}

/// Blocks of points [`gemm_channels_last`] gives its kernel in one call where the weights are
/// small: a block of 12 points of a layer with 16 input channels is ~400 multiply-adds, and
/// the bookkeeping of a call (the checks, the kernel's choice, its set-up) was a share of
/// that worth having once for several (BENCHMARKS.md, session 25).
const BLOCKS_PER_CALL: usize = 4;

/// Input channels per pass of [`gemm_channels_last`] over the output: a panel's block of
/// weights (16 KiB) and a tile's rows of `x` stay in L1 while the tiles of a stripe reuse them.
const KC: usize = 128;

/// Weights small enough (all panels) that [`gemm_channels_last`] runs every panel for each
/// block of points instead: each point's output row is written whole, front to back.
const SMALL_WEIGHTS_BYTES: usize = 32 * 1024;

/// An `x` of at most this many bytes stays in L2 while [`gemm_channels_last`] runs every weight
/// panel over all of it (1 MiB of L2 on AMD Zen 5, 2 MiB on Intel Sapphire Rapids).
const RESIDENT_X_BYTES: usize = 512 * 1024;

/// [`gemm`] for [`Layout::ChannelsLast`]: `out[p, o] = clamp(Σ_i x[p, i] · W[o, i] +
/// bias[o])`, `x` `n x k` and `out` `n x m` row-major, `w` in panels of [`NR_LAST`] output
/// channels. Three orders, by what must stay in cache:
/// - small weights ([`SMALL_WEIGHTS_BYTES`], the 112x112 and 56x56 expansions): every panel
///   per block of points, so each point's output row is written whole, front to back;
/// - a small `x` ([`RESIDENT_X_BYTES`], the 14x14 and 7x7 layers, whose weights are larger than
///   their activations): each panel over every block of points, all `k` input channels in one
///   tile, so the weights are read once, front to back, as the hardware prefetchers like, and
///   the sums never leave the registers (by blocks of `k` and stripes of points, the 7x7 layers
///   took 1.2–1.4× as long in a whole model: BENCHMARKS.md, session 19), on Intel CPUs the next
///   panel prefetched into L2 meanwhile ([`prefetches_next_panel`]);
/// - otherwise, for each stripe of points small enough for L2 ([`STRIPE_BYTES`]), by blocks of
///   [`KC`] input channels (the sums so far kept in `out` between blocks, the bias and clamp
///   applied after the last: the same sums in the same order), each weight panel over the
///   stripe's blocks of points, so its block of weights is read from L1.
///
/// All three add the products of each output in the order of `k`. AVX-512 takes a panel's 32
/// channels in one tile of [`MR_AVX512`] points; the other kernels in two of [`NR`] channels and
/// [`MR`] points. Runs of whole blocks of points go to the kernel in one call ([`by_blocks`]).
#[allow(clippy::too_many_arguments)]
fn gemm_channels_last(
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    x: &[f32],
    bias: &[f32],
    clamp: Clamp,
    residual: Option<&[f32]>,
    out: &mut [f32],
    kernel: Kernel,
) {
    let (rows_per_tile, cols_per_tile) = kernel.row_tile();
    let panels = m.div_ceil(NR_LAST);
    let biases = panel_biases(bias, m);
    // The tiles of one panel, `count` blocks of `rows` points from point `p`, input channels
    // `ks`.
    let mut tiles = |panel: usize, p: usize, rows: usize, count: usize, ks: Range<usize>| {
        let cols = NR_LAST.min(m - panel * NR_LAST);
        let wp = &w[(panel * k + ks.start) * NR_LAST..(panel + 1) * k * NR_LAST];
        let last = p + rows * count - 1;
        for c0 in (0..cols).step_by(cols_per_tile) {
            let t = RowTile {
                k: ks.len(),
                x: &x[p * k + ks.start..last * k + ks.end],
                ldx: k,
                taps: None,
                rows,
                tiles: count,
                w: &wp[c0..],
                cols: cols_per_tile.min(cols - c0),
                ldo: m,
                bias: &biases[panel * NR_LAST + c0..],
                clamp,
                accumulate: ks.start > 0,
                finish: ks.end == k,
                residual: residual.map(|r| &r[p * m + panel * NR_LAST + c0..]),
            };
            t.run(&mut out[p * m + panel * NR_LAST + c0..], kernel);
        }
    };
    if k * panels * NR_LAST * 4 <= SMALL_WEIGHTS_BYTES {
        let group = rows_per_tile * BLOCKS_PER_CALL;
        for p in (0..n).step_by(group) {
            for panel in 0..panels {
                by_blocks(p..n.min(p + group), rows_per_tile, |p, rows, count| {
                    tiles(panel, p, rows, count, 0..k)
                });
            }
        }
        return;
    }
    if n * k * 4 <= RESIDENT_X_BYTES {
        // While a panel runs, the next one is fetched into L2 (where that pays:
        // [`prefetches_next_panel`]), a share before each block of points.
        let prefetch = prefetches_next_panel();
        let panel_len = k * NR_LAST;
        let share = panel_len.div_ceil(n.div_ceil(rows_per_tile));
        for panel in 0..panels {
            if !prefetch {
                by_blocks(0..n, rows_per_tile, |p, rows, count| {
                    tiles(panel, p, rows, count, 0..k)
                });
                continue;
            }
            for (block, p) in (0..n).step_by(rows_per_tile).enumerate() {
                if panel + 1 < panels {
                    let next = &w[(panel + 1) * panel_len..(panel + 2) * panel_len];
                    let from = (block * share).min(panel_len);
                    prefetch_l2(&next[from..(from + share).min(panel_len)]);
                }
                tiles(panel, p, rows_per_tile.min(n - p), 1, 0..k);
            }
        }
        return;
    }
    let row_bytes = (KC.min(k) + m) * 4;
    let stripe = (STRIPE_BYTES / row_bytes).max(1).div_ceil(rows_per_tile) * rows_per_tile;
    for start in (0..n).step_by(stripe) {
        let end = n.min(start + stripe);
        for k0 in (0..k).step_by(KC) {
            for panel in 0..panels {
                by_blocks(start..end, rows_per_tile, |p, rows, count| {
                    tiles(panel, p, rows, count, k0..k.min(k0 + KC))
                });
            }
        }
    }
}

/// `points` as `tile(first point, rows, count)` calls: `count` whole blocks of `rows` points
/// in one call, then the points left over (fewer than `rows`) in another.
fn by_blocks(points: Range<usize>, rows: usize, mut tile: impl FnMut(usize, usize, usize)) {
    let whole = points.len() / rows;
    if whole > 0 {
        tile(points.start, rows, whole);
    }
    let rest = points.start + whole * rows..points.end;
    if !rest.is_empty() {
        tile(rest.start, rest.len(), 1);
    }
}

/// Whether [`gemm_channels_last`] fetches its next weight panel into L2 by software while a
/// panel of a layer with a small `x` runs: on Intel CPUs only. On an Intel Xeon (session 20),
/// read from L3 on demand, the first block of every panel waited on it; prefetched, the 14x14
/// and 7x7 layers took 2151–2195 µs in all instead of 2221–2427 (`l52` 329–341 instead of
/// 372–405), the whole model 154 µs less. On an AMD EPYC (Zen 4, session 25) the prefetches
/// made the same layers slower (`l52`'s product with cold weights 445–477 µs instead of
/// 404–413, every hint and one or two panels ahead; the model's products 190 µs more): the
/// hardware prefetchers alone do better there. BENCHMARKS.md, sessions 20 and 25.
fn prefetches_next_panel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *INTEL.get_or_init(|| {
            // SAFETY: `cpuid` leaf 0 exists on every x86_64 CPU.
            #[allow(unused_unsafe)]
            let vendor = unsafe { std::arch::x86_64::__cpuid(0) };
            [vendor.ebx, vendor.edx, vendor.ecx]
                == [*b"Genu", *b"ineI", *b"ntel"].map(u32::from_le_bytes)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks the CPU to bring `values` into its L2 cache (one prefetch per 64-byte line); nothing
/// where there is no such instruction.
#[inline(always)]
fn prefetch_l2(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        // SAFETY: a prefetch reads nothing and faults on no address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// [`gemm`] for [`Layout::OutChannelsLast`]: `out[p, o] = clamp(Σ_i x[i, p] · W[o, i] +
/// bias[o])`, `x` `k x n` (the column matrix of an im2col convolution, whose output the layout
/// pass makes channels-last), `out` `n x m`, `w` as for [`gemm_channels_last`]: [`gemm_taps`]
/// with point `p` at `p` and input channel `i` at `i * n` from it.
#[allow(clippy::too_many_arguments)]
fn gemm_out_channels_last(
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
    let taps: Vec<usize> = (0..k).map(|i| i * n).collect();
    gemm_taps(m, k, w, x, &taps, 0..n, bias, clamp, out, kernel);
}

/// `out[p, o] = clamp(Σ_i x[points[p] + taps[i]] · W[o, i] + bias[o])` for every point `p` of
/// `points` (where its values begin in `x`), `out` `n x m` (channels-last), `w` packed as for
/// [`Layout::OutChannelsLast`]: the product of a convolution read in place, `taps` the offsets
/// of the kernel's taps in a padded input (`crate::direct_conv`), or of a column matrix's rows.
/// Tiles of consecutive output points ([`next_tile`]: a run's points from one base, or a few
/// short runs' points each from its own); for small weights every panel per tile (each point's
/// output row written whole, front to back), for larger ones each panel over every tile (so the
/// panel stays in L1). The sums in the order of `k`, as [`RowTile`] computes them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_taps(
    m: usize,
    k: usize,
    w: &[f32],
    x: &[f32],
    taps: &[usize],
    points: impl Iterator<Item = usize> + Clone,
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    kernel: Kernel,
) {
    assert!(taps.len() == k && k >= 1 && bias.len() >= m);
    assert!(w.len() >= packed_len(Layout::OutChannelsLast, m, k));
    let (rows_per_tile, cols_per_tile) = kernel.row_tile();
    let last = *taps.iter().max().expect("k >= 1");
    let panels = m.div_ceil(NR_LAST);
    let biases = panel_biases(bias, m);
    // The tiles of `panels` over every block of points.
    let mut tiles = |panels: std::ops::Range<usize>| {
        let mut points = points.clone().peekable();
        let mut p = 0;
        loop {
            let (bases, rows, consecutive) = next_tile(&mut points, rows_per_tile);
            if rows == 0 {
                return;
            }
            let taps = Taps {
                offsets: taps,
                last,
                bases: &bases[..rows],
                consecutive,
            };
            for panel in panels.clone() {
                let cols = NR_LAST.min(m - panel * NR_LAST);
                for c0 in (0..cols).step_by(cols_per_tile) {
                    let t = RowTile {
                        k,
                        x,
                        ldx: 0,
                        taps: Some(taps),
                        rows,
                        tiles: 1,
                        w: &w[panel * k * NR_LAST + c0..(panel + 1) * k * NR_LAST],
                        cols: cols_per_tile.min(cols - c0),
                        ldo: m,
                        bias: &biases[panel * NR_LAST + c0..],
                        clamp,
                        accumulate: false,
                        finish: true,
                        residual: None,
                    };
                    t.run(&mut out[p * m + panel * NR_LAST + c0..], kernel);
                }
            }
            p += rows;
        }
    };
    // Each panel over every tile where the panels would not stay in L1 from one tile to the
    // next (`digits_cnn`'s conv2, 73 KiB of weights: the op 9.1 → 7.5 µs timed alone,
    // session 20).
    if k * panels * NR_LAST * 4 <= SMALL_WEIGHTS_BYTES {
        tiles(0..panels);
    } else {
        for panel in 0..panels {
            tiles(panel..panel + 1);
        }
    }
}

/// The next tile of [`gemm_taps`]: the bases of its points, how many, whether consecutive.
/// Consecutive points make a tile (up to `rows_per_tile`), ending where they stop being
/// consecutive if that leaves at least half a tile; shorter runs (a small plane's rows) are put
/// together, up to [`MAX_POINTS_TILE`] points.
fn next_tile(
    points: &mut std::iter::Peekable<impl Iterator<Item = usize>>,
    rows_per_tile: usize,
) -> ([usize; MAX_ROW_TILE], usize, bool) {
    let mut bases = [0usize; MAX_ROW_TILE];
    let mut rows = 0;
    // The consecutive run at the front.
    while rows < rows_per_tile {
        match points.peek() {
            Some(&at) if rows == 0 || at == bases[rows - 1] + 1 => {
                bases[rows] = at;
                rows += 1;
                points.next();
            }
            _ => break,
        }
    }
    if rows == rows_per_tile || rows * 2 >= rows_per_tile || points.peek().is_none() {
        return (bases, rows, true);
    }
    let most = MAX_POINTS_TILE.min(rows_per_tile);
    while rows < most {
        match points.next() {
            Some(at) => {
                bases[rows] = at;
                rows += 1;
            }
            None => break,
        }
    }
    (bases, rows, false)
}

/// Where a [`RowTile`] of [`gemm_taps`] reads: point `r`'s value of input channel `i` at
/// `bases[r] + offsets[i]`; `last` is the largest offset; `consecutive` when `bases[r] =
/// bases[0] + r` for all the tile's points.
#[derive(Debug, Clone, Copy)]
struct Taps<'a> {
    offsets: &'a [usize],
    last: usize,
    bases: &'a [usize],
    consecutive: bool,
}

/// How a [`RowTile`] kernel reads `x` (a const parameter of the kernels, not a branch in them:
/// the same branch in the kernel slowed the expanding 1x1 layers, k = 16 to 96, by up to 30 %:
/// BENCHMARKS.md, session 17). By rows of `ldx`:
const X_ROWS: u8 = 0;
/// Through tap offsets, the points consecutive (one base pointer for the tile).
const X_RUN: u8 = 1;
/// Through tap offsets, each point from its own base (a pointer per point: with 12 points, the
/// AVX-512 kernel ran out of registers and kept its sums on the stack, so such tiles take at
/// most [`MAX_POINTS_TILE`]).
const X_POINTS: u8 = 2;

/// The most points of a [`X_POINTS`] tile.
const MAX_POINTS_TILE: usize = 8;

/// One tile of [`gemm_channels_last`] (or [`gemm_taps`]): `rows` points, rows of `x` (`ldx`
/// apart, `k` values each; with `taps`, point `r`'s value `i` at `taps.bases[r] +
/// taps.offsets[i]`), by
/// `cols` output channels of a weight panel (`k` rows [`NR_LAST`] apart, zero past the panel's
/// channels); `out[r, c] = clamp(s + Σ_i x[r, i] · w[i, c] + bias[c]) + residual[r, c]`, `out`
/// rows `ldo` apart, where `s` is `out[r, c]` itself when `accumulate` (the sums of the input
/// channels before these) or zero, and the bias, clamp and residual are applied only when
/// `finish` (the last input channels). The sum runs over `i` in order with fused
/// multiply-adds, then the bias is added: the sums [`Tile`] computes for the channels-first
/// layouts, so the AVX kernels of every layout give the same results.
struct RowTile<'a> {
    k: usize,
    x: &'a [f32],
    ldx: usize,
    taps: Option<Taps<'a>>,
    rows: usize,
    /// This many tiles of `rows` points one after the other (without `taps` only; else 1):
    /// tile `j`'s points `j * rows` rows further on in `x`, its outputs (and residual) `j *
    /// rows` rows further on in `out`. One call for a run of blocks of points: its checks and
    /// set-up once (`BLOCKS_PER_CALL`).
    tiles: usize,
    w: &'a [f32],
    cols: usize,
    ldo: usize,
    /// At least as many values as the kernel's vectors cover (zero past `cols`).
    bias: &'a [f32],
    clamp: Clamp,
    accumulate: bool,
    finish: bool,
    /// Added after the clamp when `finish`: as many values as `out` from the tile's first
    /// output, rows `ldo` apart.
    residual: Option<&'a [f32]>,
}

impl<'a> RowTile<'a> {
    /// The tile's first `at` points, and the rest (its output rows from `at` on).
    #[cfg(target_arch = "x86_64")]
    fn split_rows(&self, at: usize) -> (RowTile<'a>, RowTile<'a>) {
        assert!(at < self.rows && self.tiles == 1);
        let first = RowTile { rows: at, ..*self };
        let rest = RowTile {
            rows: self.rows - at,
            taps: self.taps.map(|taps| Taps {
                bases: &taps.bases[at..],
                ..taps
            }),
            residual: self.residual.map(|r| &r[at * self.ldo..]),
            ..*self
        };
        (first, rest)
    }

    #[inline(always)]
    fn run(&self, out: &mut [f32], kernel: Kernel) {
        match self.taps {
            None => self.run_in::<X_ROWS>(out, kernel),
            Some(taps) if taps.consecutive => self.run_in::<X_RUN>(out, kernel),
            Some(_) => self.run_in::<X_POINTS>(out, kernel),
        }
    }

    #[inline(always)]
    fn run_in<const X: u8>(&self, out: &mut [f32], kernel: Kernel) {
        assert!(self.k >= 1 && self.rows >= 1 && self.cols >= 1 && self.tiles >= 1);
        assert!(self.tiles == 1 || X == X_ROWS);
        // The points the tiles read and write: `rows` a tile (the kernels compute rows past
        // them as copies of the last).
        let points = self.rows * self.tiles;
        let x_holds = |_most_rows: usize| {
            if let Some(taps) = self.taps {
                assert!(taps.offsets.len() >= self.k && taps.bases.len() >= self.rows);
                let last = taps.bases[..self.rows].iter().max().expect("rows >= 1");
                assert!(self.x.len() > last + taps.last);
            } else {
                assert!(self.ldx >= self.k);
                assert!(self.x.len() >= (points - 1) * self.ldx + self.k);
            }
        };
        assert!(out.len() >= (points - 1) * self.ldo + self.cols);
        assert!(self
            .residual
            .is_none_or(|r| r.len() >= (points - 1) * self.ldo + self.cols));
        match kernel {
            Kernel::Portable => {
                x_holds(self.rows);
                assert!(self.rows <= MR && self.cols <= NR && self.bias.len() >= self.cols);
                assert!(self.w.len() >= (self.k - 1) * NR_LAST + self.cols);
                for j in 0..self.tiles {
                    let (x, o) = (j * self.rows * self.ldx, j * self.rows * self.ldo);
                    let tile = RowTile {
                        x: &self.x[x..],
                        tiles: 1,
                        residual: self.residual.map(|r| &r[o..]),
                        ..*self
                    };
                    row_tile_portable(&tile, &mut out[o..]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2Fma` is only chosen when the CPU has AVX2 and FMA; the
            // slices cover every element the tile reads and writes (asserted here).
            Kernel::Avx2Fma => unsafe {
                x_holds(MR);
                assert!(self.rows <= MR && self.cols <= NR && self.bias.len() >= NR);
                assert!(self.w.len() >= (self.k - 1) * NR_LAST + NR);
                match (self.cols <= NR / 2, self.rows) {
                    (true, 1..=2) => row_tile_avx2::<1, 2, X>(self, out),
                    (true, 3..=4) => row_tile_avx2::<1, 4, X>(self, out),
                    (true, _) => row_tile_avx2::<1, MR, X>(self, out),
                    (false, 1..=2) => row_tile_avx2::<2, 2, X>(self, out),
                    (false, 3..=4) => row_tile_avx2::<2, 4, X>(self, out),
                    (false, _) => row_tile_avx2::<2, MR, X>(self, out),
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512` is only chosen when the CPU has AVX-512 F; the slices
            // cover every element the tile reads and writes (asserted here).
            Kernel::Avx512 => unsafe {
                x_holds(MR_AVX512);
                assert!(self.rows <= MR_AVX512 && self.cols <= NR_LAST);
                assert!(self.bias.len() >= NR_LAST);
                assert!(self.w.len() >= self.k * NR_LAST);
                if X == X_RUN && (MAX_POINTS_TILE + 1..MR_AVX512).contains(&self.rows) {
                    // A run's last tile of 9 to 11 points: its first 8, then the rest (the
                    // 12-point kernel takes whole tiles only).
                    let (first, rest) = self.split_rows(MAX_POINTS_TILE);
                    first.run_in::<X>(out, kernel);
                    rest.run_in::<X>(&mut out[MAX_POINTS_TILE * self.ldo..], kernel);
                    return;
                }
                if X == X_POINTS {
                    // At most 8 points (`MAX_POINTS_TILE`): no 12-point kernel to compile.
                    assert!(self.rows <= MAX_POINTS_TILE);
                    return match (self.cols <= NR_LAST / 2, self.rows) {
                        (true, 1..=2) => row_tile_avx512::<1, 2, X>(self, out),
                        (true, 3..=4) => row_tile_avx512::<1, 4, X>(self, out),
                        (true, _) => row_tile_avx512::<1, 8, X>(self, out),
                        (false, 1..=2) => row_tile_avx512::<2, 2, X>(self, out),
                        (false, 3..=4) => row_tile_avx512::<2, 4, X>(self, out),
                        (false, _) => row_tile_avx512::<2, 8, X>(self, out),
                    };
                }
                match (self.cols <= NR_LAST / 2, self.rows) {
                    (true, 1..=2) => row_tile_avx512::<1, 2, X>(self, out),
                    (true, 3..=4) => row_tile_avx512::<1, 4, X>(self, out),
                    (true, 5..=8) => row_tile_avx512::<1, 8, X>(self, out),
                    (true, _) => row_tile_avx512::<1, MR_AVX512, X>(self, out),
                    (false, 1..=2) => row_tile_avx512::<2, 2, X>(self, out),
                    (false, 3..=4) => row_tile_avx512::<2, 4, X>(self, out),
                    (false, 5..=8) => row_tile_avx512::<2, 8, X>(self, out),
                    (false, _) => row_tile_avx512::<2, MR_AVX512, X>(self, out),
                }
            },
        }
    }
}

#[inline(always)]
fn row_tile_portable(t: &RowTile, out: &mut [f32]) {
    let mut acc = [[0f32; NR]; MR];
    if t.accumulate {
        for (r, acc) in acc.iter_mut().enumerate().take(t.rows) {
            acc[..t.cols].copy_from_slice(&out[r * t.ldo..r * t.ldo + t.cols]);
        }
    }
    for i in 0..t.k {
        let wr = &t.w[i * NR_LAST..][..t.cols];
        for (r, acc) in acc.iter_mut().enumerate().take(t.rows) {
            let xv = if let Some(taps) = t.taps {
                t.x[taps.bases[r] + taps.offsets[i]]
            } else {
                t.x[r * t.ldx + i]
            };
            for (a, w) in acc.iter_mut().zip(wr) {
                *a += xv * *w;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(t.rows) {
        let to = &mut out[r * t.ldo..r * t.ldo + t.cols];
        if !t.finish {
            to.copy_from_slice(&acc[..t.cols]);
            continue;
        }
        for (j, ((o, a), b)) in to.iter_mut().zip(acc).zip(t.bias).enumerate() {
            let v = *a + *b;
            let v = if t.clamp == Clamp::NONE {
                v
            } else {
                v.max(t.clamp.low()).min(t.clamp.high())
            };
            *o = match t.residual {
                Some(res) => v + res[r * t.ldo + j],
                None => v,
            };
        }
    }
}

/// `$body` for each row `$r` below `$rows` of a tile of `$R` rows (at most [`MAX_ROW_TILE`]),
/// written out once per row with `$r` a constant, so that a kernel's array of sums is indexed by
/// constants only and stays in registers. Where a loop indexed it (`take(rows)`, or a loop to
/// `R` that LLVM chose not to unroll: the fat-LTO device build), LLVM kept the array in memory
/// as well and stored every sum to the stack after every multiply-add of the inner loop: the
/// 12-point AVX-512 tile ran at half speed in release and device builds (BENCHMARKS.md,
/// session 22).
#[cfg(target_arch = "x86_64")]
macro_rules! for_each_row {
    ($rows:expr, $R:expr, |$r:ident| $body:block) => {
        const { assert!($R <= MAX_ROW_TILE && MAX_ROW_TILE == 12) };
        for_each_row!(@ $rows, $R, $r, $body; 0 1 2 3 4 5 6 7 8 9 10 11)
    };
    (@ $rows:expr, $R:expr, $r:ident, $body:block; $($n:literal)*) => {
        $(
            if $n < $rows {
                let $r: usize = if $n < $R { $n } else { $R - 1 };
                $body
            }
        )*
    };
}

/// Defines `$name`, [`RowTile`]'s kernel on the vectors of `$lanes` with `$features` enabled
/// (one body for AVX2 and AVX-512, `crate::lanes`): `V` vectors per row (`V = 1` for up to one
/// vector of channels), the sums of `R` (at least `t.rows`) rows — the rows past `t.rows`
/// repeat the last one (never stored), so no read goes past `x` — and `x` read as `X` says
/// ([`X_ROWS`], [`X_RUN`], [`X_POINTS`]).
#[cfg(target_arch = "x86_64")]
macro_rules! row_tile_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:ty) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name<const V: usize, const R: usize, const X: u8>(
            t: &RowTile,
            out: &mut [f32],
        ) {
            type L = $lanes;
            let n = L::N;
            let (k, rows, cols, ldo) = (t.k, t.rows, t.cols, t.ldo);
            debug_assert!(rows >= 1 && rows <= R && cols >= 1 && cols <= n * V);
            // SAFETY (pointers): row `r` of `x` is `k` values from `xr[r]`, rows `ldx` apart
            // (or with taps point `r`'s value `i` at `xr[r] + taps.offsets[i]`, `xr[r]` at
            // `taps.bases[r]`); `wp` walks the panel's `k` rows, NR_LAST apart, `n * V` values
            // each; `x` holds `tiles * rows` rows, `out` (and `residual`) `tiles * rows` rows
            // of `cols` values, `ldo` apart (`RowTile::run` asserts them).
            let full = cols == n * V;
            let mask: [<L as Lanes>::Mask; V] =
                std::array::from_fn(|v| L::mask(cols.saturating_sub(n * v)));
            // Tile `j`'s points from point `j * rows` on (`RowTile::tiles`).
            for first in (0..t.tiles).map(|j| j * rows) {
                let xr: [*const f32; R] = std::array::from_fn(|r| {
                    let r = r.min(rows - 1);
                    t.x.as_ptr().add(match t.taps {
                        Some(taps) if X != X_ROWS => taps.bases[r],
                        _ => (first + r) * t.ldx,
                    })
                });
                let op = out.as_mut_ptr().add(first * ldo);
                // The sums' rows are only ever indexed by constants (`for_each_row`).
                let mut acc = [[L::splat(0.0); V]; R];
                if t.accumulate {
                    for_each_row!(rows, R, |r| {
                        for v in 0..V {
                            acc[r][v] = L::load_masked(op.add(r * ldo + n * v), mask[v]);
                        }
                    });
                }
                let mut wp = t.w.as_ptr();
                // Point `r`'s value of input channel `i`: `x_at(r, i)`. One loop, written once,
                // expanded for each layout of `x`.
                macro_rules! accumulate {
                    (|$r:ident, $i:ident| $x_at:expr) => {
                        for $i in 0..k {
                            let wv: [<L as Lanes>::V; V] =
                                std::array::from_fn(|v| L::load(wp.add(n * v)));
                            for ($r, acc) in acc.iter_mut().enumerate() {
                                let b = L::splat(*$x_at);
                                for v in 0..V {
                                    acc[v] = L::fmadd(b, wv[v], acc[v]);
                                }
                            }
                            wp = wp.add(NR_LAST);
                        }
                    };
                }
                match X {
                    X_ROWS => accumulate!(|r, i| xr[r].add(i)),
                    X_RUN => {
                        // One base: the points' addresses differ by constants.
                        let offsets = t.taps.expect("a tap tile has taps").offsets.as_ptr();
                        let x0 = xr[0];
                        // A kernel of more rows than `MAX_POINTS_TILE` takes whole tiles only
                        // (`RowTile::run_in`): with its rows past a shorter tile's repeating the
                        // last point, AVX-512's 12-row kernel ran out of registers.
                        if rows == R || R > MAX_POINTS_TILE {
                            debug_assert_eq!(rows, R);
                            accumulate!(|r, i| x0.add(*offsets.add(i) + r));
                        } else {
                            // A shorter tile (a run's last): its rows past `rows` repeat the last
                            // point, as in the other modes. Read as their own points, they went
                            // past the end of `x` when the tile was its last (a fault where that
                            // was a page's end).
                            let last = rows - 1;
                            accumulate!(|r, i| x0.add(*offsets.add(i) + r.min(last)));
                        }
                    }
                    _ => {
                        let offsets = t.taps.expect("a tap tile has taps").offsets.as_ptr();
                        accumulate!(|r, i| xr[r].add(*offsets.add(i)));
                    }
                }
                let clamped = t.clamp != Clamp::NONE;
                let (low, high) = (L::splat(t.clamp.low()), L::splat(t.clamp.high()));
                let bias: [<L as Lanes>::V; V] =
                    std::array::from_fn(|v| L::load(t.bias.as_ptr().add(n * v)));
                for_each_row!(rows, R, |r| {
                    let to = op.add(r * ldo);
                    for v in 0..V {
                        let mut y = acc[r][v];
                        if t.finish {
                            y = L::add(y, bias[v]);
                            if clamped {
                                y = L::clamp(y, low, high);
                            }
                            if let Some(res) = t.residual {
                                let at = res.as_ptr().add((first + r) * ldo + n * v);
                                y = L::add(y, L::load_masked(at, mask[v]));
                            }
                        }
                        if full {
                            L::store(to.add(n * v), y);
                        } else {
                            L::store_masked(to.add(n * v), mask[v], y);
                        }
                    }
                });
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
row_tile_kernel!(
    /// [`RowTile`] with AVX2: 8 channels a vector.
    row_tile_avx2,
    "avx2,fma",
    Avx2Lanes
);

#[cfg(target_arch = "x86_64")]
row_tile_kernel!(
    /// [`RowTile`] with AVX-512: 16 channels a vector.
    row_tile_avx512,
    "avx512f",
    Avx512Lanes
);

/// `block[i * NR + j] = x[j * k + i]` for the `cols` rows of `x` (`cols x k`, row-major).
fn transpose_block(x: &[f32], k: usize, cols: usize, block: &mut [f32]) {
    for (j, row) in x.chunks_exact(k).take(cols).enumerate() {
        for (i, v) in row.iter().enumerate() {
            block[i * NR + j] = *v;
        }
    }
}

/// One tile: `rows` (≤ MR) output rows by `cols` (≤ NR) columns; `out[r, j] = clamp(Σ_i w[i *
/// ldw + r] · x[i * ldx + j] + bias[r])`, `out` rows `ldo` apart. `w` is read for
/// all MR rows (`(k - 1) * ldw + MR` elements), `x` for `cols` columns only.
struct Tile<'a> {
    k: usize,
    w: &'a [f32],
    ldw: usize,
    x: &'a [f32],
    ldx: usize,
    /// This many tiles of `cols` points one after another: tile `j` reads `x` from `j *
    /// x_step` on and writes `out` from column `j * NR` on (`cols == NR` when more than one).
    /// One call for a run of blocks of points: its checks and set-up once.
    tiles: usize,
    x_step: usize,
    cols: usize,
    ldo: usize,
    rows: usize,
    bias: &'a [f32; MR],
    clamp: Clamp,
}

impl Tile<'_> {
    #[inline(always)]
    fn run(&self, out: &mut [f32], kernel: Kernel) {
        assert!(self.k >= 1 && self.rows >= 1 && self.rows <= MR);
        assert!(self.cols >= 1 && self.cols <= NR && self.tiles >= 1);
        assert!(self.tiles == 1 || self.cols == NR);
        assert!(self.w.len() >= (self.k - 1) * self.ldw + MR);
        let (x_last, out_last) = ((self.tiles - 1) * self.x_step, (self.tiles - 1) * NR);
        assert!(self.x.len() >= x_last + (self.k - 1) * self.ldx + self.cols);
        assert!(out.len() >= (self.rows - 1) * self.ldo + out_last + self.cols);
        match kernel {
            Kernel::Portable => {
                for j in 0..self.tiles {
                    let t = Tile {
                        x: &self.x[j * self.x_step..],
                        tiles: 1,
                        ..*self
                    };
                    tile_portable(&t, &mut out[j * NR..]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2Fma` is only chosen when the CPU has AVX2 and FMA
            // (`Kernel::best`); the slices cover every element the tile reads and writes
            // (asserted above).
            Kernel::Avx2Fma | Kernel::Avx512 => unsafe {
                // A block of at most 8 columns (the last one of a 7x7 or 14x14 plane): one
                // vector per row, not two half-empty ones.
                // At most NARROW columns (the last point of a 7x7 plane, the last 4 of a
                // 14x14 one), with the weights as the panel's vector: one multiply-add per
                // column and input channel instead of MR.
                if self.cols <= NARROW && self.ldw == MR {
                    assert!(self.tiles == 1);
                    let biases = [(self.rows, *self.bias)];
                    return narrow_panels(
                        self.k, self.w, self.x, self.ldx, self.cols, &biases, self.clamp, out,
                        self.ldo, kernel,
                    );
                }
                if self.cols <= NR / 2 {
                    tile_rows::<1>(self, out)
                } else {
                    tile_rows::<2>(self, out)
                }
            },
        }
    }
}

impl Tile<'_> {
    /// `first` and `second`, two tiles of one block of `x` and of consecutive weight panels
    /// (`second`'s rows MR rows below `first`'s in `out`), at once: with AVX-512 and more than
    /// [`NARROW`] columns, one vector of 16 columns per row and 2·MR rows of sums, as many as
    /// the AVX2 tile's, where a panel alone would have six (too few to keep two multiply-add
    /// units busy through their latency). The same sums in the same order as [`tile_avx2`].
    fn run_pair(first: &Tile, second: &Tile, out: &mut [f32], kernel: Kernel) {
        #[cfg(target_arch = "x86_64")]
        if kernel.pairs_panels() && first.cols > NARROW {
            let (a, b) = (first, second);
            assert!(a.k >= 1 && a.k == b.k && a.rows == MR && b.rows >= 1 && b.rows <= MR);
            assert!(a.cols <= NR && a.cols == b.cols && NR == 16);
            assert!(a.ldw == MR && b.ldw == MR && a.ldx == b.ldx && a.ldo == b.ldo);
            assert!(a.x.as_ptr() == b.x.as_ptr() && a.x.len() == b.x.len());
            assert!(a.clamp == b.clamp && a.tiles == 1 && b.tiles == 1);
            assert!(a.w.len() >= a.k * MR && b.w.len() >= b.k * MR);
            assert!(a.x.len() >= (a.k - 1) * a.ldx + a.cols);
            assert!(out.len() >= (MR + b.rows - 1) * a.ldo + a.cols);
            // SAFETY: `Kernel::Avx512` is only chosen when the CPU has AVX-512 F; the slices
            // cover every element the tiles read and write (asserted above).
            unsafe {
                match b.rows {
                    1..=2 => tile_pair_avx512::<2>(a, b, out),
                    3..=4 => tile_pair_avx512::<4>(a, b, out),
                    _ => tile_pair_avx512::<MR>(a, b, out),
                }
            }
            return;
        }
        first.run(out, kernel);
        second.run(&mut out[MR * first.ldo..], kernel);
    }
}

/// [`Tile::run_pair`] with AVX-512: sums for the MR rows of `a` and the first `R` (at least
/// `b.rows`) of `b`, 16 columns a vector (lanes past `cols` masked off).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_pair_avx512<const R: usize>(a: &Tile, b: &Tile, out: &mut [f32]) {
    use crate::lanes::{Avx512Lanes as L, Lanes};
    let (k, cols, ldx, ldo) = (a.k, a.cols, a.ldx, a.ldo);
    let mask = L::mask(cols);
    let mut acc_a = [L::splat(0.0); MR];
    let mut acc_b = [L::splat(0.0); R];
    // SAFETY (pointers): `xp` walks `k` rows of `x`, `ldx` apart, reading `cols` of each
    // (masked past them); `wa`, `wb` walk the `k` rows of MR weights of each panel
    // (`Tile::run_pair` asserts them).
    let (mut xp, mut wa, mut wb) = (a.x.as_ptr(), a.w.as_ptr(), b.w.as_ptr());
    macro_rules! accumulate {
        (|$p:ident| $load:expr) => {
            for _ in 0..k {
                let xv = {
                    let $p = xp;
                    $load
                };
                for (r, acc) in acc_a.iter_mut().enumerate() {
                    *acc = L::fmadd(L::splat(*wa.add(r)), xv, *acc);
                }
                for (r, acc) in acc_b.iter_mut().enumerate() {
                    *acc = L::fmadd(L::splat(*wb.add(r)), xv, *acc);
                }
                xp = xp.add(ldx);
                wa = wa.add(MR);
                wb = wb.add(MR);
            }
        };
    }
    let full = cols == NR;
    if full {
        accumulate!(|p| L::load(p));
    } else {
        accumulate!(|p| L::load_masked(p, mask));
    }
    let clamped = a.clamp != Clamp::NONE;
    let (low, high) = (L::splat(a.clamp.low()), L::splat(a.clamp.high()));
    let op = out.as_mut_ptr();
    let store = |r: usize, acc, bias: f32| {
        let mut y = L::add(acc, L::splat(bias));
        if clamped {
            y = L::clamp(y, low, high);
        }
        let to = op.add(r * ldo);
        if full {
            L::store(to, y);
        } else {
            L::store_masked(to, mask, y);
        }
    };
    for r in 0..MR {
        store(r, acc_a[r], a.bias[r]);
    }
    for_each_row!(b.rows, R, |r| {
        store(MR + r, acc_b[r], b.bias[r]);
    });
}

#[inline(always)]
fn tile_portable(t: &Tile, out: &mut [f32]) {
    let (k, cols) = (t.k, t.cols);
    let mut acc = [[0f32; NR]; MR];
    let mut xr = [0f32; NR];
    for i in 0..k {
        xr[..cols].copy_from_slice(&t.x[i * t.ldx..i * t.ldx + cols]);
        let wr = &t.w[i * t.ldw..i * t.ldw + MR];
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] += wr[r] * xr[j];
            }
        }
    }
    let (low, high) = (t.clamp.low(), t.clamp.high());
    for r in 0..t.rows {
        let to = &mut out[r * t.ldo..r * t.ldo + cols];
        for (o, a) in to.iter_mut().zip(&acc[r]) {
            let v = *a + t.bias[r];
            *o = if t.clamp == Clamp::NONE {
                v
            } else {
                v.max(low).min(high)
            };
        }
    }
}

/// [`tile_avx2`] computing only the rows it stores, rounded up to 2, 4 or [`MR`]: the last panel
/// of 16 or 32 output channels has 4 or 2 rows (`mobilenetish`'s first layer and five more),
/// which the full tile computed for all six.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_rows<const V: usize>(t: &Tile, out: &mut [f32]) {
    match t.rows {
        1..=2 => tile_avx2::<V, 2>(t, out),
        3..=4 => tile_avx2::<V, 4>(t, out),
        _ => tile_avx2::<V, MR>(t, out),
    }
}

/// One tile of `V` vectors (8 columns each) per row: `V = 2` for up to [`NR`] columns, `V = 1`
/// for up to 8; sums for the first `R` (at least `t.rows`) of the MR rows only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const V: usize, const R: usize>(t: &Tile, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, cols, ldx, ldw, ldo, rows) = (t.k, t.cols, t.ldx, t.ldw, t.ldo, t.rows);
    debug_assert!(cols >= 1 && cols <= 8 * V && rows >= 1 && rows <= R && R <= MR);
    // Lanes of the vectors inside the tile: loads and stores past `cols` are masked off.
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut mask = [_mm256_setzero_si256(); V];
    for (v, m) in mask.iter_mut().enumerate() {
        *m = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32 - 8 * v as i32), lane);
    }
    let full = cols == 8 * V;
    let clamped = t.clamp != Clamp::NONE;
    // Tile `j` reads `x` from `j * x_step` on and writes columns `j * NR` on (`Tile::tiles`).
    for j in 0..t.tiles {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let mut xp = t.x.as_ptr().add(j * t.x_step);
        let mut wp = t.w.as_ptr();
        // SAFETY (pointer arithmetic and loads): `xp` walks `k` rows of `x` from tile `j`'s
        // first point, reading `cols` columns of each (masked past them); `wp` walks `k` rows
        // of MR values of `w`, `ldw` apart (both asserted by `Tile::run`).
        // One loop, written once, expanded twice: with plain loads for a full tile and masked
        // ones otherwise, so the choice is not made again in the inner loop.
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
                    wp = wp.add(ldw);
                }
            };
        }
        if full {
            accumulate!(|p, _v| _mm256_loadu_ps(p));
        } else {
            accumulate!(|p, v| _mm256_maskload_ps(p, mask[v]));
        }
        let (low, high) = (
            _mm256_set1_ps(t.clamp.low()),
            _mm256_set1_ps(t.clamp.high()),
        );
        let op = out.as_mut_ptr().add(j * NR);
        for_each_row!(rows, R, |r| {
            let b = _mm256_set1_ps(t.bias[r]);
            let to = op.add(r * ldo);
            for v in 0..V {
                let mut y = _mm256_add_ps(acc[r][v], b);
                if clamped {
                    // `max(y, low)` gives `low` for a NaN `y`, as `f32::max` (tract's `Max`)
                    // does.
                    y = _mm256_min_ps(_mm256_max_ps(y, low), high);
                }
                if full {
                    _mm256_storeu_ps(to.add(8 * v), y);
                } else {
                    _mm256_maskstore_ps(to.add(8 * v), mask[v], y);
                }
            }
        });
    }
}

/// Most columns [`narrow_panels`] takes.
const NARROW: usize = 4;

/// The tiles of every weight panel (`w`, packed channels-first; `biases` one per panel) over
/// one block of at most [`NARROW`] points (`x`: its first point, rows `ldx` apart; `out`: its
/// first point in output row 0, rows `ldo` apart). Each point's sum over a panel's rows is one
/// vector (lanes past MR masked), a multiply-add per input channel with the point's `x` value
/// broadcast (one per point and input channel, not MR): the same sums in the same order as
/// [`tile_avx2`] (fused multiply-adds from zero over `i`, then the bias, then the clamp), so
/// the same results. A panel alone has one sum per point, each multiply-add waiting on the one
/// before (four cycles on Zen 3), so a 7x7 plane's last point cost almost as much as a full
/// tile of 16; so about `8 / cols` panels run at once and their sums interleave (the 7x7
/// layers' products 20–25 % faster, the 14x14 ones 7–14 %: BENCHMARKS.md, session 21).
#[allow(clippy::too_many_arguments)]
// Only the x86_64 kernels run it (`gemm` and `Tile::run` give the portable kernel no narrow
// blocks).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn narrow_panels(
    k: usize,
    w: &[f32],
    x: &[f32],
    ldx: usize,
    cols: usize,
    biases: &[(usize, [f32; MR])],
    clamp: Clamp,
    out: &mut [f32],
    ldo: usize,
    kernel: Kernel,
) {
    let panels = biases.len();
    assert!(k >= 1 && (1..=NARROW).contains(&cols) && kernel != Kernel::Portable);
    assert!(w.len() >= panels * k * MR && x.len() >= (k - 1) * ldx + cols);
    let (last_rows, _) = biases[panels - 1];
    assert!(out.len() >= ((panels - 1) * MR + last_rows - 1) * ldo + cols);
    let mut panel = 0;
    // Groups of `G` panels, then smaller groups for the panels left.
    macro_rules! groups {
        ($c:literal: $($g:literal),*) => {{
            $(
                while panels - panel >= $g {
                    // SAFETY: the kernel is AVX2 + FMA or AVX-512 (asserted: not the portable
                    // one, and only chosen where the CPU has them); the group's panels, `x`'s
                    // `k` rows and the group's output rows lie in the slices (asserted above).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        narrow_group_avx2::<$g, $c>(
                            k,
                            &w[panel * k * MR..],
                            x,
                            ldx,
                            &biases[panel..panel + $g],
                            clamp,
                            out[panel * MR * ldo..].as_mut_ptr(),
                            ldo,
                        )
                    };
                    panel += $g;
                }
            )*
        }};
    }
    match cols {
        1 => groups!(1: 8, 4, 2, 1),
        2 => groups!(2: 4, 2, 1),
        3 => groups!(3: 3, 1),
        _ => groups!(4: 2, 1),
    }
    debug_assert_eq!(panel, panels);
}

/// [`narrow_panels`]' kernel: `G` panels of `C` points. Each sum is a vector over a panel's
/// rows (lanes past MR masked).
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` holds `G` panels of `k` rows of MR weights; `x` `k` rows of
/// `C` values, `ldx` apart; `out` the rows of `G` panels (`biases[g].0` rows each, MR rows a
/// panel, `ldo` apart), `C` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_group_avx2<const G: usize, const C: usize>(
    k: usize,
    w: &[f32],
    x: &[f32],
    ldx: usize,
    biases: &[(usize, [f32; MR])],
    clamp: Clamp,
    out: *mut f32,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let wmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(MR as i32), lane);
    let mut acc = [[_mm256_setzero_ps(); C]; G];
    let (mut xp, wp) = (x.as_ptr(), w.as_ptr());
    for i in 0..k {
        let xv: [__m256; C] = std::array::from_fn(|j| _mm256_broadcast_ss(&*xp.add(j)));
        for (g, acc) in acc.iter_mut().enumerate() {
            let wv = _mm256_maskload_ps(wp.add((g * k + i) * MR), wmask);
            for (acc, xv) in acc.iter_mut().zip(xv) {
                *acc = _mm256_fmadd_ps(wv, xv, *acc);
            }
        }
        xp = xp.add(ldx);
    }
    let (low, high) = (_mm256_set1_ps(clamp.low()), _mm256_set1_ps(clamp.high()));
    let clamped = clamp != Clamp::NONE;
    for (g, (acc, (rows, bias))) in acc.iter().zip(biases).enumerate() {
        let mut b = [0f32; 8];
        b[..MR].copy_from_slice(bias);
        let b = _mm256_loadu_ps(b.as_ptr());
        let op = out.add(g * MR * ldo);
        for (j, acc) in acc.iter().enumerate() {
            let mut y = _mm256_add_ps(*acc, b);
            if clamped {
                y = _mm256_min_ps(_mm256_max_ps(y, low), high);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), y);
            for (r, v) in lanes.iter().enumerate().take(*rows) {
                *op.add(r * ldo + j) = *v;
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
        let Some((mut op, x, weights)) = candidate(model, node, einsum)? else {
            return Ok(None);
        };
        let mut patch = TypedModelPatch::new(format!("engine pointwise {}", node.name));
        let x = patch.tap_model(model, x)?;
        // NNEF's channels-last forms are followed by a reshape merging the spatial axes: the
        // op writes that shape (the same memory), so the bias addition after it is its
        // successor.
        let mut replaced: OutletId = node.id.into();
        if let Some(reshape) = folded_reshape(model, node, &op)? {
            op.out_spatial = reshape.1;
            replaced = reshape.0.into();
            patch.obliterate(reshape.0)?;
        }
        let wire = wire(&mut patch, &node.name, op, x, &weights, None)?;
        patch.shunt_outside(model, replaced, wire)?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    })
}

/// The reshape after a channels-last [`Pointwise`] candidate that only regroups its spatial
/// axes (the einsum feeding nothing else): its node and the output's new spatial axes.
fn folded_reshape(
    model: &TypedModel,
    node: &TypedNode,
    op: &Pointwise,
) -> TractResult<Option<(usize, TVec<usize>)>> {
    if op.layout == Layout::ChannelsFirst || model.outputs.contains(&node.id.into()) {
        return Ok(None);
    }
    let Some(next) = model.single_succ(node.id)? else {
        return Ok(None);
    };
    if !matches!(next.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) {
        return Ok(None);
    }
    let from = model.outlet_fact(node.id.into())?.shape.to_tvec();
    let to = model.outlet_fact(next.id.into())?.shape.to_tvec();
    let prefix = from.len() - 1 - op.out_spatial.len();
    if to.len() < prefix + 1 || to[..prefix] != from[..prefix] {
        return Ok(None);
    }
    let Some(rest) = to[prefix..]
        .iter()
        .map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<TVec<usize>>>()
    else {
        return Ok(None);
    };
    let (channels, spatial) = match op.layout {
        Layout::OutChannelsLast => (rest[rest.len() - 1], &rest[..rest.len() - 1]),
        _ => (rest[0], &rest[1..]),
    };
    if channels != op.m || spatial.iter().product::<usize>() != op.n() {
        return Ok(None);
    }
    Ok(Some((next.id, spatial.into())))
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
    let packed = pack_weights(op.layout, op.m, op.k, weights);
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

/// The axes of a float, unquantized `EinSum` of two inputs, one letter per axis: the first
/// input's, the second's, the output's (`"ab,cb->ac"`); `None` for any other einsum.
pub(crate) fn float_einsum_axes(
    node: &TypedNode,
    einsum: &EinSum,
) -> Option<(Vec<char>, Vec<char>, Vec<char>)> {
    if node.inputs.len() != 2
        || einsum.operating_dt != f32::datum_type()
        || einsum.q_params.is_some()
    {
        return None;
    }
    let expr = einsum.axes.to_string();
    let (ins, out) = expr.split_once("->")?;
    let (a, b) = ins.split_once(',')?;
    Some((
        a.chars().collect(),
        b.chars().collect(),
        out.chars().collect(),
    ))
}

/// The op, activation input and row-major `[m, k]` weights of an `EinSum` [`install`] takes.
fn candidate(
    model: &TypedModel,
    node: &TypedNode,
    einsum: &EinSum,
) -> TractResult<Option<(Pointwise, OutletId, Vec<f32>)>> {
    let Some((a, b, out)) = float_einsum_axes(node, einsum) else {
        return Ok(None);
    };
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
        // Weights `[o, i]`. `x` = batch axes, `i`, spatial axes; out = (batch axes), o,
        // spatial (channels first), or (batch axes), spatial, o (NNEF's channels-last output).
        // Or `x` = batch axes, spatial axes, `i`; out = (batch axes), o, spatial (NNEF's
        // channels-last input).
        let (o, i) = (wa[0], wa[1]);
        let Some(k_axis) = xa.iter().position(|c| *c == i) else {
            continue;
        };
        if out.contains(&i) || xa.contains(&o) {
            continue;
        }
        let keep_batch = out.len() == xa.len();
        let Some(o_pos) = out.iter().position(|c| *c == o) else {
            continue;
        };
        let mut found = None;
        for layout in [
            Layout::ChannelsFirst,
            Layout::OutChannelsLast,
            Layout::InChannelsLast,
        ] {
            let (batch_rank, spatial_axes) = match layout {
                Layout::InChannelsLast => {
                    if k_axis + 1 != xa.len() {
                        continue;
                    }
                    let batch_rank = if keep_batch {
                        o_pos
                    } else {
                        match xa.len().checked_sub(out.len()) {
                            Some(b) => b,
                            None => continue,
                        }
                    };
                    if batch_rank > k_axis {
                        continue;
                    }
                    (batch_rank, batch_rank..k_axis)
                }
                _ => (k_axis, k_axis + 1..xa.len()),
            };
            let (batch, spatial) = (&xa[..batch_rank], &xa[spatial_axes.clone()]);
            let mut want: Vec<char> = if keep_batch { batch.to_vec() } else { vec![] };
            if layout != Layout::OutChannelsLast {
                want.push(o);
            }
            want.extend(spatial);
            if layout == Layout::OutChannelsLast {
                want.push(o);
            }
            if out == want {
                found = Some((layout, batch_rank, spatial_axes));
                break;
            }
        }
        let Some((layout, batch_rank, spatial_axes)) = found else {
            continue;
        };
        // Dropped batch axes are summed over: only size 1 makes that the identity.
        if !keep_batch && (0..batch_rank).any(|ax| xf.shape[ax] != 1.into()) {
            continue;
        }
        let Some(spatial_dims) = xf.shape[spatial_axes]
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
            out_spatial: spatial_dims.clone(),
            spatial: spatial_dims,
            layout,
            clamp: Clamp::NONE,
            residual: false,
        };
        return Ok(Some((op, node.inputs[xi], values)));
    }
    Ok(None)
}

/// The operands of the addition at `node` that a [`Pointwise`] computes: for each, the
/// product's slot, the other operand's slot, and the product's node and op (none when `node`
/// is no two-operand `Add`).
fn pointwise_additions<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> Vec<(usize, usize, &'m TypedNode, &'m Pointwise)> {
    let is_add = node
        .op_as::<TypedBinOp>()
        .is_some_and(|bin| bin.0.is::<Add>());
    if !is_add || node.inputs.len() != 2 {
        return vec![];
    }
    [(0, 1), (1, 0)]
        .into_iter()
        .filter_map(|(pw, other)| {
            let prev = model.node(node.inputs[pw].node);
            prev.op_as::<Pointwise>().map(|op| (pw, other, prev, op))
        })
        .collect()
}

/// Folds the addition of a constant per-output-channel (or scalar) bias that follows a
/// [`Pointwise`] with a zero bias and no clamp into its bias, when the product feeds nothing
/// else. Returns how many were folded.
pub(crate) fn fuse_bias(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        for (pw_input, bias_input, prev, op) in pointwise_additions(model, node) {
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

/// Folds the addition that follows a channels-last or channels-first [`Pointwise`] into it
/// (its fourth input, added after the clamp) when the product feeds nothing else and the other
/// operand has the product's shape: the residual connection of an inverted-residual block,
/// which onnxruntime fuses too. One pass over the output and one allocation fewer per block
/// (channels-first, as an AVX2-only CPU runs `mobilenetish`, the ten separate additions took
/// 65 µs: BENCHMARKS.md, session 23). The sums are the same: the product (bias and clamp
/// applied), then the other operand added. Returns how many were folded.
pub(crate) fn fuse_residual(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        for (pw_input, other_input, prev, op) in pointwise_additions(model, node) {
            let shape = &model.outlet_fact(node.inputs[pw_input])?.shape;
            if !op.layout.takes_residual()
                || op.residual
                || model.outlet_fact(node.inputs[other_input])?.shape != *shape
                || model.outlet_fact(node.id.into())?.shape != *shape
                || model.single_succ(prev.id)?.map(|s| s.id) != Some(node.id)
                || model.outputs.contains(&node.inputs[pw_input])
            {
                continue;
            }
            let mut patch =
                TypedModelPatch::new(format!("engine pointwise residual {}", node.name));
            let inputs = prev
                .inputs
                .iter()
                .chain(std::iter::once(&node.inputs[other_input]))
                .map(|i| patch.tap_model(model, *i))
                .collect::<TractResult<TVec<_>>>()?;
            let op = Pointwise {
                residual: true,
                ..op.clone()
            };
            let wire = patch.wire_node(format!("{}.engine_pointwise", node.name), op, &inputs)?[0];
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
    use crate::testing::GuardedSlice;

    /// The tiles [`gemm_taps`] forms from `points`: (bases, consecutive) each.
    fn tiles_of(points: Vec<usize>, rows_per_tile: usize) -> Vec<(Vec<usize>, bool)> {
        let mut points = points.into_iter().peekable();
        let mut tiles = vec![];
        loop {
            let (bases, rows, consecutive) = next_tile(&mut points, rows_per_tile);
            if rows == 0 {
                return tiles;
            }
            tiles.push((bases[..rows].to_vec(), consecutive));
        }
    }

    #[test]
    fn tap_tiles_follow_runs_and_put_short_ones_together() {
        // Rows of 14 points, 20 apart: a whole tile, then the row's 2 left with the next
        // row's first 6 (8 at most), then that row's 8 left, consecutive.
        let rows = |len: usize, count: usize| -> Vec<usize> {
            (0..count).flat_map(|y| (y * 20..).take(len)).collect()
        };
        let tiles = tiles_of(rows(14, 2), 12);
        let expect: Vec<(Vec<usize>, bool)> = vec![
            ((0..12).collect(), true),
            (vec![12, 13, 20, 21, 22, 23, 24, 25], false),
            ((26..34).collect(), true),
        ];
        assert_eq!(tiles, expect);
        // Rows of 4 (`digits_cnn`'s conv2): two rows to a tile.
        let tiles = tiles_of(rows(4, 4), 12);
        assert_eq!(tiles.len(), 2);
        assert_eq!(tiles[0], (vec![0, 1, 2, 3, 20, 21, 22, 23], false));
        // Half a tile or more of a row ends the tile with the row: rows of 9, tiles of 12.
        let tiles = tiles_of(rows(9, 2), 12);
        assert_eq!(
            tiles,
            vec![((0..9).collect(), true), ((20..29).collect(), true)]
        );
        // The kernels of six points take at most six, of any kind.
        let tiles = tiles_of(rows(2, 4), 6);
        assert_eq!(tiles[0], (vec![0, 1, 20, 21, 40, 41], false));
        assert_eq!(tiles[1], (vec![60, 61], true));
        // Every point once, in order.
        for (len, count, per_tile) in [(112, 3, 12), (7, 5, 12), (1, 9, 6), (4, 4, 6)] {
            let all: Vec<usize> = tiles_of(rows(len, count), per_tile)
                .into_iter()
                .flat_map(|(bases, _)| bases)
                .collect();
            assert_eq!(all, rows(len, count));
        }
    }

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

    /// The prefetch is chosen by the vendor `cpuid` names, as Linux reads it.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn prefetches_the_next_panel_on_intel_cpus_only() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']))
            .unwrap();
        assert_eq!(
            prefetches_next_panel(),
            vendor == "GenuineIntel",
            "{vendor}"
        );
    }

    #[test]
    fn matches_naive_product() {
        let relu6 = Clamp::new(0.0, 6.0);
        // (m, k, n): whole tiles, partial row panels and column blocks, one point, the large-x
        // loop order (k * n * 4 > 192 KiB), digits_cnn's conv2 and mobilenetish's 7x7 layers;
        // for the channels-last product each of its three orders (small weights, an `x` that
        // stays in L2, the stripes of points by blocks of KC input channels).
        let cases = [
            (6, 4, 16),
            (16, 32, 49),
            (7, 3, 1),
            (1, 1, 5),
            (13, 9, 33),
            (64, 288, 16),
            (24, 16, 3136),
            (20, 17, 200),
            // Columns left for the narrow kernel (2, 3, 4 past the last 16-block), and input
            // channels enough for the packed blocks (PACK_K_MIN), with a partial stripe.
            (7, 5, 18),
            (9, 6, 35),
            (10, 260, 196),
            (13, 300, 180),
            // The narrow block in groups of panels: 1 point over 15 panels (groups of 8, 4, 2
            // and 1), 2 points over 10 (4, 4, 2), 3 over 8 (3, 3, 1, 1), 4 over 5 panels of 260
            // input channels (packed blocks: 2, 2, 1).
            (88, 7, 17),
            (56, 20, 18),
            (44, 20, 35),
            (29, 260, 196),
            // Channels-last: weights over 32 KiB; `x` under 512 KiB (three panels over 49
            // points), then over it (two stripes, three blocks of KC, a partial panel).
            (70, 200, 49),
            (40, 300, 500),
        ];
        let layouts = [
            Layout::ChannelsFirst,
            Layout::InChannelsLast,
            Layout::OutChannelsLast,
            Layout::ChannelsLast,
        ];
        for (kernel, layout) in Kernel::all_available()
            .into_iter()
            .flat_map(|k| layouts.map(|l| (k, l)))
        {
            for &(m, k, n) in &cases {
                for clamp in [Clamp::NONE, relu6] {
                    let w: Vec<f32> = (0..m * k)
                        .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                        .collect();
                    let x: Vec<f32> = (0..k * n)
                        .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    let b: Vec<f32> = (0..m).map(|v| v as f32 * 0.5 - 2.0).collect();
                    let packed = pack_weights(layout, m, k, &w);
                    // Operands at a page's end: nothing is read past them.
                    let packed = GuardedSlice::new(&packed);
                    let x_in = GuardedSlice::new(&if layout.input_channels_last() {
                        transpose(&x, k, n)
                    } else {
                        x.clone()
                    });
                    // Sentinels past the output must survive (masked stores).
                    let mut out = vec![f32::NAN; m * n + 3];
                    out[m * n..].fill(1234.5);
                    // The channels-last and channels-first layouts with a residual added (an
                    // inverted-residual block's projection, `fuse_residual`).
                    let res: Vec<f32> = (0..m * n).map(|v| (v % 11) as f32 - 5.0).collect();
                    let res = GuardedSlice::new(&res);
                    let residual = layout.takes_residual().then_some(&res[..]);
                    gemm(
                        layout, m, k, n, &packed, &x_in, &b, clamp, residual, &mut out, kernel,
                    );
                    let what = format!("{kernel:?} {layout:?} {m}x{k}x{n} {clamp:?}");
                    assert_eq!(&out[m * n..], &[1234.5; 3], "{what}");
                    let mut want = naive(m, k, n, &w, &x, &b, clamp);
                    if layout.output_channels_last() {
                        want = transpose(&want, m, n);
                    }
                    if let Some(res) = residual {
                        for (w, r) in want.iter_mut().zip(res) {
                            *w += r;
                        }
                    }
                    for (j, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{what} element {j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Every einsum form [`install`] takes, as a one-node model, against tract's own optimised
    /// plan for the same `EinSum`: random data, sizes that are not multiples of 8 or 16 (partial
    /// tiles everywhere), weights as either operand.
    #[test]
    fn pointwise_einsum_forms_match_tract() {
        use tract_nnef::tract_core::axes::AxesMapping;
        if !fast_kernel() {
            return;
        }
        let mut seed = 0x2545_f491_u64;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let (m, k) = (13, 11);
        // (expression, shape of x, whether the weights are the first operand); `m`/`n` in the
        // weights' letters are the output channels, `k` the input ones.
        let forms: [(&str, &[usize], bool); 11] = [
            // Channels first (ONNX's NCHW forms): batch kept, batch of one dropped, no batch.
            ("akhw,nk->anhw", &[2, k, 5, 7], false),
            ("akhw,nk->nhw", &[1, k, 5, 7], false),
            ("kp,nk->np", &[k, 35], false),
            ("nk,akp->anp", &[3, k, 19], true),
            // Channels-last output (NNEF): `akbm,nk->bmn`, `kam,nk->amn`, symbolic-batch form.
            ("akbm,nk->bmn", &[1, k, 5, 7], false),
            ("kam,nk->amn", &[k, 3, 9], false),
            ("akbm,nk->abmn", &[2, k, 3, 5], false),
            // Channels-last input (NNEF): `mk,nk->nm`, the symbolic-batch form.
            ("mk,nk->nm", &[37, k], false),
            ("amk,nk->anm", &[2, 21, k], false),
            ("amk,nk->nm", &[1, 21, k], false),
            ("nk,mk->nm", &[19, k], true),
        ];
        for (expr, x_shape, weights_first) in forms {
            let axes: AxesMapping = expr.parse().unwrap();
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(x_shape)).unwrap();
            let w = model
                .add_const("w", Tensor::from_shape(&[m, k], &random(m * k)).unwrap())
                .unwrap();
            let inputs = if weights_first { [w, x] } else { [x, w] };
            let y = model
                .wire_node("einsum", EinSum::new(axes, f32::datum_type()), &inputs)
                .unwrap();
            model.select_output_outlets(&y).unwrap();
            let stock = model
                .clone()
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap();
            assert_eq!(install(&mut model).unwrap(), 1, "{expr} not taken");
            let ours = model.into_optimized().unwrap();
            assert!(
                ours.nodes().iter().any(|n| n.op_is::<Pointwise>()),
                "{expr}: no EnginePointwise in the optimised plan"
            );
            let ours = ours.into_runnable().unwrap();
            let len: usize = x_shape.iter().product();
            let input = Tensor::from_shape(x_shape, &random(len)).unwrap();
            let want = stock.run(tvec!(input.clone().into())).unwrap();
            let got = ours.run(tvec!(input.into())).unwrap();
            assert_eq!(got[0].shape(), want[0].shape(), "{expr}");
            let want = want[0].try_as_plain_ram().unwrap();
            let got = got[0].try_as_plain_ram().unwrap();
            let (want, got) = (
                want.as_slice::<f32>().unwrap(),
                got.as_slice::<f32>().unwrap(),
            );
            for (j, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-6,
                    "{expr} element {j}: engine {g}, tract {w}"
                );
            }
        }
    }

    /// Row-major `rows x cols` to `cols x rows`.
    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = a[r * cols + c];
            }
        }
        t
    }

    /// The portable kernel is the one ARM devices would run; on x86 it must agree with AVX2.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_and_avx2_agree() {
        if crate::window::Avx2::detect().is_none() {
            return;
        }
        // And the narrow blocks in groups of panels (1, 3 and 4 points).
        for (m, k, n) in [(20, 40, 37), (88, 40, 49), (44, 40, 35), (29, 40, 196)] {
            agree_on(m, k, n);
        }
    }

    fn agree_on(m: usize, k: usize, n: usize) {
        let w: Vec<f32> = (0..m * k).map(|v| (v % 7) as f32 - 3.0).collect();
        let x: Vec<f32> = (0..k * n).map(|v| (v % 5) as f32 * 0.25).collect();
        let b = vec![0.5; m];
        for layout in [
            Layout::ChannelsFirst,
            Layout::InChannelsLast,
            Layout::OutChannelsLast,
            Layout::ChannelsLast,
        ] {
            let packed = pack_weights(layout, m, k, &w);
            // A residual where one is taken.
            let res: Vec<f32> = (0..m * n).map(|v| (v % 3) as f32 - 1.0).collect();
            let residual = layout.takes_residual().then_some(&res[..]);
            let mut portable = vec![0f32; m * n];
            gemm(
                layout,
                m,
                k,
                n,
                &packed,
                &x,
                &b,
                Clamp::NONE,
                residual,
                &mut portable,
                Kernel::Portable,
            );
            // AVX-512 too where the CPU has it (`kernels`).
            for kernel in Kernel::all_available().into_iter().skip(1) {
                let mut out = vec![0f32; m * n];
                gemm(
                    layout,
                    m,
                    k,
                    n,
                    &packed,
                    &x,
                    &b,
                    Clamp::NONE,
                    residual,
                    &mut out,
                    kernel,
                );
                // Small integers and quarters: exact in both.
                assert_eq!(portable, out, "{layout:?} {kernel:?}");
            }
        }
    }
}
