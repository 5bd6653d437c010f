//! A depthwise 2-D convolution that replaces tract's, and the pass installing it (`passes`).
//!
//! tract 0.23.9 walks a depthwise convolution zone by zone and output row by output row, with
//! its vectorised routine only for unit-stride rows: 60 % of a `mobilenetish` inference
//! (BENCHMARKS.md, "Engine latency (batch 1)"). This op pads each channel plane once into a
//! scratch buffer, split by column phase for strided convolutions (filled a row at a time, a
//! phase at a time), so that every tap is a contiguous multiply-add over an output row, which the
//! compiler vectorises (AVX2 when the CPU has it). 3x3 kernels on x86_64 with AVX2 + FMA
//! (every depthwise layer of the reference models) instead run `plane3x3_avx2`: 8 output points
//! at a time, the sum kept in a register over the nine taps and stored once (BENCHMARKS.md,
//! session 15: half the instructions of the row-accumulator loop); with stride 2 on rows of up
//! to 64 columns, `plane3x3_s2_avx2` reads the input plane in place instead, with no padded
//! copy (session 21: the copy was most of those layers' time). It computes what tract's
//! depthwise kernel computes, in the same order: the bias, then each tap's product added in
//! turn, no fused multiply-add (a padded tap adds an exact zero), so results are the same on
//! every CPU.
//! (An earlier version, off by default, measured no faster than tract: it filled the padded
//! plane with a division per element.)

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_nnef::tract_core::ops::nn::DataFormat;

use crate::window::{split_by_phase, Avx2};

/// Depthwise convolution, NCHW or CHW, f32, dilation 1, kernel `[C·multiplier, 1, kh, kw]` and
/// bias `[C·multiplier]` (or a single value) as second and third inputs: output channel `o`
/// reads input channel `o / multiplier` (ONNX's grouped convolution with `group = C`; a
/// convolution of a single input channel is one with `multiplier` = its output channels).
/// The outputs are clamped to `[low, high]` (`max` then `min`, as tract's `Max` and `Min`
/// compute them), which is how the activation after it is fused (`fuse_clamp`).
///
/// With `channels_last` (set by the layout pass, [`crate::layout`]; multiplier 1 only) the
/// activations are NHWC or HWC instead, the kernel `[kh, kw, C]`
/// ([`crate::depthwise_cl::pack_kernel`]), and [`crate::depthwise_cl`] runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DepthwiseConv {
    pub has_n: bool,
    pub c: usize,
    pub multiplier: usize,
    pub clamp: Clamp,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
    pub channels_last: bool,
}

/// The bounds a [`DepthwiseConv`] clamps its outputs to, as f32 bits (for `Hash` and `Eq`);
/// unbounded (`-inf`, `+inf`) unless an activation was fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Clamp {
    low: u32,
    high: u32,
}

impl Clamp {
    pub(crate) const NONE: Clamp = Clamp {
        low: f32::NEG_INFINITY.to_bits(),
        high: f32::INFINITY.to_bits(),
    };

    pub(crate) fn new(low: f32, high: f32) -> Clamp {
        Clamp {
            low: low.to_bits(),
            high: high.to_bits(),
        }
    }

    pub(crate) fn low(self) -> f32 {
        f32::from_bits(self.low)
    }

    pub(crate) fn high(self) -> f32 {
        f32::from_bits(self.high)
    }
}

impl DepthwiseConv {
    fn output_channels(&self) -> usize {
        self.c * self.multiplier
    }

    /// The batch size of an input of shape `x` (its first axis, or 1 without one): this op's,
    /// or that of the fused ops' inputs that share its batch axis.
    pub(crate) fn batch<D: DimLike>(&self, x: &[D]) -> D {
        if self.has_n {
            x[0].clone()
        } else {
            D::from(1)
        }
    }

    pub(crate) fn output_shape<D: From<usize>>(&self, n: D) -> TVec<D> {
        let mut shape: TVec<D> = if self.channels_last {
            tvec![
                self.oh.into(),
                self.ow.into(),
                self.output_channels().into()
            ]
        } else {
            tvec![
                self.output_channels().into(),
                self.oh.into(),
                self.ow.into()
            ]
        };
        if self.has_n {
            shape.insert(0, n);
        }
        shape
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "EngineDepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, k, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let n = self.batch(x.shape());
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let ks = k.try_as_plain_ram()?;
        let ks = ks.as_slice::<f32>()?;
        let bs = b.try_as_plain_ram()?;
        let bs = bs.as_slice::<f32>()?;
        if xs.len() != n * self.c * self.h * self.w
            || ks.len() != self.output_channels() * self.kh * self.kw
            || !(bs.len() == 1 || bs.len() == self.output_channels())
        {
            bail!("EngineDepthwiseConv: input sizes do not match {self:?}");
        }
        // Every element is written by `run`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape(n))? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let os = out_ram.as_slice_mut::<f32>()?;
            if self.channels_last {
                crate::depthwise_cl::run(self, xs, ks, bs, os);
            } else {
                run(self, xs, ks, bs, os);
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = self.batch(&inputs[0].shape);
        Ok(tvec!(f32::fact(self.output_shape(n))))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = self.batch(&inputs[0].shape);
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            n * (self.output_channels() * self.oh * self.ow * self.kh * self.kw)
        )))
    }

    as_op!();
}

/// Largest plane (accumulated points) computed whole with unit stride: 16 KiB of accumulators.
const WHOLE_PLANE_MAX: usize = 4096;

fn run(op: &DepthwiseConv, x: &[f32], k: &[f32], b: &[f32], out: &mut [f32]) {
    let planes = Planes {
        input: op.h * op.w,
        output: op.oh * op.ow * op.multiplier,
    };
    run_planes(op, x, k, b, out, planes)
}

/// How far apart the planes of a channels-first input and output lie: each input plane's
/// `h x w` points, and its `multiplier` output planes of `oh x ow`, may be the start of a
/// larger slot (a band of rows of a plane: [`crate::pointwise_depthwise`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planes {
    pub input: usize,
    pub output: usize,
}

/// [`DepthwiseConv`] channels-first, input plane `i` at `x[i * planes.input..]` and its output
/// planes at `out[i * planes.output..]`.
pub(crate) fn run_planes(
    op: &DepthwiseConv,
    x: &[f32],
    k: &[f32],
    b: &[f32],
    out: &mut [f32],
    planes: Planes,
) {
    assert!(planes.input >= op.h * op.w && planes.output >= op.oh * op.ow * op.multiplier);
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        // SAFETY: the CPU supports AVX2 and FMA (`avx2` is the proof).
        return unsafe { run_avx2(op, x, k, b, out, planes, avx2) };
    }
    run_generic::<false>(op, x, k, b, out, planes, None)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    op: &DepthwiseConv,
    x: &[f32],
    k: &[f32],
    b: &[f32],
    out: &mut [f32],
    planes: Planes,
    avx2: Avx2,
) {
    run_generic::<true>(op, x, k, b, out, planes, Some(avx2))
}

/// The widest rows [`plane3x3_s2_avx2`] reads in place. On wider rows the padded copy's split
/// by phase is vectorised and the nine taps' plain loads outrun the in-place masked loads and
/// shuffles: on a Zen 3, `mobilenetish`'s 112x112 → 56x56 layer took 1.5 times as long in
/// place, its 56x56 → 28x28 one 0.7 times (BENCHMARKS.md, session 21).
const IN_PLACE_MAX_WIDTH: usize = 64;

/// Zero elements after the padded plane, so that [`plane3x3_avx2`] may load whole vectors past
/// a row's last output point (lanes it never stores).
const PLANE_SLACK: usize = 16;

/// `AVX2`: the CPU has AVX2 and FMA (only ever true from [`run_avx2`], which passes its proof
/// as `avx2`); 3x3 kernels then run [`plane3x3_avx2`].
#[inline(always)]
fn run_generic<const AVX2: bool>(
    op: &DepthwiseConv,
    x: &[f32],
    k: &[f32],
    b: &[f32],
    out: &mut [f32],
    planes: Planes,
    avx2: Option<Avx2>,
) {
    let (sh, sw) = op.stride;
    // Padded plane, stored by column phase: phase p holds padded columns p, p + sw, p + 2sw...
    let ph = (op.oh - 1) * sh + op.kh;
    let pw = (op.ow - 1) * sw + op.kw;
    let phase_len = pw.div_ceil(sw);
    let row_len = phase_len * sw;
    // 3x3 with stride 2 on x86_64 reads a plane of short rows in place ([`plane3x3_s2_avx2`]).
    let direct = cfg!(target_arch = "x86_64")
        && AVX2
        && (op.kh, op.kw, sh, sw) == (3, 3, 2, 2)
        && op.w <= IN_PLACE_MAX_WIDTH;
    let mut padded = vec![
        0f32;
        if direct {
            0
        } else {
            ph * row_len + PLANE_SLACK
        }
    ];
    // Accumulators: an output row, or with unit stride the whole plane over padded rows when
    // that stays in the L1 cache with its input (a large plane's rows are long enough).
    let plane_span = (op.oh - 1) * row_len + op.ow;
    let whole_plane = (sh, sw) == (1, 1) && plane_span <= WHOLE_PLANE_MAX;
    let fast3x3 = cfg!(target_arch = "x86_64") && AVX2 && op.kh == 3 && op.kw == 3;
    let mut acc = vec![
        0f32;
        match (fast3x3, whole_plane) {
            (true, _) => 0,
            (false, true) => plane_span,
            (false, false) => op.ow,
        }
    ];
    // Where tap kx starts in a padded row (its column phase, then its place in the phase).
    let tap_starts: TVec<usize> = (0..op.kw)
        .map(|kx| (kx % sw) * phase_len + kx / sw)
        .collect();
    let plane_in = op.h * op.w;
    let plane_out = op.oh * op.ow;
    let (low, high) = (op.clamp.low(), op.clamp.high());
    let taps = op.kh * op.kw;
    // Short rows with a partial last vector (14 or 7 points) store it whole but on the plane's
    // last row ([`plane3x3_avx2`]); the spilled lanes stay inside the next row (at least 4 points
    // wide).
    #[cfg(target_arch = "x86_64")]
    let spill = op.oh > 1 && op.ow % 8 != 0 && (4..16).contains(&op.ow);
    let xins = x.chunks(planes.input).map(|slot| &slot[..plane_in]);
    let xouts = out
        .chunks_mut(planes.output)
        .map(|slot| &mut slot[..plane_out * op.multiplier]);
    for (plane, (xin, xouts)) in xins.zip(xouts).enumerate() {
        let c = plane % op.c;
        #[cfg(target_arch = "x86_64")]
        if direct {
            for (m, xout) in xouts.chunks_exact_mut(plane_out).enumerate() {
                let o = c * op.multiplier + m;
                let bias = if b.len() == 1 { b[0] } else { b[o] };
                // SAFETY: `direct` holds only when called from `run_avx2` (AVX2 and FMA
                // detected); `xin` is the `h x w` plane, `xout` `oh * ow` points.
                unsafe { plane3x3_s2_avx2(op, xin, &k[o * taps..(o + 1) * taps], bias, xout) };
            }
            continue;
        }
        // Fill the padded plane (borders stay zero from the first fill: only interior rewritten).
        for y in 0..op.h {
            let py = y + op.pad_top;
            if py >= ph {
                break;
            }
            let row = &mut padded[py * row_len..(py + 1) * row_len];
            // Input columns that land inside the padded row (the rest is never read).
            let src = &xin[y * op.w..(y + 1) * op.w][..op.w.min(pw - op.pad_left)];
            if sw == 1 {
                row[op.pad_left..op.pad_left + src.len()].copy_from_slice(src);
            } else {
                split_by_phase(src, row, phase_len, sw, op.pad_left, avx2);
            }
        }
        // Every output channel reading this input plane.
        for (m, xout) in xouts.chunks_exact_mut(plane_out).enumerate() {
            let o = c * op.multiplier + m;
            let kernel = &k[o * taps..(o + 1) * taps];
            let bias = if b.len() == 1 { b[0] } else { b[o] };
            #[cfg(target_arch = "x86_64")]
            if fast3x3 {
                // SAFETY: `AVX2` is true only when called from `run_avx2` (AVX2 and FMA
                // detected); `padded` holds `ph` rows of `row_len` plus `PLANE_SLACK`, `xout`
                // `oh * ow` points.
                unsafe {
                    if spill {
                        plane3x3_avx2::<true>(
                            op,
                            &padded,
                            row_len,
                            &tap_starts,
                            kernel,
                            bias,
                            xout,
                        );
                    } else {
                        plane3x3_avx2::<false>(
                            op,
                            &padded,
                            row_len,
                            &tap_starts,
                            kernel,
                            bias,
                            xout,
                        );
                    }
                }
                continue;
            }
            if whole_plane {
                // Unit stride, small plane: the whole plane at once, over padded rows (the
                // `pw - ow` columns past each output row are computed and dropped), so every
                // tap is one long contiguous multiply-add even when the rows are 7 or 14 points.
                acc.fill(bias);
                for ky in 0..op.kh {
                    for kx in 0..op.kw {
                        let wgt = kernel[ky * op.kw + kx];
                        let src = &padded[ky * row_len + kx..][..acc.len()];
                        for (a, s) in acc.iter_mut().zip(src) {
                            *a += wgt * *s;
                        }
                    }
                }
                for (oy, row) in xout.chunks_exact_mut(op.ow).enumerate() {
                    store_clamped(row, &acc[oy * row_len..][..op.ow], low, high);
                }
                continue;
            }
            for oy in 0..op.oh {
                let acc = &mut acc[..op.ow];
                acc.fill(bias);
                for ky in 0..op.kh {
                    let row = &padded[(oy * sh + ky) * row_len..(oy * sh + ky + 1) * row_len];
                    for (kx, start) in tap_starts.iter().enumerate() {
                        let wgt = kernel[ky * op.kw + kx];
                        let src = &row[*start..*start + op.ow];
                        for (a, s) in acc.iter_mut().zip(src) {
                            *a += wgt * *s;
                        }
                    }
                }
                store_clamped(&mut xout[oy * op.ow..(oy + 1) * op.ow], acc, low, high);
            }
        }
    }
}

/// One output plane of a 3x3 depthwise convolution from its padded input plane (`padded`,
/// rows `row_len` apart, column phases at `tap_starts`, [`PLANE_SLACK`] zeros after it), 8
/// output points at a time with the sum in a register: the bias, then the nine taps' products
/// added in order (a multiply, then an add: what tract's depthwise kernel and [`run_generic`]
/// compute, bit for bit; fused multiply-adds moved `mobilenetish`'s outputs by 4e-5 relative
/// over its 17 depthwise layers, more than the 1e-5 the passes keep to), then the clamp, one store (masked for a row's last partial block; with `SPILL`, on the plane's
/// last row only: whole stores took 0.78–0.91× the time on 7x7 and 14x14 planes in a microbenchmark,
/// BENCHMARKS.md session 16). The
/// vector loads of a partial block read past the row's last point (into the next row, or the
/// slack), lanes that are never stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane3x3_avx2<const SPILL: bool>(
    op: &DepthwiseConv,
    padded: &[f32],
    row_len: usize,
    tap_starts: &[usize],
    kernel: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (oh, ow, sh) = (op.oh, op.ow, op.stride.0);
    assert!(kernel.len() >= 9 && tap_starts.len() >= 3 && out.len() >= oh * ow);
    let (t0, t1, t2) = (tap_starts[0], tap_starts[1], tap_starts[2]);
    // The last vector read: row (oh - 1) * sh + 2, from its largest tap start, 8 lanes from the
    // last block's first point.
    let last_block = (ow - 1) / 8 * 8;
    assert!(((oh - 1) * sh + 2) * row_len + t0.max(t1).max(t2) + last_block + 8 <= padded.len());
    let w: [__m256; 9] = std::array::from_fn(|i| _mm256_set1_ps(kernel[i]));
    let vbias = _mm256_set1_ps(bias);
    let clamped = op.clamp != Clamp::NONE;
    let (low, high) = (
        _mm256_set1_ps(op.clamp.low()),
        _mm256_set1_ps(op.clamp.high()),
    );
    let tail = ow % 8;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), lane);
    let p = padded.as_ptr();
    let o = out.as_mut_ptr();
    for oy in 0..oh {
        let r0 = p.add(oy * sh * row_len);
        let (r1, r2) = (r0.add(row_len), r0.add(2 * row_len));
        let to = o.add(oy * ow);
        let mut ox = 0;
        while ox < ow {
            let mut acc = vbias;
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[0], _mm256_loadu_ps(r0.add(t0 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[1], _mm256_loadu_ps(r0.add(t1 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[2], _mm256_loadu_ps(r0.add(t2 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[3], _mm256_loadu_ps(r1.add(t0 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[4], _mm256_loadu_ps(r1.add(t1 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[5], _mm256_loadu_ps(r1.add(t2 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[6], _mm256_loadu_ps(r2.add(t0 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[7], _mm256_loadu_ps(r2.add(t1 + ox))));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(w[8], _mm256_loadu_ps(r2.add(t2 + ox))));
            if clamped {
                // `max(y, low)` gives `low` for a NaN `y`, as `f32::max` (tract's `Max`) does.
                acc = _mm256_min_ps(_mm256_max_ps(acc, low), high);
            }
            if ox + 8 <= ow || (SPILL && oy + 1 < oh) {
                // With `SPILL`, a partial vector's lanes past the row land on the next row's
                // first points (`ow` ≥ 4, so inside it), which that row's stores overwrite.
                _mm256_storeu_ps(to.add(ox), acc);
            } else {
                _mm256_maskstore_ps(to.add(ox), mask, acc);
            }
            ox += 8;
        }
    }
}

/// One output plane of a 3x3 depthwise convolution with stride 2, read from the input plane
/// `xin` (`h x w`, at most [`IN_PLACE_MAX_WIDTH`] columns) in place: no padded copy split by
/// column phase. (That copy, row by row, took most of the strided layers' time on short rows:
/// 191 of 243 µs for `mobilenetish`'s 14x14 → 7x7 layer, 134 of 178 µs for the 28x28 one, on
/// a Zen 3; BENCHMARKS.md, session 21.) For 8 output points the 16 input columns from
/// `2 * ox - pad_left` are two masked loads (columns outside the plane read as zeros: the
/// padding), split into the even and odd columns (taps 0 and 1), and the even ones moved by one
/// lane with the 17th column (tap 2); a row above or below the plane is zeros. The same
/// products added in the same order as [`plane3x3_avx2`] over the padded plane (the bias,
/// then the nine taps, a multiply then an add each, zeros where it reads padding), then the
/// clamp: the same results, bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane3x3_s2_avx2(
    op: &DepthwiseConv,
    xin: &[f32],
    kernel: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (h, w, oh, ow) = (op.h, op.w, op.oh, op.ow);
    assert!(op.stride == (2, 2) && kernel.len() >= 9);
    assert!(xin.len() >= h * w && out.len() >= oh * ow);
    let wv: [__m256; 9] = std::array::from_fn(|i| _mm256_set1_ps(kernel[i]));
    let vbias = _mm256_set1_ps(bias);
    let clamped = op.clamp != Clamp::NONE;
    let (low, high) = (
        _mm256_set1_ps(op.clamp.low()),
        _mm256_set1_ps(op.clamp.high()),
    );
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // The lanes of 8 columns from `from` that lie in the plane's row.
    let inside = |from: isize| {
        let cols = _mm256_add_epi32(_mm256_set1_epi32(from as i32), lane);
        _mm256_and_si256(
            _mm256_cmpgt_epi32(cols, _mm256_set1_epi32(-1)),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), cols),
        )
    };
    // Lanes 1..7 of a vector into lanes 0..6 (lane 7 is then replaced by the 17th column).
    let next = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7);
    let store_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((ow % 8) as i32), lane);
    let (xp, o) = (xin.as_ptr(), out.as_mut_ptr());
    for oy in 0..oh {
        let to = o.add(oy * ow);
        let mut ox = 0;
        while ox < ow {
            let c0 = (2 * ox) as isize - op.pad_left as isize;
            let (mask_a, mask_b) = (inside(c0), inside(c0 + 8));
            let c16 = c0 + 16;
            let mut acc = vbias;
            for ky in 0..3 {
                let iy = (2 * oy + ky) as isize - op.pad_top as isize;
                let (t0, t1, t2) = if iy >= 0 && (iy as usize) < h {
                    // SAFETY: the masks keep the loads to columns 0..w of row `iy` (a masked
                    // lane is not read, so the pointer may start before the row).
                    let row = xp.add(iy as usize * w);
                    let a = _mm256_maskload_ps(row.wrapping_offset(c0), mask_a);
                    let b = _mm256_maskload_ps(row.wrapping_offset(c0 + 8), mask_b);
                    let last = if c16 >= 0 && (c16 as usize) < w {
                        *row.add(c16 as usize)
                    } else {
                        0.0
                    };
                    let (even, odd) = crate::window::even_odd_avx2(a, b);
                    let even_next = _mm256_blend_ps::<0x80>(
                        _mm256_permutevar8x32_ps(even, next),
                        _mm256_set1_ps(last),
                    );
                    (even, odd, even_next)
                } else {
                    let zero = _mm256_setzero_ps();
                    (zero, zero, zero)
                };
                acc = _mm256_add_ps(acc, _mm256_mul_ps(wv[3 * ky], t0));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(wv[3 * ky + 1], t1));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(wv[3 * ky + 2], t2));
            }
            if clamped {
                // `max(y, low)` gives `low` for a NaN `y`, as `f32::max` (tract's `Max`) does.
                acc = _mm256_min_ps(_mm256_max_ps(acc, low), high);
            }
            if ox + 8 <= ow {
                _mm256_storeu_ps(to.add(ox), acc);
            } else {
                _mm256_maskstore_ps(to.add(ox), store_mask, acc);
            }
            ox += 8;
        }
    }
}

/// `to[i] = from[i].max(low).min(high)`: tract's `Max` then `Min` (a NaN becomes `low`, as
/// `f32::max` makes it), a no-op on numbers when unbounded.
#[inline(always)]
pub(crate) fn store_clamped(to: &mut [f32], from: &[f32], low: f32, high: f32) {
    if low == f32::NEG_INFINITY && high == f32::INFINITY {
        // Unbounded: a plain copy (NaN stays NaN).
        to.copy_from_slice(from);
        return;
    }
    for (t, f) in to.iter_mut().zip(from) {
        *t = f.max(low).min(high);
    }
}

/// Replaces every depthwise `Conv` this op can run (f32, NCHW/CHW, dilation 1, constant kernel
/// and bias, known spatial size) with [`DepthwiseConv`]. Returns how many were replaced.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let Some(op) = candidate(model, node, conv)? else {
            return Ok(None);
        };
        TypedModelPatch::replace_single_op(model, node, &node.inputs, op).map(Some)
    })
}

/// Fuses the element-wise `Max` and `Min` with a constant scalar that follow a
/// [`DepthwiseConv`] or a [`crate::pointwise::Pointwise`] (ReLU is `Max(x, 0)`, ReLU6 and ONNX's
/// `Clip` are `Max` then `Min`, once decluttered) into its [`Clamp`], when the convolution's
/// output feeds nothing else: one pass over the output fewer, and one node fewer, per
/// activation. Returns how many were fused.
pub(crate) fn fuse_clamp(model: &mut TypedModel) -> TractResult<usize> {
    use crate::pointwise::Pointwise;
    use tract_nnef::tract_core::ops::binary::TypedBinOp;
    use tract_nnef::tract_core::ops::math::{Max, Min};
    crate::passes::patch_each(model, |model, node| {
        let Some(bin) = node.op_as::<TypedBinOp>() else {
            return Ok(None);
        };
        let is_max = bin.0.is::<Max>();
        if !(is_max || bin.0.is::<Min>()) || node.inputs.len() != 2 {
            return Ok(None);
        }
        // One input from a depthwise or pointwise convolution feeding only this node, the
        // other a constant f32 scalar (of any rank up to the output's: the output shape stays
        // the conv's).
        for (conv_input, bound_input) in [(0, 1), (1, 0)] {
            let prev = model.node(node.inputs[conv_input].node);
            let current = if let Some(conv) = prev.op_as::<DepthwiseConv>() {
                conv.clamp
            } else if let Some(pw) = prev.op_as::<Pointwise>() {
                pw.clamp
            } else {
                continue;
            };
            let bound = model.outlet_fact(node.inputs[bound_input])?;
            let Some(value) = bound.konst.as_ref() else {
                continue;
            };
            if value.datum_type() != f32::datum_type()
                || value.len() != 1
                || model.single_succ(prev.id)?.map(|s| s.id) != Some(node.id)
                || model.outputs.contains(&node.inputs[conv_input])
                || model.outlet_fact(node.id.into())?.shape
                    != model.outlet_fact(node.inputs[conv_input])?.shape
            {
                continue;
            }
            let v = value.try_as_plain_ram()?.as_slice::<f32>()?[0];
            let (low, high) = (current.low(), current.high());
            let clamp = if is_max {
                // max(min(max(a, low), high), v) = min(max(a, max(low, v)), high) only when
                // `high` is unbounded.
                if high != f32::INFINITY || v.is_nan() {
                    continue;
                }
                Clamp::new(low.max(v), high)
            } else {
                if v.is_nan() {
                    continue;
                }
                Clamp::new(low, high.min(v))
            };
            if let Some(conv) = prev.op_as::<DepthwiseConv>() {
                let op = DepthwiseConv {
                    clamp,
                    ..conv.clone()
                };
                return TypedModelPatch::fuse_with_next(model, prev, op).map(Some);
            }
            if let Some(pw) = prev.op_as::<Pointwise>() {
                let op = Pointwise {
                    clamp,
                    ..pw.clone()
                };
                return TypedModelPatch::fuse_with_next(model, prev, op).map(Some);
            }
        }
        Ok(None)
    })
}

fn candidate(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> TractResult<Option<DepthwiseConv>> {
    let ps = &conv.pool_spec;
    let c = ps.input_channels;
    let m = ps.output_channels;
    if conv.q_params.is_some()
        || conv.group != c
        || c == 0
        || m % c != 0
        || conv.kernel_fmt != KernelFormat::OIHW
        || ps.kernel_shape.len() != 2
        || ps
            .dilations
            .as_ref()
            .is_some_and(|d| d.iter().any(|d| *d != 1))
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let has_n = match ps.data_format {
        DataFormat::NCHW => true,
        DataFormat::CHW => false,
        _ => return Ok(None),
    };
    let x = model.outlet_fact(node.inputs[0])?;
    let k = model.outlet_fact(node.inputs[1])?;
    let b = model.outlet_fact(node.inputs[2])?;
    let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
    if x.datum_type != f32::datum_type()
        || x.rank() != if has_n { 4 } else { 3 }
        || k.konst.is_none()
        || b.konst.is_none()
        || k.datum_type != f32::datum_type()
        || b.datum_type != f32::datum_type()
        || k.shape.as_concrete() != Some(&[m, 1, kh, kw][..])
        || !(b.shape.volume() == 1.into() || b.shape.volume() == m.into())
    {
        return Ok(None);
    }
    // A known batch size only (the batch-1 plan): with a symbolic one tract does not lower a
    // depthwise convolution to its depthwise kernel (bias, then each tap's product added in
    // order, no FMA: what this op computes) but to a matrix product with FMA, and replacing
    // that would move the general plan's outputs by more than the 1e-5 the passes keep to.
    if has_n && x.shape[0].as_i64().is_none() {
        return Ok(None);
    }
    let spatial = &x.shape[x.rank() - 2..];
    let (Some(h), Some(w)) = (spatial[0].as_i64(), spatial[1].as_i64()) else {
        return Ok(None);
    };
    if x.shape[x.rank() - 3].as_i64() != Some(c as i64) {
        return Ok(None);
    }
    let (h, w) = (h as usize, w as usize);
    let strides = ps.strides.clone().unwrap_or_else(|| tvec![1, 1]);
    let dims = ps.padding.compute(&[h, w], &[kh, kw], &[1, 1], &strides);
    let (oh, ow) = (dims[0].convoluted, dims[1].convoluted);
    if oh == 0 || ow == 0 {
        return Ok(None);
    }
    Ok(Some(DepthwiseConv {
        has_n,
        c,
        multiplier: m / c,
        clamp: Clamp::NONE,
        h,
        w,
        kh,
        kw,
        stride: (strides[0], strides[1]),
        pad_top: dims[0].pad_before,
        pad_left: dims[1].pad_before,
        oh,
        ow,
        channels_last: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GuardedSlice;

    /// Straightforward reference: zero padding, every tap bounds-checked.
    fn naive(op: &DepthwiseConv, n: usize, x: &[f32], k: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = vec![];
        for ni in 0..n {
            for o in 0..op.output_channels() {
                let c = o / op.multiplier;
                for oy in 0..op.oh {
                    for ox in 0..op.ow {
                        let mut s = if b.len() == 1 { b[0] } else { b[o] };
                        for ky in 0..op.kh {
                            for kx in 0..op.kw {
                                let y = (oy * op.stride.0 + ky) as isize - op.pad_top as isize;
                                let xx = (ox * op.stride.1 + kx) as isize - op.pad_left as isize;
                                if y >= 0 && xx >= 0 && (y as usize) < op.h && (xx as usize) < op.w
                                {
                                    let v = x[((ni * op.c + c) * op.h + y as usize) * op.w
                                        + xx as usize];
                                    s += k[(o * op.kh + ky) * op.kw + kx] * v;
                                }
                            }
                        }
                        out.push(s.max(op.clamp.low()).min(op.clamp.high()));
                    }
                }
            }
        }
        out
    }

    /// The stride-2 3x3 planes read in place give the padded plane's results to the bit (the
    /// portable loop over the padded copy: the same products, added in the same order), over
    /// plane sizes with and without a partial last vector, and left and top paddings of 0 to 2.
    #[test]
    fn strided_planes_in_place_match_the_padded_copy_to_the_bit() {
        let Some(avx2) = Avx2::detect() else {
            return;
        };
        for (h, w, pad_top, pad_left, pad_bottom, pad_right) in [
            (14, 14, 1, 1, 1, 1),
            (28, 28, 0, 0, 1, 1),
            (56, 56, 1, 1, 1, 1),
            (7, 9, 1, 2, 0, 1),
            (17, 33, 2, 0, 0, 0),
            (3, 3, 1, 1, 1, 1),
        ] {
            let (c, multiplier, clamp) = (3, 2, Clamp::new(-0.5, 6.0));
            let oh = (h + pad_top + pad_bottom - 3) / 2 + 1;
            let ow = (w + pad_left + pad_right - 3) / 2 + 1;
            let op = DepthwiseConv {
                has_n: false,
                c,
                multiplier,
                clamp,
                h,
                w,
                kh: 3,
                kw: 3,
                stride: (2, 2),
                pad_top,
                pad_left,
                oh,
                ow,
                channels_last: false,
            };
            let x = crate::testing::values(c * h * w, 1);
            let k = crate::testing::values(c * multiplier * 9, 2);
            let b = crate::testing::values(c * multiplier, 3);
            let mut padded = vec![0f32; c * multiplier * oh * ow];
            let planes = Planes {
                input: h * w,
                output: multiplier * oh * ow,
            };
            run_generic::<false>(&op, &x, &k, &b, &mut padded, planes, None);
            let mut in_place = vec![0f32; padded.len()];
            // SAFETY: `avx2` proves the CPU has AVX2 and FMA.
            unsafe { run_avx2(&op, &x, &k, &b, &mut in_place, planes, avx2) };
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&in_place),
                bits(&padded),
                "{h}x{w} pads {pad_top} {pad_left}"
            );
        }
    }

    #[test]
    fn matches_naive_convolution() {
        // (h, w, kh, kw, stride, pad_top, pad_left, pad_bottom, pad_right)
        let cases = [
            (7, 9, 3, 3, (1, 1), 1, 1, 1, 1),
            (8, 8, 3, 3, (2, 2), 1, 1, 1, 1),
            (9, 7, 3, 3, (2, 2), 0, 0, 0, 0),
            (10, 11, 5, 5, (2, 1), 2, 1, 2, 3),
            (6, 6, 1, 3, (1, 3), 0, 2, 0, 0),
            (5, 5, 3, 3, (3, 2), 1, 0, 0, 1),
            // Rows of more than one vector, with and without a partial last one.
            (13, 21, 3, 3, (1, 1), 1, 1, 1, 1),
            (12, 16, 3, 3, (1, 1), 1, 1, 1, 1),
            (15, 37, 3, 3, (2, 2), 1, 1, 1, 1),
            (14, 34, 3, 3, (2, 2), 0, 0, 1, 1),
            // Column stride 2 with an even and an odd left padding of 2 and 3 (the vector
            // phase split), rows cut short by the padded width, 16-column chunks and a tail.
            (9, 40, 3, 3, (2, 2), 1, 2, 0, 0),
            (6, 17, 5, 5, (1, 2), 2, 3, 2, 0),
        ];
        // (multiplier, clamp): plain, a channel multiplier, ReLU6 fused, both.
        let relu6 = Clamp::new(0.0, 6.0);
        let variants = [(1, Clamp::NONE), (4, Clamp::NONE), (1, relu6), (3, relu6)];
        for (i, &(h, w, kh, kw, stride, pt, pl, pb, pr)) in cases.iter().enumerate() {
            for &(multiplier, clamp) in &variants {
                let (c, n) = (3, 2);
                let m = c * multiplier;
                let oh = (h + pt + pb - kh) / stride.0 + 1;
                let ow = (w + pl + pr - kw) / stride.1 + 1;
                let op = DepthwiseConv {
                    has_n: true,
                    c,
                    multiplier,
                    clamp,
                    h,
                    w,
                    kh,
                    kw,
                    stride,
                    pad_top: pt,
                    pad_left: pl,
                    oh,
                    ow,
                    channels_last: false,
                };
                let x: Vec<f32> = (0..n * c * h * w)
                    .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let k: Vec<f32> = (0..m * kh * kw)
                    .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                    .collect();
                let b: Vec<f32> = (0..m).map(|v| v as f32 * 0.5 - 0.5).collect();
                let mut out = vec![0.0; n * m * oh * ow];
                // Input at a page's end: nothing is read past it.
                run(&op, &GuardedSlice::new(&x), &k, &b, &mut out);
                let want = naive(&op, n, &x, &k, &b);
                for (j, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "case {i} multiplier {multiplier} {clamp:?} element {j}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// `[n, c, s]` to `[n, s, c]` (`to_last`) or back.
    fn transpose_channels(x: &[f32], n: usize, c: usize, s: usize, to_last: bool) -> Vec<f32> {
        let mut t = vec![0f32; x.len()];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..s {
                    let (first, last) = ((b * c + ch) * s + p, (b * s + p) * c + ch);
                    if to_last {
                        t[last] = x[first];
                    } else {
                        t[first] = x[last];
                    }
                }
            }
        }
        t
    }

    /// The channels-last op computes what the channels-first one does, to the bit (the same
    /// sums in the same order), on the AVX2 kernel and the portable one: channel counts with
    /// and without a partial block of 8, strides 1 and 2, paddings that cut the window on every
    /// side, kernels of 3x3 (registers) and others.
    #[test]
    fn channels_last_matches_channels_first() {
        // (h, w, kh, kw, stride, pad_top, pad_left, pad_bottom, pad_right)
        let cases = [
            (7, 9, 3, 3, (1, 1), 1, 1, 1, 1),
            (8, 8, 3, 3, (2, 2), 1, 1, 1, 1),
            (14, 14, 3, 3, (2, 2), 0, 0, 1, 1),
            (9, 7, 3, 3, (2, 2), 0, 0, 0, 0),
            (10, 11, 5, 5, (2, 1), 2, 1, 2, 3),
            (5, 5, 3, 3, (3, 2), 1, 0, 0, 1),
            (3, 3, 3, 3, (1, 1), 2, 2, 2, 2),
        ];
        let relu6 = Clamp::new(0.0, 6.0);
        for (i, &(h, w, kh, kw, stride, pt, pl, pb, pr)) in cases.iter().enumerate() {
            for (c, clamp) in [
                (3, Clamp::NONE),
                (8, relu6),
                (19, relu6),
                (32, Clamp::NONE),
                (40, relu6),
            ] {
                let n = 2;
                let oh = (h + pt + pb - kh) / stride.0 + 1;
                let ow = (w + pl + pr - kw) / stride.1 + 1;
                let first = DepthwiseConv {
                    has_n: true,
                    c,
                    multiplier: 1,
                    clamp,
                    h,
                    w,
                    kh,
                    kw,
                    stride,
                    pad_top: pt,
                    pad_left: pl,
                    oh,
                    ow,
                    channels_last: false,
                };
                let last = DepthwiseConv {
                    channels_last: true,
                    ..first.clone()
                };
                let x: Vec<f32> = (0..n * c * h * w)
                    .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let k: Vec<f32> = (0..c * kh * kw)
                    .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                    .collect();
                let b: Vec<f32> = (0..c).map(|v| v as f32 * 0.5 - 0.5).collect();
                let mut want = vec![0.0; n * c * oh * ow];
                run(&first, &x, &k, &b, &mut want);
                let want = transpose_channels(&want, n, c, oh * ow, true);
                let x_last = GuardedSlice::new(&transpose_channels(&x, n, c, h * w, true));
                let k_last = crate::depthwise_cl::pack_kernel(&k, c, kh * kw);
                // Sentinels past the output must survive (masked stores).
                let mut got = vec![f32::NAN; want.len() + 3];
                got[want.len()..].fill(1234.5);
                crate::depthwise_cl::run(&last, &x_last, &k_last, &b, &mut got);
                assert_eq!(&got[want.len()..], &[1234.5; 3], "case {i} c {c}");
                assert_eq!(&got[..want.len()], &want[..], "case {i} c {c} {clamp:?}");
                let outs = crate::depthwise_cl::run_each_kernel_for_tests(
                    &last,
                    &x_last,
                    &k_last,
                    &b,
                    want.len(),
                );
                for (kernel, out) in outs {
                    assert_eq!(out, want, "{kernel}: case {i} c {c} {clamp:?}");
                }
            }
        }
    }

    #[cfg(feature = "onnx")]
    #[test]
    fn installs_on_mobilenetish_only_where_it_applies() {
        use tract_onnx::prelude::InferenceModelExt;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
        // Batch size fixed, as in the batch-1 plan (a symbolic one is left to tract).
        let load = |name: &str| {
            let typed = tract_onnx::onnx()
                .model_for_path(dir.join(name).join(format!("{name}.onnx")))
                .unwrap()
                .into_typed()
                .unwrap()
                .into_decluttered()
                .unwrap();
            let n = typed.symbols.sym("N");
            let mut typed = typed
                .set_symbols(&[(n, TDim::Val(2))].into_iter().collect())
                .unwrap();
            typed.declutter().unwrap();
            typed
        };
        // conv1 (one input channel: multiplier 32); conv2 (32 channels in, one group) is not.
        let mut cnn = load("digits_cnn");
        assert_eq!(install(&mut cnn).unwrap(), 1);

        let stock = load("mobilenetish");
        let mut ours = stock.clone();
        assert_eq!(install(&mut ours).unwrap(), 17);
        let input = crate::npy::read_npy(dir.join("mobilenetish/test_input.npy")).unwrap();
        let x = Tensor::from_shape(
            &[2, 3, 224, 224],
            &input.as_f32().unwrap()[..2 * 3 * 224 * 224],
        )
        .unwrap();
        let (a, b) = (
            crate::testing::first_output(stock, &x),
            crate::testing::first_output(ours, &x),
        );
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 + 1e-4 * a.abs(),
                "logit {i}: tract {a} vs engine {b}"
            );
        }
    }
}
