//! The vector operations of the engine's x86_64 kernels, one trait for AVX2 and AVX-512, so
//! that each kernel is written once (`depthwise_cl`, `pointwise`) and expanded for both.
//!
//! A kernel is a `#[target_feature]` function, made by a macro (a closure inherits target
//! features only from a function it is written in, so a generic kernel compiled its closures
//! without them and ran 4x slower: BENCHMARKS.md, session 17), whose body calls these methods
//! through a type alias `L`; each method is `#[inline(always)]` and becomes one instruction.

/// The vector operations the engine's kernels are written in, for AVX2 (8 lanes) and AVX-512
/// (16 lanes). Every method is inlined into the `#[target_feature]` kernel that calls it, so it
/// compiles to that instruction set; calling one anywhere else is unsound (hence `unsafe`).
pub(crate) trait Lanes {
    const N: usize;
    type V: Copy;
    type Mask: Copy;
    /// The first `lanes` (at most [`Lanes::N`]) lanes.
    unsafe fn mask(lanes: usize) -> Self::Mask;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn load_masked(p: *const f32, m: Self::Mask) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn store_masked(p: *mut f32, m: Self::Mask, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `max(a, low)` then `min(.., high)`; a NaN `a` gives `low`, as `f32::max` does.
    unsafe fn clamp(a: Self::V, low: Self::V, high: Self::V) -> Self::V;
}

pub(crate) struct Avx2Lanes;

impl Lanes for Avx2Lanes {
    const N: usize = 8;
    type V = std::arch::x86_64::__m256;
    type Mask = std::arch::x86_64::__m256i;
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> Self::Mask {
        use std::arch::x86_64::*;
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, m: Self::Mask) -> Self::V {
        std::arch::x86_64::_mm256_maskload_ps(p, m)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: Self::Mask, v: Self::V) {
        std::arch::x86_64::_mm256_maskstore_ps(p, m, v)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn clamp(a: Self::V, low: Self::V, high: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        _mm256_min_ps(_mm256_max_ps(a, low), high)
    }
}

pub(crate) struct Avx512Lanes;

impl Lanes for Avx512Lanes {
    const N: usize = 16;
    type V = std::arch::x86_64::__m512;
    type Mask = u16;
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> Self::Mask {
        if lanes >= 16 {
            u16::MAX
        } else {
            (1u16 << lanes) - 1
        }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, m: Self::Mask) -> Self::V {
        std::arch::x86_64::_mm512_maskz_loadu_ps(m, p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: Self::Mask, v: Self::V) {
        std::arch::x86_64::_mm512_mask_storeu_ps(p, m, v)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn clamp(a: Self::V, low: Self::V, high: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        _mm512_min_ps(_mm512_max_ps(a, low), high)
    }
}
