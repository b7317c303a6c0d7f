//! The kernels at the `bench` model's expert shapes (hidden 1024,
//! intermediate 3584), 1 to 32 rows, on 2 scoped threads: compare with
//! `cargo bench -p tramontane-kernels` before and after a change.
//!
//! Each iteration runs the next of 8 experts (176 MB in bf16, 352 MB in
//! f32): more than the last-level cache holds, so the weights stream from
//! memory as they do in a decode step. The throughput is one expert's
//! weight bytes per iteration.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tramontane_kernels::parallel::Scoped;
use tramontane_kernels::{Bf16, Element, F32, Kernel, Shape, gate_up, linear, supported};

const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 3584;
const EXPERTS: usize = 8;

struct Expert<E> {
    w1: Vec<E>,
    w3: Vec<E>,
    w2: Vec<E>,
}

fn experts<E: Copy>(one: E) -> Vec<Expert<E>> {
    (0..EXPERTS)
        .map(|_| Expert {
            w1: vec![one; INTERMEDIATE * HIDDEN],
            w3: vec![one; INTERMEDIATE * HIDDEN],
            w2: vec![one; HIDDEN * INTERMEDIATE],
        })
        .collect()
}

fn group<K: Kernel>(c: &mut Criterion, name: &str, one: K::Elem, zero: K::Elem) {
    let team = Scoped(2);
    let experts = experts(one);
    let mut group = c.benchmark_group(name);
    for rows in [1usize, 2, 4, 8, 16, 32] {
        let x = vec![one; rows * HIDDEN];
        let mut h = vec![zero; rows * INTERMEDIATE];
        let mut y = vec![zero; rows * HIDDEN];
        let bytes = 3 * HIDDEN * INTERMEDIATE * std::mem::size_of::<K::Elem>();
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
                gate_up::<K>(&team, &x, &expert.w1, &expert.w3, shape, &mut h).expect("shape");
                let shape = Shape {
                    rows,
                    inner: INTERMEDIATE,
                    outputs: HIDDEN,
                };
                linear::<K>(&team, &h, &expert.w2, shape, &mut y).expect("shape");
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
    group::<Bf16>(c, "expert_bf16", 0x3c00, 0);
    group::<F32>(c, "expert_f32", 2f32.powi(-7), 0.0);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
