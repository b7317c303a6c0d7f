//! The block loops of the projections: a chunk of output columns of one
//! projection, a block of weight rows at a time, each block's dot products
//! with every row of x from the register-blocked [`Kernel::dot`].

use std::ops::Range;

use crate::avx512::Kernel;
use crate::linear::Shape;

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
const PREFETCH_BYTES: usize = 8192;

/// Runs `each(m, dots)` for every row `m` of `x`, where `dots[n]` is row m's
/// dot product with weight row `w[n]`, `MR` rows of x at a time. The
/// first pass streams the weight rows from memory, prefetching further along
/// them; later passes find them in cache, and the second prefetches the rows
/// at `next` (the next block's) so that memory stays busy meanwhile.
///
/// # Safety
/// The kernels are supported; `x` holds `rows × inner` elements and each
/// `w[n]` `inner`.
pub(crate) unsafe fn dots<K: Kernel, const NB: usize, const MR: usize>(
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

/// `out[:, columns] = x · w[columns]ᵀ`, `WR` weight rows at a time.
///
/// # Safety
/// The kernels are supported; the lengths fit `shape`; no other thread
/// writes these columns meanwhile.
pub(crate) unsafe fn linear_columns<K: Kernel, const WR: usize, const MR: usize>(
    x: &[K::Elem],
    w: &[K::Elem],
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
    let store = |n: usize, m: usize, values: &[f32]| {
        for (offset, &value) in values.iter().enumerate() {
            // SAFETY: this thread's own columns, in bounds.
            unsafe { out.write(m * outputs + n + offset, K::from_f32(value)) };
        }
    };
    let mut first = columns.start;
    while first + WR <= columns.end {
        let w = std::array::from_fn(|n| row(first + n));
        let next = std::array::from_fn(|n| row(first + WR + n));
        let store = |m, v: [f32; WR]| store(first, m, &v);
        // SAFETY: the caller's bounds.
        unsafe { dots::<K, WR, MR>(x, rows, inner, w, next, store) };
        first += WR;
    }
    for n in first..columns.end {
        let store = |m, v: [f32; 1]| store(n, m, &v);
        // SAFETY: as above.
        unsafe { dots::<K, 1, MR>(x, rows, inner, [row(n)], [row(n + 1)], store) };
    }
}

/// `out[:, columns] = silu(x · w1[columns]ᵀ) ⊙ (x · w3[columns]ᵀ)`: the
/// columns' gate and up dot products per row of x, `WR / 2` rows of each
/// matrix at a time, then the SwiGLU over each row's columns (vectorised).
///
/// # Safety
/// As [`linear_columns`].
pub(crate) unsafe fn gate_up_columns<K: Kernel, const WR: usize, const MR: usize>(
    x: &[K::Elem],
    w1: &[K::Elem],
    w3: &[K::Elem],
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
    let mut first = columns.start;
    while first + pairs <= columns.end {
        let at = first - columns.start;
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
        // SAFETY: the caller's bounds.
        unsafe { dots::<K, WR, MR>(x, rows, inner, w, next, each) };
        first += pairs;
    }
    for j in first..columns.end {
        let at = j - columns.start;
        let each = |m: usize, v: [f32; 2]| {
            gates[m * width + at] = v[0];
            ups[m * width + at] = v[1];
        };
        let next = [gate(j + 1), up(j + 1)];
        // SAFETY: as above.
        unsafe { dots::<K, 2, MR>(x, rows, inner, [gate(j), up(j)], next, each) };
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
