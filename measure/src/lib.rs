//! # tramontane-measure
//!
//! Measurements on a device, run on purpose (never as tests): what the
//! capacity planner's profile needs, the forward's tokens/s the benchmarks
//! compare with transformers and llama.cpp, and the dispatch round trip. It
//! runs the real model and the router's own dispatch code on real worker
//! processes, so it links libtorch; the planner reads its output
//! ([`tramontane_planner::profile::Profile`]) without linking it.
//!
//! # Layout
//!
//! - [`tokens`]: the pseudo-random prompts every benchmark (and transformers) shares.
//! - [`forward`]: prefill and decode tokens/s, in process or over workers.
//! - [`dispatch`]: round trips of a one-row Forward to a running worker.
//! - [`delay_proxy`]: a TCP proxy adding latency, for the sharded benchmarks.
//! - [`profile`]: the planner's device profile (`tramontane profile`).
//! - [`perplexity`]: a model's perplexity on a text (`tramontane perplexity`).
//! - [`error`]: what can go wrong measuring.

#![forbid(unsafe_code)]

pub mod delay_proxy;
pub mod dispatch;
pub mod error;
pub mod forward;
pub mod perplexity;
pub mod profile;
pub mod tokens;

pub use error::MeasureError;

/// The median of `xs` (the upper one of an even count); `xs` is not empty.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
