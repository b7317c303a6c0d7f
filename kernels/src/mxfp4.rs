//! Projections through MXFP4 weights, as gpt-oss checkpoints store their
//! experts: per output row, blocks of 32 values, each 16 bytes of E2M1
//! values (two a byte, the low nibble first) and one E8M0 scale (a power
//! of two, its exponent + 127). The weights are read as stored, 17 bytes
//! for 32 values, and widened in registers: a block's scale picks one of
//! 256 tables of the sixteen E2M1 values so scaled (exact in f32, built at
//! compile time), its nibbles index it (`vpermps`). The weight rows are
//! prefetched along as the other kernels' are. The rows of x are widened to
//! f32 once per call, each block's 16 even elements before its 16 odd ones:
//! the order of the low and the high nibbles. Accumulation is in f32, the
//! output rounded once.

// Index loops over the const block sizes: they unroll into straight-line
// register code, which iterator chains over the accumulators obscure.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::avx512::Kernel;
use crate::blocks::{Output, PREFETCH_BYTES};
use crate::linear::Shape;

/// Values per scale.
pub const BLOCK: usize = 32;

/// The sixteen E2M1 values, by their 4 bits (sign, 2 exponent, 1 mantissa).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The sixteen E2M1 values times each E8M0 scale, `2^(scale - 127)`: a
/// block's table is one load (16 KiB in all, L1-resident), not a scaling.
/// Every product is exact in f32 (two significant bits; the smallest,
/// 2^-128, a subnormal), but for those of 2^128 and more, infinite.
#[repr(align(64))]
struct ScaledTables([[f32; 16]; 256]);

static SCALED: ScaledTables = ScaledTables({
    let mut tables = [[0.0f32; 16]; 256];
    let mut scale = 0;
    while scale < 256 {
        // 2^(scale - 127) as an f64's exponent bits.
        let power = f64::from_bits(((scale as u64) + 1023 - 127) << 52);
        let mut code = 0;
        while code < 16 {
            tables[scale][code] = (E2M1[code] as f64 * power) as f32;
            code += 1;
        }
        scale += 1;
    }
    tables
});

/// Weight rows a pass reads at once.
const WR: usize = 4;
/// Rows of x a pass takes at once.
const MR: usize = 4;

/// The rows of `x` (`rows × inner`) in f32, each block's even elements
/// before its odd ones.
fn deinterleaved<K: Kernel>(x: &[K::Elem], rows: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * inner];
    for (row, out) in x[..rows * inner]
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        for i in 0..BLOCK / 2 {
            out[i] = K::to_f32(row[2 * i]);
            out[BLOCK / 2 + i] = K::to_f32(row[2 * i + 1]);
        }
    }
    out
}

/// `out[:, columns] = x · w[columns]ᵀ` for an MXFP4 `w`: `blocks` `[outputs,
/// inner / 2]`, `scales` `[outputs, inner / 32]`.
///
/// # Safety
/// The kernels are supported; `inner` is a multiple of 32; the lengths fit
/// `shape`; no other thread writes these columns meanwhile.
pub(crate) unsafe fn linear_columns<K: Kernel>(
    x: &[K::Elem],
    (blocks, scales): (&[u8], &[u8]),
    shape: Shape,
    out: &Output<K::Elem>,
    columns: Range<usize>,
) {
    let Shape {
        rows,
        inner,
        outputs,
    } = shape;
    let groups = inner / BLOCK;
    let x = deinterleaved::<K>(x, rows, inner);
    let mut first = columns.start;
    while first < columns.end {
        let count = (columns.end - first).min(WR);
        // Past the last column, the last one again (its dots are dropped).
        let row = |n: usize| (first + n).min(first + count - 1);
        let w = std::array::from_fn(|n| blocks[row(n) * inner / 2..].as_ptr());
        let s = std::array::from_fn(|n| scales[row(n) * groups..].as_ptr());
        let mut m = 0;
        while m < rows {
            let at = x[m * inner..].as_ptr();
            let emit = |dots: &[[f32; WR]]| {
                for (offset, dots) in dots.iter().enumerate() {
                    for (n, &dot) in dots.iter().take(count).enumerate() {
                        // SAFETY: the caller's bounds; this thread's own column.
                        unsafe { out.write((m + offset) * outputs + first + n, K::from_f32(dot)) };
                    }
                }
            };
            // SAFETY: supported; x holds the rows from m, each of `inner`
            // values; each weight row `groups` blocks and scales.
            unsafe {
                match (rows - m).min(MR) {
                    1 => emit(&dots::<1>(at, inner, w, s, groups)),
                    2 => emit(&dots::<2>(at, inner, w, s, groups)),
                    3 => emit(&dots::<3>(at, inner, w, s, groups)),
                    _ => emit(&dots::<4>(at, inner, w, s, groups)),
                }
            }
            m += MR;
        }
        first += count;
    }
}

/// `acc[m][n]`: row `m` of `x` (rows `ldx` apart, deinterleaved) against
/// weight row `n` (`groups` blocks from `w[n]`, their scales from `s[n]`).
///
/// # Safety
/// AVX-512F; `x` holds `MB` rows of `groups × 32` values `ldx` apart; each
/// `w[n]` `groups × 16` bytes and `s[n]` `groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots<const MB: usize>(
    x: *const f32,
    ldx: usize,
    w: [*const u8; WR],
    s: [*const u8; WR],
    groups: usize,
) -> [[f32; WR]; MB] {
    // SAFETY: the caller's bounds: every load is within the rows given.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); WR]; MB];
        for g in 0..groups {
            let mut even = [_mm512_setzero_ps(); MB];
            let mut odd = [_mm512_setzero_ps(); MB];
            for m in 0..MB {
                let at = x.add(m * ldx + g * BLOCK);
                even[m] = _mm512_loadu_ps(at);
                odd[m] = _mm512_loadu_ps(at.add(BLOCK / 2));
            }
            for n in 0..WR {
                let at = w[n].add(g * 16);
                // A hint only: never faults, even past the end.
                _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH_BYTES).cast());
                let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(at.cast()));
                let scaled = _mm512_load_ps(SCALED.0[usize::from(*s[n].add(g))].as_ptr());
                // vpermps reads the low 4 bits of an index.
                let lows = _mm512_permutexvar_ps(codes, scaled);
                let highs = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(codes), scaled);
                for m in 0..MB {
                    acc[m][n] = _mm512_fmadd_ps(lows, even[m], acc[m][n]);
                    acc[m][n] = _mm512_fmadd_ps(highs, odd[m], acc[m][n]);
                }
            }
        }
        let mut out = [[0.0f32; WR]; MB];
        for m in 0..MB {
            for n in 0..WR {
                out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
            }
        }
        out
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dots<const MB: usize>(
    _: *const f32,
    _: usize,
    _: [*const u8; WR],
    _: [*const u8; WR],
    _: usize,
) -> [[f32; WR]; MB] {
    unreachable!("the kernels are not supported here")
}

#[cfg(test)]
mod tests {
    //! The MXFP4 projection against its weights dequantized, in f64.

    use proptest::prelude::*;

    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};
    use crate::linear::{Matrix, Shape, ShapeError, linear};
    use crate::parallel::Scoped;
    use crate::{Element, supported};

    use super::*;

    /// `blocks` and `scales` as plain values `[outputs, inner]`.
    fn dequantized(blocks: &[u8], scales: &[u8], inner: usize) -> Vec<f64> {
        let mut w = Vec::new();
        for (row, scales) in blocks
            .chunks_exact(inner / 2)
            .zip(scales.chunks_exact(inner / BLOCK))
        {
            for (i, byte) in row.iter().enumerate() {
                let scale = 2f64.powi(i32::from(scales[i / 16]) - 127);
                w.push(f64::from(E2M1[usize::from(byte & 15)]) * scale);
                w.push(f64::from(E2M1[usize::from(byte >> 4)]) * scale);
            }
        }
        w
    }

    type Case = (Shape, Vec<f32>, Vec<u8>, Vec<u8>, usize);

    fn case() -> impl Strategy<Value = Case> {
        (1usize..10, 1usize..5, 1usize..20, 1usize..4).prop_flat_map(
            |(rows, groups, outputs, threads)| {
                let inner = groups * BLOCK;
                (
                    Just(Shape {
                        rows,
                        inner,
                        outputs,
                    }),
                    proptest::collection::vec(-2.0f32..2.0, rows * inner),
                    proptest::collection::vec(any::<u8>(), outputs * inner / 2),
                    proptest::collection::vec(118u8..134, outputs * groups),
                    Just(threads),
                )
            },
        )
    }

    proptest! {
        #[test]
        fn mxfp4_matches_the_dequantized_reference((shape, x, blocks, scales, threads) in case()) {
            if !supported(Element::Bf16) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let w = dequantized(&blocks, &scales, shape.inner);
            let team = Scoped(threads);
            let matrix = Matrix::Mxfp4 { blocks: &blocks, scales: &scales };
            let expected = |x: &[f32]| -> Vec<(f64, f64)> {
                (0..shape.rows)
                    .flat_map(|m| (0..shape.outputs).map(move |n| (m, n)))
                    .map(|(m, n)| {
                        let terms = (0..shape.inner)
                            .map(|i| f64::from(x[m * shape.inner + i]) * w[n * shape.inner + i]);
                        terms.fold((0.0, 0.0), |(sum, size), t| (sum + t, size + t.abs()))
                    })
                    .collect()
            };
            let mut out = vec![f32::NAN; shape.rows * shape.outputs];
            linear::<F32>(&team, &x, matrix, shape, &mut out).unwrap();
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected(&x)).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 1e-5 * size + 1e-6, "f32 {i}: {ours} vs {want}");
            }
            let xb: Vec<u16> = x.iter().map(|&v| bf16_from_f32(v)).collect();
            let exact: Vec<f32> = xb.iter().map(|&b| f32_from_bf16(b)).collect();
            let mut out = vec![0u16; shape.rows * shape.outputs];
            let matrix = Matrix::Mxfp4 { blocks: &blocks, scales: &scales };
            linear::<Bf16>(&team, &xb, matrix, shape, &mut out).unwrap();
            // The output rounded to bf16 once.
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected(&exact)).enumerate() {
                let ours = f64::from(f32_from_bf16(ours));
                prop_assert!((ours - want).abs() <= 1e-5 * size + want.abs() / 256.0 + 1e-6, "bf16 {i}: {ours} vs {want}");
            }
        }
    }

    #[test]
    fn every_nibble_and_scale_is_widened_exactly() {
        if !supported(Element::F32) {
            return;
        }
        // One row per value: x picks element i of each block.
        let inner = BLOCK;
        let outputs = 16;
        let blocks: Vec<u8> = (0..outputs as u8)
            .flat_map(|v| (0..16).map(move |_| v | (v << 4)))
            .collect();
        for exponent in [0u8, 1, 100, 127, 130, 200] {
            let scales = vec![exponent; outputs];
            let w = dequantized(&blocks, &scales, inner);
            for i in 0..inner {
                let mut x = vec![0.0f32; inner];
                x[i] = 1.0;
                let mut out = vec![f32::NAN; outputs];
                let shape = Shape {
                    rows: 1,
                    inner,
                    outputs,
                };
                let matrix = Matrix::Mxfp4 {
                    blocks: &blocks,
                    scales: &scales,
                };
                linear::<F32>(&Scoped(2), &x, matrix, shape, &mut out).unwrap();
                for n in 0..outputs {
                    assert_eq!(
                        f64::from(out[n]),
                        w[n * inner + i],
                        "value {n} scale {exponent}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_refused() {
        let (blocks, scales) = (vec![0u8; 24], vec![127u8; 2]);
        let shape = Shape {
            rows: 1,
            inner: 48,
            outputs: 1,
        };
        let matrix = Matrix::Mxfp4 {
            blocks: &blocks,
            scales: &scales,
        };
        let err = linear::<F32>(&Scoped(1), &[0.0; 48], matrix, shape, &mut [0.0]).unwrap_err();
        assert_eq!(err, ShapeError::Mxfp4Inner(48));
    }
}
