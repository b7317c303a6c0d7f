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
