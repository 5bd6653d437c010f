//! The channels-last depthwise convolution: [`crate::depthwise::DepthwiseConv`] on `[N, H, W,
//! C]` activations, as the layout pass ([`crate::layout`]) runs it.
//!
//! In NCHW a depthwise convolution works plane by plane: each channel's plane is padded into a
//! scratch copy (split by column phase when strided) and its rows are the vectors. On the small
//! planes of a network's later layers (14x14, 7x7) that copy and the partial vectors at each
//! row's end cost as much as the arithmetic (BENCHMARKS.md, session 16). Channels-last, the
//! vectors run across channels instead: 8 neighbouring channels of one point are one vector, a
//! tap is one load at any stride, padding is a skipped tap, and no plane is copied. This is
//! what onnxruntime's NCHWc kernels do, with the whole of `C` as the block.
//!
//! Loop order: output row, then a block of 8 channels (16 with AVX-512; its nine 3x3 weights
//! held in registers), then the row's points. The sum is the bias, then each in-bounds tap's
//! product added in order, a multiply then an add (no fused multiply-add): what the
//! channels-first kernels and tract's compute, so the results are the same (a padded tap adds
//! an exact zero there and is skipped here). One kernel body serves AVX2 and AVX-512
//! (`channels_last_kernel!` on [`crate::lanes`]); other CPUs run a portable loop.
//!
//! The kernel input is `[kh, kw, C]` (each tap's weights for every channel contiguous), packed
//! by [`pack_kernel`] when the pass switches a convolution's layout. Channel multiplier 1 only.

use crate::depthwise::DepthwiseConv;
#[cfg(target_arch = "x86_64")]
use crate::lanes::{Avx2Lanes, Avx512Lanes, Lanes};

/// The `[C, 1, kh, kw]` (OIHW) depthwise kernel as `[kh, kw, C]`.
pub(crate) fn pack_kernel(k: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let mut packed = vec![0f32; c * taps];
    for (ch, kernel) in k.chunks_exact(taps).take(c).enumerate() {
        for (t, v) in kernel.iter().enumerate() {
            packed[t * c + ch] = *v;
        }
    }
    packed
}

/// The range of kernel taps along one axis that fall inside the input for the output position
/// whose window starts at `start` (input coordinates, before the padding is removed).
#[inline(always)]
fn taps_inside(start: isize, kernel: usize, size: usize) -> (usize, usize) {
    let lo = (-start).clamp(0, kernel as isize) as usize;
    let hi = (size as isize - start).clamp(0, kernel as isize) as usize;
    (lo, hi.max(lo))
}

/// The bias per channel: `b` itself when it has `c` values, else its one value repeated (a
/// copy only for a scalar bias, not on every call).
fn per_channel(b: &[f32], c: usize) -> std::borrow::Cow<'_, [f32]> {
    if b.len() == c {
        std::borrow::Cow::Borrowed(b)
    } else {
        assert!(
            b.len() == 1,
            "a depthwise bias of {} values for {c} channels",
            b.len()
        );
        std::borrow::Cow::Owned(vec![b[0]; c])
    }
}

/// Runs `op` (channels-last, multiplier 1) on `x` `[n, h, w, c]`, the kernel `k` `[kh, kw, c]`,
/// the bias `b` (`[c]` or one value), into `out` `[n, oh, ow, c]`.
pub(crate) fn run(op: &DepthwiseConv, x: &[f32], k: &[f32], b: &[f32], out: &mut [f32]) {
    let bias = per_channel(b, op.c);
    let bias = &bias[..];
    assert!(k.len() >= op.kh * op.kw * op.c);
    #[cfg(target_arch = "x86_64")]
    if crate::window::avx512_detected() {
        // SAFETY: the CPU supports AVX-512 F.
        return unsafe { run_avx512(op, x, k, bias, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::window::Avx2::detect().is_some() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { run_avx2(op, x, k, bias, out) };
    }
    run_portable(op, x, k, bias, out)
}

/// The outputs of every kernel this CPU runs (portable, AVX2, AVX-512), by name: the tests
/// compare each with the channels-first op.
#[cfg(test)]
pub(crate) fn run_each_kernel_for_tests(
    op: &DepthwiseConv,
    x: &[f32],
    k: &[f32],
    b: &[f32],
    len: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    let bias = per_channel(b, op.c);
    let mut outs = vec![];
    let mut out = vec![0f32; len];
    run_portable(op, x, k, &bias, &mut out);
    outs.push(("portable", out));
    #[cfg(target_arch = "x86_64")]
    if crate::window::Avx2::detect().is_some() {
        let mut out = vec![0f32; len];
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { run_avx2(op, x, k, &bias, &mut out) };
        outs.push(("avx2", out));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::window::avx512_detected() {
        let mut out = vec![0f32; len];
        // SAFETY: the CPU supports AVX-512 F.
        unsafe { run_avx512(op, x, k, &bias, &mut out) };
        outs.push(("avx512", out));
    }
    outs
}

/// Any CPU: each point's channels as one row of accumulators the compiler vectorises.
fn run_portable(op: &DepthwiseConv, x: &[f32], k: &[f32], bias: &[f32], out: &mut [f32]) {
    let c = op.c;
    let (low, high) = (op.clamp.low(), op.clamp.high());
    let mut acc = vec![0f32; c];
    for (xin, xout) in x
        .chunks_exact(op.h * op.w * c)
        .zip(out.chunks_exact_mut(op.oh * op.ow * c))
    {
        for oy in 0..op.oh {
            let y0 = (oy * op.stride.0) as isize - op.pad_top as isize;
            let (ky_lo, ky_hi) = taps_inside(y0, op.kh, op.h);
            for ox in 0..op.ow {
                let x0 = (ox * op.stride.1) as isize - op.pad_left as isize;
                let (kx_lo, kx_hi) = taps_inside(x0, op.kw, op.w);
                acc.copy_from_slice(bias);
                for ky in ky_lo..ky_hi {
                    for kx in kx_lo..kx_hi {
                        let point =
                            (y0 + ky as isize) as usize * op.w + (x0 + kx as isize) as usize;
                        let src = &xin[point * c..(point + 1) * c];
                        let wgt = &k[(ky * op.kw + kx) * c..][..c];
                        for ((a, s), w) in acc.iter_mut().zip(src).zip(wgt) {
                            *a += *w * *s;
                        }
                    }
                }
                let to = &mut xout[(oy * op.ow + ox) * c..][..c];
                crate::depthwise::store_clamped(to, &acc, low, high);
            }
        }
    }
}

/// Defines `$name`, the channels-last kernel on the vectors of `$lanes` with `$features`
/// enabled: blocks of [`Lanes::N`] channels, the last one masked when `c` is not a multiple.
/// Points whose 3x3 window lies inside the input run with the nine weights in registers and
/// no bounds checks; the others (the border) check each tap. A macro rather than a generic
/// function so that its closures are compiled with the target features too (a closure
/// inherits them only from a `#[target_feature]` function it is written in).
#[cfg(target_arch = "x86_64")]
macro_rules! channels_last_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:ty) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name(
            op: &DepthwiseConv,
            x: &[f32],
            k: &[f32],
            bias: &[f32],
            out: &mut [f32],
        ) {
            type L = $lanes;
            let c = op.c;
            let (sh, sw) = op.stride;
            let (kh, kw) = (op.kh, op.kw);
            let clamped = op.clamp != crate::depthwise::Clamp::NONE;
            let (low, high) = (L::splat(op.clamp.low()), L::splat(op.clamp.high()));
            // Output columns whose window lies inside the input's columns.
            let ox_lo = op.pad_left.div_ceil(sw).min(op.ow);
            let ox_hi = if op.w + op.pad_left >= kw {
                ((op.w + op.pad_left - kw) / sw + 1).clamp(ox_lo, op.ow)
            } else {
                ox_lo
            };
            let fast3x3 = kh == 3 && kw == 3;
            let row_stride = op.w * c;
            for (xin, xout) in x
                .chunks_exact(op.h * op.w * c)
                .zip(out.chunks_exact_mut(op.oh * op.ow * c))
            {
                let (xp, op_out) = (xin.as_ptr(), xout.as_mut_ptr());
                for oy in 0..op.oh {
                    let y0 = (oy * sh) as isize - op.pad_top as isize;
                    let (ky_lo, ky_hi) = taps_inside(y0, kh, op.h);
                    let full_rows = ky_lo == 0 && ky_hi == kh;
                    for ch in (0..c).step_by(L::N) {
                        let partial = ch + L::N > c;
                        let mask = L::mask(c - ch);
                        let load = |p: *const f32| {
                            if partial {
                                L::load_masked(p, mask)
                            } else {
                                L::load(p)
                            }
                        };
                        let vbias = load(bias.as_ptr().add(ch));
                        // SAFETY (every pointer below): `ch` < `c`; the taps read are inside the
                        // input plane (`taps_inside`, or the interior range `ox_lo..ox_hi` with full
                        // rows), masked past `c`; stores go to the point's `c` outputs.
                        let finish = |mut acc: <L as Lanes>::V, to: *mut f32| {
                            if clamped {
                                acc = L::clamp(acc, low, high);
                            }
                            if partial {
                                L::store_masked(to, mask, acc);
                            } else {
                                L::store(to, acc);
                            }
                        };
                        let border = |ox: usize| {
                            let x0 = (ox * sw) as isize - op.pad_left as isize;
                            let (kx_lo, kx_hi) = taps_inside(x0, kw, op.w);
                            let mut acc = vbias;
                            for ky in ky_lo..ky_hi {
                                let row = xp.add((y0 + ky as isize) as usize * row_stride + ch);
                                for kx in kx_lo..kx_hi {
                                    let s = load(row.add((x0 + kx as isize) as usize * c));
                                    let wgt = load(k.as_ptr().add((ky * kw + kx) * c + ch));
                                    acc = L::add(acc, L::mul(wgt, s));
                                }
                            }
                            finish(acc, op_out.add((oy * op.ow + ox) * c + ch));
                        };
                        if !(fast3x3 && full_rows && !partial) {
                            for ox in 0..op.ow {
                                border(ox);
                            }
                            continue;
                        }
                        for ox in 0..ox_lo {
                            border(ox);
                        }
                        let w: [<L as Lanes>::V; 9] = std::array::from_fn(|t| L::load(k.as_ptr().add(t * c + ch)));
                        let r0 = xp.add(y0 as usize * row_stride + ch);
                        let rows = [r0, r0.add(row_stride), r0.add(2 * row_stride)];
                        for ox in ox_lo..ox_hi {
                            let at = (ox * sw - op.pad_left) * c;
                            let mut acc = vbias;
                            for (ky, row) in rows.iter().enumerate() {
                                let p = row.add(at);
                                acc = L::add(acc, L::mul(w[3 * ky], L::load(p)));
                                acc = L::add(acc, L::mul(w[3 * ky + 1], L::load(p.add(c))));
                                acc = L::add(acc, L::mul(w[3 * ky + 2], L::load(p.add(2 * c))));
                            }
                            finish(acc, op_out.add((oy * op.ow + ox) * c + ch));
                        }
                        for ox in ox_hi..op.ow {
                            border(ox);
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
channels_last_kernel!(
    /// AVX2 + FMA: 8 lanes.
    run_avx2,
    "avx2,fma",
    Avx2Lanes
);

#[cfg(target_arch = "x86_64")]
channels_last_kernel!(
    /// AVX-512 F: 16 lanes.
    run_avx512,
    "avx512f",
    Avx512Lanes
);
