//! The kernels at the `bench` model's expert shapes (hidden 1024,
//! intermediate 3584), 1 to 32 rows, on 2 scoped threads: compare with
//! `cargo bench -p tramontane-kernels` before and after a change.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tramontane_kernels::parallel::Scoped;
use tramontane_kernels::{Bf16, Element, Shape, gate_up, linear, supported};

fn kernels(c: &mut Criterion) {
    if !supported(Element::Bf16) {
        eprintln!("this CPU has no AVX-512 BF16: nothing to measure");
        return;
    }
    let (hidden, intermediate) = (1024usize, 3584usize);
    let team = Scoped(2);
    let w1 = vec![0x3c00u16; intermediate * hidden];
    let w3 = w1.clone();
    let w2 = vec![0x3c00u16; hidden * intermediate];
    let mut group = c.benchmark_group("expert_bf16");
    for rows in [1usize, 4, 8, 16, 32] {
        let x = vec![0x3c00u16; rows * hidden];
        let mut h = vec![0u16; rows * intermediate];
        let mut y = vec![0u16; rows * hidden];
        group.throughput(Throughput::Bytes((3 * hidden * intermediate * 2) as u64));
        group.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter(|| {
                let shape = Shape {
                    rows,
                    inner: hidden,
                    outputs: intermediate,
                };
                gate_up::<Bf16>(&team, &x, &w1, &w3, shape, &mut h).expect("shape");
                let shape = Shape {
                    rows,
                    inner: intermediate,
                    outputs: hidden,
                };
                linear::<Bf16>(&team, &h, &w2, shape, &mut y).expect("shape");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
