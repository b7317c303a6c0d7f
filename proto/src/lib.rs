//! # tramontane-proto
//!
//! The `moe.v1` protocol: the expert service a router calls on its workers,
//! the public generation service, and the codec that moves hidden states
//! across the wire as raw little-endian bytes with dtype and shape beside
//! them. It does not link libtorch: payloads are built from and added into
//! host `f32` rows here, and become tensors where tensors live (the worker).
//!
//! # Layout
//!
//! - `moe/v1/*.proto`: the protocol, compiled at build time by protox.
//! - [`v1`]: the generated messages, clients and servers.
//! - [`codec`]: [`v1::TensorPayload`] ↔ host rows, validating on decode;
//!   the wire's dtype values ↔ [`tramontane_config::Dtype`] (the one dtype
//!   type of config, wire and command line).
//! - `elements`: each wire element type's reading, writing and rounding,
//!   one type each so that the codec's loops are compiled per type.

#![forbid(unsafe_code)]

pub mod codec;
mod elements;

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// The metadata a worker's NOT_FOUND to a Forward carries: the experts of
/// the request's layer it does not hold, decimal, separated by commas (a
/// router plans them again over their other replicas).
pub const NOT_HELD_METADATA: &str = "tramontane-not-held";
