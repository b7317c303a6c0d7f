//! The block loops of the projections: a chunk of output columns of one
//! projection, a block of weight rows at a time, each block's dot products
//! with every row of x from the register-blocked [`Kernel::dot`].

use std::ops::Range;

use crate::avx512::Kernel;
use crate::linear::Shape;

/// How a projection's weight rows are stored, for the kernels of `K`: as
/// `K`'s own elements ([`Plain`]), as int8 ([`Int8`]) or as FP8 e4m3
/// ([`Fp8`]); the caller applies the scales ([`Scales`]).
pub(crate) trait Format<K: Kernel> {
    type W: Copy + Sync;
    /// [`Kernel::dot`] against rows of `Self::W`.
    ///
    /// # Safety
    /// As [`Kernel::dot`].
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const K::Elem,
        ldx: usize,
        w: [*const Self::W; NB],
        ahead: [*const Self::W; NB],
        k: usize,
    ) -> [[f32; NB]; MB];
}

/// What a weight matrix's dot products are multiplied by.
#[derive(Clone, Copy)]
pub(crate) enum Scales<'a> {
    /// Nothing (plain weights).
    None,
    /// One scale per output row.
    PerRow(&'a [f32]),
    /// One scale per block of `rows × columns` weights, row-major over
    /// the blocks (`per_row` blocks a row of them).
    PerBlock {
        scales: &'a [f32],
        rows: usize,
        columns: usize,
        per_row: usize,
    },
}

impl Scales<'_> {
    /// The inner elements one scale covers (all `inner` but per block).
    fn width(self, inner: usize) -> usize {
        match self {
            Scales::PerBlock { columns, .. } => columns,
            _ => inner.max(1),
        }
    }

    /// The scale of output row `n`'s dot products over inner block `kb`.
    fn get(self, n: usize, kb: usize) -> f32 {
        match self {
            Scales::None => 1.0,
            Scales::PerRow(scales) => scales[n],
            Scales::PerBlock {
                scales,
                rows,
                per_row,
                ..
            } => scales[n / rows * per_row + kb],
        }
    }
}

/// A weight matrix's elements as stored, and their scales.
pub(crate) type Rows<'a, W> = (&'a [W], Scales<'a>);

/// Weights in the activations' element type.
pub(crate) struct Plain;
/// int8 weights.
pub(crate) struct Int8;
/// FP8 e4m3 weights (as bytes).
pub(crate) struct Fp8;

impl<K: Kernel> Format<K> for Plain {
    type W = K::Elem;
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const K::Elem,
        ldx: usize,
        w: [*const K::Elem; NB],
        ahead: [*const K::Elem; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps the contract, which is `Kernel::dot`'s.
        unsafe { K::dot::<MB, NB>(x, ldx, w, ahead, k) }
    }
}

impl<K: Kernel> Format<K> for Fp8 {
    type W = u8;
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const K::Elem,
        ldx: usize,
        w: [*const u8; NB],
        ahead: [*const u8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps the contract, which is `Kernel::dot_fp8`'s.
        unsafe { K::dot_fp8::<MB, NB>(x, ldx, w, ahead, k) }
    }
}

impl<K: Kernel> Format<K> for Int8 {
    type W = i8;
    unsafe fn dot<const MB: usize, const NB: usize>(
        x: *const K::Elem,
        ldx: usize,
        w: [*const i8; NB],
        ahead: [*const i8; NB],
        k: usize,
    ) -> [[f32; NB]; MB] {
        // SAFETY: the caller keeps the contract, which is `Kernel::dot_i8`'s.
        unsafe { K::dot_i8::<MB, NB>(x, ldx, w, ahead, k) }
    }
}

/// Calls `run::<K, F, WR, MR>(args)` with the block for `rows` rows of x: `WR`
/// weight rows against `MR` rows of x per pass, in `WR × MR ≤ 16`
/// accumulators (with more, the compiler spills some to the stack inside
/// the loop). One pass takes up to 8 rows, so the weights stream from memory
/// while the dot products run; each later pass reads them from cache.
macro_rules! blocked {
    ($rows:expr, $run:ident::<$k:ty, $f:ty>($($arg:expr),*)) => {
        match $rows {
            1 => $run::<$k, $f, 8, 1>($($arg),*),
            2 => $run::<$k, $f, 8, 2>($($arg),*),
            3..=4 => $run::<$k, $f, 4, 4>($($arg),*),
            _ => $run::<$k, $f, 2, 8>($($arg),*),
        }
    };
}

/// An output buffer, written by every thread at disjoint indexes.
pub(crate) struct Output<T>(pub(crate) *mut T);
// SAFETY: threads write disjoint elements (their own output columns) and the
// team returns only when all are done.
unsafe impl<T> Sync for Output<T> {}
impl<T> Output<T> {
    /// # Safety
    /// `index` is in bounds and no other thread writes it.
    pub(crate) unsafe fn write(&self, index: usize, value: T) {
        // SAFETY: the caller's contract: in bounds, and this thread's alone.
        unsafe { self.0.add(index).write(value) }
    }
}

/// How far ahead of its loads a weight row is prefetched into L2 while it is
/// read from memory (the first pass over it), in bytes. Measured on the
/// `bench` model's expert shapes, 8 experts streamed from memory, 2 threads,
/// bf16: into L1 2 KiB ahead (before) 23–26 GB/s at 1–2 rows of x and 18 at
/// 8; into L2 8 KiB ahead 29–32 and 26 (4 and 16 KiB: within noise of 8).
pub(crate) const PREFETCH_BYTES: usize = 8192;

/// Runs `each(m, dots)` for every row `m` of `x`, where `dots[n]` is row m's
/// dot product with weight row `w[n]`, `MR` rows of x at a time. The
/// first pass streams the weight rows from memory, prefetching further along
/// them; later passes find them in cache, and the second prefetches the rows
/// at `next` (the next block's) so that memory stays busy meanwhile.
///
/// The dot products are over `k` elements of each row, rows of x `ldx`
/// apart.
///
/// # Safety
/// The kernels are supported; `x` holds `(rows - 1) × ldx + k` elements and
/// each `w[n]` `k`.
pub(crate) unsafe fn dots<K: Kernel, F: Format<K>, const NB: usize, const MR: usize>(
    x: &[K::Elem],
    rows: usize,
    (ldx, k): (usize, usize),
    w: [*const F::W; NB],
    next: [*const F::W; NB],
    mut each: impl FnMut(usize, [f32; NB]),
) {
    let along = PREFETCH_BYTES / std::mem::size_of::<F::W>();
    let mut m = 0;
    while m < rows {
        let at = x[m * ldx..].as_ptr();
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
                    $($rows => emit(&unsafe { F::dot::<$rows, NB>(at, ldx, w, ahead, k) }),)*
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

/// `out[:, columns] = x · w[columns]ᵀ`, `WR` weight rows at a time, each
/// dot product times its scale (per row, or per block of the row: then
/// block by block along the row).
///
/// # Safety
/// The kernels are supported; the lengths fit `shape`; no other thread
/// writes these columns meanwhile.
pub(crate) unsafe fn linear_columns<K: Kernel, F: Format<K>, const WR: usize, const MR: usize>(
    x: &[K::Elem],
    (w, scales): Rows<'_, F::W>,
    shape: Shape,
    out: &Output<K::Elem>,
    columns: Range<usize>,
) {
    let Shape {
        rows,
        inner,
        outputs,
    } = shape;
    // Row pointers; past the end only as prefetch addresses.
    let row = |n: usize| w.as_ptr().wrapping_add(n * inner);
    let width = scales.width(inner);
    let mut sums = vec![0.0f32; rows * WR];
    // `count` weight rows from `first`: their sums over every inner block.
    let block = |first: usize, count: usize, sums: &mut [f32]| {
        sums.fill(0.0);
        for (kb, start) in (0..inner).step_by(width).enumerate() {
            let k = width.min(inner - start);
            let x = &x[start..];
            let mut add = |m: usize, v: &[f32]| {
                for (j, &v) in v.iter().enumerate() {
                    sums[m * count + j] += v * scales.get(first + j, kb);
                }
            };
            // SAFETY: the caller's bounds; each row's block is `k` elements from `start`.
            unsafe {
                if count == WR {
                    let w = std::array::from_fn(|n| row(first + n).wrapping_add(start));
                    let next = std::array::from_fn(|n| row(first + WR + n).wrapping_add(start));
                    let each = |m, v: [f32; WR]| add(m, &v);
                    dots::<K, F, WR, MR>(x, rows, (inner, k), w, next, each);
                } else {
                    let (w, next) = ([row(first).wrapping_add(start)], [row(first + 1)]);
                    let each = |m, v: [f32; 1]| add(m, &v);
                    dots::<K, F, 1, MR>(x, rows, (inner, k), w, next, each);
                }
            }
        }
    };
    let store = |first: usize, count: usize, sums: &[f32]| {
        for m in 0..rows {
            for j in 0..count {
                let value = K::from_f32(sums[m * count + j]);
                // SAFETY: this thread's own columns, in bounds.
                unsafe { out.write(m * outputs + first + j, value) };
            }
        }
    };
    let mut first = columns.start;
    while first + WR <= columns.end {
        block(first, WR, &mut sums);
        store(first, WR, &sums);
        first += WR;
    }
    for n in first..columns.end {
        block(n, 1, &mut sums[..rows]);
        store(n, 1, &sums[..rows]);
    }
}

/// `out[:, columns] = silu(x · w1[columns]ᵀ) ⊙ (x · w3[columns]ᵀ)`: the
/// columns' gate and up dot products per row of x, `WR / 2` rows of each
/// matrix at a time (each times its scale, block by block along the row
/// where the scales are per block), then the SwiGLU over each row's
/// columns (vectorised).
///
/// # Safety
/// As [`linear_columns`]; w1 and w3 are scaled alike (per row or in the
/// same blocks).
pub(crate) unsafe fn gate_up_columns<K: Kernel, F: Format<K>, const WR: usize, const MR: usize>(
    x: &[K::Elem],
    [(w1, scales1), (w3, scales3)]: [Rows<'_, F::W>; 2],
    shape: Shape,
    out: &Output<K::Elem>,
    columns: Range<usize>,
) {
    let Shape {
        rows,
        inner,
        outputs,
    } = shape;
    let pairs = WR / 2;
    // Row pointers; past the end only as prefetch addresses.
    let gate = |j: usize| w1.as_ptr().wrapping_add(j * inner);
    let up = |j: usize| w3.as_ptr().wrapping_add(j * inner);
    let width = columns.len();
    let mut gates = vec![0.0f32; rows * width];
    let mut ups = vec![0.0f32; rows * width];
    let block_width = scales1.width(inner);
    for (kb, start) in (0..inner).step_by(block_width).enumerate() {
        let k = block_width.min(inner - start);
        let x = &x[start..];
        let mut first = columns.start;
        while first + pairs <= columns.end {
            let at = first - columns.start;
            let rows_from = |first: usize| {
                std::array::from_fn(|n| {
                    let row = if n < pairs {
                        gate(first + n)
                    } else {
                        up(first + n - pairs)
                    };
                    row.wrapping_add(start)
                })
            };
            let (w, next) = (rows_from(first), rows_from(first + pairs));
            let each = |m: usize, v: [f32; WR]| {
                let (g, u) = (&mut gates[m * width + at..], &mut ups[m * width + at..]);
                for n in 0..pairs {
                    g[n] += v[n] * scales1.get(first + n, kb);
                    u[n] += v[pairs + n] * scales3.get(first + n, kb);
                }
            };
            // SAFETY: the caller's bounds; each row's block is `k` elements from `start`.
            unsafe { dots::<K, F, WR, MR>(x, rows, (inner, k), w, next, each) };
            first += pairs;
        }
        for j in first..columns.end {
            let at = j - columns.start;
            let each = |m: usize, v: [f32; 2]| {
                gates[m * width + at] += v[0] * scales1.get(j, kb);
                ups[m * width + at] += v[1] * scales3.get(j, kb);
            };
            let w = [gate(j).wrapping_add(start), up(j).wrapping_add(start)];
            let next = [gate(j + 1), up(j + 1)];
            // SAFETY: as above.
            unsafe { dots::<K, F, 2, MR>(x, rows, (inner, k), w, next, each) };
        }
    }
    for m in 0..rows {
        let row = m * width..(m + 1) * width;
        // SAFETY: the caller's bounds; this thread's own columns of row m.
        unsafe {
            K::swiglu_row(
                &gates[row.clone()],
                &ups[row],
                out.0.add(m * outputs + columns.start),
            )
        };
    }
}
