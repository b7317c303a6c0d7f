//! Capacity planning for a sharded MoE cluster: what fits where, where each
//! expert goes, and what throughput and latency to expect.
//!
//! - [`profile`]: what a step costs on a device (measured, or a
//!   [`roofline`] estimate from a datasheet).
//! - [`memory`]: bytes of the dense part, the experts, the KV cache.
//! - [`workload`]: arrivals and prompt / output lengths.
//! - [`routing`]: which experts simulated tokens choose (from a routing trace).
//! - [`eplb`]: expert replication and placement (DeepSeek's EPLB algorithm).
//! - [`simulate`]: the discrete-event simulation of the scheduler and dispatch.
//! - [`plan`]: a plan per cluster size, and the search for the smallest one.
//! - [`svg`]: the plan's charts.

pub mod eplb;
pub mod memory;
pub mod plan;
pub mod profile;
pub mod roofline;
pub mod routing;
pub mod simulate;
pub mod svg;
#[cfg(test)]
mod test_fixtures;
mod torch_order;
pub mod workload;
