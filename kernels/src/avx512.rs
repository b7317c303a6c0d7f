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
    type Elem: Copy + Send + Sync;
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
        unsafe { dot_bf16::<MB, NB>(x, ldx, w, ahead, k) }
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
        unsafe { dot_f32::<MB, NB>(x, ldx, w, ahead, k) }
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
unsafe fn dot_bf16<const MB: usize, const NB: usize>(
    _: *const u16,
    _: usize,
    _: [*const u16; NB],
    _: [*const u16; NB],
    _: usize,
) -> [[f32; NB]; MB] {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_f32<const MB: usize, const NB: usize>(
    _: *const f32,
    _: usize,
    _: [*const f32; NB],
    _: [*const f32; NB],
    _: usize,
) -> [[f32; NB]; MB] {
    unreachable!("supported() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_bf16<const MB: usize, const NB: usize>(
    x: *const u16,
    ldx: usize,
    w: [*const u16; NB],
    ahead: [*const u16; NB],
    k: usize,
) -> [[f32; NB]; MB] {
    const LANES: usize = 32;
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    let mut wv = [_mm512_setzero_si512(); NB];
    let mut at = 0;
    while at < k {
        // All lanes but past the end of a row: masked loads read nothing there.
        let mask: __mmask32 = if at + LANES <= k {
            !0
        } else {
            (1u32 << (k - at)) - 1
        };
        for n in 0..NB {
            // SAFETY: `w[n]` holds k elements and `mask` covers only those.
            wv[n] = unsafe { _mm512_maskz_loadu_epi16(mask, w[n].add(at).cast()) };
            // A hint only: never faults, even past the end.
            _mm_prefetch::<_MM_HINT_T0>(ahead[n].wrapping_add(at).cast());
        }
        for m in 0..MB {
            // SAFETY: row m of x holds k elements.
            let xv = unsafe { _mm512_maskz_loadu_epi16(mask, x.add(m * ldx + at).cast()) };
            // SAFETY: the same 512 bits, read as 32 bfloat16.
            let xv: __m512bh = unsafe { std::mem::transmute::<__m512i, __m512bh>(xv) };
            for n in 0..NB {
                let wn = unsafe { std::mem::transmute::<__m512i, __m512bh>(wv[n]) };
                acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wn);
            }
        }
        at += LANES;
    }
    let mut out = [[0.0; NB]; MB];
    for m in 0..MB {
        for n in 0..NB {
            out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_f32<const MB: usize, const NB: usize>(
    x: *const f32,
    ldx: usize,
    w: [*const f32; NB],
    ahead: [*const f32; NB],
    k: usize,
) -> [[f32; NB]; MB] {
    const LANES: usize = 16;
    let mut acc = [[_mm512_setzero_ps(); NB]; MB];
    let mut wv = [_mm512_setzero_ps(); NB];
    let mut at = 0;
    while at < k {
        let mask: __mmask16 = if at + LANES <= k {
            !0
        } else {
            ((1u32 << (k - at)) - 1) as __mmask16
        };
        for n in 0..NB {
            // SAFETY: `w[n]` holds k elements and `mask` covers only those.
            wv[n] = unsafe { _mm512_maskz_loadu_ps(mask, w[n].add(at)) };
            _mm_prefetch::<_MM_HINT_T0>(ahead[n].wrapping_add(at).cast());
        }
        for m in 0..MB {
            // SAFETY: row m of x holds k elements.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(m * ldx + at)) };
            for n in 0..NB {
                acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
            }
        }
        at += LANES;
    }
    let mut out = [[0.0; NB]; MB];
    for m in 0..MB {
        for n in 0..NB {
            out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
        }
    }
    out
}
