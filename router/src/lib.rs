//! # tramontane-router
//!
//! The router holds everything of a MoE model that is not an
//! expert (embeddings, attention and KV caches, norms, gates, lm_head). For
//! every MoE layer it routes each token to its top-k experts and dispatches
//! the token rows to the expert workers that hold them, then adds their
//! partial sums back into the residual stream.
//!
//! # Layout
//!
//! Placement, the scheduler's step plan and admission, dispatch planning and
//! the routing-trace format are [`tramontane_policy`]'s: policy without
//! tensors, which the capacity planner simulates with the same code. The
//! dispatch to the workers (the model's experts over gRPC, cluster checks
//! and probing, dispatch phases and expert load) is
//! [`tramontane_dispatch`]'s.
//!
//! - [`start`]: [`Router::start`]: config, tokenizer and chat template, the
//!   workers connected and checked, the engine thread started.
//! - [`serving`]: [`serve`]: the gRPC and HTTP listeners, health, the drain.
//! - [`engine`]: continuous batching on the thread that owns the model;
//!   [`sampling`] picks each sequence's next token, [`logit_bias`] biases it.
//! - [`failure`]: what goes wrong on the data path, typed, mapped once to
//!   HTTP statuses and gRPC codes at the edges.
//! - [`completion`]: one request whichever API it came through; [`text`]
//!   turns tokens into streamed text and applies stop strings.
//! - [`http`] (OpenAI-compatible) and [`service`] (gRPC `moe.v1.Generation`):
//!   the public APIs; [`chat_template`] renders chat messages, their
//!   control-token strings kept as text ([`control_strings`]);
//!   [`api_keys`] guards them; [`excerpt`] cuts the user input their errors
//!   quote.
//! - [`metrics`]: the Prometheus metrics; [`readiness`]: what health says.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api_keys;
pub mod chat_template;
pub mod completion;
pub mod control_strings;
pub mod engine;
pub mod excerpt;
pub mod failure;
pub mod http;
pub mod logit_bias;
pub mod metrics;
pub mod readiness;
pub mod sampling;
pub mod service;
pub mod serving;
pub mod start;
pub mod structured_output;
pub mod text;
pub mod tool_calls;

pub use serving::{Listeners, ServeError, serve, until_end};
pub use start::{Router, RouterError, RouterOptions};
