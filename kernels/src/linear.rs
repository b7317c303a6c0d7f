//! `y = x · Wᵀ` for a few rows of `x` ([`linear`]), and the SwiGLU gate/up projection
//! `h = silu(x · W1ᵀ) ⊙ (x · W3ᵀ)` in one pass over W1 and W3 ([`gate_up`]),
//! each for the element type of a [`Kernel`]: [`crate::Bf16`] or [`crate::F32`]. Weights are
//! row-major `[outputs, inner]`; `x` is `[rows, inner]`, the output
//! `[rows, outputs]`, all contiguous. Accumulation is in f32; bf16 outputs
//! are rounded to nearest even, the SwiGLU's steps each as libtorch does.

use crate::Element;
use crate::avx512::Kernel;
#[cfg(test)]
use crate::parallel::Serial;
use crate::parallel::{Parallel, for_each_chunk};

/// Rows of `x`, their length, and the number of outputs per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rows: usize,
    pub inner: usize,
    pub outputs: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error("{what} holds {len} elements, the shape {shape:?} needs {needed}")]
    Length {
        what: &'static str,
        len: usize,
        needed: usize,
        shape: Shape,
    },
    #[error("row {row} is past the {tokens} rows of x")]
    Row { row: usize, tokens: usize },
    #[error("this CPU lacks the instructions for {0:?} kernels")]
    Unsupported(Element),
}

/// Whether this CPU runs the kernels for `element`: AVX-512F and FMA, and
/// AVX-512 BW, VL and BF16 for bf16.
pub fn supported(element: Element) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let f32_ok = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma");
        match element {
            Element::F32 => f32_ok,
            Element::Bf16 => {
                f32_ok
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = element;
        false
    }
}

/// Calls `run::<K, WR, MR>(args)` with the block for `rows` rows of x: `WR`
/// weight rows against `MR` rows of x per pass, in `WR × MR ≤ 16`
/// accumulators (with more, the compiler spills some to the stack inside
/// the loop). One pass takes up to 8 rows, so the weights stream from memory
/// while the dot products run; each later pass reads them from cache.
macro_rules! blocked {
    ($rows:expr, $run:ident::<$k:ty>($($arg:expr),*)) => {
        match $rows {
            1 => $run::<$k, 8, 1>($($arg),*),
            2 => $run::<$k, 8, 2>($($arg),*),
            3..=4 => $run::<$k, 4, 4>($($arg),*),
            _ => $run::<$k, 2, 8>($($arg),*),
        }
    };
}

/// `out = x · wᵀ`.
pub fn linear<K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w: &[K::Elem],
    shape: Shape,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    check(K::ELEMENT, shape, x.len(), &[w.len()], out.len())?;
    blocked!(shape.rows, run_linear::<K>(team, x, w, shape, out));
    Ok(())
}

/// `out = silu(x · w1ᵀ) ⊙ (x · w3ᵀ)`; `shape.outputs` is the intermediate
/// size (rows of w1 and of w3).
pub fn gate_up<K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w1: &[K::Elem],
    w3: &[K::Elem],
    shape: Shape,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    check(K::ELEMENT, shape, x.len(), &[w1.len(), w3.len()], out.len())?;
    blocked!(shape.rows, run_gate_up::<K>(team, x, w1, w3, shape, out));
    Ok(())
}

fn check(
    element: Element,
    shape: Shape,
    x: usize,
    weights: &[usize],
    out: usize,
) -> Result<(), ShapeError> {
    let length = |what, len, needed| {
        if len == needed {
            Ok(())
        } else {
            Err(ShapeError::Length {
                what,
                len,
                needed,
                shape,
            })
        }
    };
    length("x", x, shape.rows * shape.inner)?;
    for &w in weights {
        length("the weight", w, shape.outputs * shape.inner)?;
    }
    length("the output", out, shape.rows * shape.outputs)?;
    if !supported(element) {
        return Err(ShapeError::Unsupported(element));
    }
    Ok(())
}

/// The output buffer, written by every thread at disjoint indexes.
struct Output<T>(*mut T);
// SAFETY: threads write disjoint elements (their own output columns) and the
// team returns only when all are done.
unsafe impl<T> Sync for Output<T> {}
impl<T> Output<T> {
    /// # Safety
    /// `index` is in bounds and no other thread writes it.
    unsafe fn write(&self, index: usize, value: T) {
        unsafe { self.0.add(index).write(value) }
    }
}

/// How far ahead of its loads a weight row is prefetched into L2 while it is
/// read from memory (the first pass over it), in bytes. Measured on the
/// `bench` model's expert shapes, 8 experts streamed from memory, 2 threads,
/// bf16: into L1 2 KiB ahead (before) 23–26 GB/s at 1–2 rows of x and 18 at
/// 8; into L2 8 KiB ahead 29–32 and 26 (4 and 16 KiB: within noise of 8).
const PREFETCH_BYTES: usize = 8192;

/// Weight bytes a thread takes at a time: enough to keep the prefetcher
/// streaming, small enough that the threads finish together (the `bench`
/// model's expert shapes, 2 threads, 8 rows of x: 64 KiB 17 GB/s, 512 KiB
/// 21, 4 MiB 19.5; at 1 row 25.5, 27, 27).
const CHUNK_BYTES: usize = 512 * 1024;

/// Blocks per chunk for blocks of `elements` weight elements.
fn chunk_blocks<K: Kernel>(elements: usize) -> usize {
    (CHUNK_BYTES / (elements * std::mem::size_of::<K::Elem>()).max(1)).max(1)
}

/// Runs `each(m, dots)` for every row `m` of `x`, where `dots[n]` is row m's
/// dot product with weight row `w[n]`, `MR` rows of x at a time. The
/// first pass streams the weight rows from memory, prefetching further along
/// them; later passes find them in cache, and the second prefetches the rows
/// at `next` (the next block's) so that memory stays busy meanwhile.
///
/// # Safety
/// The kernels are supported; `x` holds `rows × inner` elements and each
/// `w[n]` `inner`.
unsafe fn dots<K: Kernel, const NB: usize, const MR: usize>(
    x: &[K::Elem],
    rows: usize,
    inner: usize,
    w: [*const K::Elem; NB],
    next: [*const K::Elem; NB],
    mut each: impl FnMut(usize, [f32; NB]),
) {
    let along = PREFETCH_BYTES / std::mem::size_of::<K::Elem>();
    let mut m = 0;
    while m < rows {
        let at = x[m * inner..].as_ptr();
        let ahead = if m == 0 {
            w.map(|row| row.wrapping_add(along))
        } else if m == MR {
            next
        } else {
            w
        };
        let mut emit = |block: &[[f32; NB]]| {
            for (offset, values) in block.iter().enumerate() {
                each(m + offset, *values);
            }
        };
        macro_rules! passes {
            ($($rows:literal)*) => {
                match (rows - m).min(MR) {
                    // SAFETY: the caller's bounds; each arm reads the rows left.
                    $($rows => emit(&unsafe { K::dot::<$rows, NB>(at, inner, w, ahead, inner) }),)*
                    _ => unreachable!("MR is at most 8"),
                }
            };
        }
        if MR <= 4 {
            passes!(1 2 3 4)
        } else {
            passes!(1 2 3 4 5 6 7 8)
        }
        m += MR;
    }
}

fn run_linear<K: Kernel, const WR: usize, const MR: usize>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w: &[K::Elem],
    shape: Shape,
    out: &mut [K::Elem],
) {
    let Shape {
        rows,
        inner,
        outputs,
    } = shape;
    let out = Output(out.as_mut_ptr());
    // Row pointers; past the end only as prefetch addresses.
    let row = |n: usize| w.as_ptr().wrapping_add(n * inner);
    let blocks = outputs.div_ceil(WR);
    let chunk = chunk_blocks::<K>(WR * inner);
    for_each_chunk(team, blocks, chunk, &|chunk| {
        for block in chunk {
            let first = block * WR;
            let out = &out;
            let store = |n: usize, m: usize, values: &[f32]| {
                for (offset, &value) in values.iter().enumerate() {
                    // SAFETY: this thread's own columns, in bounds.
                    unsafe { out.write(m * outputs + n + offset, K::from_f32(value)) };
                }
            };
            if first + WR <= outputs {
                let w = std::array::from_fn(|n| row(first + n));
                let next = std::array::from_fn(|n| row(first + WR + n));
                let store = |m, v: [f32; WR]| store(first, m, &v);
                // SAFETY: checked lengths; supported() was checked.
                unsafe { dots::<K, WR, MR>(x, rows, inner, w, next, store) };
            } else {
                for n in first..outputs {
                    // SAFETY: as above.
                    unsafe {
                        dots::<K, 1, MR>(x, rows, inner, [row(n)], [row(n + 1)], |m, v| {
                            store(n, m, &v)
                        })
                    };
                }
            }
        }
    });
}

fn run_gate_up<K: Kernel, const WR: usize, const MR: usize>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w1: &[K::Elem],
    w3: &[K::Elem],
    shape: Shape,
    out: &mut [K::Elem],
) {
    let Shape {
        rows,
        inner,
        outputs,
    } = shape;
    // Each block reads `pairs` rows of w1 and the same rows of w3.
    let pairs = WR / 2;
    let out = Output(out.as_mut_ptr());
    let out = &out;
    // Row pointers; past the end only as prefetch addresses.
    let gate = |j: usize| w1.as_ptr().wrapping_add(j * inner);
    let up = |j: usize| w3.as_ptr().wrapping_add(j * inner);
    let blocks = outputs.div_ceil(pairs);
    let chunk = chunk_blocks::<K>(2 * pairs * inner);
    for_each_chunk(team, blocks, chunk, &|chunk| {
        // This chunk's outputs: their gate and up dot products per row of
        // x, then the SwiGLU over whole rows (vectorised, not per dot).
        let columns = chunk.start * pairs..(chunk.end * pairs).min(outputs);
        let width = columns.len();
        let mut gates = vec![0.0f32; rows * width];
        let mut ups = vec![0.0f32; rows * width];
        for block in chunk {
            let first = block * pairs;
            let at = first - columns.start;
            if first + pairs <= outputs {
                let rows_from = |first: usize| {
                    std::array::from_fn(|n| {
                        if n < pairs {
                            gate(first + n)
                        } else {
                            up(first + n - pairs)
                        }
                    })
                };
                let (w, next) = (rows_from(first), rows_from(first + pairs));
                let each = |m: usize, v: [f32; WR]| {
                    gates[m * width + at..][..pairs].copy_from_slice(&v[..pairs]);
                    ups[m * width + at..][..pairs].copy_from_slice(&v[pairs..]);
                };
                // SAFETY: checked lengths; supported() was checked.
                unsafe { dots::<K, WR, MR>(x, rows, inner, w, next, each) };
            } else {
                for j in first..outputs {
                    let each = |m: usize, v: [f32; 2]| {
                        gates[m * width + j - columns.start] = v[0];
                        ups[m * width + j - columns.start] = v[1];
                    };
                    let next = [gate(j + 1), up(j + 1)];
                    unsafe { dots::<K, 2, MR>(x, rows, inner, [gate(j), up(j)], next, each) };
                }
            }
        }
        for m in 0..rows {
            let row = m * width..(m + 1) * width;
            // SAFETY: supported() was checked; this thread's own columns of
            // row m, in bounds.
            unsafe {
                K::swiglu_row(
                    &gates[row.clone()],
                    &ups[row],
                    out.0.add(m * outputs + columns.start),
                )
            };
        }
    });
}

#[cfg(test)]
mod tests {
    //! Each kernel against a plain f64 reference on random shapes that cover
    //! every block size and the row tails (inner not a multiple of the lanes).

    use proptest::prelude::*;

    use super::*;
    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};
    use crate::parallel::Scoped;

    fn reference(x: &[f32], w: &[f32], shape: Shape) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        for m in 0..shape.rows {
            for n in 0..shape.outputs {
                let terms = (0..shape.inner)
                    .map(|i| f64::from(x[m * shape.inner + i]) * f64::from(w[n * shape.inner + i]));
                let (sum, magnitude) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                out.push((sum, magnitude));
            }
        }
        out
    }

    fn silu(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    /// Within f32 accumulation error and, for bf16, the output's rounding.
    fn close(ours: f32, (expected, magnitude): (f64, f64), output_ulp: f64) -> bool {
        (f64::from(ours) - expected).abs() <= 1e-5 * magnitude + output_ulp * expected.abs() + 1e-6
    }

    fn case() -> impl Strategy<Value = (Shape, Vec<f32>, Vec<f32>, Vec<f32>, usize)> {
        (1usize..11, 1usize..100, 1usize..14, 1usize..4).prop_flat_map(
            |(rows, inner, outputs, threads)| {
                let shape = Shape {
                    rows,
                    inner,
                    outputs,
                };
                let values = |n| proptest::collection::vec(-2.0f32..2.0, n);
                (
                    Just(shape),
                    values(rows * inner),
                    values(outputs * inner),
                    values(outputs * inner),
                    Just(threads),
                )
            },
        )
    }

    fn to_bf16(values: &[f32]) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = values.iter().map(|&v| bf16_from_f32(v)).collect();
        let exact = bits.iter().map(|&b| f32_from_bf16(b)).collect();
        (bits, exact)
    }

    proptest! {
        #[test]
        fn linear_matches_the_reference((shape, x, w, _, threads) in case()) {
            if !supported(Element::F32) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let team = Scoped(threads);
            let expected = reference(&x, &w, shape);
            let mut out = vec![f32::NAN; shape.rows * shape.outputs];
            linear::<F32>(&team, &x, &w, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                prop_assert!(close(ours, expected[i], 0.0), "f32 {i}: {ours} vs {:?}", expected[i]);
            }

            if !supported(Element::Bf16) {
                return Ok(());
            }
            let ((xb, xe), (wb, we)) = (to_bf16(&x), to_bf16(&w));
            let expected = reference(&xe, &we, shape);
            let mut out = vec![0u16; shape.rows * shape.outputs];
            linear::<Bf16>(&team, &xb, &wb, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                let ours = f32_from_bf16(ours);
                prop_assert!(close(ours, expected[i], 1.0 / 256.0), "bf16 {i}: {ours} vs {:?}", expected[i]);
            }
        }

        #[test]
        fn gate_up_matches_the_reference((shape, x, w1, w3, threads) in case()) {
            if !supported(Element::F32) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let team = Scoped(threads);
            let check = |out: &[f32], x: &[f32], w1: &[f32], w3: &[f32], ulp: f64| {
                let (gate, up) = (reference(x, w1, shape), reference(x, w3, shape));
                for (i, &ours) in out.iter().enumerate() {
                    let expected = silu(gate[i].0) * up[i].0;
                    // The error of each dot product, carried through silu·up.
                    let slack = 1e-5 * (gate[i].1 * up[i].0.abs() + up[i].1 * (1.0 + gate[i].0.abs()))
                        + ulp * expected.abs() + 1e-6;
                    prop_assert!((f64::from(ours) - expected).abs() <= slack, "{i}: {ours} vs {expected}");
                }
                Ok(())
            };
            let mut out = vec![f32::NAN; shape.rows * shape.outputs];
            gate_up::<F32>(&team, &x, &w1, &w3, shape, &mut out).unwrap();
            check(&out, &x, &w1, &w3, 0.0)?;

            if !supported(Element::Bf16) {
                return Ok(());
            }
            let ((xb, xe), (w1b, w1e), (w3b, w3e)) = (to_bf16(&x), to_bf16(&w1), to_bf16(&w3));
            let mut out = vec![0u16; shape.rows * shape.outputs];
            gate_up::<Bf16>(&team, &xb, &w1b, &w3b, shape, &mut out).unwrap();
            let out: Vec<f32> = out.iter().map(|&b| f32_from_bf16(b)).collect();
            // Four roundings: each projection, silu, the product.
            check(&out, &xe, &w1e, &w3e, 4.0 / 256.0)?;
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let shape = Shape {
            rows: 2,
            inner: 3,
            outputs: 4,
        };
        let err = linear::<F32>(&Serial, &[0.0; 5], &[0.0; 12], shape, &mut [0.0; 8]).unwrap_err();
        assert_eq!(
            err,
            ShapeError::Length {
                what: "x",
                len: 5,
                needed: 6,
                shape
            }
        );
        let err = gate_up::<F32>(
            &Serial,
            &[0.0; 6],
            &[0.0; 12],
            &[0.0; 11],
            shape,
            &mut [0.0; 8],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Length {
                    what: "the weight",
                    len: 11,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_from_f32(1.0), 0x3f80);
        // Halfway between 0x3f80 and 0x3f81: to the even one.
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32_from_bf16(bf16_from_f32(f32::NAN)).is_nan());
    }
}
