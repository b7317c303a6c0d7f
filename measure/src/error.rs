//! What can go wrong measuring.

use std::convert::Infallible;

use tramontane_dispatch::error::DispatchError;
use tramontane_model::{ConfigError, ForwardError, LoadError, StepError, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] tramontane_model::TokenizerError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Placement(#[from] tramontane_policy::placement::PlacementError),
    #[error(transparent)]
    Cluster(#[from] tramontane_dispatch::cluster::ClusterError),
    #[error(transparent)]
    Launch(#[from] tramontane_launcher::LaunchError),
    #[error(transparent)]
    Profile(#[from] tramontane_planner::profile::ProfileError),
    #[error("connecting to the worker")]
    Connect(#[from] tonic::transport::Error),
    #[error("the worker answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        error: std::io::Error,
    },
}

/// A step's failure: the model's own, or its experts' (each says its layer).
impl<X: Into<MeasureError>> From<StepError<X>> for MeasureError {
    fn from(error: StepError<X>) -> Self {
        match error {
            StepError::Forward(error) => MeasureError::Forward(error),
            StepError::Experts { source, .. } => source.into(),
        }
    }
}

/// Experts that cannot fail (the dense part timed alone).
impl From<Infallible> for MeasureError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

impl MeasureError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |error| MeasureError::Io { what, error }
    }
}
