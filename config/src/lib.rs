//! # tramontane-config
//!
//! What every Tramontane process reads of a checkpoint before (or without)
//! touching a tensor: the router, the workers, the planner (which never
//! links libtorch) and the tools agree on these.
//!
//! # Layout
//!
//! - [`mixtral`]: the Hugging Face `config.json` of a Mixtral checkpoint.
//! - [`model_id`]: the identity router and workers compare (SHA-256 of config.json).
//! - [`dtype`]: the dtypes weights are stored, loaded and sent in.
//! - [`error`]: why a config cannot be read.

#![forbid(unsafe_code)]

pub mod dtype;
pub mod error;
pub mod mixtral;
pub mod model_id;

pub use dtype::Dtype;
pub use error::ConfigError;
pub use mixtral::{MixtralConfig, TokenIds};
pub use model_id::model_id;
