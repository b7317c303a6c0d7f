//! # tramontane-model
//!
//! A Mixtral-style Mixture-of-Experts causal LM in libtorch (through `tch`),
//! numerically matching HF transformers' `MixtralForCausalLM`.
//!
//! # Layout
//!
//! - The HF `config.json` is [`tramontane_config`]'s ([`MixtralConfig`]);
//!   [`dtype`] maps its dtypes to libtorch kinds.
//! - [`weights`]: memory-mapped safetensors (single or sharded), loaded key by key.
//! - [`tokenizer`]: `tokenizer.json` + `tokenizer_config.json`.
//! - Layers, bottom-up: [`norm`], [`rotary`], [`kv_cache`], [`attention`],
//!   [`expert`], [`gating`], [`moe`] (the block and the [`moe::Experts`] seam
//!   through which it reaches its experts), [`layer`].
//! - [`projection`]: every `x · Wᵀ`, on the weight-streaming kernels of
//!   `tramontane-kernels` for a few rows on the CPU (run on libtorch's own
//!   OpenMP team, `openmp`), on libtorch's `linear` otherwise.
//! - [`model`]: the causal LM over a ragged batch of sequences.
//! - [`generate`]: greedy generation for a batch of prompts.
//! - [`error`]: one error enum per boundary.
//! - [`cuda`]: libtorch's CUDA half, loaded when a CUDA device is asked for.

pub mod attention;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod expert;
pub mod gating;
pub mod generate;
pub mod kv_cache;
pub mod layer;
pub mod model;
pub mod moe;
pub mod norm;
mod openmp;
pub mod projection;
pub mod rotary;
pub mod tokenizer;
pub mod weights;

pub use error::{ConfigError, ForwardError, LoadError, TokenizerError, WeightsError};
pub use model::{BatchItem, LoadOptions, Logits, Mixtral};
pub use tokenizer::Tokenizer;
pub use tramontane_config::{Dtype, MixtralConfig};
