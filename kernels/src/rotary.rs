//! Rotary position embedding ("rotate half", HF Llama/Mixtral) applied in
//! place to the heads at the start of each row of a projection's output, as
//! libtorch computes `x · cos + rotate_half(x) · sin` in the element type:
//! each product rounded, then the sum. Plain Rust on any CPU, for a decode
//! step's few rows.

use crate::avx512::Kernel;
use crate::linear::{Shape, ShapeError};

/// Rotates heads `0..heads` (each `cos.len() / rows` elements) of every row
/// of `x` (`[rows, width]`, `width ≥ heads · head_dim`) by its row's `cos`
/// and `sin` (`[rows, head_dim]` each).
pub fn rotate_heads<K: Kernel>(
    x: &mut [K::Elem],
    width: usize,
    heads: usize,
    cos: &[K::Elem],
    sin: &[K::Elem],
) -> Result<(), ShapeError> {
    let rows = x.len() / width.max(1);
    let head_dim = cos.len() / rows.max(1);
    let shape = Shape {
        rows,
        inner: width,
        outputs: heads * head_dim,
    };
    let bad = |what, len, needed| ShapeError::Length {
        what,
        len,
        needed,
        shape,
    };
    if width == 0 || x.len() != rows * width || heads * head_dim > width || head_dim % 2 == 1 {
        return Err(bad("x", x.len(), rows.max(1) * (heads * head_dim).max(1)));
    }
    if cos.len() != rows * head_dim || sin.len() != cos.len() {
        return Err(bad("the tables", sin.len(), cos.len()));
    }
    if head_dim == 0 {
        return Ok(());
    }
    let half = head_dim / 2;
    let (f, round) = (K::to_f32, |value: f32| K::to_f32(K::from_f32(value)));
    for ((row, cos), sin) in x
        .chunks_exact_mut(width)
        .zip(cos.chunks_exact(head_dim))
        .zip(sin.chunks_exact(head_dim))
    {
        for head in row[..heads * head_dim].chunks_exact_mut(head_dim) {
            let (first, second) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (f(first[i]), f(second[i]));
                let rotated_first = round(x1 * f(cos[i])) + round(-x2 * f(sin[i]));
                let rotated_second = round(x2 * f(cos[half + i])) + round(x1 * f(sin[half + i]));
                first[i] = K::from_f32(rotated_first);
                second[i] = K::from_f32(rotated_second);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};

    proptest! {
        #[test]
        fn rotates_the_leading_heads_and_leaves_the_rest(
            (rows, half, heads, extra, angles, x) in (1usize..4, 1usize..6, 1usize..4, 0usize..7)
                .prop_flat_map(|(rows, half, heads, extra)| {
                    let width = heads * 2 * half + extra;
                    (
                        Just(rows), Just(half), Just(heads), Just(extra),
                        proptest::collection::vec(-3.0f32..3.0, rows * half),
                        proptest::collection::vec(-2.0f32..2.0, rows * width),
                    )
                })
        ) {
            let head_dim = 2 * half;
            let width = heads * head_dim + extra;
            // Tables as the model builds them: the angles twice over.
            let table = |f: fn(f32) -> f32| -> Vec<f32> {
                angles.chunks(half).flat_map(|a| a.iter().chain(a).map(|&v| f(v)).collect::<Vec<_>>()).collect()
            };
            let (cos, sin) = (table(f32::cos), table(f32::sin));
            let mut ours = x.clone();
            rotate_heads::<F32>(&mut ours, width, heads, &cos, &sin).unwrap();
            for r in 0..rows {
                for c in 0..width {
                    let (i, want) = (r * width + c, if c < heads * head_dim {
                        let (head, d) = (c / head_dim, c % head_dim);
                        let at = |d: usize| x[r * width + head * head_dim + d];
                        let angle = angles[r * half + d % half];
                        // A 2-D rotation of the pair (d, d ± half).
                        if d < half {
                            at(d) * angle.cos() - at(d + half) * angle.sin()
                        } else {
                            at(d) * angle.cos() + at(d - half) * angle.sin()
                        }
                    } else {
                        x[r * width + c]
                    });
                    prop_assert!((ours[i] - want).abs() <= 1e-5, "f32 row {r} col {c}: {} vs {want}", ours[i]);
                }
            }

            let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
            let mut ours_bf16 = bf16(&x);
            rotate_heads::<Bf16>(&mut ours_bf16, width, heads, &bf16(&cos), &bf16(&sin)).unwrap();
            for (i, (&o, &want)) in ours_bf16.iter().zip(&ours).enumerate() {
                // Inputs, the two products and the sum each rounded once.
                prop_assert!((f32_from_bf16(o) - want).abs() <= 4.0 / 256.0 * 4.0, "bf16 {i}: {} vs {want}", f32_from_bf16(o));
            }
        }
    }

    #[test]
    fn tables_of_another_size_are_refused() {
        let mut x = [0.0f32; 8];
        let err = rotate_heads::<F32>(&mut x, 8, 2, &[1.0; 4], &[0.0; 3]).unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Length {
                    what: "the tables",
                    ..
                }
            ),
            "{err}"
        );
        let err = rotate_heads::<F32>(&mut x, 8, 3, &[1.0; 4], &[0.0; 4]).unwrap_err();
        assert!(matches!(err, ShapeError::Length { what: "x", .. }), "{err}");
    }
}
