//! The kernels at the `bench` model's expert shapes (hidden 1024,
//! intermediate 3584), 1 to 32 rows, on 2 scoped threads: compare with
//! `cargo bench -p tramontane-kernels` before and after a change.
//!
//! Each iteration runs the next of 8 experts (88 MB in int8, 176 MB in
//! bf16, 352 MB in f32): more than the last-level cache holds, so the weights stream from
//! memory as they do in a decode step. The throughput is one expert's
//! weight bytes per iteration.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tramontane_kernels::parallel::Scoped;
use tramontane_kernels::{Bf16, Element, F32, Kernel, Matrix, Shape, gate_up, linear, supported};

const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 3584;
const EXPERTS: usize = 8;

struct Expert<W> {
    w1: Aligned<W>,
    w3: Aligned<W>,
    w2: Aligned<W>,
}

/// `len` elements from a cache line's start, as libtorch allocates a
/// model's tensors (a large `Vec` starts 16 bytes into a page).
struct Aligned<W> {
    storage: Vec<W>,
    start: usize,
    len: usize,
}

impl<W: Copy> Aligned<W> {
    fn new(value: W, len: usize) -> Self {
        let size = std::mem::size_of::<W>();
        let storage = vec![value; len + 64 / size];
        let start = storage.as_ptr().align_offset(64);
        Self {
            storage,
            start,
            len,
        }
    }
}

impl<W> std::ops::Deref for Aligned<W> {
    type Target = [W];
    fn deref(&self) -> &[W] {
        &self.storage[self.start..self.start + self.len]
    }
}

fn experts<W: Copy>(one: W) -> Vec<Expert<W>> {
    (0..EXPERTS)
        .map(|_| Expert {
            w1: Aligned::new(one, INTERMEDIATE * HIDDEN),
            w3: Aligned::new(one, INTERMEDIATE * HIDDEN),
            w2: Aligned::new(one, HIDDEN * INTERMEDIATE),
        })
        .collect()
}

/// One expert's SwiGLU for 1 to 32 rows, its weights stored as `W`
/// (`matrix` sees them as the kernels take them).
fn group<K: Kernel, W: Copy>(
    c: &mut Criterion,
    name: &str,
    (one, zero): (K::Elem, K::Elem),
    weight: W,
    matrix: for<'a> fn(&'a [W], &'a [f32]) -> Matrix<'a, K::Elem>,
) {
    let team = Scoped(2);
    let experts = experts(weight);
    let scales = vec![1.0f32; INTERMEDIATE.max(HIDDEN)];
    let mut group = c.benchmark_group(name);
    for rows in [1usize, 2, 4, 8, 16, 32] {
        let x = vec![one; rows * HIDDEN];
        let mut h = vec![zero; rows * INTERMEDIATE];
        let mut y = vec![zero; rows * HIDDEN];
        let bytes = 3 * HIDDEN * INTERMEDIATE * std::mem::size_of::<W>();
        group.throughput(Throughput::Bytes(bytes as u64));
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter(|| {
                let expert = &experts[next];
                next = (next + 1) % EXPERTS;
                let shape = Shape {
                    rows,
                    inner: HIDDEN,
                    outputs: INTERMEDIATE,
                };
                let (w1, w3) = (
                    matrix(&expert.w1, &scales[..INTERMEDIATE]),
                    matrix(&expert.w3, &scales[..INTERMEDIATE]),
                );
                gate_up::<K>(&team, &x, w1, w3, shape, &mut h).expect("shape");
                let shape = Shape {
                    rows,
                    inner: INTERMEDIATE,
                    outputs: HIDDEN,
                };
                let w2 = matrix(&expert.w2, &scales[..HIDDEN]);
                linear::<K>(&team, &h, w2, shape, &mut y).expect("shape");
            })
        });
    }
    group.finish();
}

fn plain<'a, E>(w: &'a [E], _: &'a [f32]) -> Matrix<'a, E> {
    Matrix::Plain(w)
}

fn int8<'a, E>(values: &'a [i8], scales: &'a [f32]) -> Matrix<'a, E> {
    Matrix::Int8 { values, scales }
}

/// One expert's three projections for 1 to 32 rows in bf16, its weights
/// in MXFP4 (17 bytes per 32 values; the gate and up projections apart, as
/// gpt-oss's experts run).
fn mxfp4(c: &mut Criterion) {
    let team = Scoped(2);
    // 0x22: 1.0 at both nibbles; scale 2⁻⁷ (120).
    let experts: Vec<[(Aligned<u8>, Aligned<u8>); 3]> = (0..EXPERTS)
        .map(|_| {
            std::array::from_fn(|_| {
                (
                    Aligned::new(0x22, INTERMEDIATE * HIDDEN / 2),
                    Aligned::new(120, INTERMEDIATE * HIDDEN / 32),
                )
            })
        })
        .collect();
    let mut group = c.benchmark_group("expert_bf16_mxfp4");
    for rows in [1usize, 2, 4, 8, 16, 32] {
        let x = vec![0x3c00u16; rows * HIDDEN];
        let (mut g, mut u) = (
            vec![0u16; rows * INTERMEDIATE],
            vec![0u16; rows * INTERMEDIATE],
        );
        let mut y = vec![0u16; rows * HIDDEN];
        group.throughput(Throughput::Bytes(
            (3 * HIDDEN * INTERMEDIATE * 17 / 32) as u64,
        ));
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter(|| {
                let [w1, w3, w2] = &experts[next];
                next = (next + 1) % EXPERTS;
                fn m((blocks, scales): &(Aligned<u8>, Aligned<u8>)) -> Matrix<'_, u16> {
                    Matrix::Mxfp4 { blocks, scales }
                }
                let up = Shape {
                    rows,
                    inner: HIDDEN,
                    outputs: INTERMEDIATE,
                };
                linear::<Bf16>(&team, &x, m(w1), up, &mut g).expect("shape");
                linear::<Bf16>(&team, &x, m(w3), up, &mut u).expect("shape");
                let down = Shape {
                    rows,
                    inner: INTERMEDIATE,
                    outputs: HIDDEN,
                };
                linear::<Bf16>(&team, &g, m(w2), down, &mut y).expect("shape");
            })
        });
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    if !supported(Element::Bf16) {
        eprintln!("this CPU has no AVX-512 BF16: nothing to measure");
        return;
    }
    // 0x3c00 is bf16 for 2⁻⁷: small enough that sums stay finite.
    let bf16 = (0x3c00, 0);
    let f32 = (2f32.powi(-7), 0.0);
    group::<Bf16, u16>(c, "expert_bf16", bf16, 0x3c00, plain);
    group::<Bf16, i8>(c, "expert_bf16_int8", bf16, 1, int8);
    group::<F32, f32>(c, "expert_f32", f32, 2f32.powi(-7), plain);
    group::<F32, i8>(c, "expert_f32_int8", f32, 1, int8);
    mxfp4(c);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
