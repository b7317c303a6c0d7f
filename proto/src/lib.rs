//! # tramontane-proto
//!
//! The `moe.v1` protocol: the expert service a router calls on its workers,
//! the public generation service, and the codec that moves tensors across
//! the wire as raw little-endian bytes with dtype and shape beside them.
//!
//! # Layout
//!
//! - `moe/v1/*.proto`: the protocol, compiled at build time by protox.
//! - [`v1`]: the generated messages, clients and servers.
//! - [`codec`]: [`v1::TensorPayload`] ↔ `tch::Tensor`, validating on decode.

pub mod codec;

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}
