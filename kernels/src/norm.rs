//! RMSNorm of a few rows, computed as HF `MixtralRMSNorm` computes it: in
//! f32, `x · rsqrt(mean(x²) + eps)`, rounded to the element type, then
//! multiplied by the weight in the element type. Plain Rust on any CPU: a
//! decode step's rows are a few thousand elements, where libtorch's eight
//! ops cost more in dispatch than in arithmetic.

use crate::avx512::Kernel;
use crate::linear::{Shape, ShapeError};

/// `out[r] = weight ⊙ norm(x[r])` for every row of `x` (`[rows, hidden]`,
/// `hidden = weight.len()`).
pub fn rms_norm<K: Kernel>(
    x: &[K::Elem],
    weight: &[K::Elem],
    eps: f32,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    let hidden = weight.len();
    let shape = Shape {
        rows: x.len() / hidden.max(1),
        inner: hidden,
        outputs: hidden,
    };
    for (what, len) in [("x", x.len()), ("the output", out.len())] {
        if hidden == 0 || len != shape.rows * hidden || x.len() != out.len() {
            return Err(ShapeError::Length {
                what,
                len,
                needed: shape.rows.max(1) * hidden.max(1),
                shape,
            });
        }
    }
    let round = |value: f32| K::to_f32(K::from_f32(value));
    for (row, normed) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        let squares: f32 = row.iter().map(|&v| K::to_f32(v) * K::to_f32(v)).sum();
        let scale = 1.0 / (squares / hidden as f32 + eps).sqrt();
        for ((out, &v), &w) in normed.iter_mut().zip(row).zip(weight) {
            *out = K::from_f32(K::to_f32(w) * round(K::to_f32(v) * scale));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};

    fn reference(x: &[f32], weight: &[f32], eps: f64) -> Vec<f64> {
        let hidden = weight.len();
        x.chunks(hidden)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / hidden as f64;
                let scale = 1.0 / (mean + eps).sqrt();
                row.iter()
                    .zip(weight)
                    .map(move |(&v, &w)| f64::from(w) * f64::from(v) * scale)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn matches_the_reference(
            (x, weight) in (1usize..70, 1usize..5).prop_flat_map(|(hidden, rows)| (
                proptest::collection::vec(-3.0f32..3.0, rows * hidden),
                proptest::collection::vec(-2.0f32..2.0, hidden),
            ))
        ) {
            let eps = 1e-5;
            let expected = reference(&x, &weight, eps);
            let mut out = vec![f32::NAN; x.len()];
            rms_norm::<F32>(&x, &weight, eps as f32, &mut out).unwrap();
            for (i, (&ours, &want)) in out.iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 1e-5 * (want.abs() + 1.0), "f32 {i}: {ours} vs {want}");
            }

            let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
            let (xb, wb) = (bf16(&x), bf16(&weight));
            let exact = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| f32_from_bf16(b)).collect() };
            let expected = reference(&exact(&xb), &exact(&wb), eps);
            let mut out = vec![0u16; x.len()];
            rms_norm::<Bf16>(&xb, &wb, eps as f32, &mut out).unwrap();
            // Two roundings: the normalised value and the product.
            for (i, (&ours, &want)) in exact(&out).iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 2.0 / 256.0 * want.abs() + 1e-6, "bf16 {i}: {ours} vs {want}");
            }
        }
    }

    #[test]
    fn a_row_of_another_length_is_refused() {
        let err = rms_norm::<F32>(&[1.0; 5], &[1.0; 2], 1e-5, &mut [0.0; 5]).unwrap_err();
        assert!(matches!(err, ShapeError::Length { what: "x", .. }), "{err}");
    }
}
