//! # tramontane-model
//!
//! A Mixture-of-Experts causal LM in libtorch (through `tch`), one forward
//! for every family the project serves (Mixtral, Qwen3-MoE, Qwen2-MoE,
//! OLMoE, DeepSeek-V2 and V3), numerically matching each family's transformers class.
//!
//! # Layout
//!
//! - The HF `config.json` is read into [`tramontane_config`]'s
//!   [`ModelSpec`], the one description everything here follows;
//!   [`dtype`] maps its dtypes to libtorch kinds.
//! - [`weights`]: memory-mapped safetensors (single or sharded), loaded key by key.
//! - [`tokenizer`]: `tokenizer.json` + `tokenizer_config.json`.
//! - Layers, bottom-up: [`norm`], [`rotary`], [`kv_cache`] (its blocks and
//!   prefix cache: [`block_pool`]), [`attention`] (grouped-query) and
//!   [`latent_attention`] (DeepSeek's MLA over a latent cache),
//!   [`expert`] (any SwiGLU MLP), [`gating`], [`moe`] (the block with its
//!   shared expert, and the experts held in process), [`layer`] (a dense
//!   or MoE feed-forward), `load` (a layer's tensors by the description).
//! - [`experts`]: the seam through which the model reaches its experts,
//!   wherever they live ([`experts::Experts`]); the model is generic over it.
//! - [`weight_matrix`]: a projection's weights as held, in the compute
//!   dtype or quantized at load (`--quantize int8`).
//! - [`projection`]: every `x · Wᵀ`, on the weight-streaming kernels of
//!   `tramontane-kernels` for a few rows on the CPU (run on libtorch's own
//!   OpenMP team, `openmp`), on libtorch's `linear` otherwise.
//! - [`model`]: the causal LM over a ragged batch of sequences.
//! - [`generate`]: greedy generation for a batch of prompts.
//! - [`error`]: one error enum per boundary; a step's is
//!   [`StepError`], generic over its experts' error.
//! - [`testing`] (feature `test-support`): the one test double of the seam.
//! - [`cuda`]: libtorch's CUDA half, loaded when a CUDA device is asked for.
//! - [`heap`]: the heap's free memory given back once weights are loaded.

pub mod attention;
pub mod block_pool;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod expert;
pub mod experts;
pub mod gating;
pub mod generate;
pub mod heap;
pub mod kv_cache;
pub mod latent_attention;
pub mod layer;
mod load;
pub mod model;
pub mod moe;
pub mod norm;
mod openmp;
pub mod projection;
pub mod rotary;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tokenizer;
pub mod weight_matrix;
pub mod weights;

pub use error::{
    ConfigError, Failed, ForwardError, LoadError, StepError, TokenizerError, WeightsError,
};
pub use model::{BatchItem, CausalLm, LoadOptions, Logits};
pub use tokenizer::Tokenizer;
pub use tramontane_config::{Dtype, MixtralConfig, ModelSpec, Quantization, SharedExperts};
pub use weight_matrix::WeightMatrix;
