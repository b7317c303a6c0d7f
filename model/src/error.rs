//! Errors, one enum per boundary: reading the config, loading weights,
//! tokenizing, running the forward.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot parse {}: {error}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "config.json".into()))]
    Parse {
        path: Option<PathBuf>,
        error: serde_json::Error,
    },
    #[error("unsupported architecture {found}: only MixtralForCausalLM is supported")]
    UnsupportedArchitecture { found: String },
    #[error("invalid config field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConfigError {
    pub(crate) fn at(self, path: &std::path::Path) -> Self {
        match self {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: Some(path.to_owned()),
                error,
            },
            other => other,
        }
    }
}

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
    #[error("experts failed on layer {layer}: {reason}")]
    Experts { layer: usize, reason: String },
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
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
