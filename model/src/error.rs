//! Errors, one enum per boundary: loading weights, tokenizing, running the
//! forward (reading the config is `tramontane_config`'s).

use std::path::PathBuf;

pub use tramontane_config::ConfigError;

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
    /// The [`crate::moe::Experts`] implementation failed; `source` is its
    /// own error type (the router's dispatch error, for remote experts).
    #[error("experts failed on layer {layer}")]
    Experts {
        layer: usize,
        /// Where the token rows `source` may name start in the step: an
        /// implementation counts rows in the `xs` it got (and gives 0, see
        /// [`ForwardError::experts`]); the model adds the first row of the
        /// micro-batch `xs` was, so that out of [`crate::Mixtral::forward`]
        /// row `first_row + r` is the step's row (its sequences' new tokens
        /// in batch order).
        first_row: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
    /// `Experts::finish` got work another implementation started (a bug).
    #[error("experts were asked to finish work they did not start")]
    NotStartedHere,
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("expert kernel: {0}")]
    Kernel(#[from] tramontane_kernels::ShapeError),
}

impl ForwardError {
    /// The experts of `layer` failed with `source`, which counts token rows
    /// in the input the experts got.
    pub fn experts(layer: usize, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ForwardError::Experts {
            layer,
            first_row: 0,
            source: Box::new(source),
        }
    }

    /// This error of experts whose input started at row `first_row` of the
    /// step (a micro-batch's first row); other errors as they are.
    pub(crate) fn offset_rows(self, first_row: usize) -> Self {
        match self {
            ForwardError::Experts {
                layer,
                first_row: within,
                source,
            } => ForwardError::Experts {
                layer,
                first_row: first_row + within,
                source,
            },
            other => other,
        }
    }
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
