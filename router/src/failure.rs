//! What goes wrong on the data path, typed: a request refused before it
//! runs, and a generation that fails after it was accepted. A failure is
//! built where it happens (validation, the queue, the dispatch to a worker,
//! the engine), travels unchanged through the engine's events, and is mapped
//! once at each edge: to an HTTP status in [`crate::http`] (`ApiError`), to
//! a gRPC code in [`crate::service`]. Causes are kept as `source()` chains;
//! a client reads the whole chain ([`tramontane_infra::error::chain`]).

use std::time::Duration;

use tramontane_infra::grpc::code_name;
use tramontane_model::ForwardError;
use tramontane_proto::codec::CodecError;

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
    /// The experts of a layer could not be computed: see [`DispatchError`].
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The router's own part of the step failed: HTTP 500, gRPC INTERNAL.
    #[error("the forward step failed")]
    Forward(#[source] ForwardError),
}

impl GenerationError {
    /// The rows of the failed step routed to an expert without a live
    /// worker: only the sequences that fed them need fail. Empty for any
    /// other failure (which every sequence of the step shares).
    pub fn stranded_rows(&self) -> &[usize] {
        match self {
            GenerationError::Dispatch(DispatchError::NoLiveReplica { tokens, .. }) => tokens,
            _ => &[],
        }
    }
}

impl From<ForwardError> for GenerationError {
    /// A dispatch failure comes out of the model as the source of
    /// [`ForwardError::Experts`]; it is unwrapped by type, and the token
    /// rows it names (counted in its micro-batch) become rows of the step.
    fn from(error: ForwardError) -> Self {
        match error {
            ForwardError::Experts {
                layer,
                first_row,
                source,
            } => match source.downcast::<DispatchError>() {
                Ok(dispatch) => GenerationError::Dispatch((*dispatch).offset_rows(first_row)),
                Err(source) => GenerationError::Forward(ForwardError::Experts {
                    layer,
                    first_row,
                    source,
                }),
            },
            other => GenerationError::Forward(other),
        }
    }
}

/// A worker as failures name it: its index and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRef {
    pub index: usize,
    pub addr: String,
}

impl std::fmt::Display for WorkerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} at {}", self.index, self.addr)
    }
}

/// Why a layer's experts could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No live worker holds (layer, expert) — the workers placed there are
    /// down or failed during this dispatch (`failures`): HTTP 503, gRPC
    /// UNAVAILABLE (the request may succeed once a worker is back). Only
    /// the sequences of `tokens` fail; the others' step is run again.
    #[error(
        "layer {layer} expert {expert} has no live worker (placed on {}){}",
        list(placed_on),
        failures.iter().map(|f| format!("; {}", tramontane_infra::error::chain(f))).collect::<String>()
    )]
    NoLiveReplica {
        layer: usize,
        expert: usize,
        placed_on: Vec<WorkerRef>,
        /// Every token row of the layer routed to an expert with no live
        /// worker (`expert` or another), sorted, each once: rows of the
        /// experts' input in the dispatch, rows of the step once out of the
        /// model (see [`GenerationError::from`]).
        tokens: Vec<usize>,
        /// The Forwards that failed in this dispatch, in order.
        failures: Vec<WorkerFailure>,
    },
    /// The hidden states could not be put on the wire (a bug): HTTP 500,
    /// gRPC INTERNAL.
    #[error("layer {layer}: cannot encode the hidden states")]
    Encode {
        layer: usize,
        #[source]
        source: EncodeError,
    },
    /// A checked answer could not be added back (a bug): HTTP 500, gRPC
    /// INTERNAL.
    #[error("layer {layer}: cannot add a worker's answer")]
    Combine {
        layer: usize,
        #[source]
        source: CodecError,
    },
}

impl DispatchError {
    /// The failure of experts whose input started at row `first_row` of
    /// the step, its rows counted in the step.
    fn offset_rows(mut self, first_row: usize) -> Self {
        if let DispatchError::NoLiveReplica { tokens, .. } = &mut self {
            tokens.iter_mut().for_each(|row| *row += first_row);
        }
        self
    }
}

/// Why hidden states could not be put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The model computes in a libtorch kind the wire has no dtype for.
    #[error("tensor of kind {0:?} cannot be sent")]
    Kind(tch::Kind),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

fn list(workers: &[WorkerRef]) -> String {
    workers
        .iter()
        .map(WorkerRef::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One Forward that failed: the worker is taken out of the dispatch and its
/// share goes to other replicas.
#[derive(Debug, thiserror::Error)]
#[error("{worker} failed")]
pub struct WorkerFailure {
    pub worker: WorkerRef,
    #[source]
    pub error: WorkerError,
}

/// How a Forward failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker (or the connection to it) answered with a gRPC error.
    #[error("{code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    /// No answer within the dispatch deadline.
    #[error("no answer within {0:?} (DEADLINE_EXCEEDED)")]
    Deadline(Duration),
    /// An answer that does not fit the request.
    #[error("bad answer")]
    BadAnswer(#[source] BadAnswer),
}

impl WorkerError {
    /// The connection failed rather than the worker: refused, reset, or
    /// broken since the last call (UNAVAILABLE, or UNKNOWN from the transport).
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            WorkerError::Status {
                code: tonic::Code::Unavailable | tonic::Code::Unknown,
                ..
            }
        )
    }

    /// The metrics label: the gRPC code name, or what went wrong instead.
    pub fn code_label(&self) -> &'static str {
        match self {
            WorkerError::Status { code, .. } => code_name(*code),
            WorkerError::Deadline(_) => "DEADLINE_EXCEEDED",
            WorkerError::BadAnswer(_) => "BAD_ANSWER",
        }
    }
}

/// What is wrong with a worker's answer.
#[derive(Debug, thiserror::Error)]
pub enum BadAnswer {
    #[error(transparent)]
    Payload(#[from] CodecError),
    #[error("answered shape {answered:?} for {rows} rows of width {hidden}")]
    Shape {
        answered: Vec<i64>,
        rows: usize,
        hidden: i64,
    },
    #[error("answered dtype {answered:?} to a request in {sent:?}")]
    Dtype {
        answered: tramontane_config::Dtype,
        sent: tramontane_config::Dtype,
    },
    #[error("answered dispatch {answered} to dispatch {sent}")]
    DispatchId { answered: u64, sent: u64 },
    #[error("value {index} of the answer is not finite (NaN or infinite)")]
    NonFinite { index: usize },
}

#[cfg(test)]
pub(crate) mod examples {
    //! One value of every failure kind, for the edges' tests.

    use super::*;

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

    #[test]
    fn a_dispatch_failure_comes_out_of_the_model_as_itself_its_rows_in_the_step() {
        let dispatch = DispatchError::NoLiveReplica {
            layer: 0,
            expert: 1,
            placed_on: vec![examples::worker(0)],
            tokens: vec![0, 3],
            failures: vec![],
        };
        // From the micro-batch whose rows start at row 5 of the step.
        let from_model = ForwardError::Experts {
            layer: 0,
            first_row: 5,
            source: Box::new(dispatch),
        };
        let error = GenerationError::from(from_model);
        assert!(matches!(
            error,
            GenerationError::Dispatch(DispatchError::NoLiveReplica { expert: 1, .. })
        ));
        assert_eq!(error.stranded_rows(), [5, 8]);
        let encode = ForwardError::experts(
            0,
            DispatchError::Encode {
                layer: 0,
                source: EncodeError::Kind(tch::Kind::Int8),
            },
        );
        assert!(GenerationError::from(encode).stranded_rows().is_empty());
        // Another experts implementation's error stays a forward failure.
        let other = ForwardError::experts(2, std::io::Error::other("disk"));
        let error = GenerationError::from(other);
        assert!(error.stranded_rows().is_empty());
        assert!(matches!(
            error,
            GenerationError::Forward(ForwardError::Experts { layer: 2, .. })
        ));
        assert_eq!(
            tramontane_infra::error::chain(&error),
            "the forward step failed: experts failed on layer 2: disk"
        );
    }

    #[test]
    fn worker_errors_are_labelled_by_code() {
        let status = WorkerError::Status {
            code: tonic::Code::NotFound,
            message: "x".into(),
        };
        assert_eq!(status.code_label(), "NOT_FOUND");
        assert_eq!(
            WorkerError::Deadline(Duration::from_millis(1)).code_label(),
            "DEADLINE_EXCEEDED"
        );
    }
}
