//! # tramontane-config
//!
//! What every Tramontane process reads of a checkpoint before (or without)
//! touching a tensor: the router, the workers, the planner (which never
//! links libtorch) and the tools agree on these.
//!
//! # Layout
//!
//! - [`spec`]: one description of a model whatever its family
//!   ([`ModelSpec`]: attention variant, norms, biases, dense and routed
//!   layers, gate, shared expert), from its config.json.
//! - [`mixtral`], [`qwen_moe`] (Qwen3-MoE and Qwen2-MoE), [`olmoe`],
//!   [`deepseek`] (DeepSeek-V2 and V3), [`gpt_oss`]: each
//!   family's `config.json` (the only code that knows its fields).
//! - [`tensors`]: every tensor of a checkpoint, named and shaped as the
//!   family's transformers class has it.
//! - [`model_id`]: the identity router and workers compare (SHA-256 of config.json).
//! - [`dtype`]: the dtypes weights are stored, loaded and sent in.
//! - [`error`]: why a config cannot be read.

#![forbid(unsafe_code)]

pub mod deepseek;
pub mod dtype;
pub mod error;
pub mod gpt_oss;
pub mod mixtral;
pub mod model_id;
pub mod olmoe;
pub mod qwen_moe;
pub mod spec;
pub mod tensors;

pub use dtype::{Dtype, Quantization};
pub use error::ConfigError;
pub use mixtral::{MixtralConfig, TokenIds};
pub use model_id::model_id;
pub use spec::{
    Activation, AttentionSpec, Family, FfnSpec, Gate, GroupScore, GroupedGate, LatentAttention,
    ModelSpec, MoeSpec, Parameters, QkNorm, Scoring, SharedExpertSpec, SharedExperts, Yarn,
};
pub use tensors::{ExpertTensors, FusedExperts, TensorRole, TensorSpec};
