//! What goes wrong on the data path, typed: a request refused before it
//! runs, and a generation that fails after it was accepted. A failure is
//! built where it happens (validation, the queue, the dispatch to a worker,
//! the engine), travels unchanged through the engine's events, and is mapped
//! once at each edge: to an HTTP status in [`crate::http`] (`ApiError`), to
//! a gRPC code in [`crate::service`]. Causes are kept as `source()` chains;
//! a client reads the whole chain ([`tramontane_infra::error::chain`]).

use crate::structured_output::GuideError;
use tramontane_dispatch::error::DispatchError;
use tramontane_model::{Failed, ForwardError, StepError};

use crate::sampling::InvalidParam;

/// Why a generation request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The request is wrong: HTTP 400, gRPC INVALID_ARGUMENT.
    #[error(transparent)]
    Invalid(#[from] InvalidParam),
    /// Too many requests wait already: HTTP 429, gRPC RESOURCE_EXHAUSTED.
    #[error("{waiting} requests are already waiting; retry later")]
    QueueFull { waiting: usize },
    /// The engine thread is gone: HTTP 503, gRPC UNAVAILABLE.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The server is shutting down and takes no new request: HTTP 503,
    /// gRPC UNAVAILABLE.
    #[error("the server is shutting down; retry on another replica")]
    Draining,
    /// The engine let go of the request without finishing it (a bug):
    /// HTTP 500, gRPC INTERNAL.
    #[error("the engine dropped the request")]
    Dropped,
    /// The experts of a layer could not be computed: see [`DispatchError`]
    /// (`tramontane-dispatch`'s).
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The router's own part of the step failed: HTTP 500, gRPC INTERNAL.
    #[error("the forward step failed")]
    Forward(#[source] ForwardError),
    /// A structured output's constraint failed to give or take a token:
    /// HTTP 500, gRPC INTERNAL.
    #[error(transparent)]
    Guide(#[from] GuideError),
}

impl GenerationError {
    /// A failed step as a generation failure, and the sequences of the step
    /// it fails: an experts failure is its experts' own error (for the
    /// router's, a [`DispatchError`]), for the sequences the model found it
    /// concerns; anything else fails every sequence of the step.
    pub fn of_step<X: Into<GenerationError>>(error: StepError<X>) -> (Self, Failed) {
        match error {
            StepError::Forward(error) => (GenerationError::Forward(error), Failed::All),
            StepError::Experts { failed, source, .. } => (source.into(), failed),
        }
    }
}

/// The model's own failure, and in-process experts': the router's.
impl From<ForwardError> for GenerationError {
    fn from(error: ForwardError) -> Self {
        GenerationError::Forward(error)
    }
}

/// The test double's failures, as the router's tests' engines see them.
#[cfg(test)]
impl<X: Into<GenerationError>> From<tramontane_model::testing::TestError<X>> for GenerationError {
    fn from(error: tramontane_model::testing::TestError<X>) -> Self {
        match error {
            tramontane_model::testing::TestError::Hook(error) => error.into(),
            tramontane_model::testing::TestError::Local(error) => error.into(),
        }
    }
}

#[cfg(test)]
impl From<std::convert::Infallible> for GenerationError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

#[cfg(test)]
pub(crate) mod examples {
    //! One value of every failure kind, for the edges' tests.

    use std::time::Duration;

    use super::*;
    use tramontane_dispatch::error::{
        BadAnswer, EncodeError, WorkerError, WorkerFailure, WorkerRef,
    };
    use tramontane_proto::codec::CodecError;

    pub fn worker(index: usize) -> WorkerRef {
        WorkerRef {
            index,
            addr: format!("10.0.0.{index}:50061"),
        }
    }

    /// Expert 3 of layer 1 lost: its worker failed with `error`.
    pub fn no_live_replica(error: WorkerError) -> GenerationError {
        DispatchError::NoLiveReplica {
            layer: 1,
            expert: 3,
            placed_on: vec![worker(1)],
            tokens: vec![0, 2],
            failures: vec![WorkerFailure {
                worker: worker(1),
                error,
            }],
        }
        .into()
    }

    /// Every kind, with what its message must contain.
    pub fn all() -> Vec<(&'static str, GenerationError, Vec<&'static str>)> {
        vec![
            (
                "invalid",
                InvalidParam::new("temperature", "3 is outside [0, 2]").into(),
                vec!["temperature", "3 is outside [0, 2]"],
            ),
            (
                "queue full",
                GenerationError::QueueFull { waiting: 256 },
                vec!["256 requests are already waiting"],
            ),
            (
                "engine stopped",
                GenerationError::EngineStopped,
                vec!["engine has stopped"],
            ),
            ("draining", GenerationError::Draining, vec!["shutting down"]),
            (
                "dropped",
                GenerationError::Dropped,
                vec!["dropped the request"],
            ),
            (
                "worker status",
                no_live_replica(WorkerError::Status {
                    code: tonic::Code::Unavailable,
                    message: "connection refused".into(),
                }),
                vec![
                    "layer 1 expert 3 has no live worker (placed on worker 1 at 10.0.0.1:50061)",
                    "worker 1 at 10.0.0.1:50061 failed: Unavailable: connection refused",
                ],
            ),
            (
                "worker deadline",
                no_live_replica(WorkerError::Deadline(Duration::from_secs(5))),
                vec!["worker 1 at 10.0.0.1:50061 failed: no answer within 5s"],
            ),
            (
                "worker bad answer",
                no_live_replica(WorkerError::BadAnswer(BadAnswer::Shape {
                    answered: vec![1, 8],
                    rows: 2,
                    hidden: 8,
                })),
                vec!["failed: bad answer: answered shape [1, 8] for 2 rows"],
            ),
            (
                "encode",
                DispatchError::Encode {
                    layer: 0,
                    source: EncodeError::Kind(tch::Kind::Int8),
                }
                .into(),
                vec!["layer 0: cannot encode the hidden states: tensor of kind Int8"],
            ),
            (
                "combine",
                DispatchError::Combine {
                    layer: 1,
                    source: CodecError::Row { row: 9 },
                }
                .into(),
                vec!["layer 1: cannot add a worker's answer: row 9 is outside the matrix"],
            ),
            (
                "tensor",
                DispatchError::Tensor {
                    layer: 2,
                    source: tch::TchError::Torch("out of memory".into()),
                }
                .into(),
                vec![
                    "layer 2: the hidden states could not be moved to or from the host",
                    "out of memory",
                ],
            ),
            (
                "forward",
                ForwardError::TokenOutOfRange {
                    id: 40000,
                    vocab_size: 32000,
                }
                .into(),
                vec!["the forward step failed: token id 40000 is outside the vocabulary"],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tramontane_dispatch::error::EncodeError;
    use tramontane_model::experts::ExpertsError;

    #[test]
    fn a_failed_step_is_its_experts_own_failure_for_the_sequences_the_model_names() {
        let lost = StepError::Experts {
            layer: 0,
            failed: Failed::Only(vec![1, 3]),
            source: DispatchError::NoLiveReplica {
                layer: 0,
                expert: 1,
                placed_on: vec![examples::worker(0)],
                tokens: vec![0, 3],
                failures: vec![],
            },
        };
        let (error, failed) = GenerationError::of_step(lost);
        assert!(matches!(
            error,
            GenerationError::Dispatch(DispatchError::NoLiveReplica { expert: 1, .. })
        ));
        assert_eq!(failed, Failed::Only(vec![1, 3]));
        // Its rows are what the model maps to sequences; no other
        // dispatch failure names any.
        let no_live = |tokens: Vec<usize>| DispatchError::NoLiveReplica {
            layer: 0,
            expert: 1,
            placed_on: vec![],
            tokens,
            failures: vec![],
        };
        assert_eq!(no_live(vec![0, 3]).failed_rows(), Some(&[0, 3][..]));
        let encode = DispatchError::Encode {
            layer: 0,
            source: EncodeError::Kind(tch::Kind::Int8),
        };
        assert_eq!(encode.failed_rows(), None);
        let (error, failed) = GenerationError::of_step(StepError::Experts {
            layer: 0,
            failed: Failed::All,
            source: encode,
        });
        assert!(matches!(
            error,
            GenerationError::Dispatch(DispatchError::Encode { .. })
        ));
        assert_eq!(failed, Failed::All);
        // The model's own failure, and in-process experts', fail the step.
        let (error, failed) = GenerationError::of_step(StepError::<DispatchError>::Forward(
            ForwardError::TokenOutOfRange {
                id: 40000,
                vocab_size: 32000,
            },
        ));
        assert_eq!(failed, Failed::All);
        assert_eq!(
            tramontane_infra::error::chain(&error),
            "the forward step failed: token id 40000 is outside the vocabulary of 32000"
        );
        let (error, failed) = GenerationError::of_step(StepError::Experts {
            layer: 2,
            failed: Failed::All,
            source: ForwardError::ExpertNotHeld {
                layer: 2,
                expert: 5,
            },
        });
        assert_eq!(failed, Failed::All);
        assert!(matches!(
            error,
            GenerationError::Forward(ForwardError::ExpertNotHeld {
                layer: 2,
                expert: 5
            })
        ));
    }
}
