//! Tensors on the wire: dtype + shape + raw little-endian bytes. Decoding
//! checks everything before a tensor is built from the bytes.

use tch::{Kind, Tensor};

use crate::v1::{Dtype, TensorPayload};

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
    #[error("tensor of kind {0:?} cannot be sent")]
    UnsupportedKind(Kind),
    #[error("dtype {0:?} cannot be sent")]
    UnsupportedDtype(Dtype),
    #[error("row {row} is outside the matrix")]
    Row { row: usize },
    #[error("{field}: shape {shape:?}, expected [{rows}, {hidden}]")]
    Answer {
        field: &'static str,
        shape: Vec<i64>,
        rows: usize,
        hidden: usize,
    },
    #[error("{field}: {reason}")]
    Torch { field: &'static str, reason: String },
}

pub fn dtype_of(kind: Kind) -> Result<Dtype, CodecError> {
    match kind {
        Kind::Float => Ok(Dtype::F32),
        Kind::BFloat16 => Ok(Dtype::Bf16),
        Kind::Half => Ok(Dtype::F16),
        other => Err(CodecError::UnsupportedKind(other)),
    }
}

pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::Bf16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::Unspecified => None,
    }
}

/// Copies a tensor (any device) into a payload.
pub fn encode(tensor: &Tensor) -> Result<TensorPayload, CodecError> {
    let dtype = dtype_of(tensor.kind())?;
    let host = tensor.to_device(tch::Device::Cpu).contiguous();
    let numel = host.numel();
    let mut data = vec![0u8; numel * host.kind().elt_size_in_bytes()];
    host.copy_data_u8(&mut data, numel);
    Ok(TensorPayload {
        dtype: dtype as i32,
        shape: host.size(),
        data: data.into(),
    })
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
    let size = kind_of(dtype)
        .ok_or(CodecError::UnsupportedDtype(dtype))?
        .elt_size_in_bytes();
    let mut data = Vec::with_capacity(rows.len() * hidden * size);
    for &row in rows {
        let values = xs
            .get(row * hidden..(row + 1) * hidden)
            .ok_or(CodecError::Row { row })?;
        match dtype {
            Dtype::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            Dtype::Bf16 => values
                .iter()
                .for_each(|&v| data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
            Dtype::F16 => values
                .iter()
                .for_each(|&v| data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            Dtype::Unspecified => return Err(CodecError::UnsupportedDtype(dtype)),
        }
    }
    Ok(TensorPayload {
        dtype: dtype as i32,
        shape: vec![rows.len() as i64, hidden as i64],
        data: data.into(),
    })
}

/// The dtype a sum is kept in: each sum is rounded to it, as libtorch's
/// in-place add of that dtype rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn of(kind: Kind) -> Result<Self, CodecError> {
        match kind {
            Kind::Float => Ok(Precision::F32),
            Kind::BFloat16 => Ok(Precision::Bf16),
            Kind::Half => Ok(Precision::F16),
            other => Err(CodecError::UnsupportedKind(other)),
        }
    }

    fn round(self, v: f32) -> f32 {
        match self {
            Precision::F32 => v,
            Precision::Bf16 => half::bf16::from_f32(v).to_f32(),
            Precision::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

/// Adds row `i` of `payload` (`[rows.len(), hidden]`, checked here) into row
/// `rows[i]` of the host matrix `out` (`[_, hidden]`): each payload value is
/// first rounded to `precision`, then each sum, as `out.index_add_(rows,
/// partial.to(dtype))` does in that dtype. No tensor is built.
pub fn add_rows(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rows: &[usize],
    hidden: usize,
    out: &mut [f32],
    precision: Precision,
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
    let size = kind_of(dtype).map_or(4, |k| k.elt_size_in_bytes());
    for (i, &row) in rows.iter().enumerate() {
        let target = &mut out[row * hidden..(row + 1) * hidden];
        let source = &data[i * hidden * size..(i + 1) * hidden * size];
        let value = |b: &[u8]| match dtype {
            Dtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        };
        for (t, b) in target.iter_mut().zip(source.chunks_exact(size)) {
            *t = precision.round(*t + precision.round(value(b)));
        }
    }
    Ok(())
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
        Dtype::Unspecified => None,
    }
}

/// Checks a payload's dtype, rank and byte length; returns its dtype and shape.
pub fn validate(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rank: usize,
) -> Result<(Dtype, Vec<i64>), CodecError> {
    let payload = payload.ok_or(CodecError::Missing { field })?;
    let dtype = Dtype::try_from(payload.dtype)
        .ok()
        .filter(|d| *d != Dtype::Unspecified)
        .ok_or(CodecError::Dtype {
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
    let element_size = kind_of(dtype).map_or(0, |k| k.elt_size_in_bytes());
    let Some(expected) = elements.and_then(|n| n.checked_mul(element_size)) else {
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

/// Validates and builds a CPU tensor of the payload's dtype.
pub fn decode(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rank: usize,
) -> Result<Tensor, CodecError> {
    let (dtype, shape) = validate(payload, field, rank)?;
    let kind = kind_of(dtype).ok_or(CodecError::Dtype {
        field,
        dtype: dtype as i32,
    })?;
    let data = payload.map(|p| &p.data[..]).unwrap_or_default();
    Tensor::f_from_data_size(data, &shape, kind).map_err(|e| CodecError::Torch {
        field,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let dtype = dtype_of(kind).unwrap();
            let finite = Tensor::from_slice(&[1.0f32, -2.5, 0.0, 65000.0]).to_kind(kind);
            assert_eq!(
                first_non_finite(&encode(&finite).unwrap(), dtype),
                None,
                "{kind:?}"
            );
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let values = Tensor::from_slice(&[1.0f32, 2.0, bad, 3.0]).to_kind(kind);
                assert_eq!(
                    first_non_finite(&encode(&values).unwrap(), dtype),
                    Some(2),
                    "{kind:?} {bad}"
                );
            }
        }
    }

    #[test]
    fn round_trips_every_wire_dtype() {
        let t = Tensor::randn([3, 5], (Kind::Float, tch::Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = t.to_kind(kind);
            let payload = encode(&x).unwrap();
            assert_eq!(payload.data.len(), 15 * kind.elt_size_in_bytes());
            let y = decode(Some(&payload), "hidden", 2).unwrap();
            assert_eq!(y.kind(), kind);
            assert!(x.equal(&y));
        }
    }

    #[test]
    fn rows_encode_and_add_as_libtorch_gathers_and_index_adds() {
        let _guard = tch::no_grad_guard();
        let (tokens, hidden) = (5usize, 7usize);
        let xs = Tensor::randn(
            [tokens as i64, hidden as i64],
            (Kind::Float, tch::Device::Cpu),
        );
        let host: Vec<f32> = Vec::try_from(xs.flatten(0, -1)).unwrap();
        let rows = [3usize, 0, 4];
        let index = Tensor::from_slice(&[3i64, 0, 4]);
        for (kind, dtype) in [
            (Kind::Float, Dtype::F32),
            (Kind::BFloat16, Dtype::Bf16),
            (Kind::Half, Dtype::F16),
        ] {
            let ours = encode_rows(&host, hidden, &rows, dtype).unwrap();
            let theirs = encode(&xs.index_select(0, &index).to_kind(kind)).unwrap();
            assert_eq!(ours, theirs, "{kind:?}");
        }
        // Two partial answers added into the same rows, each dtype kept.
        let partial = Tensor::randn([3, hidden as i64], (Kind::Float, tch::Device::Cpu)) * 3.0;
        for out_kind in [Kind::Float, Kind::BFloat16] {
            for wire in [Kind::Float, Kind::BFloat16] {
                let payload = encode(&partial.to_kind(wire)).unwrap();
                let precision = Precision::of(out_kind).unwrap();
                let start = xs.to_kind(out_kind);
                let mut ours: Vec<f32> =
                    Vec::try_from(start.to_kind(Kind::Float).flatten(0, -1)).unwrap();
                let mut theirs = start.copy();
                for _ in 0..2 {
                    add_rows(
                        Some(&payload),
                        "output",
                        &rows,
                        hidden,
                        &mut ours,
                        precision,
                    )
                    .unwrap();
                    let _ = theirs.index_add_(0, &index, &partial.to_kind(wire).to_kind(out_kind));
                }
                let theirs: Vec<f32> =
                    Vec::try_from(theirs.to_kind(Kind::Float).flatten(0, -1)).unwrap();
                assert_eq!(ours, theirs, "out {out_kind:?}, wire {wire:?}");
            }
        }
        let payload = encode(&partial).unwrap();
        let mut out = vec![0.0; tokens * hidden];
        assert!(matches!(
            add_rows(
                Some(&payload),
                "output",
                &rows[..2],
                hidden,
                &mut out,
                Precision::F32
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
                Precision::F32
            ),
            Err(CodecError::Row { row: 9 })
        );
        assert_eq!(
            encode_rows(&host, hidden, &[5], Dtype::F32),
            Err(CodecError::Row { row: 5 })
        );
    }

    #[test]
    fn bad_payloads_are_named_errors() {
        let good = encode(&Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu))).unwrap();
        assert_eq!(
            decode(None, "hidden", 2).unwrap_err(),
            CodecError::Missing { field: "hidden" }
        );
        let mut p = good.clone();
        p.data = p.data.slice(0..31);
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::ByteLength {
                expected: 32,
                actual: 31,
                ..
            }
        ));
        let mut p = good.clone();
        p.dtype = 0;
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Dtype { .. }
        ));
        let mut p = good.clone();
        p.dtype = 99;
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Dtype { .. }
        ));
        let mut p = good.clone();
        p.shape = vec![8];
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Rank { .. }
        ));
        let mut p = good.clone();
        p.shape = vec![-2, -4];
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Shape { .. }
        ));
        let mut p = good;
        p.shape = vec![i64::MAX, i64::MAX];
        assert!(matches!(
            decode(Some(&p), "hidden", 2).unwrap_err(),
            CodecError::Shape { .. }
        ));
    }
}
