//! Tensors on the wire: dtype + shape + raw little-endian bytes. Decoding
//! checks everything before a tensor is built from the bytes.

use tramontane_config::Dtype;

use crate::elements::{Element, with_element};
use crate::v1::{self, TensorPayload};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("{field}: missing tensor payload")]
    Missing { field: &'static str },
    #[error("{field}: unsupported dtype {dtype}")]
    Dtype { field: &'static str, dtype: i32 },
    #[error("{field}: expected {expected} dimensions, got shape {shape:?}")]
    Rank {
        field: &'static str,
        expected: usize,
        shape: Vec<i64>,
    },
    #[error("{field}: invalid shape {shape:?}")]
    Shape {
        field: &'static str,
        shape: Vec<i64>,
    },
    #[error("{field}: shape {shape:?} of {dtype:?} needs {expected} bytes, got {actual}")]
    ByteLength {
        field: &'static str,
        shape: Vec<i64>,
        dtype: Dtype,
        expected: usize,
        actual: usize,
    },
    #[error("row {row} is outside the matrix")]
    Row { row: usize },
    #[error("{field}: shape {shape:?}, expected [{rows}, {hidden}]")]
    Answer {
        field: &'static str,
        shape: Vec<i64>,
        rows: usize,
        hidden: usize,
    },
}

/// The wire's value of `dtype` (`TensorPayload.dtype`, `InfoResponse.dtype`).
pub fn to_wire(dtype: Dtype) -> i32 {
    let wire = match dtype {
        Dtype::F32 => v1::Dtype::F32,
        Dtype::Bf16 => v1::Dtype::Bf16,
        Dtype::F16 => v1::Dtype::F16,
    };
    wire as i32
}

/// The dtype of a wire value; None for `DTYPE_UNSPECIFIED` and values this
/// protocol does not define.
pub fn from_wire(value: i32) -> Option<Dtype> {
    match v1::Dtype::try_from(value).ok()? {
        v1::Dtype::F32 => Some(Dtype::F32),
        v1::Dtype::Bf16 => Some(Dtype::Bf16),
        v1::Dtype::F16 => Some(Dtype::F16),
        v1::Dtype::Unspecified => None,
    }
}

/// A payload of `dtype` and `shape` holding `data` as it is: the caller's
/// bytes are row-major, little-endian values of `dtype` (nothing checks
/// them here; [`validate`] does on the other side).
pub fn payload(dtype: Dtype, shape: Vec<i64>, data: impl Into<bytes::Bytes>) -> TensorPayload {
    TensorPayload {
        dtype: to_wire(dtype),
        shape,
        data: data.into(),
    }
}

/// Rows of a host matrix `[_, hidden]` (`xs`, f32 values) gathered into a
/// payload `[rows.len(), hidden]` of `dtype`, rounding to nearest even where
/// `dtype` is narrower: one pass, no tensor built.
pub fn encode_rows(
    xs: &[f32],
    hidden: usize,
    rows: &[usize],
    dtype: Dtype,
) -> Result<TensorPayload, CodecError> {
    let mut data = vec![0u8; rows.len() * hidden * dtype.bytes()];
    with_element!(dtype, T => gather::<T>(xs, hidden, rows, &mut data))?;
    Ok(payload(dtype, vec![rows.len() as i64, hidden as i64], data))
}

/// `rows` of `xs` (`[_, hidden]`) written one after the other into `data`
/// as `T`, which has room for them.
fn gather<T: Element>(
    xs: &[f32],
    hidden: usize,
    rows: &[usize],
    data: &mut [u8],
) -> Result<(), CodecError> {
    for (&row, target) in rows.iter().zip(data.chunks_exact_mut(hidden * T::BYTES)) {
        let values = xs
            .get(row * hidden..(row + 1) * hidden)
            .ok_or(CodecError::Row { row })?;
        for (&value, bytes) in values.iter().zip(target.chunks_exact_mut(T::BYTES)) {
            T::write(value, bytes);
        }
    }
    Ok(())
}

/// Adds row `i` of `payload` (`[rows.len(), hidden]`, checked here) into row
/// `rows[i]` of the host matrix `out` (`[_, hidden]`): each payload value is
/// first rounded to `precision`, then each sum, as `out.index_add_(rows,
/// partial.to(precision))` does in that dtype. No tensor is built.
pub fn add_rows(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rows: &[usize],
    hidden: usize,
    out: &mut [f32],
    precision: Dtype,
) -> Result<(), CodecError> {
    let (dtype, shape) = validate(payload, field, 2)?;
    if shape != [rows.len() as i64, hidden as i64] {
        return Err(CodecError::Answer {
            field,
            shape,
            rows: rows.len(),
            hidden,
        });
    }
    if let Some(&row) = rows.iter().find(|&&row| (row + 1) * hidden > out.len()) {
        return Err(CodecError::Row { row });
    }
    let data = payload.map(|p| &p.data[..]).unwrap_or_default();
    with_element!(dtype, D => with_element!(precision, P => scatter_add::<D, P>(data, rows, hidden, out)));
    Ok(())
}

/// Adds row `i` of `data` (values of `D`) into row `rows[i]` of `out`
/// (`[_, hidden]`), rounding each value and then each sum to `P`. The rows
/// were checked to be inside `out`, and `data` to hold them.
fn scatter_add<D: Element, P: Element>(
    data: &[u8],
    rows: &[usize],
    hidden: usize,
    out: &mut [f32],
) {
    for (&row, source) in rows.iter().zip(data.chunks_exact(hidden * D::BYTES)) {
        let target = &mut out[row * hidden..(row + 1) * hidden];
        for (t, b) in target.iter_mut().zip(source.chunks_exact(D::BYTES)) {
            *t = P::round(*t + P::round(D::read(b)));
        }
    }
}

/// The index of the first value of `payload` (of `dtype`) that is NaN or
/// ±Inf, read from the exponent bits (all ones) without converting.
pub fn first_non_finite(payload: &TensorPayload, dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => payload.data.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        Dtype::Bf16 => payload
            .data
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        Dtype::F16 => payload
            .data
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
    }
}

/// Checks a payload's dtype, rank and byte length; returns its dtype and shape.
pub fn validate(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rank: usize,
) -> Result<(Dtype, Vec<i64>), CodecError> {
    let payload = payload.ok_or(CodecError::Missing { field })?;
    let dtype = from_wire(payload.dtype).ok_or(CodecError::Dtype {
        field,
        dtype: payload.dtype,
    })?;
    let shape = payload.shape.clone();
    if shape.len() != rank {
        return Err(CodecError::Rank {
            field,
            expected: rank,
            shape,
        });
    }
    let elements = shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let Some(expected) = elements.and_then(|n| n.checked_mul(dtype.bytes())) else {
        return Err(CodecError::Shape { field, shape });
    };
    if expected != payload.data.len() {
        return Err(CodecError::ByteLength {
            field,
            shape,
            dtype,
            expected,
            actual: payload.data.len(),
        });
    }
    Ok((dtype, shape))
}

#[cfg(test)]
mod tests {
    //! The host codec alone; payload ↔ tensor, and these functions against
    //! libtorch's own gather, casts and index_add, are tested where tensors
    //! live (the worker's `payload` module).

    use super::*;

    /// `values` as one row of `dtype`.
    fn row(values: &[f32], dtype: Dtype) -> TensorPayload {
        encode_rows(values, values.len(), &[0], dtype).unwrap()
    }

    #[test]
    fn every_dtype_crosses_the_wire_as_its_own_value() {
        for dtype in Dtype::ALL {
            assert_eq!(from_wire(to_wire(dtype)), Some(dtype));
        }
        assert_eq!(from_wire(v1::Dtype::Unspecified as i32), None);
        assert_eq!(from_wire(99), None);
    }

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        for dtype in Dtype::ALL {
            let finite = row(&[1.0, -2.5, 0.0, 65000.0], dtype);
            assert_eq!(first_non_finite(&finite, dtype), None, "{dtype:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let values = row(&[1.0, 2.0, bad, 3.0], dtype);
                assert_eq!(first_non_finite(&values, dtype), Some(2), "{dtype:?} {bad}");
            }
        }
    }

    #[test]
    fn rows_outside_the_matrix_or_answers_of_another_shape_are_errors() {
        let (tokens, hidden) = (5usize, 7usize);
        let host: Vec<f32> = (0..tokens * hidden).map(|i| i as f32).collect();
        let rows = [3usize, 0, 4];
        let payload = encode_rows(&host, hidden, &rows, Dtype::F32).unwrap();
        assert_eq!(payload.shape, [3, hidden as i64]);
        let mut out = vec![0.0; tokens * hidden];
        assert!(matches!(
            add_rows(
                Some(&payload),
                "output",
                &rows[..2],
                hidden,
                &mut out,
                Dtype::F32
            ),
            Err(CodecError::Answer { .. })
        ));
        assert_eq!(
            add_rows(
                Some(&payload),
                "output",
                &[0, 1, 9],
                hidden,
                &mut out,
                Dtype::F32
            ),
            Err(CodecError::Row { row: 9 })
        );
        assert_eq!(
            encode_rows(&host, hidden, &[5], Dtype::F32),
            Err(CodecError::Row { row: 5 })
        );
        // The rows land where they came from.
        add_rows(
            Some(&payload),
            "output",
            &rows,
            hidden,
            &mut out,
            Dtype::F32,
        )
        .unwrap();
        for &r in &rows {
            assert_eq!(
                out[r * hidden..(r + 1) * hidden],
                host[r * hidden..(r + 1) * hidden]
            );
        }
        assert!(out[hidden..3 * hidden].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_payloads_are_named_errors() {
        let good = encode_rows(&[1.0; 8], 4, &[0, 1], Dtype::F32).unwrap();
        assert_eq!(
            validate(Some(&good), "hidden", 2),
            Ok((Dtype::F32, vec![2, 4]))
        );
        assert_eq!(
            validate(None, "hidden", 2).unwrap_err(),
            CodecError::Missing { field: "hidden" }
        );
        let mut p = good.clone();
        p.data = p.data.slice(0..31);
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::ByteLength {
                expected: 32,
                actual: 31,
                ..
            }
        ));
        let mut p = good.clone();
        p.dtype = 0;
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Dtype { .. }
        ));
        let mut p = good.clone();
        p.dtype = 99;
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Dtype { .. }
        ));
        let mut p = good.clone();
        p.shape = vec![8];
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Rank { .. }
        ));
        let mut p = good.clone();
        p.shape = vec![-2, -4];
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Shape { .. }
        ));
        let mut p = good;
        p.shape = vec![i64::MAX, i64::MAX];
        assert!(matches!(
            validate(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Shape { .. }
        ));
    }
}
