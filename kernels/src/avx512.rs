//! The inner loops: `MB` input rows against `NB` weight rows, each pair's dot
//! product accumulated in its own 512-bit register (`MB × NB ≤ 16` leaves
//! registers for the loads), reduced once at the end. The weight rows stream
//! from memory once; the input rows stay in L1.
//!
//! Callers guarantee the instructions exist ([`crate::supported`]) and that
//! every pointer has `k` readable elements.

// Index loops over the const block sizes: they unroll into straight-line
// register code, which iterator chains over the accumulators obscure.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::Element;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Bf16 {}
    impl Sealed for super::F32 {}
}

/// bfloat16 kernels: elements are bf16's raw bits (`u16`).
pub struct Bf16;
/// f32 kernels.
pub struct F32;

/// One element type's kernels: [`Bf16`] or [`F32`] (sealed).
pub trait Kernel: sealed::Sealed {
    type Elem: Copy + Send + Sync + 'static;
    const ELEMENT: Element;
    /// `acc[m][n] = Σ_i x[m * ldx + i] · w[n][i]` for `i < k`, prefetching
    /// `ahead[n][i]` meanwhile (any address: a prefetch never faults).
    ///
    /// # Safety
    /// The CPU has the instructions; `x` holds `MB` rows of `ldx ≥ k`
    /// elements and each `w[n]` holds `k` elements.
    #[doc(hidden)]
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const Self::Elem,
        ldx: usize,
        w: [*const Self::Elem; NB],
        ahead: [*const Self::Elem; NB],
        k: usize,
    ) -> [[f32; NB]; MB];
    /// [`Kernel::dot`] against int8 weight rows: `acc[m][n] = Σ_i x[m *
    /// ldx + i] · w[n][i]`, each weight exact in the dot product's
    /// element type (the caller applies the row's scale).
    ///
    /// # Safety
    /// As [`Kernel::dot`].
    #[doc(hidden)]
    unsafe fn dot_i8<const MB: usize, const NB: usize>(
        x: *const Self::Elem,
        ldx: usize,
        w: [*const i8; NB],
        ahead: [*const i8; NB],
        k: usize,
    ) -> [[f32; NB]; MB];
    /// [`Kernel::dot`] against FP8 e4m3 weight rows (bytes): each weight
    /// exact in the dot product's element type (the caller applies the
    /// block's scale).
    ///
    /// # Safety
    /// As [`Kernel::dot`].
    #[doc(hidden)]
    unsafe fn dot_fp8<const MB: usize, const NB: usize>(
        x: *const Self::Elem,
        ldx: usize,
        w: [*const u8; NB],
        ahead: [*const u8; NB],
        k: usize,
    ) -> [[f32; NB]; MB];
    #[doc(hidden)]
    fn from_f32(value: f32) -> Self::Elem;
    #[doc(hidden)]
    fn to_f32(value: Self::Elem) -> f32;
    /// `silu(gate) · up` from the two dot products, rounded as libtorch
    /// rounds it in this element type (so that the kernels and libtorch's
    /// `linear(...).silu() * linear(...)` agree to the last bit as often as
    /// the dot products do).
    #[doc(hidden)]
    fn swiglu(gate: f32, up: f32) -> f32;
    /// `out[i] = swiglu(gate[i], up[i])` for a whole row, 16 lanes at a
    /// time, rounded as [`Kernel::swiglu`] rounds (exp to within an ulp or
    /// two of libm's, as libtorch's vectorised silu is).
    ///
    /// # Safety
    /// The CPU has the instructions; `up` is as long as `gate` and `out`
    /// has room for `gate.len()` elements.
    #[doc(hidden)]
    unsafe fn swiglu_row(gate: &[f32], up: &[f32], out: *mut Self::Elem);
    /// `acc[g] += Σᵢ weights[g·n + i] · rows[i]` for each row `g` of `acc`
    /// (rows of `len` elements; `n = rows.len()`), adding in the order of
    /// `i`, one multiply-add each; every row `i` is read once for all `g`.
    ///
    /// # Safety
    /// The CPU has the instructions; `acc` holds whole rows of `len`
    /// elements, `weights` `n` per row of `acc`, and each of `rows` points
    /// at `len` elements.
    #[doc(hidden)]
    unsafe fn add_weighted(
        acc: &mut [f32],
        weights: &[f32],
        rows: &[*const Self::Elem],
        len: usize,
    );
}

impl Kernel for Bf16 {
    type Elem = u16;
    const ELEMENT: Element = Element::Bf16;
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const u16,
        ldx: usize,
        w: [*const u16; NB],
        ahead: [*const u16; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot`'s contract, which is
        // `dot_bf16`'s.
        unsafe { dot_bf16::<MB, NB>(x, ldx, w, ahead, k) }
    }
    unsafe fn dot_i8<const MB: usize, const NB: usize>(
        x: *const u16,
        ldx: usize,
        w: [*const i8; NB],
        ahead: [*const i8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot_i8`'s contract, which is
        // `dot_bf16_i8`'s.
        unsafe { dot_bf16_i8::<MB, NB>(x, ldx, w, ahead, k) }
    }
    unsafe fn dot_fp8<const MB: usize, const NB: usize>(
        x: *const u16,
        ldx: usize,
        w: [*const u8; NB],
        ahead: [*const u8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot_fp8`'s contract, which is
        // `dot_bf16_fp8`'s.
        unsafe { dot_bf16_fp8::<MB, NB>(x, ldx, w, ahead, k) }
    }
    fn from_f32(value: f32) -> u16 {
        bf16_from_f32(value)
    }
    fn to_f32(value: u16) -> f32 {
        f32_from_bf16(value)
    }
    /// libtorch rounds each projection, silu's result and the product.
    fn swiglu(gate: f32, up: f32) -> f32 {
        let round = |v: f32| f32::from_bits(u32::from(bf16_from_f32(v)) << 16);
        let (gate, up) = (round(gate), round(up));
        round(round(gate / (1.0 + (-gate).exp())) * up)
    }
    unsafe fn swiglu_row(gate: &[f32], up: &[f32], out: *mut u16) {
        // SAFETY: the caller keeps `Kernel::swiglu_row`'s contract.
        unsafe { swiglu_row_bf16(gate, up, out) }
    }
    unsafe fn add_weighted(acc: &mut [f32], weights: &[f32], rows: &[*const u16], len: usize) {
        // SAFETY: the caller keeps `Kernel::add_weighted`'s contract.
        unsafe { add_weighted_bf16(acc, weights, rows, len) }
    }
}

impl Kernel for F32 {
    type Elem = f32;
    const ELEMENT: Element = Element::F32;
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const f32,
        ldx: usize,
        w: [*const f32; NB],
        ahead: [*const f32; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot`'s contract, which is
        // `dot_f32`'s.
        unsafe { dot_f32::<MB, NB>(x, ldx, w, ahead, k) }
    }
    unsafe fn dot_i8<const MB: usize, const NB: usize>(
        x: *const f32,
        ldx: usize,
        w: [*const i8; NB],
        ahead: [*const i8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot_i8`'s contract, which is
        // `dot_f32_i8`'s.
        unsafe { dot_f32_i8::<MB, NB>(x, ldx, w, ahead, k) }
    }
    unsafe fn dot_fp8<const MB: usize, const NB: usize>(
        x: *const f32,
        ldx: usize,
        w: [*const u8; NB],
        ahead: [*const u8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps `Kernel::dot_fp8`'s contract, which is
        // `dot_f32_fp8`'s.
        unsafe { dot_f32_fp8::<MB, NB>(x, ldx, w, ahead, k) }
    }
    fn from_f32(value: f32) -> f32 {
        value
    }
    fn to_f32(value: f32) -> f32 {
        value
    }
    fn swiglu(gate: f32, up: f32) -> f32 {
        gate / (1.0 + (-gate).exp()) * up
    }
    unsafe fn swiglu_row(gate: &[f32], up: &[f32], out: *mut f32) {
        // SAFETY: the caller keeps `Kernel::swiglu_row`'s contract.
        unsafe { swiglu_row_f32(gate, up, out) }
    }
    unsafe fn add_weighted(acc: &mut [f32], weights: &[f32], rows: &[*const f32], len: usize) {
        // SAFETY: the caller keeps `Kernel::add_weighted`'s contract.
        unsafe { add_weighted_f32(acc, weights, rows, len) }
    }
}

/// Round to nearest even, as torch converts f32 to bfloat16; NaN stays NaN.
pub(crate) fn bf16_from_f32(value: f32) -> u16 {
    if value.is_nan() {
        return 0x7fc0;
    }
    let bits = value.to_bits();
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

pub(crate) fn f32_from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn swiglu_row_bf16(_: &[f32], _: &[f32], _: *mut u16) {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn swiglu_row_f32(_: &[f32], _: &[f32], _: *mut f32) {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn add_weighted_bf16(_: &mut [f32], _: &[f32], _: &[*const u16], _: usize) {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn add_weighted_f32(_: &mut [f32], _: &[f32], _: &[*const f32], _: usize) {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn exp_sum(_: &mut [f32], _: f32) -> f32 {
    unreachable!("supported() is false off x86-64")
}

/// A dot-product kernel: `MB × NB` accumulators, whole steps of `$lanes`
/// elements with plain loads (which the multiply-adds can take straight
/// from memory, holding no register per row of x), then the row's end
/// under a mask that reads nothing past it. The weights are loaded (and
/// widened, where stored narrower than x) by `load_w`. Off x86-64 the
/// kernel is a stub that is never called ([`crate::supported`] is false).
macro_rules! dot_kernel {
    (
        $(#[$attr:meta])* fn $name:ident($x:ty, $w:ty, $vec:ty, $lanes:literal, $mask:ty);
        load: $load:expr, load_masked: $masked:expr,
        load_w: $load_w:expr, load_w_masked: $masked_w:expr,
        madd: $madd:expr
    ) => {
        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $name<const MB: usize, const NB: usize>(
            _: *const $x,
            _: usize,
            _: [*const $w; NB],
            _: [*const $w; NB],
            _: usize,
        ) -> [[f32; NB]; MB] {
            unreachable!("supported() is false off x86-64")
        }

        $(#[$attr])*
        #[cfg(target_arch = "x86_64")]
        unsafe fn $name<const MB: usize, const NB: usize>(
            x: *const $x,
            ldx: usize,
            w: [*const $w; NB],
            ahead: [*const $w; NB],
            k: usize,
        ) -> [[f32; NB]; MB] {
            let mut acc = [[_mm512_setzero_ps(); NB]; MB];
            let full = k - k % $lanes;
            let mut at = 0;
            while at < full {
                // SAFETY: `w[n]` and each row of x hold k ≥ at + lanes elements.
                let wv: [$vec; NB] = std::array::from_fn(|n| unsafe { $load_w(w[n].add(at)) });
                for n in 0..NB {
                    // A hint only: never faults, even past the end.
                    _mm_prefetch::<_MM_HINT_T1>(ahead[n].wrapping_add(at).cast());
                }
                for m in 0..MB {
                    // SAFETY: row m of x holds k ≥ at + lanes elements.
                    let xv = unsafe { $load(x.add(m * ldx + at)) };
                    for n in 0..NB {
                        acc[m][n] = $madd(acc[m][n], xv, wv[n]);
                    }
                }
                at += $lanes;
            }
            if at < k {
                let mask = ((1u64 << (k - at)) - 1) as $mask;
                // SAFETY: `mask` covers only the k - at elements left.
                let wv: [$vec; NB] = std::array::from_fn(|n| unsafe { $masked_w(mask, w[n].add(at)) });
                for m in 0..MB {
                    // SAFETY: `mask` covers only row m's k - at elements left.
                    let xv = unsafe { $masked(mask, x.add(m * ldx + at)) };
                    for n in 0..NB {
                        acc[m][n] = $madd(acc[m][n], xv, wv[n]);
                    }
                }
            }
            let mut out = [[0.0; NB]; MB];
            for m in 0..MB {
                for n in 0..NB {
                    out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
                }
            }
            out
        }
    };
}

/// 32 bfloat16 as the dot products take them; the transmute reads the
/// same 512 bits.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn load_bf16(p: *const u16) -> __m512bh {
    // SAFETY: the caller's: 32 elements at `p`.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

/// The first elements of 32 bfloat16 under `mask`, zero after.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_bf16_masked(mask: __mmask32, p: *const u16) -> __m512bh {
    // SAFETY: the caller's: the elements under `mask` at `p`.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p.cast())) }
}

/// 16 int8 as f32 (exact).
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_i8(p: *const i8) -> __m512 {
    // SAFETY: the caller's: 16 elements at `p`.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
}

/// 16 int8 as f32 (exact), those outside `mask` zero.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_i8_masked(mask: __mmask16, p: *const i8) -> __m512 {
    // SAFETY: the caller's: the elements under `mask` at `p`.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p.cast()))) }
}

/// 16 FP8 e4m3 values (bytes) as f32, exactly: the sign and the 7 bits of
/// exponent and mantissa moved into an f32's places, which makes each
/// value 2⁻¹²⁰ times itself (its subnormals too, as f32 subnormals), then
/// times 2¹²⁰. (0x7f and 0xff, e4m3's NaNs, become ±480; checkpoints hold
/// none.)
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn fp8_as_f32(bytes: __m128i) -> __m512 {
    let v = _mm512_cvtepu8_epi32(bytes);
    let magnitude = _mm512_srli_epi32::<5>(_mm512_slli_epi32::<25>(v));
    let sign = _mm512_and_si512(_mm512_slli_epi32::<24>(v), _mm512_set1_epi32(i32::MIN));
    let bits = _mm512_or_si512(magnitude, sign);
    _mm512_mul_ps(
        _mm512_castsi512_ps(bits),
        _mm512_castsi512_ps(_mm512_set1_epi32((120 + 127) << 23)),
    )
}

/// 16 FP8 values as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen_fp8(p: *const u8) -> __m512 {
    // SAFETY: the caller's: 16 elements at `p`.
    fp8_as_f32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// 16 FP8 values as f32, those outside `mask` zero.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_fp8_masked(mask: __mmask16, p: *const u8) -> __m512 {
    // SAFETY: the caller's: the elements under `mask` at `p`.
    fp8_as_f32(unsafe { _mm_maskz_loadu_epi8(mask, p.cast()) })
}

/// Defines `$name(p)` and `$masked(mask, p)`: 32 weights of `$w` as
/// bfloat16, from two halves of 16 widened to f32 by `$widen` (and
/// `$widen_masked`, those outside `mask` zero) and packed, exactly where
/// every value has at most 8 significant bits and a bfloat16 exponent (int8
/// and e4m3 do).
macro_rules! widen_to_bf16 {
    ($w:ty: $name:ident, $masked:ident from $widen:ident, $widen_masked:ident) => {
        #[inline]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn $name(p: *const $w) -> __m512bh {
            // SAFETY: the caller's: 32 elements at `p`.
            unsafe { _mm512_cvtne2ps_pbh($widen(p.add(16)), $widen(p)) }
        }

        #[inline]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn $masked(mask: __mmask32, p: *const $w) -> __m512bh {
            // SAFETY: the caller's: the elements under `mask` at `p`.
            unsafe {
                let low = $widen_masked(mask as __mmask16, p);
                let high = $widen_masked((mask >> 16) as __mmask16, p.wrapping_add(16));
                _mm512_cvtne2ps_pbh(high, low)
            }
        }
    };
}

widen_to_bf16!(i8: widen_i8_bf16, widen_i8_bf16_masked from widen_i8, widen_i8_masked);
widen_to_bf16!(u8: widen_fp8_bf16, widen_fp8_bf16_masked from widen_fp8, widen_fp8_masked);

dot_kernel! {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    fn dot_bf16_fp8(u16, u8, __m512bh, 32, __mmask32);
    load: |p| load_bf16(p), load_masked: |mask, p| load_bf16_masked(mask, p),
    load_w: |p| widen_fp8_bf16(p), load_w_masked: |mask, p| widen_fp8_bf16_masked(mask, p),
    madd: |acc, x, w| _mm512_dpbf16_ps(acc, x, w)
}

dot_kernel! {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    fn dot_f32_fp8(f32, u8, __m512, 16, __mmask16);
    load: |p: *const f32| _mm512_loadu_ps(p),
    load_masked: |mask, p: *const f32| _mm512_maskz_loadu_ps(mask, p),
    load_w: |p| widen_fp8(p),
    load_w_masked: |mask, p| widen_fp8_masked(mask, p),
    madd: |acc, x, w| _mm512_fmadd_ps(x, w, acc)
}

dot_kernel! {
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn dot_bf16(u16, u16, __m512bh, 32, __mmask32);
    load: |p| load_bf16(p), load_masked: |mask, p| load_bf16_masked(mask, p),
    load_w: |p| load_bf16(p), load_w_masked: |mask, p| load_bf16_masked(mask, p),
    madd: |acc, x, w| _mm512_dpbf16_ps(acc, x, w)
}

dot_kernel! {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    fn dot_bf16_i8(u16, i8, __m512bh, 32, __mmask32);
    load: |p| load_bf16(p), load_masked: |mask, p| load_bf16_masked(mask, p),
    load_w: |p| widen_i8_bf16(p), load_w_masked: |mask, p| widen_i8_bf16_masked(mask, p),
    madd: |acc, x, w| _mm512_dpbf16_ps(acc, x, w)
}

dot_kernel! {
    #[target_feature(enable = "avx512f,fma")]
    fn dot_f32(f32, f32, __m512, 16, __mmask16);
    load: |p: *const f32| _mm512_loadu_ps(p),
    load_masked: |mask, p: *const f32| _mm512_maskz_loadu_ps(mask, p),
    load_w: |p: *const f32| _mm512_loadu_ps(p),
    load_w_masked: |mask, p: *const f32| _mm512_maskz_loadu_ps(mask, p),
    madd: |acc, x, w| _mm512_fmadd_ps(x, w, acc)
}

dot_kernel! {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    fn dot_f32_i8(f32, i8, __m512, 16, __mmask16);
    load: |p: *const f32| _mm512_loadu_ps(p),
    load_masked: |mask, p: *const f32| _mm512_maskz_loadu_ps(mask, p),
    load_w: |p| widen_i8(p),
    load_w_masked: |mask, p| widen_i8_masked(mask, p),
    madd: |acc, x, w| _mm512_fmadd_ps(x, w, acc)
}

/// `e^x` in 16 lanes: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-6
/// polynomial for `e^r` (about 1 ulp), scaled by `2^n`; overflows to +inf
/// and underflows to 0 as libm's `expf` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_ps(x: __m512) -> __m512 {
    // Past these e^x is inf or 0 in f32; clamping keeps n finite.
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(89.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 in two parts, so that n·ln 2 is exact enough.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(p, n)
}

/// `silu(x) = x / (1 + e^-x)`, as libtorch computes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_ps(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(
        x,
        _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))),
    )
}

/// Each lane rounded to bfloat16 as [`bf16_from_f32`] rounds (to nearest
/// even; NaN stays NaN), as the bits of the bfloat16 in its low half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn bf16_bits_ps(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    let rounded = _mm512_srli_epi32::<16>(rounded);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0))
}

/// Each lane rounded to bfloat16 and back to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round_bf16_ps(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bf16_bits_ps(v)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn swiglu_row_bf16(gate: &[f32], up: &[f32], out: *mut u16) {
    for at in (0..gate.len()).step_by(16) {
        let mask = lanes(gate.len() - at);
        // SAFETY: `mask` covers only the elements left in gate, up and out.
        unsafe {
            let g = round_bf16_ps(_mm512_maskz_loadu_ps(mask, gate.as_ptr().add(at)));
            let u = round_bf16_ps(_mm512_maskz_loadu_ps(mask, up.as_ptr().add(at)));
            let h = bf16_bits_ps(_mm512_mul_ps(round_bf16_ps(silu_ps(g)), u));
            _mm256_mask_storeu_epi16(out.add(at).cast(), mask, _mm512_cvtepi32_epi16(h));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_row_f32(gate: &[f32], up: &[f32], out: *mut f32) {
    for at in (0..gate.len()).step_by(16) {
        let mask = lanes(gate.len() - at);
        // SAFETY: `mask` covers only the elements left in gate, up and out.
        unsafe {
            let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(at));
            let u = _mm512_maskz_loadu_ps(mask, up.as_ptr().add(at));
            _mm512_mask_storeu_ps(out.add(at), mask, _mm512_mul_ps(silu_ps(g), u));
        }
    }
}

/// `acc[g] += Σᵢ weights[g·n + i] · rows[i]`: 32 lanes of up to 4 rows of
/// `acc` stay in registers while every row `i` streams by (loaded once for
/// them all), so each sum takes its multiply-adds in the order of `i`.
macro_rules! add_weighted {
    ($(#[$attr:meta])* fn $name:ident($elem:ty); load: $load:expr) => {
        $(#[$attr])*
        #[cfg(target_arch = "x86_64")]
        unsafe fn $name(acc: &mut [f32], weights: &[f32], rows: &[*const $elem], len: usize) {
            /// Lanes `at..at + 32` of `G` rows of `acc` from `first`.
            $(#[$attr])*
            unsafe fn block<const G: usize>(
                acc: &mut [f32],
                weights: &[f32],
                rows: &[*const $elem],
                (len, first, at): (usize, usize, usize),
            ) {
                let n = rows.len();
                let masks = [lanes(len - at), lanes(len.saturating_sub(at + 16))];
                let base = acc.as_mut_ptr();
                let sum = |g: usize, half: usize| base.wrapping_add((first + g) * len + at + 16 * half);
                // SAFETY: the masks cover only the lanes left in each row of
                // acc and of `rows`; masked-off lanes are neither read nor
                // written.
                unsafe {
                    let mut sums = [[_mm512_setzero_ps(); 2]; G];
                    for (g, halves) in sums.iter_mut().enumerate() {
                        for (half, s) in halves.iter_mut().enumerate() {
                            *s = _mm512_maskz_loadu_ps(masks[half], sum(g, half));
                        }
                    }
                    for (i, &row) in rows.iter().enumerate() {
                        let v = [$load(masks[0], row.add(at)), $load(masks[1], row.wrapping_add(at + 16))];
                        for (g, halves) in sums.iter_mut().enumerate() {
                            let w = _mm512_set1_ps(*weights.get_unchecked((first + g) * n + i));
                            for (half, s) in halves.iter_mut().enumerate() {
                                *s = _mm512_fmadd_ps(w, v[half], *s);
                            }
                        }
                    }
                    for (g, halves) in sums.iter().enumerate() {
                        for (half, s) in halves.iter().enumerate() {
                            _mm512_mask_storeu_ps(sum(g, half), masks[half], *s);
                        }
                    }
                }
            }
            let groups = acc.len() / len.max(1);
            for at in (0..len).step_by(32) {
                let mut first = 0;
                while first < groups {
                    let shape = (len, first, at);
                    // SAFETY: as the caller promised, for rows first.. of acc.
                    unsafe {
                        match groups - first {
                            1 => block::<1>(acc, weights, rows, shape),
                            2 => block::<2>(acc, weights, rows, shape),
                            3 => block::<3>(acc, weights, rows, shape),
                            _ => block::<4>(acc, weights, rows, shape),
                        }
                    }
                    first += (groups - first).min(4);
                }
            }
        }
    };
}

/// The first `left` of 16 lanes (all 16 from 16 on).
#[cfg(target_arch = "x86_64")]
fn lanes(left: usize) -> __mmask16 {
    if left >= 16 {
        u16::MAX
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

add_weighted! {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn add_weighted_bf16(u16);
    // bfloat16 is the high half of an f32.
    load: |mask, p: *const u16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(mask, p.cast()),
    )))
}

add_weighted! {
    #[target_feature(enable = "avx512f")]
    fn add_weighted_f32(f32);
    load: |mask, p: *const f32| _mm512_maskz_loadu_ps(mask, p)
}

/// `e^x` in 16 lanes as libtorch's attention softmax takes it on AVX-512
/// (`Vectorized<float>::exp_u20`, within 20 ulp): `x = n·ln 2 + r` with
/// `n = ⌊x·log2 e + ½⌋`, a degree-5 polynomial for `e^r`, times `2^n`;
/// below `ln(FLT_MIN)` it is 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_u20_ps(x: __m512) -> __m512 {
    let ln_min = _mm512_castsi512_ps(_mm512_set1_epi32(0xc2ae_ac50_u32 as i32));
    let ln_max = _mm512_castsi512_ps(_mm512_set1_epi32(0x42b1_7218));
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OS>(x, ln_min);
    let x = _mm512_max_ps(_mm512_min_ps(x, ln_max), ln_min);
    let log2e = _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8_aa3b));
    let n = _mm512_fmadd_ps(x, log2e, _mm512_set1_ps(0.5));
    let n = _mm512_cvtepi32_ps(_mm512_cvt_roundps_epi32::<
        { _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC },
    >(n));
    let ln2 = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f31_7218));
    let r = _mm512_fnmadd_ps(n, ln2, x);
    let mut p = _mm512_set1_ps(0.008_289_291);
    for c in [0.041_897_822, 0.166_676_52, 0.499_991_5, 0.999_999_7, 1.0] {
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c));
    }
    // 2^(n - 1) built in the exponent bits, then doubled.
    let exponent = _mm512_cvtps_epi32(_mm512_sub_ps(n, _mm512_set1_ps(1.0)));
    let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(exponent, _mm512_set1_epi32(127)));
    let scale = _mm512_mask_blend_ps(underflow, _mm512_castsi512_ps(scale), _mm512_setzero_ps());
    _mm512_mul_ps(_mm512_mul_ps(p, scale), _mm512_set1_ps(2.0))
}

/// `xs[i] = e^(xs[i] - max)` for every element; returns their sum. As
/// libtorch's attention softmax computes it (so that bf16 attention rounds
/// its weights where libtorch does): whole groups of 16 with
/// [`exp_u20_ps`], summed lane by lane and then across the lanes, then the
/// elements left one by one with libm's `expf`.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut sum = _mm512_setzero_ps();
    let whole = xs.len() - xs.len() % 16;
    for at in (0..whole).step_by(16) {
        // SAFETY: 16 elements from `at` are in `xs`.
        unsafe {
            let p = xs.as_mut_ptr().add(at);
            let e = exp_u20_ps(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_set1_ps(max)));
            _mm512_storeu_ps(p, e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    let mut sum = _mm512_reduce_add_ps(sum);
    for x in &mut xs[whole..] {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

#[cfg(test)]
mod tests {
    //! The vectorised SwiGLU and weighted sums against the scalar code they
    //! stand for.

    use proptest::prelude::*;

    use super::*;
    use crate::{Element, supported};

    fn bf16_value(bits: u16) -> f32 {
        f32_from_bf16(bits)
    }

    proptest! {
        #[test]
        fn swiglu_row_rounds_as_the_scalar_swiglu(
            pairs in proptest::collection::vec((-120.0f32..120.0, -8.0f32..8.0), 1..70),
        ) {
            if !supported(Element::Bf16) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let (gate, up): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let mut ours = vec![0u16; gate.len() + 1];
            // SAFETY: supported; `ours` has room (one more, which must stay untouched).
            unsafe { Bf16::swiglu_row(&gate, &up, ours.as_mut_ptr()) };
            prop_assert_eq!(ours[gate.len()], 0, "wrote past the row");
            for (i, (&g, &u)) in gate.iter().zip(&up).enumerate() {
                let want = Bf16::swiglu(g, u);
                let got = bf16_value(ours[i]);
                // exp within an ulp or two of libm's: at most one bf16 step apart.
                let step = want.abs() / 128.0 + f32::MIN_POSITIVE;
                prop_assert!((got - want).abs() <= step, "bf16 {i}: swiglu({g}, {u}) = {got}, scalar {want}");
            }
            let mut ours = vec![0f32; gate.len() + 1];
            // SAFETY: as for bf16.
            unsafe { F32::swiglu_row(&gate, &up, ours.as_mut_ptr()) };
            prop_assert_eq!(ours[gate.len()], 0.0, "wrote past the row");
            for (i, (&g, &u)) in gate.iter().zip(&up).enumerate() {
                let want = F32::swiglu(g, u);
                prop_assert!((ours[i] - want).abs() <= 4.0 * f32::EPSILON * want.abs() + 1e-30, "f32 {i}: swiglu({g}, {u}) = {}, scalar {want}", ours[i]);
            }
        }
    }

    proptest! {
        /// Bit for bit the scalar loop `acc = w·v + acc` (one fused
        /// multiply-add per row, in row order); nothing written past `acc`.
        #[test]
        fn add_weighted_adds_in_row_order(
            (groups, len, n, weights, start, values) in (1usize..10, 1usize..80, 0usize..12)
                .prop_flat_map(|(groups, len, n)| {
                    let numbers = |count| proptest::collection::vec(-1.0f32..1.0, count);
                    (Just(groups), Just(len), Just(n), numbers(groups * n), numbers(groups * len), numbers(n * len))
                }),
        ) {
            if !supported(Element::Bf16) {
                return Ok(());
            }
            let bf16s: Vec<u16> = values.iter().map(|&v| bf16_from_f32(v)).collect();
            let want = |value: &dyn Fn(usize) -> f32| {
                let mut acc = start.clone();
                for g in 0..groups {
                    for i in 0..n {
                        for d in 0..len {
                            let w = weights[g * n + i];
                            acc[g * len + d] = w.mul_add(value(i * len + d), acc[g * len + d]);
                        }
                    }
                }
                acc
            };
            let mut ours = start.clone();
            ours.push(7.0);
            let rows: Vec<_> = (0..n).map(|i| values[i * len..].as_ptr()).collect();
            // SAFETY: supported; `ours` holds `groups` rows of `len` (and one
            // more element, which must stay), each row `len` values.
            unsafe { F32::add_weighted(&mut ours[..groups * len], &weights, &rows, len) };
            prop_assert_eq!(ours.pop(), Some(7.0));
            prop_assert_eq!(&ours, &want(&|at| values[at]));
            let mut ours = start.clone();
            let rows: Vec<_> = (0..n).map(|i| bf16s[i * len..].as_ptr()).collect();
            // SAFETY: supported; `ours` holds `groups` rows of `len`, each row `len` values.
            unsafe { Bf16::add_weighted(&mut ours, &weights, &rows, len) };
            prop_assert_eq!(&ours, &want(&|at| f32_from_bf16(bf16s[at])));
        }
    }

    #[test]
    fn exp_follows_libm_to_its_limits() {
        if !supported(Element::F32) {
            return;
        }
        let xs: Vec<f32> = (-1100..=1000)
            .map(|i| i as f32 * 0.1 + 0.013)
            .chain([
                0.0,
                -0.0,
                88.7,
                89.5,
                -103.0,
                -110.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
            ])
            .collect();
        for chunk in xs.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0.0f32; 16];
            // SAFETY: supported; 16 lanes in and out.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp_ps(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (&x, &got) in chunk.iter().zip(&out) {
                let want = x.exp();
                let close = (got - want).abs() <= 2.0 * f32::EPSILON * want
                    || want < f32::MIN_POSITIVE && got < f32::MIN_POSITIVE;
                assert!(close || got == want, "exp({x}) = {got}, libm {want}");
            }
        }
        let mut nan = [f32::NAN; 16];
        // SAFETY: supported; 16 lanes in, 16 out.
        unsafe { _mm512_storeu_ps(nan.as_mut_ptr(), silu_ps(_mm512_loadu_ps(nan.as_ptr()))) };
        assert!(nan.iter().all(|v| v.is_nan()), "silu(NaN) stays NaN");
    }
}
