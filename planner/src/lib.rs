//! Capacity planning for a sharded MoE cluster: what fits where, where each
//! expert goes, and what throughput and latency to expect.
//!
//! - [`model`]: the model a plan is for (its config.json, of any family
//!   `tramontane_config::ModelSpec` reads; id, name; the dtype it is sized in).
//! - [`profile`]: what a step costs on a device (measured by
//!   `tramontane-measure`, or a [`roofline`] estimate from a datasheet).
//! - [`memory`]: bytes of the dense part (the router's: attention, dense-layer
//!   MLPs, shared experts, ...), the routed experts (the workers'), the KV cache.
//! - [`workload`]: arrivals and prompt / output lengths.
//! - [`routing`]: which experts simulated tokens choose (from a routing trace).
//! - [`simulate`]: the discrete-event simulation of the scheduler and dispatch.
//! - [`plan`]: a plan per cluster size (experts placed by
//!   `tramontane_policy::eplb`, DeepSeek's EPLB), and the search for the smallest one.
//! - [`report`]: what a plan reports (`plan --json`, tables, charts);
//!   [`svg`]: the charts' drawing; [`helm_values`]: the Helm chart's
//!   values for a plan (`plan --helm-values`).
//!
//! The scheduler, admission and dispatch planning it simulates are
//! [`tramontane_policy`]'s, the router's own code; nothing here links
//! libtorch.

#![forbid(unsafe_code)]

pub mod helm_values;
pub mod memory;
pub mod model;
pub mod plan;
pub mod profile;
pub mod report;
pub mod roofline;
pub mod routing;
pub mod simulate;
pub mod svg;
#[cfg(test)]
mod test_fixtures;
pub mod weight_dtype;
pub mod workload;
