//! Payloads ↔ tensors, on the worker: where hidden states become a tensor
//! for the experts and their output becomes bytes again. The checks are the
//! host codec's ([`tramontane_proto::codec`]); libtorch kinds meet the
//! wire's dtypes through [`tramontane_model::dtype`].

use tch::{Kind, Tensor};
use tramontane_model::dtype;
use tramontane_proto::codec::{self, CodecError};
use tramontane_proto::v1::TensorPayload;

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("tensor of kind {0:?} cannot be sent")]
    UnsupportedKind(Kind),
    #[error("{field}: {source}")]
    Torch {
        field: &'static str,
        #[source]
        source: tch::TchError,
    },
}

/// Copies a tensor (any device) into a payload of its own dtype.
pub fn from_tensor(tensor: &Tensor) -> Result<TensorPayload, PayloadError> {
    let dtype = dtype::dtype(tensor.kind()).ok_or(PayloadError::UnsupportedKind(tensor.kind()))?;
    let torch = |source| PayloadError::Torch {
        field: "output",
        source,
    };
    let host = tensor
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(torch)?;
    let numel = host.numel();
    let mut data = vec![0u8; numel * dtype.bytes()];
    host.f_copy_data_u8(&mut data, numel).map_err(torch)?;
    Ok(codec::payload(dtype, host.size(), data))
}

/// Validates a payload of `rank` dimensions and builds a CPU tensor of its
/// dtype from its bytes.
pub fn to_tensor(
    payload: Option<&TensorPayload>,
    field: &'static str,
    rank: usize,
) -> Result<Tensor, PayloadError> {
    let (dtype, shape) = codec::validate(payload, field, rank)?;
    let data = payload.map(|p| &p.data[..]).unwrap_or_default();
    Tensor::f_from_data_size(data, &shape, dtype::kind(dtype))
        .map_err(|source| PayloadError::Torch { field, source })
}

#[cfg(test)]
mod tests {
    //! The payloads of tensors, and the host codec the router uses against
    //! libtorch's own gather, casts and in-place index_add.

    use super::*;
    use tramontane_config::Dtype;

    #[test]
    fn round_trips_every_wire_dtype() {
        let t = Tensor::randn([3, 5], (Kind::Float, tch::Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = t.to_kind(kind);
            let payload = from_tensor(&x).unwrap();
            assert_eq!(payload.data.len(), 15 * kind.elt_size_in_bytes());
            let y = to_tensor(Some(&payload), "hidden", 2).unwrap();
            assert_eq!(y.kind(), kind);
            assert!(x.equal(&y));
        }
        let int8 = Tensor::zeros([2], (Kind::Int8, tch::Device::Cpu));
        assert!(matches!(
            from_tensor(&int8),
            Err(PayloadError::UnsupportedKind(Kind::Int8))
        ));
        assert!(matches!(
            to_tensor(None, "hidden", 2),
            Err(PayloadError::Codec(CodecError::Missing { field: "hidden" }))
        ));
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
            let ours = codec::encode_rows(&host, hidden, &rows, dtype).unwrap();
            let theirs = from_tensor(&xs.index_select(0, &index).to_kind(kind)).unwrap();
            assert_eq!(ours, theirs, "{kind:?}");
        }
        // Two partial answers added into the same rows, each dtype kept.
        let partial = Tensor::randn([3, hidden as i64], (Kind::Float, tch::Device::Cpu)) * 3.0;
        for out_kind in [Kind::Float, Kind::BFloat16] {
            for wire in [Kind::Float, Kind::BFloat16] {
                let payload = from_tensor(&partial.to_kind(wire)).unwrap();
                let precision = dtype::dtype(out_kind).unwrap();
                let start = xs.to_kind(out_kind);
                let mut ours: Vec<f32> =
                    Vec::try_from(start.to_kind(Kind::Float).flatten(0, -1)).unwrap();
                let mut theirs = start.copy();
                for _ in 0..2 {
                    codec::add_rows(
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
    }
}
