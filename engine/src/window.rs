//! The geometry of a 2-D sliding window (a pooling or a convolution kernel) over a channels-first
//! f32 input, as the engine's own ops ([`crate::maxpool`], [`crate::im2col`]) walk it.
//!
//! An output point `(oy, ox)` reads, for the kernel tap `(ky, kx)`, the input point
//! `(oy * stride_h + ky * dilation_h - pad_top, ox * stride_w + kx * dilation_w - pad_left)`;
//! taps that land outside the input are padding (zero for a convolution, skipped by a max pool).
//! [`Window2d::row_windows`] and [`Window2d::column_windows`] give, for each output row and
//! column, the part of its window inside the input, so the ops' inner loops need no bounds
//! checks per tap.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::ops::cnn::PoolSpec;
use tract_nnef::tract_core::ops::nn::DataFormat;

/// A 2-D window over an NCHW (or CHW) input with known channel count and spatial size; the
/// batch size may stay symbolic (it is read from the input at run time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Window2d {
    /// NCHW (true) or CHW (false).
    pub has_n: bool,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Window2d {
    /// The window of `spec` over an input of type `input`, or `None` when the engine's ops do
    /// not take it: not f32, not channels-first 2-D, channels or spatial size not known, or an
    /// empty output.
    pub fn of(spec: &PoolSpec, input: &TypedFact) -> Option<Window2d> {
        let has_n = match spec.data_format {
            DataFormat::NCHW => true,
            DataFormat::CHW => false,
            _ => return None,
        };
        let rank = if has_n { 4 } else { 3 };
        if input.datum_type != f32::datum_type()
            || input.rank() != rank
            || spec.kernel_shape.len() != 2
        {
            return None;
        }
        let dim = |axis: usize| {
            input.shape[axis]
                .as_i64()
                .and_then(|d| usize::try_from(d).ok())
        };
        let (c, h, w) = (dim(rank - 3)?, dim(rank - 2)?, dim(rank - 1)?);
        let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
        let strides = spec.strides.clone().unwrap_or_else(|| tvec![1, 1]);
        let dilations = spec.dilations.clone().unwrap_or_else(|| tvec![1, 1]);
        if strides.len() != 2 || dilations.len() != 2 || strides.contains(&0) || kh * kw == 0 {
            return None;
        }
        let dims = spec
            .padding
            .compute(&[h, w], &[kh, kw], &dilations, &strides);
        let (oh, ow) = (dims[0].convoluted, dims[1].convoluted);
        if oh == 0 || ow == 0 {
            return None;
        }
        Some(Window2d {
            has_n,
            c,
            h,
            w,
            kh,
            kw,
            stride: (strides[0], strides[1]),
            dilation: (dilations[0], dilations[1]),
            pad_top: dims[0].pad_before,
            pad_left: dims[1].pad_before,
            oh,
            ow,
        })
    }

    /// Batch size of an input of shape `shape` (1 without a batch axis).
    pub fn batch(&self, shape: &[usize]) -> usize {
        if self.has_n {
            shape[0]
        } else {
            1
        }
    }

    /// The output shape for batch size `n`.
    pub fn output_shape<D: From<usize>>(&self, n: D, channels: usize) -> TVec<D> {
        let mut shape: TVec<D> = tvec![channels.into(), self.oh.into(), self.ow.into()];
        if self.has_n {
            shape.insert(0, n);
        }
        shape
    }

    /// For every output row `oy`, the input rows `[from, to)` its window covers inside the input:
    /// the in-bounds taps are `from`, `from + dilation_h`, ... below `to` (none when
    /// `from >= to`).
    pub fn row_windows(&self) -> TVec<(usize, usize)> {
        let (k, s, d) = (self.kh, self.stride.0, self.dilation.0);
        axis_windows(self.oh, self.h, k, s, d, self.pad_top)
    }

    /// [`Window2d::row_windows`] along the columns.
    pub fn column_windows(&self) -> TVec<(usize, usize)> {
        let (k, s, d) = (self.kw, self.stride.1, self.dilation.1);
        axis_windows(self.ow, self.w, k, s, d, self.pad_left)
    }
}

/// Along one axis: for each of `outputs` output points, the input range `[from, to)` holding
/// its in-bounds taps (every `dilation`-th from `from`) on an input of `len` points.
fn axis_windows(
    outputs: usize,
    len: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_before: usize,
) -> TVec<(usize, usize)> {
    let extent = ((kernel - 1) * dilation + 1) as isize;
    (0..outputs)
        .map(|o| {
            // Input index of the first tap, which may be before the input (padding).
            let start = (o * stride) as isize - pad_before as isize;
            let first_inside = if start < 0 {
                start + ((-start) as usize).div_ceil(dilation) as isize * dilation as isize
            } else {
                start
            };
            let end = (start + extent).min(len as isize);
            let from = first_inside.max(0) as usize;
            (from, (end.max(0) as usize).max(from))
        })
        .collect()
}

/// A test case's window: `(h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow)` over
/// `c` channels of an NCHW input.
#[cfg(test)]
pub(crate) type WindowCase = (
    usize,
    usize,
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    usize,
    usize,
    usize,
    usize,
);

/// Proof that this CPU has AVX2 and FMA (only [`Avx2::detect`] makes one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Avx2(()));
        }
        None
    }
}

/// Whether this CPU has AVX-512 F besides AVX2 and FMA (the channels-last kernels' widest
/// vectors), and `MODELFLEET_ENGINE_NO_AVX512` is not set in the environment (to run the AVX2
/// kernels instead: to compare them on one machine, or where AVX-512 lowers the clock).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_detected() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        Avx2::detect().is_some()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var_os("MODELFLEET_ENGINE_NO_AVX512").is_none()
    })
}

/// Stores the input row `src` into the padded row `row` of a convolution with column stride
/// `sw` > 1, by column phase: input column `xx` is padded column `px = xx + pad_left`, stored in
/// phase `px % sw` at `px / sw` (phase `p` starts at `p * phase_len`), so that every tap of an
/// output row reads a contiguous run (`im2col`, `depthwise`). For `sw` = 2 with AVX2 and rows of
/// [`SPLIT_AVX2_MIN`] columns or more, 16 columns at a time: the even input columns are one
/// contiguous run of a phase and the odd ones of the other (BENCHMARKS.md, session 16).
#[inline(always)]
pub(crate) fn split_by_phase(
    src: &[f32],
    row: &mut [f32],
    phase_len: usize,
    sw: usize,
    pad_left: usize,
    avx2: Option<Avx2>,
) {
    #[cfg(target_arch = "x86_64")]
    if sw == 2 && src.len() >= SPLIT_AVX2_MIN && avx2.is_some() {
        // SAFETY: an `Avx2` exists only where the CPU has AVX2.
        return unsafe { split_by_phase2_avx2(src, row, phase_len, pad_left) };
    }
    let _ = avx2;
    // The input columns before the first of phase 0 one by one, then `sw` at a time (phases 0,
    // 1, ... at the same place).
    let lead = ((sw - pad_left % sw) % sw).min(src.len());
    for (xx, v) in src[..lead].iter().enumerate() {
        let px = xx + pad_left;
        row[(px % sw) * phase_len + px / sw] = *v;
    }
    let at = (lead + pad_left) / sw;
    if sw == 2 {
        // Pairs into the two phases: a loop the compiler vectorises.
        let (even, odd) = row.split_at_mut(phase_len);
        let pairs = src[lead..].chunks_exact(2);
        let last = pairs.remainder().first().copied();
        let n = pairs.len();
        for ((e, o), pair) in even[at..].iter_mut().zip(&mut odd[at..]).zip(pairs) {
            *e = pair[0];
            *o = pair[1];
        }
        if let Some(v) = last {
            even[at + n] = v;
        }
        return;
    }
    let groups = src[lead..].chunks_exact(sw);
    let rest = groups.remainder();
    let n = groups.len();
    for (j, group) in groups.enumerate() {
        for (phase, v) in group.iter().enumerate() {
            row[phase * phase_len + at + j] = *v;
        }
    }
    for (phase, v) in rest.iter().enumerate() {
        row[phase * phase_len + at + n] = *v;
    }
}

/// The shortest row [`split_by_phase`] splits with AVX2: on 112- and 224-column rows it takes
/// two thirds of the loop's time, on 56- and 28-column rows up to a tenth more (a microbenchmark
/// of the fill, BENCHMARKS.md, session 16).
#[cfg(target_arch = "x86_64")]
const SPLIT_AVX2_MIN: usize = 64;

/// The even and the odd lanes of the 16 values `a` then `b`, in order: `[a0 a2 a4 a6 b0 b2 b4
/// b6]` and `[a1 a3 a5 a7 b1 b3 b5 b7]` (the columns of the two phases of a stride-2 row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn even_odd_avx2(
    a: std::arch::x86_64::__m256,
    b: std::arch::x86_64::__m256,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // [a0 a2 b0 b2 | a4 a6 b4 b6] reordered by 64-bit pairs to [a0 a2 a4 a6 b0 b2 b4 b6], and
    // the same for the odd lanes.
    let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
    (
        order(_mm256_shuffle_ps::<0x88>(a, b)),
        order(_mm256_shuffle_ps::<0xDD>(a, b)),
    )
}

/// [`split_by_phase`] for `sw` = 2, 16 input columns at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn split_by_phase2_avx2(src: &[f32], row: &mut [f32], phase_len: usize, pad_left: usize) {
    use std::arch::x86_64::*;
    let len = src.len();
    // (first index in `row`, count) of the even and the odd input columns.
    let even = ((pad_left % 2) * phase_len + pad_left / 2, len.div_ceil(2));
    let odd = (
        ((pad_left + 1) % 2) * phase_len + (pad_left + 1) / 2,
        len / 2,
    );
    assert!(even.0 + even.1 <= row.len() && odd.0 + odd.1 <= row.len());
    let (s, r) = (src.as_ptr(), row.as_mut_ptr());
    // SAFETY: loads read `src[..len]` (masked past it); stores write the even and odd runs,
    // `even.1` and `odd.1` values from their starts (masked past them; inside `row`, asserted
    // above). Whole chunks of 16 columns hold 8 of each.
    let full = len / 16 * 16;
    let mut c = 0;
    while c < full {
        let (e, o) = even_odd_avx2(_mm256_loadu_ps(s.add(c)), _mm256_loadu_ps(s.add(c + 8)));
        _mm256_storeu_ps(r.add(even.0 + c / 2), e);
        _mm256_storeu_ps(r.add(odd.0 + c / 2), o);
        c += 16;
    }
    if c < len {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lanes = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
        let left = len - c;
        let (e, o) = even_odd_avx2(
            _mm256_maskload_ps(s.add(c), lanes(left)),
            _mm256_maskload_ps(s.add(c + 8), lanes(left.saturating_sub(8))),
        );
        _mm256_maskstore_ps(r.add(even.0 + c / 2), lanes(even.1 - c / 2), e);
        _mm256_maskstore_ps(r.add(odd.0 + c / 2), lanes(odd.1 - c / 2), o);
    }
}

#[cfg(test)]
impl Window2d {
    pub(crate) fn of_case(c: usize, case: WindowCase) -> Window2d {
        let (h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow) = case;
        Window2d {
            has_n: true,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            dilation,
            pad_top,
            pad_left,
            oh,
            ow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(w: usize, kw: usize, sw: usize, dw: usize, pad_left: usize, ow: usize) -> Window2d {
        Window2d {
            has_n: true,
            c: 1,
            h: 1,
            w,
            kh: 1,
            kw,
            stride: (1, sw),
            dilation: (1, dw),
            pad_top: 0,
            pad_left,
            oh: 1,
            ow,
        }
    }

    /// The AVX2 split of a stride-2 row stores what the per-column loop stores, for every row
    /// length around the 16-column chunks and both parities of the left padding.
    #[test]
    fn split_by_phase_avx2_matches_scalar() {
        if Avx2::detect().is_none() {
            return;
        }
        for len in (0..40usize).chain(60..100) {
            for pad_left in 0..4 {
                let src: Vec<f32> = (0..len).map(|v| v as f32 + 1.0).collect();
                let phase_len = (len + pad_left + 2).div_ceil(2);
                let mut want = vec![0f32; 2 * phase_len + 9];
                let mut got = want.clone();
                split_by_phase(&src, &mut want, phase_len, 2, pad_left, None);
                // SAFETY: `Avx2::detect` above found AVX2 (every length, not only the long
                // rows `split_by_phase` gives it).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    split_by_phase2_avx2(&src, &mut got, phase_len, pad_left)
                };
                assert_eq!(got, want, "len {len} pad_left {pad_left}");
            }
        }
    }

    /// Every window holds exactly the in-bounds taps of its output column.
    #[test]
    fn column_windows_hold_exactly_the_in_bounds_taps() {
        for w in 1..7 {
            for kw in 1..4 {
                for sw in 1..4 {
                    for dw in 1..3 {
                        for pad_left in 0..4 {
                            for ow in 1..8 {
                                let win = window(w, kw, sw, dw, pad_left, ow);
                                for (ox, &(from, to)) in win.column_windows().iter().enumerate() {
                                    let inside: Vec<usize> = (0..kw)
                                        .map(|kx| (ox * sw + kx * dw) as isize - pad_left as isize)
                                        .filter(|&x| x >= 0 && (x as usize) < w)
                                        .map(|x| x as usize)
                                        .collect();
                                    let got: Vec<usize> = (from..to).step_by(dw).collect();
                                    assert_eq!(got, inside, "{win:?} ox {ox}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
