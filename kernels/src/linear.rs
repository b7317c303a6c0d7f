//! `y = x · Wᵀ` for a few rows of `x` ([`linear`]), and the SwiGLU gate/up projection
//! `h = silu(x · W1ᵀ) ⊙ (x · W3ᵀ)` in one pass over W1 and W3 ([`gate_up`]),
//! each for the element type of a [`Kernel`]: [`crate::Bf16`] or [`crate::F32`]. Weights are
//! row-major `[outputs, inner]`; `x` is `[rows, inner]`, the output
//! `[rows, outputs]`, all contiguous. Accumulation is in f32; bf16 outputs
//! are rounded to nearest even, the SwiGLU's steps each as libtorch does.
//! Several projections can run in one parallel region ([`project`]): the
//! team's threads take chunks of any of them from one counter, so a layer's
//! experts stream back to back instead of each waiting for the slower
//! thread at its end.

use crate::Element;
use crate::avx512::Kernel;
use crate::blocks::{Fp8, Int8, Output, Plain, Scales, gate_up_columns, linear_columns};
#[cfg(test)]
use crate::parallel::Serial;
use crate::parallel::{Parallel, for_each_unit};

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
    #[error("slot {slot} is past the pool's {slots} slots")]
    Slot { slot: u32, slots: usize },
    #[error(
        "w1 and w3 are not stored alike (both plain, both int8, or both FP8 in the same blocks)"
    )]
    Unalike,
    #[error("an FP8 matrix's blocks are {0:?}: each side must be at least 1")]
    Block((usize, usize)),
    #[error("an MXFP4 matrix's rows are whole blocks of 32 values, not {0}")]
    Mxfp4Inner(usize),
    #[error("MXFP4 gate and up projections run as two linear projections, not fused")]
    Mxfp4GateUp,
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

/// A projection's weight matrix, `[outputs, inner]` row-major, as it is
/// stored: in the activations' element type, or as int8 with one scale per
/// output row (`w[n][i] = values[n][i] · scales[n]`; the dot products run
/// on the int8 values widened exactly, and each output is scaled once).
pub enum Matrix<'a, E> {
    Plain(&'a [E]),
    Int8 {
        values: &'a [i8],
        scales: &'a [f32],
    },
    /// FP8 e4m3 bytes, and one scale per block of `block.0 × block.1`
    /// weights (the last blocks of a row or column may be partial),
    /// row-major over the blocks: `w[n][i] = values[n][i] · scales[n /
    /// block.0][i / block.1]`, as published FP8 checkpoints store their
    /// `weight` and `weight_scale_inv`.
    Fp8 {
        values: &'a [u8],
        scales: &'a [f32],
        block: (usize, usize),
    },
    /// MXFP4, as gpt-oss checkpoints store their experts: `blocks` `[outputs,
    /// inner / 2]`, two E2M1 values a byte (the low nibble first), and
    /// `scales` `[outputs, inner / 32]`, E8M0: `w[n][i] = e2m1(nibble i of
    /// row n) · 2^(scales[n][i / 32] − 127)`. Linear projections only.
    Mxfp4 {
        blocks: &'a [u8],
        scales: &'a [u8],
    },
}

impl<E> Matrix<'_, E> {
    /// Elements of the matrix, and of its scales and how many it needs.
    fn lengths(&self, shape: Shape) -> (usize, Option<(usize, usize)>) {
        match self {
            Matrix::Plain(w) => (w.len(), None),
            Matrix::Int8 { values, scales } => (values.len(), Some((scales.len(), shape.outputs))),
            Matrix::Fp8 {
                values,
                scales,
                block: (rows, columns),
            } => {
                let blocks = shape.outputs.div_ceil((*rows).max(1))
                    * shape.inner.div_ceil((*columns).max(1));
                (values.len(), Some((scales.len(), blocks)))
            }
            Matrix::Mxfp4 { blocks, scales } => (
                2 * blocks.len(),
                Some((
                    scales.len(),
                    shape.outputs * shape.inner.div_ceil(crate::mxfp4::BLOCK),
                )),
            ),
        }
    }

    /// Bytes of a row of `inner` weights as stored.
    fn row_bytes(&self, inner: usize) -> usize {
        match self {
            Matrix::Plain(_) => inner * std::mem::size_of::<E>(),
            Matrix::Int8 { .. } | Matrix::Fp8 { .. } => inner,
            Matrix::Mxfp4 { .. } => inner / 2 + inner / crate::mxfp4::BLOCK,
        }
    }

    /// How the dot products are scaled, for a matrix of `inner` columns.
    fn scales(&self, inner: usize) -> Scales<'_> {
        match *self {
            // MXFP4's scales are applied in the kernel, block by block.
            Matrix::Plain(_) | Matrix::Mxfp4 { .. } => Scales::None,
            Matrix::Int8 { scales, .. } => Scales::PerRow(scales),
            Matrix::Fp8 {
                scales,
                block: (rows, columns),
                ..
            } => Scales::PerBlock {
                scales,
                rows,
                columns,
                per_row: inner.div_ceil(columns),
            },
        }
    }

    /// Whether `other` is stored and scaled the same way.
    fn alike(&self, other: &Self) -> bool {
        match (self, other) {
            (Matrix::Plain(_), Matrix::Plain(_)) | (Matrix::Int8 { .. }, Matrix::Int8 { .. }) => {
                true
            }
            (Matrix::Fp8 { block, .. }, Matrix::Fp8 { block: other, .. }) => block == other,
            (Matrix::Mxfp4 { .. }, Matrix::Mxfp4 { .. }) => true,
            _ => false,
        }
    }
}

impl<'a, E> From<&'a [E]> for Matrix<'a, E> {
    fn from(w: &'a [E]) -> Self {
        Matrix::Plain(w)
    }
}

impl<'a, E> From<&'a Vec<E>> for Matrix<'a, E> {
    fn from(w: &'a Vec<E>) -> Self {
        Matrix::Plain(w)
    }
}

/// Which weights a [`Job`] projects `x` through.
pub enum Projection<'a, E> {
    /// `out = x · wᵀ`.
    Linear { w: Matrix<'a, E> },
    /// `out = silu(x · w1ᵀ) ⊙ (x · w3ᵀ)`; `shape.outputs` is the
    /// intermediate size (rows of w1 and of w3), which are stored alike.
    GateUp {
        w1: Matrix<'a, E>,
        w3: Matrix<'a, E>,
    },
}

// Copy without requiring it of `E`: only references are copied.
impl<E> Clone for Matrix<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Matrix<'_, E> {}
impl<E> Clone for Projection<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Projection<'_, E> {}

/// One projection of a [`project`] call.
pub struct Job<'a, E> {
    pub x: &'a [E],
    pub projection: Projection<'a, E>,
    pub shape: Shape,
    pub out: &'a mut [E],
}

/// `out = x · wᵀ`.
pub fn linear<'w, K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w: impl Into<Matrix<'w, K::Elem>>,
    shape: Shape,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    let projection = Projection::Linear { w: w.into() };
    project::<K>(
        team,
        &mut [Job {
            x,
            projection,
            shape,
            out,
        }],
    )
}

/// `out = silu(x · w1ᵀ) ⊙ (x · w3ᵀ)`; `shape.outputs` is the intermediate
/// size (rows of w1 and of w3).
pub fn gate_up<'w, K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    w1: impl Into<Matrix<'w, K::Elem>>,
    w3: impl Into<Matrix<'w, K::Elem>>,
    shape: Shape,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    let projection = Projection::GateUp {
        w1: w1.into(),
        w3: w3.into(),
    };
    project::<K>(
        team,
        &mut [Job {
            x,
            projection,
            shape,
            out,
        }],
    )
}

/// Runs every job in one parallel region of `team`: the output columns of
/// each are cut into chunks of about [`CHUNK_BYTES`] of weights, and the
/// threads take chunks, of whichever job, in order from one shared counter.
pub fn project<K: Kernel>(
    team: &dyn Parallel,
    jobs: &mut [Job<'_, K::Elem>],
) -> Result<(), ShapeError> {
    for job in jobs.iter() {
        let weights: &[_] = match job.projection {
            Projection::Linear { w } => &[w],
            Projection::GateUp { w1, w3 } => &[w1, w3],
        };
        check(K::ELEMENT, job.shape, job.x.len(), weights, job.out.len())?;
    }
    let jobs: Vec<Chunked<'_, K::Elem>> = jobs
        .iter_mut()
        .filter(|job| job.shape.rows > 0 && job.shape.outputs > 0)
        .map(Chunked::new)
        .collect();
    // Where each job's chunks start in the shared numbering.
    let starts: Vec<usize> = jobs
        .iter()
        .scan(0, |next, job| {
            let start = *next;
            *next += job.chunks;
            Some(start)
        })
        .collect();
    let total = jobs.iter().map(|job| job.chunks).sum::<usize>();
    for_each_unit(team, total, &|chunk| {
        let index = starts.partition_point(|&start| start <= chunk) - 1;
        jobs[index].run::<K>(chunk - starts[index]);
    });
    Ok(())
}

/// Weight bytes a thread takes at a time: enough to keep the prefetcher
/// streaming, small enough that the threads finish together (the `bench`
/// model's expert shapes, 2 threads, 8 rows of x: 64 KiB 17 GB/s, 512 KiB
/// 21, 4 MiB 19.5; at 1 row 25.5, 27, 27; with the L2 prefetch, 128 KiB to
/// 1 MiB were within noise of each other).
pub const CHUNK_BYTES: usize = 512 * 1024;

/// A job cut into chunks of output columns, each a multiple of 8 (every
/// block's width divides it, so blocks never straddle chunks).
struct Chunked<'a, E> {
    x: &'a [E],
    projection: Projection<'a, E>,
    shape: Shape,
    out: Output<E>,
    columns: usize,
    chunks: usize,
}

impl<'a, E> Chunked<'a, E> {
    fn new(job: &'a mut Job<'_, E>) -> Self {
        let (matrices, w) = match job.projection {
            Projection::Linear { w } => (1, w),
            Projection::GateUp { w1, .. } => (2, w1),
        };
        let column_bytes = matrices * w.row_bytes(job.shape.inner);
        let columns = (CHUNK_BYTES / column_bytes.max(1)).max(8) / 8 * 8;
        Self {
            x: job.x,
            projection: job.projection,
            shape: job.shape,
            out: Output(job.out.as_mut_ptr()),
            columns,
            chunks: job.shape.outputs.div_ceil(columns),
        }
    }

    /// The job's `chunk`-th chunk of columns.
    fn run<K: Kernel<Elem = E>>(&self, chunk: usize) {
        let Shape { rows, outputs, .. } = self.shape;
        let columns = chunk * self.columns..((chunk + 1) * self.columns).min(outputs);
        let (x, shape, out) = (self.x, self.shape, &self.out);
        let inner = shape.inner;
        // SAFETY: `project` checked every length and that the kernels are
        // supported; chunks are disjoint columns of the output.
        unsafe {
            match self.projection {
                Projection::Linear { w } => {
                    let scales = w.scales(inner);
                    match w {
                        Matrix::Plain(w) => {
                            let w = (w, scales);
                            blocked!(rows, linear_columns::<K, Plain>(x, w, shape, out, columns))
                        }
                        Matrix::Int8 { values, .. } => {
                            let w = (values, scales);
                            blocked!(rows, linear_columns::<K, Int8>(x, w, shape, out, columns))
                        }
                        Matrix::Fp8 { values, .. } => {
                            let w = (values, scales);
                            blocked!(rows, linear_columns::<K, Fp8>(x, w, shape, out, columns))
                        }
                        Matrix::Mxfp4 { blocks, scales } => {
                            let w = (blocks, scales);
                            crate::mxfp4::linear_columns::<K>(x, w, shape, out, columns)
                        }
                    }
                }
                Projection::GateUp { w1, w3 } => {
                    let (s1, s3) = (w1.scales(inner), w3.scales(inner));
                    match (w1, w3) {
                        (Matrix::Plain(w1), Matrix::Plain(w3)) => {
                            let w = [(w1, s1), (w3, s3)];
                            blocked!(rows, gate_up_columns::<K, Plain>(x, w, shape, out, columns))
                        }
                        (Matrix::Int8 { values: v1, .. }, Matrix::Int8 { values: v3, .. }) => {
                            let w = [(v1, s1), (v3, s3)];
                            blocked!(rows, gate_up_columns::<K, Int8>(x, w, shape, out, columns))
                        }
                        (Matrix::Fp8 { values: v1, .. }, Matrix::Fp8 { values: v3, .. }) => {
                            let w = [(v1, s1), (v3, s3)];
                            blocked!(rows, gate_up_columns::<K, Fp8>(x, w, shape, out, columns))
                        }
                        _ => unreachable!("`project` refuses w1 and w3 unalike"),
                    }
                }
            }
        }
    }
}

// SAFETY: the output is written only at disjoint columns (see `Output`).
unsafe impl<E: Sync> Sync for Chunked<'_, E> {}

fn check<E>(
    element: Element,
    shape: Shape,
    x: usize,
    weights: &[Matrix<'_, E>],
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
    if weights.iter().any(|w| matches!(w, Matrix::Mxfp4 { .. })) {
        if weights.len() > 1 {
            return Err(ShapeError::Mxfp4GateUp);
        }
        if !shape.inner.is_multiple_of(crate::mxfp4::BLOCK) {
            return Err(ShapeError::Mxfp4Inner(shape.inner));
        }
    }
    for w in weights {
        if let Matrix::Fp8 { block, .. } = w
            && (block.0 == 0 || block.1 == 0)
        {
            return Err(ShapeError::Block(*block));
        }
        let (values, scales) = w.lengths(shape);
        length("the weight", values, shape.outputs * shape.inner)?;
        if let Some((scales, needed)) = scales {
            length("the weight's scales", scales, needed)?;
        }
    }
    if let [w1, w3] = weights
        && !w1.alike(w3)
    {
        return Err(ShapeError::Unalike);
    }
    length("the output", out, shape.rows * shape.outputs)?;
    if !supported(element) {
        return Err(ShapeError::Unsupported(element));
    }
    Ok(())
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

    /// d silu / dg: a relative error in g reaches silu(g) times |1 + g(1 - sigmoid(g))|,
    /// more than the error itself for g below -2.
    fn silu_slope(g: f64) -> f64 {
        let sigmoid = 1.0 / (1.0 + (-g).exp());
        sigmoid * (1.0 + g * (1.0 - sigmoid))
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
                    let (g, u) = (gate[i].0, up[i].0);
                    // The error of each dot product, carried through silu·up, and
                    // for bf16 four roundings: the gate's carried through silu's
                    // slope, the up projection's, silu's and the product's.
                    let slack = 1e-5 * (gate[i].1 * u.abs() + up[i].1 * (1.0 + g.abs()))
                        + ulp * ((silu_slope(g) * g * u).abs() + 3.0 * expected.abs())
                        + 1e-6;
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
            check(&out, &xe, &w1e, &w3e, 1.0 / 256.0)?;
        }
    }

    /// Jobs long enough to cut into several chunks each (and a tail),
    /// run in one region on 3 threads: each equals itself run alone, to
    /// the bit, and the f64 reference.
    #[test]
    fn jobs_in_one_region_match_each_alone() {
        if !supported(Element::F32) {
            return; // no AVX-512 here: nothing runs these kernels
        }
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
                .collect()
        };
        // 4096 f32 per row: 32 columns per chunk.
        let shapes = [(3, 4096, 70), (1, 4096, 41), (9, 2048, 130), (2, 4096, 8)];
        let xs: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, k, _))| values(r * k, i))
            .collect();
        let ws: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(_, k, o))| values(o * k, i + 10))
            .collect();
        let w3: Vec<f32> = values(shapes[1].2 * shapes[1].1, 99);
        // Job 3's weights in int8 instead.
        let int8: Vec<i8> = ws[3].iter().map(|&v| (v * 127.0) as i8).collect();
        let scales: Vec<f32> = (0..shapes[3].2).map(|n| 0.01 + n as f32 * 1e-3).collect();
        let shape = |i: usize| Shape {
            rows: shapes[i].0,
            inner: shapes[i].1,
            outputs: shapes[i].2,
        };
        let mut together: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(r, _, o)| vec![f32::NAN; r * o])
            .collect();
        let mut jobs: Vec<Job<'_, f32>> = together
            .iter_mut()
            .enumerate()
            .map(|(i, out)| {
                let projection = match i {
                    1 => Projection::GateUp {
                        w1: Matrix::Plain(&ws[1]),
                        w3: Matrix::Plain(&w3),
                    },
                    3 => Projection::Linear {
                        w: Matrix::Int8 {
                            values: &int8,
                            scales: &scales,
                        },
                    },
                    _ => Projection::Linear {
                        w: Matrix::Plain(&ws[i]),
                    },
                };
                Job {
                    x: &xs[i],
                    projection,
                    shape: shape(i),
                    out,
                }
            })
            .collect();
        project::<F32>(&Scoped(3), &mut jobs).unwrap();
        for (i, ours) in together.iter().enumerate() {
            let mut alone = vec![f32::NAN; ours.len()];
            match i {
                1 => gate_up::<F32>(&Serial, &xs[1], &ws[1], &w3, shape(1), &mut alone).unwrap(),
                3 => {
                    let w = Matrix::Int8 {
                        values: &int8,
                        scales: &scales,
                    };
                    linear::<F32>(&Serial, &xs[i], w, shape(i), &mut alone).unwrap()
                }
                _ => linear::<F32>(&Serial, &xs[i], &ws[i], shape(i), &mut alone).unwrap(),
            }
            assert_eq!(ours, &alone, "job {i}");
            if i == 3 {
                let dequantized = dequantize(&int8, &scales, shapes[3].1);
                let expected = reference(&xs[3], &dequantized, shape(3));
                for (j, &value) in ours.iter().enumerate() {
                    assert!(close(value, expected[j], 0.0), "int8 job output {j}");
                }
            } else if i != 1 {
                let expected = reference(&xs[i], &ws[i], shape(i));
                for (j, &value) in ours.iter().enumerate() {
                    assert!(
                        close(value, expected[j], 0.0),
                        "job {i} output {j}: {value} vs {:?}",
                        expected[j]
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let shape = Shape {
            rows: 2,
            inner: 3,
            outputs: 4,
        };
        let err =
            linear::<F32>(&Serial, &[0.0; 5], &[0.0; 12][..], shape, &mut [0.0; 8]).unwrap_err();
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
            &[0.0; 12][..],
            &[0.0; 11][..],
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
        let (values, scales) = ([0i8; 12], [1.0f32; 3]);
        let w = Matrix::Int8 {
            values: &values,
            scales: &scales,
        };
        let err = linear::<F32>(&Serial, &[0.0; 6], w, shape, &mut [0.0; 8]).unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Length {
                    what: "the weight's scales",
                    len: 3,
                    needed: 4,
                    ..
                }
            ),
            "{err}"
        );
        let scales = [1.0f32; 4];
        let w = Matrix::Int8 {
            values: &values,
            scales: &scales,
        };
        let err = gate_up::<F32>(&Serial, &[0.0; 6], w, &[0.0; 12][..], shape, &mut [0.0; 8])
            .unwrap_err();
        assert_eq!(err, ShapeError::Unalike);
    }

    /// int8 values and their scales, and the matrix they stand for in f32.
    fn int8_case() -> impl Strategy<Value = (Shape, Vec<f32>, Vec<i8>, Vec<f32>, usize)> {
        (1usize..11, 1usize..100, 1usize..14, 1usize..4).prop_flat_map(
            |(rows, inner, outputs, threads)| {
                let shape = Shape {
                    rows,
                    inner,
                    outputs,
                };
                (
                    Just(shape),
                    proptest::collection::vec(-2.0f32..2.0, rows * inner),
                    proptest::collection::vec(any::<i8>(), outputs * inner),
                    proptest::collection::vec(1e-4f32..0.1, outputs),
                    Just(threads),
                )
            },
        )
    }

    /// Weights (decoded, `inner` a row) times the scale of their block of
    /// `block` weights, the blocks row-major.
    fn scaled(
        values: impl IntoIterator<Item = f32>,
        scales: &[f32],
        block: (usize, usize),
        inner: usize,
    ) -> Vec<f32> {
        let per_row = inner.div_ceil(block.1);
        values
            .into_iter()
            .enumerate()
            .map(|(at, value)| {
                let (n, i) = (at / inner, at % inner);
                value * scales[n / block.0 * per_row + i / block.1]
            })
            .collect()
    }

    /// int8 values times their row's scale.
    fn dequantize(values: &[i8], scales: &[f32], inner: usize) -> Vec<f32> {
        scaled(
            values.iter().map(|&q| f32::from(q)),
            scales,
            (1, inner),
            inner,
        )
    }

    proptest! {
        /// int8 weights (every value, -128 included) against the f64
        /// product with the matrix they stand for: exact widening, f32
        /// sums, and bf16's one rounding of the output.
        #[test]
        fn int8_linear_matches_the_dequantized_reference(
            (shape, x, values, scales, threads) in int8_case(),
        ) {
            if !supported(Element::F32) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let team = Scoped(threads);
            let w = Matrix::Int8 { values: &values, scales: &scales };
            let expected = reference(&x, &dequantize(&values, &scales, shape.inner), shape);
            let mut out = vec![f32::NAN; shape.rows * shape.outputs];
            linear::<F32>(&team, &x, w, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                prop_assert!(close(ours, expected[i], 0.0), "f32 {i}: {ours} vs {:?}", expected[i]);
            }
            if !supported(Element::Bf16) {
                return Ok(());
            }
            let (xb, xe) = to_bf16(&x);
            let expected = reference(&xe, &dequantize(&values, &scales, shape.inner), shape);
            let mut out = vec![0u16; shape.rows * shape.outputs];
            let w = Matrix::Int8 { values: &values, scales: &scales };
            linear::<Bf16>(&team, &xb, w, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                let ours = f32_from_bf16(ours);
                prop_assert!(close(ours, expected[i], 1.0 / 256.0), "bf16 {i}: {ours} vs {:?}", expected[i]);
            }
        }

        /// The int8 gate/up projection against the plain kernel on the
        /// dequantized matrices: each projection differs only in where its
        /// scale is applied (once per output, not per element).
        #[test]
        fn int8_gate_up_matches_the_plain_kernel_on_the_dequantized_weights(
            (shape, x, values, scales, threads) in int8_case(),
        ) {
            if !supported(Element::F32) {
                return Ok(());
            }
            let team = Scoped(threads);
            let reversed: Vec<i8> = values.iter().rev().copied().collect();
            let w1 = Matrix::Int8 { values: &values, scales: &scales };
            let w3 = Matrix::Int8 { values: &reversed, scales: &scales };
            let (d1, d3) = (
                dequantize(&values, &scales, shape.inner),
                dequantize(&reversed, &scales, shape.inner),
            );
            let mut ours = vec![f32::NAN; shape.rows * shape.outputs];
            gate_up::<F32>(&team, &x, w1, w3, shape, &mut ours).unwrap();
            let mut plain = vec![f32::NAN; shape.rows * shape.outputs];
            gate_up::<F32>(&team, &x, &d1, &d3, shape, &mut plain).unwrap();
            let (gate, up) = (reference(&x, &d1, shape), reference(&x, &d3, shape));
            for (i, (&a, &b)) in ours.iter().zip(&plain).enumerate() {
                // The SwiGLU's slope times the sums' rounding.
                let slack = 1e-5 * (gate[i].1 * (1.0 + up[i].0.abs()) + up[i].1 * (1.0 + gate[i].0.abs())) + 1e-6;
                prop_assert!((f64::from(a) - f64::from(b)).abs() <= slack, "f32 {i}: {a} vs {b}");
            }
        }
    }

    /// An FP8 e4m3 byte's value, decoded by its definition.
    fn e4m3(byte: u8) -> f32 {
        let sign = if byte & 0x80 == 0 { 1.0 } else { -1.0 };
        let (exponent, mantissa) = (i32::from((byte >> 3) & 0xf), f32::from(byte & 7));
        sign * match exponent {
            0 => mantissa / 8.0 * 2f32.powi(-6),
            _ => (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
        }
    }

    /// A shape, x, FP8 bytes, their block scales, the blocks and threads.
    type Fp8Case = (Shape, Vec<f32>, Vec<u8>, Vec<f32>, (usize, usize), usize);

    /// FP8 bytes (not e4m3's NaNs), their block scales and the blocks.
    fn fp8_case() -> impl Strategy<Value = Fp8Case> {
        (
            1usize..11,
            1usize..100,
            1usize..14,
            1usize..40,
            1usize..40,
            1usize..4,
        )
            .prop_flat_map(
                |(rows, inner, outputs, block_rows, block_columns, threads)| {
                    let shape = Shape {
                        rows,
                        inner,
                        outputs,
                    };
                    let blocks = outputs.div_ceil(block_rows) * inner.div_ceil(block_columns);
                    let byte = any::<u8>().prop_filter("not NaN", |b| b & 0x7f != 0x7f);
                    (
                        Just(shape),
                        proptest::collection::vec(-2.0f32..2.0, rows * inner),
                        proptest::collection::vec(byte, outputs * inner),
                        proptest::collection::vec(1e-4f32..0.1, blocks),
                        Just((block_rows, block_columns)),
                        Just(threads),
                    )
                },
            )
    }

    fn dequantize_fp8(
        values: &[u8],
        scales: &[f32],
        block: (usize, usize),
        inner: usize,
    ) -> Vec<f32> {
        scaled(values.iter().map(|&b| e4m3(b)), scales, block, inner)
    }

    #[test]
    fn every_fp8_value_is_widened_exactly() {
        if !supported(Element::Bf16) {
            return; // no AVX-512 here: nothing runs these kernels
        }
        let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        let inner = bytes.len();
        let shape = Shape {
            rows: 1,
            inner,
            outputs: 1,
        };
        let scales = [1.0f32];
        let w = Matrix::Fp8 {
            values: &bytes,
            scales: &scales,
            block: (1, inner),
        };
        for (i, &byte) in bytes.iter().enumerate() {
            let mut x = vec![0.0f32; inner];
            x[i] = 1.0;
            let mut out = [f32::NAN];
            linear::<F32>(&Serial, &x, w, shape, &mut out).unwrap();
            assert_eq!(out[0], e4m3(byte), "f32, byte {byte:#04x}");
            let xb: Vec<u16> = x.iter().map(|&v| bf16_from_f32(v)).collect();
            let mut out = [0u16];
            let wb = Matrix::Fp8 {
                values: &bytes,
                scales: &scales,
                block: (1, inner),
            };
            linear::<Bf16>(&Serial, &xb, wb, shape, &mut out).unwrap();
            assert_eq!(f32_from_bf16(out[0]), e4m3(byte), "bf16, byte {byte:#04x}");
        }
        assert_eq!(e4m3(0x7e), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
    }

    proptest! {
        /// FP8 weights in blocks of every size (partial ones at the ends)
        /// against the f64 product with the matrix they stand for; the
        /// gate/up projection against the plain kernel on it.
        #[test]
        fn fp8_matches_the_dequantized_reference(
            (shape, x, values, scales, block, threads) in fp8_case(),
        ) {
            if !supported(Element::Bf16) {
                return Ok(());
            }
            let team = Scoped(threads);
            let w = Matrix::Fp8 { values: &values, scales: &scales, block };
            let dequantized = dequantize_fp8(&values, &scales, block, shape.inner);
            let expected = reference(&x, &dequantized, shape);
            let mut out = vec![f32::NAN; shape.rows * shape.outputs];
            linear::<F32>(&team, &x, w, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                prop_assert!(close(ours, expected[i], 0.0), "f32 {i}: {ours} vs {:?}", expected[i]);
            }
            let (xb, xe) = to_bf16(&x);
            let expected = reference(&xe, &dequantized, shape);
            let mut out = vec![0u16; shape.rows * shape.outputs];
            let w = Matrix::Fp8 { values: &values, scales: &scales, block };
            linear::<Bf16>(&team, &xb, w, shape, &mut out).unwrap();
            for (i, &ours) in out.iter().enumerate() {
                let ours = f32_from_bf16(ours);
                prop_assert!(close(ours, expected[i], 1.0 / 256.0), "bf16 {i}: {ours} vs {:?}", expected[i]);
            }
            let w1 = Matrix::Fp8 { values: &values, scales: &scales, block };
            let mut ours = vec![f32::NAN; shape.rows * shape.outputs];
            gate_up::<F32>(&team, &x, w1, w1, shape, &mut ours).unwrap();
            let mut plain = vec![f32::NAN; shape.rows * shape.outputs];
            gate_up::<F32>(&team, &x, &dequantized, &dequantized, shape, &mut plain).unwrap();
            let sums = reference(&x, &dequantized, shape);
            for (i, (&a, &b)) in ours.iter().zip(&plain).enumerate() {
                let slack = 1e-5 * sums[i].1 * (2.0 + 2.0 * sums[i].0.abs()) + 1e-6;
                prop_assert!((f64::from(a) - f64::from(b)).abs() <= slack, "gate/up {i}: {a} vs {b}");
            }
        }
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
