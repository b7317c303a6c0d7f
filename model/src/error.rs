//! Errors, one enum per boundary: loading weights, tokenizing, running the
//! forward (reading the config is `tramontane_config`'s).

use std::path::PathBuf;

pub use tramontane_config::ConfigError;

use crate::experts::ExpertsError;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("invalid index {path}: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("invalid safetensors file {path} (truncated or corrupt?): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("missing tensor {key}")]
    MissingTensor { key: String },
    #[error("tensor {key}: expected shape {expected:?}, found {actual:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("tensor {key}: unsupported dtype {dtype}")]
    UnsupportedDtype { key: String, dtype: String },
    #[error("tensor {key}: {error}")]
    Torch { key: String, error: tch::TchError },
    #[error(
        "the checkpoint is already quantized (its config.json's quantization_config.quant_method \
         is {quant_method:?}): --quantize {asked} quantizes bf16, f16 or f32 checkpoints only; \
         leave it out"
    )]
    AlreadyQuantized {
        quant_method: String,
        asked: tramontane_config::Quantization,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "the checkpoint's config.json says quantization_config.quant_method {quant_method:?}, \
         which is not served (served: {served}); serve its unquantized weights, with \
         --quantize int8 for less memory"
    )]
    UnsupportedQuantization {
        quant_method: String,
        served: &'static str,
    },
    #[error(
        "tensor {key} is {found:?}: its FP8 weight {weight:?} in blocks of {block:?} \
         (quantization_config.weight_block_size) needs {needed:?} scales"
    )]
    Fp8Scales {
        key: String,
        found: Vec<i64>,
        needed: Vec<i64>,
        weight: Vec<i64>,
        block: (i64, i64),
    },
    #[error(
        "tensor {key} is {found:?}: an MXFP4 weight of {outputs} × {inner} values needs {needed:?}"
    )]
    Mxfp4Shape {
        key: String,
        found: Vec<i64>,
        needed: Vec<i64>,
        outputs: i64,
        inner: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("sequence {sequence}: {positions} positions exceed max_position_embeddings {limit}")]
    ContextOverflow {
        sequence: usize,
        positions: usize,
        limit: usize,
    },
    #[error("sequence {sequence}: no tokens to run")]
    EmptySequence { sequence: usize },
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { id: i64, vocab_size: usize },
    #[error("layer {layer}: expert {expert} is not held by these experts")]
    ExpertNotHeld { layer: usize, expert: usize },
    /// The step's new positions do not fit in the KV pool; no cache was
    /// changed.
    #[error("sequence {sequence}: no room in the KV cache")]
    KvCacheFull {
        sequence: usize,
        #[source]
        source: crate::kv_cache::KvCacheFull,
    },
    #[error("sequence {sequence}: its KV cache belongs to another pool")]
    ForeignCache { sequence: usize },
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("expert kernel: {0}")]
    Kernel(#[from] crate::projection::KernelError),
}

impl From<tramontane_kernels::ShapeError> for ForwardError {
    fn from(error: tramontane_kernels::ShapeError) -> Self {
        ForwardError::Kernel(error.into())
    }
}

/// In-process experts fail as the model does, for the whole step.
impl ExpertsError for ForwardError {}

/// Why a step of [`crate::CausalLm::forward`] failed: the model's own part,
/// or the experts of a layer, with the error type of its
/// [`crate::experts::Experts`]. On error no cache was changed.
#[derive(Debug, thiserror::Error)]
pub enum StepError<X> {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("experts failed on layer {layer}")]
    Experts {
        layer: usize,
        /// The step's sequences the failure concerns.
        failed: Failed,
        #[source]
        source: X,
    },
}

impl<X> From<tch::TchError> for StepError<X> {
    fn from(error: tch::TchError) -> Self {
        StepError::Forward(error.into())
    }
}

/// Which sequences of a step an experts failure concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// Every sequence of the step.
    All,
    /// Only these, as indexes into the step's batch (sorted, each once,
    /// never empty): the others may run the step again.
    Only(Vec<usize>),
}

/// Anything that can go wrong building a model from a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}
