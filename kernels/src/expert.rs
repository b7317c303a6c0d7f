//! One routed expert's share of an MoE layer for a few tokens, in one call:
//! the expert's rows of `x` gathered, its SwiGLU feed-forward
//! `w2 · (silu(w1 · x) ⊙ (w3 · x))` on the kernels, each output row scaled
//! by its routing weight and added into the layer's output at its row. It
//! replaces libtorch's `out.index_add_(0, rows, expert(x.index_select(0,
//! rows)) * weights)`, and rounds as that does in bf16: the expert's output,
//! the weight, the scaled row and each sum.

use crate::avx512::Kernel;
use crate::linear::{Shape, ShapeError, gate_up, linear};
use crate::parallel::Parallel;

/// An expert's weights, row-major as the checkpoint stores them: w1 and w3
/// `[intermediate, hidden]`, w2 `[hidden, intermediate]`.
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a, E> {
    pub w1: &'a [E],
    pub w3: &'a [E],
    pub w2: &'a [E],
    pub hidden: usize,
    pub intermediate: usize,
}

/// The rows of `x` an expert computes and each row's routing weight.
#[derive(Clone, Copy)]
pub struct Routed<'a> {
    pub rows: &'a [usize],
    pub weights: &'a [f32],
}

/// `out[r] += weight_r · expert(x[r])` for every routed row `r`; `x` and
/// `out` are `[tokens, hidden]`.
pub fn add_expert<K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    expert: ExpertWeights<'_, K::Elem>,
    routed: Routed<'_>,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    let ExpertWeights {
        w1,
        w3,
        w2,
        hidden,
        intermediate,
    } = expert;
    let n = routed.rows.len();
    let tokens = x.len() / hidden.max(1);
    let gate_shape = Shape {
        rows: n,
        inner: hidden,
        outputs: intermediate,
    };
    if routed.weights.len() != n {
        return Err(ShapeError::Length {
            what: "the routing weights",
            len: routed.weights.len(),
            needed: n,
            shape: gate_shape,
        });
    }
    let tokens_ok = hidden > 0 && x.len() % hidden == 0;
    for (what, len) in [("x", x.len()), ("the output", out.len())] {
        if !tokens_ok || len != x.len() {
            return Err(ShapeError::Length {
                what,
                len,
                needed: tokens.max(1) * hidden.max(1),
                shape: gate_shape,
            });
        }
    }
    if let Some(&row) = routed.rows.iter().find(|&&row| row >= tokens) {
        return Err(ShapeError::Row { row, tokens });
    }
    if n == 0 {
        return Ok(());
    }
    let zero = K::from_f32(0.0);
    let mut gathered = Vec::with_capacity(n * hidden);
    for &row in routed.rows {
        gathered.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
    }
    let mut projected = vec![zero; n * intermediate];
    gate_up::<K>(team, &gathered, w1, w3, gate_shape, &mut projected)?;
    let down_shape = Shape {
        rows: n,
        inner: intermediate,
        outputs: hidden,
    };
    let mut expert_out = vec![zero; n * hidden];
    linear::<K>(team, &projected, w2, down_shape, &mut expert_out)?;
    // Rounded to the element type after each step, as libtorch's ops are.
    let round = |value: f32| K::to_f32(K::from_f32(value));
    for ((&row, &weight), values) in routed
        .rows
        .iter()
        .zip(routed.weights)
        .zip(expert_out.chunks_exact(hidden))
    {
        let weight = round(weight);
        for (sum, &value) in out[row * hidden..(row + 1) * hidden].iter_mut().zip(values) {
            let scaled = round(K::to_f32(value) * weight);
            *sum = K::from_f32(K::to_f32(*sum) + scaled);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! `add_expert` against a plain f64 computation of the same expert, and
    //! its refusals.

    use proptest::prelude::*;

    use super::*;
    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};
    use crate::parallel::{Scoped, Serial};
    use crate::{Element, supported};

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    }

    /// `start + Σ weight · expert(x[row])` per element, in f64, with a
    /// magnitude that bounds every term's rounding: `|start|` plus, per
    /// routed row, `weight · Σ_j |w2[i][j]| · (|gate_j| + 1) · (|up_j| + 1)`.
    fn reference(
        x: &[f32],
        [w1, w3, w2]: [&[f32]; 3],
        (hidden, intermediate): (usize, usize),
        routed: &[(usize, f32)],
        start: &[f32],
    ) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = start
            .iter()
            .map(|&v| (f64::from(v), f64::from(v).abs()))
            .collect();
        for &(row, weight) in routed {
            let x = &x[row * hidden..(row + 1) * hidden];
            let (h, size): (Vec<f64>, Vec<f64>) = (0..intermediate)
                .map(|j| {
                    let g = dot(x, &w1[j * hidden..][..hidden]);
                    let u = dot(x, &w3[j * hidden..][..hidden]);
                    (
                        g / (1.0 + (-g).exp()) * u,
                        (g.abs() + 1.0) * (u.abs() + 1.0),
                    )
                })
                .unzip();
            let weight = f64::from(weight);
            for i in 0..hidden {
                let w2 = &w2[i * intermediate..][..intermediate];
                let y: f64 = h.iter().zip(w2).map(|(h, &w)| h * f64::from(w)).sum();
                let m: f64 = size
                    .iter()
                    .zip(w2)
                    .map(|(s, &w)| s * f64::from(w).abs())
                    .sum();
                out[row * hidden + i].0 += weight * y;
                out[row * hidden + i].1 += weight * m;
            }
        }
        out
    }

    type Case = (
        usize,
        usize,
        usize,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<(usize, f32)>,
        usize,
    );

    fn case() -> impl Strategy<Value = Case> {
        (1usize..7, 1usize..40, 1usize..30, 1usize..3).prop_flat_map(
            |(tokens, hidden, intermediate, threads)| {
                let values = |n| proptest::collection::vec(-1.0f32..1.0, n);
                (
                    Just(tokens),
                    Just(hidden),
                    Just(intermediate),
                    values(tokens * hidden),
                    values(intermediate * hidden),
                    values(intermediate * hidden),
                    values(hidden * intermediate),
                    proptest::collection::vec((0..tokens, 0.0f32..1.0), 0..tokens + 2),
                    Just(threads),
                )
            },
        )
    }

    proptest! {
        #[test]
        fn adds_each_routed_row_of_the_expert((tokens, hidden, intermediate, x, w1, w3, w2, routed, threads) in case()) {
            if !supported(Element::F32) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let team = Scoped(threads);
            let start: Vec<f32> = (0..tokens * hidden).map(|i| (i % 7) as f32 * 0.25).collect();
            let expected = reference(&x, [&w1, &w3, &w2], (hidden, intermediate), &routed, &start);
            let rows: Vec<usize> = routed.iter().map(|r| r.0).collect();
            let weights: Vec<f32> = routed.iter().map(|r| r.1).collect();
            let routed_rows = Routed { rows: &rows, weights: &weights };

            let mut out = start.clone();
            let expert = ExpertWeights { w1: &w1, w3: &w3, w2: &w2, hidden, intermediate };
            add_expert::<F32>(&team, &x, expert, routed_rows, &mut out).unwrap();
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 1e-5 * size + 1e-6, "f32 {i}: {ours} vs {want}");
            }

            if !supported(Element::Bf16) {
                return Ok(());
            }
            let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
            let exact = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| f32_from_bf16(b)).collect() };
            let (xb, w1b, w3b, w2b, startb) = (bf16(&x), bf16(&w1), bf16(&w3), bf16(&w2), bf16(&start));
            let weights_exact = [exact(&w1b), exact(&w3b), exact(&w2b)];
            let expected = reference(
                &exact(&xb),
                [&weights_exact[0], &weights_exact[1], &weights_exact[2]],
                (hidden, intermediate),
                &routed,
                &exact(&startb),
            );
            let mut out = startb;
            let expert = ExpertWeights { w1: &w1b, w3: &w3b, w2: &w2b, hidden, intermediate };
            add_expert::<Bf16>(&team, &xb, expert, routed_rows, &mut out).unwrap();
            // A few bf16 roundings (2⁻⁸ each) of every term: the activations,
            // the expert's output, the weight, the scaled row and each sum.
            for (i, (&ours, &(want, size))) in exact(&out).iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 8.0 / 256.0 * size + 1e-6, "bf16 {i}: {ours} vs {want}");
            }
        }
    }

    #[test]
    fn bad_rows_and_lengths_are_refused() {
        let (hidden, intermediate) = (3, 2);
        let w = [0.0f32; 6];
        let expert = ExpertWeights {
            w1: &w,
            w3: &w,
            w2: &w,
            hidden,
            intermediate,
        };
        let x = [0.0f32; 6];
        let mut out = [0.0f32; 6];
        let routed = Routed {
            rows: &[0, 2],
            weights: &[0.5, 0.5],
        };
        let err = add_expert::<F32>(&Serial, &x, expert, routed, &mut out).unwrap_err();
        assert_eq!(err, ShapeError::Row { row: 2, tokens: 2 });
        let routed = Routed {
            rows: &[0, 1],
            weights: &[0.5],
        };
        let err = add_expert::<F32>(&Serial, &x, expert, routed, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Length {
                    what: "the routing weights",
                    ..
                }
            ),
            "{err}"
        );
        let routed = Routed {
            rows: &[1],
            weights: &[1.0],
        };
        let err = add_expert::<F32>(&Serial, &x, expert, routed, &mut out[..5]).unwrap_err();
        assert!(matches!(err, ShapeError::Length { .. }), "{err}");
    }
}
