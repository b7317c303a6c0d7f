//! The block loops of the projections: a chunk of output columns of one
//! projection, a block of weight rows at a time, each block's dot products
//! with every row of x from the register-blocked [`Kernel::dot`].

use std::ops::Range;

use crate::avx512::Kernel;
use crate::linear::Shape;

/// How a projection's weight rows are stored, for the kernels of `K`: as
/// `K`'s own elements ([`Plain`]) or as int8 ([`Int8`]; the caller scales
/// each output by its row's scale).
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

/// A weight matrix's elements as stored and, for int8, its rows' scales.
pub(crate) type Rows<'a, W> = (&'a [W], Option<&'a [f32]>);

/// Weights in the activations' element type.
pub(crate) struct Plain;
/// int8 weights.
pub(crate) struct Int8;

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
pub(crate) unsafe fn dots<K: Kernel, F: Format<K>, const NB: usize, const MR: usize>(
    x: &[K::Elem],
    rows: usize,
    inner: usize,
    w: [*const F::W; NB],
    next: [*const F::W; NB],
    mut each: impl FnMut(usize, [f32; NB]),
) {
    let along = PREFETCH_BYTES / std::mem::size_of::<F::W>();
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
                    $($rows => emit(&unsafe { F::dot::<$rows, NB>(at, inner, w, ahead, inner) }),)*
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
/// output times its row's scale where `w` has them.
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
    let store = |n: usize, m: usize, values: &[f32]| {
        for (offset, &value) in values.iter().enumerate() {
            let value = match scales {
                Some(scales) => value * scales[n + offset],
                None => value,
            };
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
        unsafe { dots::<K, F, WR, MR>(x, rows, inner, w, next, store) };
        first += WR;
    }
    for n in first..columns.end {
        let store = |m, v: [f32; 1]| store(n, m, &v);
        // SAFETY: as above.
        unsafe { dots::<K, F, 1, MR>(x, rows, inner, [row(n)], [row(n + 1)], store) };
    }
}

/// `out[:, columns] = silu(x · w1[columns]ᵀ) ⊙ (x · w3[columns]ᵀ)`: the
/// columns' gate and up dot products per row of x, `WR / 2` rows of each
/// matrix at a time (each times its row's scale where the matrices have
/// them), then the SwiGLU over each row's columns (vectorised).
///
/// # Safety
/// As [`linear_columns`].
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
    // The row's scale, 1 without.
    let scale = |scales: Option<&[f32]>, j: usize| scales.map_or(1.0, |s| s[j]);
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
            let (g, u) = (&mut gates[m * width + at..], &mut ups[m * width + at..]);
            for n in 0..pairs {
                g[n] = v[n] * scale(scales1, first + n);
                u[n] = v[pairs + n] * scale(scales3, first + n);
            }
        };
        // SAFETY: the caller's bounds.
        unsafe { dots::<K, F, WR, MR>(x, rows, inner, w, next, each) };
        first += pairs;
    }
    for j in first..columns.end {
        let at = j - columns.start;
        let each = |m: usize, v: [f32; 2]| {
            gates[m * width + at] = v[0] * scale(scales1, j);
            ups[m * width + at] = v[1] * scale(scales3, j);
        };
        let next = [gate(j + 1), up(j + 1)];
        // SAFETY: as above.
        unsafe { dots::<K, F, 2, MR>(x, rows, inner, [gate(j), up(j)], next, each) };
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
