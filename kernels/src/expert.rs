//! The routed experts' share of an MoE layer for a few tokens, in one call:
//! each expert's rows of `x` gathered, its SwiGLU feed-forward
//! `w2 · (silu(w1 · x) ⊙ (w3 · x))` on the kernels, each output row scaled
//! by its routing weight and added into the layer's output at its row, the
//! experts in the order given. It replaces libtorch's `out.index_add_(0,
//! rows, expert(x.index_select(0, rows)) * weights)` per expert, and rounds
//! as that does in bf16: the expert's output, the weight, the scaled row and
//! each sum. The gate/up projections of every expert run in one parallel
//! region, then their down projections in another. gpt-oss's experts
//! (biases, the clamped SwiGLU, MXFP4 weights) run their gate and up
//! projections as two linear ones, then the biases and the activation
//! element by element, rounded step by step as transformers' ops are.

use crate::avx512::Kernel;
use crate::linear::{Job, Matrix, Projection, Shape, ShapeError, project};
use crate::parallel::Parallel;

/// An expert's weights, row-major as the checkpoint stores them (or
/// quantized, see [`Matrix`]): w1 and w3 `[intermediate, hidden]`, w2
/// `[hidden, intermediate]`; its biases and activation.
pub struct ExpertWeights<'a, E> {
    pub w1: Matrix<'a, E>,
    pub w3: Matrix<'a, E>,
    pub w2: Matrix<'a, E>,
    pub hidden: usize,
    pub intermediate: usize,
    /// The gate's and the up projection's biases side by side `[2 ×
    /// intermediate]`, and the down projection's `[hidden]` (gpt-oss).
    pub biases: Option<(&'a [E], &'a [E])>,
    pub activation: Activation,
}

/// What an expert makes of its gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu(gate) ⊙ up`.
    SwiGlu,
    /// gpt-oss's: the gate clamped to at most `limit`, the up projection
    /// to ±`limit`, then `(up + 1) ⊙ gate·σ(alpha·gate)`.
    ClampedSwiGlu { limit: f32, alpha: f32 },
}

impl<E> ExpertWeights<'_, E> {
    /// Whether the gate/up projection runs fused (`silu(w1·x) ⊙ w3·x` in one
    /// pass): a plain SwiGLU without biases, its weights not MXFP4.
    fn fused(&self) -> bool {
        self.biases.is_none()
            && self.activation == Activation::SwiGlu
            && !matches!(self.w1, Matrix::Mxfp4 { .. })
    }
}

// Copy without requiring it of `E`: only references are copied.
impl<E> Clone for ExpertWeights<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for ExpertWeights<'_, E> {}

/// The rows of `x` an expert computes and each row's routing weight.
#[derive(Clone, Copy)]
pub struct Routed<'a> {
    pub rows: &'a [usize],
    pub weights: &'a [f32],
}

/// `out[r] += weight_r · expert(x[r])` for every expert and each of its
/// routed rows `r`, the experts' sums added in their order; `x` and `out`
/// are `[tokens, hidden]`.
pub fn add_experts<K: Kernel>(
    team: &dyn Parallel,
    x: &[K::Elem],
    experts: &[(ExpertWeights<'_, K::Elem>, Routed<'_>)],
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    for &(expert, routed) in experts {
        check(x.len(), out.len(), expert, routed)?;
    }
    let zero = K::from_f32(0.0);
    let mut gathered = Vec::with_capacity(experts.len());
    let mut projected = Vec::with_capacity(experts.len());
    // The up projections of the experts that run it apart (empty for the others).
    let mut ups = Vec::with_capacity(experts.len());
    let mut expert_out = Vec::with_capacity(experts.len());
    for &(expert, routed) in experts {
        let (n, hidden) = (routed.rows.len(), expert.hidden);
        let mut rows = Vec::with_capacity(n * hidden);
        for &row in routed.rows {
            rows.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        gathered.push(rows);
        projected.push(vec![zero; n * expert.intermediate]);
        let apart = if expert.fused() { 0 } else { n };
        ups.push(vec![zero; apart * expert.intermediate]);
        expert_out.push(vec![zero; n * hidden]);
    }
    let mut jobs: Vec<Job<'_, K::Elem>> = Vec::with_capacity(2 * experts.len());
    for (((&(expert, routed), x), out), up) in experts
        .iter()
        .zip(&gathered)
        .zip(&mut projected)
        .zip(&mut ups)
    {
        let shape = Shape {
            rows: routed.rows.len(),
            inner: expert.hidden,
            outputs: expert.intermediate,
        };
        if expert.fused() {
            let projection = Projection::GateUp {
                w1: expert.w1,
                w3: expert.w3,
            };
            jobs.push(Job {
                x,
                projection,
                shape,
                out,
            });
        } else {
            for (w, out) in [(expert.w1, out), (expert.w3, up)] {
                let projection = Projection::Linear { w };
                jobs.push(Job {
                    x,
                    projection,
                    shape,
                    out,
                });
            }
        }
    }
    project::<K>(team, &mut jobs)?;
    drop(jobs);
    for ((&(expert, _), gates), ups) in experts.iter().zip(&mut projected).zip(&ups) {
        if !expert.fused() {
            activate::<K>(expert, gates, ups);
        }
    }
    let mut jobs: Vec<Job<'_, K::Elem>> = experts
        .iter()
        .zip(&projected)
        .zip(&mut expert_out)
        .map(|((&(expert, routed), x), out)| Job {
            x,
            projection: Projection::Linear { w: expert.w2 },
            shape: Shape {
                rows: routed.rows.len(),
                inner: expert.intermediate,
                outputs: expert.hidden,
            },
            out,
        })
        .collect();
    project::<K>(team, &mut jobs)?;
    // Rounded to the element type after each step, as libtorch's ops are.
    let round = |value: f32| K::to_f32(K::from_f32(value));
    for (&(expert, routed), values) in experts.iter().zip(&mut expert_out) {
        let hidden = expert.hidden;
        if let Some((_, down)) = expert.biases {
            for row in values.chunks_exact_mut(hidden) {
                for (value, &bias) in row.iter_mut().zip(down) {
                    *value = K::from_f32(K::to_f32(*value) + K::to_f32(bias));
                }
            }
        }
        for ((&row, &weight), values) in routed
            .rows
            .iter()
            .zip(routed.weights)
            .zip(values.chunks_exact(hidden))
        {
            let weight = round(weight);
            for (sum, &value) in out[row * hidden..(row + 1) * hidden].iter_mut().zip(values) {
                let scaled = round(K::to_f32(value) * weight);
                *sum = K::from_f32(K::to_f32(*sum) + scaled);
            }
        }
    }
    Ok(())
}

/// `gates` (`[rows, intermediate]`, the gate projection's output) becomes
/// the expert's hidden activation, from them and `ups` (the up
/// projection's): each biased, then the activation, each step rounded to
/// the element type as transformers' ops round them.
fn activate<K: Kernel>(expert: ExpertWeights<'_, K::Elem>, gates: &mut [K::Elem], ups: &[K::Elem]) {
    let round = |value: f32| K::to_f32(K::from_f32(value));
    let intermediate = expert.intermediate;
    let bias = |i: usize, up: bool| {
        expert.biases.map_or(0.0, |(gate_up, _)| {
            K::to_f32(gate_up[i + if up { intermediate } else { 0 }])
        })
    };
    for (gates, ups) in gates
        .chunks_exact_mut(intermediate)
        .zip(ups.chunks_exact(intermediate))
    {
        for (i, (gate, &up)) in gates.iter_mut().zip(ups).enumerate() {
            let g = round(K::to_f32(*gate) + bias(i, false));
            let u = round(K::to_f32(up) + bias(i, true));
            let value = match expert.activation {
                Activation::SwiGlu => K::swiglu(g, u),
                Activation::ClampedSwiGlu { limit, alpha } => {
                    let g = g.min(limit);
                    let u = u.clamp(-limit, limit);
                    let sigmoid = round(1.0 / (1.0 + (-round(g * alpha)).exp()));
                    let glu = round(g * sigmoid);
                    round(u + 1.0) * glu
                }
            };
            *gate = K::from_f32(value);
        }
    }
}

/// An expert's routed rows are in `x` and its weights fit its sizes.
fn check<E>(
    x: usize,
    out: usize,
    expert: ExpertWeights<'_, E>,
    routed: Routed<'_>,
) -> Result<(), ShapeError> {
    let ExpertWeights {
        hidden,
        intermediate,
        ..
    } = expert;
    let n = routed.rows.len();
    let tokens = x / hidden.max(1);
    let gate_shape = Shape {
        rows: n,
        inner: hidden,
        outputs: intermediate,
    };
    if let Some((gate_up, down)) = expert.biases {
        for (what, len, needed) in [
            ("the gate/up biases", gate_up.len(), 2 * intermediate),
            ("the down bias", down.len(), hidden),
        ] {
            if len != needed {
                return Err(ShapeError::Length {
                    what,
                    len,
                    needed,
                    shape: gate_shape,
                });
            }
        }
    }
    if routed.weights.len() != n {
        return Err(ShapeError::Length {
            what: "the routing weights",
            len: routed.weights.len(),
            needed: n,
            shape: gate_shape,
        });
    }
    let tokens_ok = hidden > 0 && x.is_multiple_of(hidden);
    for (what, len) in [("x", x), ("the output", out)] {
        if !tokens_ok || len != x {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    //! `add_experts` against a plain f64 computation of the same experts,
    //! the experts of one call against one call each, and its refusals.

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

    /// `start` per element with its magnitude, which bounds every term's
    /// rounding.
    fn start_of(start: &[f32]) -> Vec<(f64, f64)> {
        start
            .iter()
            .map(|&v| (f64::from(v), f64::from(v).abs()))
            .collect()
    }

    /// Adds `Σ weight · expert(x[row])` to `out` per element, in f64, and to
    /// its magnitude, per routed row, `weight · Σ_j |w2[i][j]| · (|gate_j| +
    /// 1) · (|up_j| + 1)`.
    fn reference(
        x: &[f32],
        [w1, w3, w2]: [&[f32]; 3],
        (hidden, intermediate): (usize, usize),
        routed: &[(usize, f32)],
        mut out: Vec<(f64, f64)>,
    ) -> Vec<(f64, f64)> {
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
        /// Two experts in one call (the second's weights are the first's
        /// reversed), each with its own rows.
        #[test]
        fn adds_each_routed_row_of_each_expert(
            (tokens, hidden, intermediate, x, w1, w3, w2, routed, threads) in case(),
            second in proptest::collection::vec((0usize..64, 0.0f32..1.0), 0..6),
        ) {
            if !supported(Element::F32) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let team = Scoped(threads);
            let start: Vec<f32> = (0..tokens * hidden).map(|i| (i % 7) as f32 * 0.25).collect();
            let second: Vec<(usize, f32)> = second.into_iter().map(|(row, w)| (row % tokens, w)).collect();
            let reversed = |w: &[f32]| -> Vec<f32> { w.iter().rev().copied().collect() };
            let (v1, v3, v2) = (reversed(&w1), reversed(&w3), reversed(&w2));
            let sizes = (hidden, intermediate);
            let expected = reference(&x, [&w1, &w3, &w2], sizes, &routed, start_of(&start));
            let expected = reference(&x, [&v1, &v3, &v2], sizes, &second, expected);
            let split = |routed: &[(usize, f32)]| -> (Vec<usize>, Vec<f32>) { routed.iter().copied().unzip() };
            let ((rows, weights), (rows2, weights2)) = (split(&routed), split(&second));
            let routings = [
                Routed { rows: &rows, weights: &weights },
                Routed { rows: &rows2, weights: &weights2 },
            ];

            let mut out = start.clone();
            let experts = [
                (ExpertWeights { w1: Matrix::Plain(&w1), w3: Matrix::Plain(&w3), w2: Matrix::Plain(&w2), hidden, intermediate, biases: None, activation: Activation::SwiGlu }, routings[0]),
                (ExpertWeights { w1: Matrix::Plain(&v1), w3: Matrix::Plain(&v3), w2: Matrix::Plain(&v2), hidden, intermediate, biases: None, activation: Activation::SwiGlu }, routings[1]),
            ];
            add_experts::<F32>(&team, &x, &experts, &mut out).unwrap();
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 1e-5 * size + 1e-6, "f32 {i}: {ours} vs {want}");
            }

            if !supported(Element::Bf16) {
                return Ok(());
            }
            let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
            let exact = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| f32_from_bf16(b)).collect() };
            let (xb, startb) = (bf16(&x), bf16(&start));
            let first = [bf16(&w1), bf16(&w3), bf16(&w2)];
            let other = [bf16(&v1), bf16(&v3), bf16(&v2)];
            let [e1, e3, e2] = [exact(&first[0]), exact(&first[1]), exact(&first[2])];
            let [f1, f3, f2] = [exact(&other[0]), exact(&other[1]), exact(&other[2])];
            let expected = reference(&exact(&xb), [&e1, &e3, &e2], sizes, &routed, start_of(&exact(&startb)));
            let expected = reference(&exact(&xb), [&f1, &f3, &f2], sizes, &second, expected);
            let experts = [
                (ExpertWeights { w1: Matrix::Plain(&first[0]), w3: Matrix::Plain(&first[1]), w2: Matrix::Plain(&first[2]), hidden, intermediate, biases: None, activation: Activation::SwiGlu }, routings[0]),
                (ExpertWeights { w1: Matrix::Plain(&other[0]), w3: Matrix::Plain(&other[1]), w2: Matrix::Plain(&other[2]), hidden, intermediate, biases: None, activation: Activation::SwiGlu }, routings[1]),
            ];
            let mut out = startb.clone();
            add_experts::<Bf16>(&team, &xb, &experts, &mut out).unwrap();
            // A few bf16 roundings (2⁻⁸ each) of every term: the activations,
            // the expert's output, the weight, the scaled row and each sum.
            for (i, (&ours, &(want, size))) in exact(&out).iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 8.0 / 256.0 * size + 1e-6, "bf16 {i}: {ours} vs {want}");
            }
            // One call for both equals one call each, in order, to the bit.
            let mut each = startb;
            for expert in &experts {
                add_experts::<Bf16>(&Serial, &xb, std::slice::from_ref(expert), &mut each).unwrap();
            }
            prop_assert_eq!(out, each);
        }
    }

    #[test]
    fn bad_rows_and_lengths_are_refused() {
        let (hidden, intermediate) = (3, 2);
        let w = [0.0f32; 6];
        let expert = ExpertWeights {
            w1: Matrix::Plain(&w),
            w3: Matrix::Plain(&w),
            w2: Matrix::Plain(&w),
            hidden,
            intermediate,
            biases: None,
            activation: Activation::SwiGlu,
        };
        let x = [0.0f32; 6];
        let mut out = [0.0f32; 6];
        let routed = Routed {
            rows: &[0, 2],
            weights: &[0.5, 0.5],
        };
        let err = add_experts::<F32>(&Serial, &x, &[(expert, routed)], &mut out).unwrap_err();
        assert_eq!(err, ShapeError::Row { row: 2, tokens: 2 });
        let routed = Routed {
            rows: &[0, 1],
            weights: &[0.5],
        };
        let err = add_experts::<F32>(&Serial, &x, &[(expert, routed)], &mut out).unwrap_err();
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
        let err = add_experts::<F32>(&Serial, &x, &[(expert, routed)], &mut out[..5]).unwrap_err();
        assert!(matches!(err, ShapeError::Length { .. }), "{err}");
    }

    /// gpt-oss's experts: biases, the clamped SwiGLU, weights in MXFP4 and
    /// plain, against an f64 computation of the same (the MXFP4 weights
    /// dequantized); in f32, and the biased and clamped path in bf16.
    #[test]
    fn biased_clamped_mxfp4_experts_match_the_reference() {
        if !supported(Element::Bf16) {
            return; // no AVX-512 here: nothing runs these kernels
        }
        let (hidden, intermediate, tokens) = (64usize, 32usize, 5usize);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 1000.0 - 1.0
        };
        let mut bytes =
            |n: usize| -> Vec<u8> { (0..n).map(|_| (next() * 127.0 + 128.0) as u8).collect() };
        // MXFP4 blocks and scales per matrix: gate/up rows scaled so that
        // the clamp at 7 cuts in.
        let (b1, b3, b2) = (
            bytes(intermediate * hidden / 2),
            bytes(intermediate * hidden / 2),
            bytes(hidden * intermediate / 2),
        );
        let (s1, s3, s2) = (
            vec![126u8; intermediate * hidden / 32],
            vec![125u8; intermediate * hidden / 32],
            vec![122u8; hidden * intermediate / 32],
        );
        let mut next = {
            let mut state = 7u64;
            move || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 2001) as f32 / 1000.0 - 1.0
            }
        };
        let x: Vec<f32> = (0..tokens * hidden).map(|_| 2.0 * next()).collect();
        let gate_up_bias: Vec<f32> = (0..2 * intermediate).map(|_| next()).collect();
        let down_bias: Vec<f32> = (0..hidden).map(|_| next()).collect();
        let dequantized = |blocks: &[u8], scales: &[u8], inner: usize| -> Vec<f32> {
            let mut w = Vec::new();
            for (row, scales) in blocks
                .chunks_exact(inner / 2)
                .zip(scales.chunks_exact(inner / 32))
            {
                for (i, byte) in row.iter().enumerate() {
                    let scale = 2f32.powi(i32::from(scales[i / 16]) - 127);
                    w.push(crate::mxfp4::E2M1[usize::from(byte & 15)] * scale);
                    w.push(crate::mxfp4::E2M1[usize::from(byte >> 4)] * scale);
                }
            }
            w
        };
        let (w1, w3, w2) = (
            dequantized(&b1, &s1, hidden),
            dequantized(&b3, &s3, hidden),
            dequantized(&b2, &s2, intermediate),
        );
        let (limit, alpha) = (7.0f32, 1.702f32);
        let rows = [0usize, 2, 3];
        let weights = [0.5f32, 0.25, 1.0];
        // f64: out[r] = weight · (w2 · act(w1·x + b1, w3·x + b3) + b2).
        let mut expected = vec![(0.0f64, 0.0f64); tokens * hidden];
        let mut clamped = 0;
        for (&row, &weight) in rows.iter().zip(&weights) {
            let x = &x[row * hidden..(row + 1) * hidden];
            let h: Vec<f64> = (0..intermediate)
                .map(|j| {
                    let g = dot(x, &w1[j * hidden..(j + 1) * hidden]) + f64::from(gate_up_bias[j]);
                    let u = dot(x, &w3[j * hidden..(j + 1) * hidden])
                        + f64::from(gate_up_bias[intermediate + j]);
                    clamped += usize::from(g > 7.0 || u.abs() > 7.0);
                    let (g, u) = (g.min(7.0), u.clamp(-7.0, 7.0));
                    (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
                })
                .collect();
            for i in 0..hidden {
                let terms = (0..intermediate).map(|j| f64::from(w2[i * intermediate + j]) * h[j]);
                let (sum, size) = terms.fold((0.0, 0.0), |(s, z), t| (s + t, z + t.abs()));
                let at = &mut expected[row * hidden + i];
                at.0 += f64::from(weight) * (sum + f64::from(down_bias[i]));
                at.1 += f64::from(weight) * (size + f64::from(down_bias[i]).abs() + 1.0);
            }
        }
        assert!(clamped > 0, "the clamp never cuts in");
        let routed = Routed {
            rows: &rows,
            weights: &weights,
        };
        let activation = Activation::ClampedSwiGlu { limit, alpha };
        // In f32: MXFP4 weights, and the same dequantized.
        fn mxfp4<E>(blocks: &'static [u8], scales: &'static [u8]) -> Matrix<'static, E> {
            Matrix::Mxfp4 { blocks, scales }
        }
        let leak = |v: Vec<u8>| -> &'static [u8] { Vec::leak(v) };
        let (b1, b3, b2, s1, s3, s2) = (leak(b1), leak(b3), leak(b2), leak(s1), leak(s3), leak(s2));
        for plain in [false, true] {
            let expert = ExpertWeights {
                w1: if plain {
                    Matrix::Plain(&w1)
                } else {
                    mxfp4(b1, s1)
                },
                w3: if plain {
                    Matrix::Plain(&w3)
                } else {
                    mxfp4(b3, s3)
                },
                w2: if plain {
                    Matrix::Plain(&w2)
                } else {
                    mxfp4(b2, s2)
                },
                hidden,
                intermediate,
                biases: Some((&gate_up_bias, &down_bias)),
                activation,
            };
            let mut out = vec![0.0f32; tokens * hidden];
            add_experts::<F32>(&Scoped(2), &x, &[(expert, routed)], &mut out).unwrap();
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(ours) - want).abs() <= 1e-5 * size + 1e-6,
                    "f32 plain {plain} {i}: {ours} vs {want}"
                );
            }
        }
        // In bf16 (plain weights rounded to bf16 would change them: MXFP4,
        // exact in bf16 too): each step rounded, within a few 2⁻⁸.
        let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
        let (xb, gub, db) = (bf16(&x), bf16(&gate_up_bias), bf16(&down_bias));
        let exact = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| f32_from_bf16(b)).collect() };
        assert_eq!(
            exact(&xb),
            x.iter()
                .map(|&v| f32_from_bf16(bf16_from_f32(v)))
                .collect::<Vec<_>>()
        );
        let expert = ExpertWeights {
            w1: mxfp4(b1, s1),
            w3: mxfp4(b3, s3),
            w2: mxfp4(b2, s2),
            hidden,
            intermediate,
            biases: Some((&gub, &db)),
            activation,
        };
        let mut out = vec![0u16; tokens * hidden];
        add_experts::<Bf16>(&Scoped(2), &xb, &[(expert, routed)], &mut out).unwrap();
        for (i, (&ours, &(want, size))) in exact(&out).iter().zip(&expected).enumerate() {
            assert!(
                (f64::from(ours) - want).abs() <= 8.0 / 256.0 * size + 1e-3,
                "bf16 {i}: {ours} vs {want}"
            );
        }
    }
}
