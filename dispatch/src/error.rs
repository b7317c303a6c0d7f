//! What goes wrong dispatching a layer to its workers, typed: a Forward
//! that failed ([`WorkerFailure`]: its worker and how), and why a layer's
//! experts could not be computed ([`DispatchError`], the error of
//! [`crate::RemoteExperts`] at the model's `Experts` seam). The router maps
//! each kind once to an HTTP status and a gRPC code.

use std::time::Duration;

use tramontane_infra::grpc::code_name;
use tramontane_model::experts::ExpertsError;
use tramontane_proto::codec::CodecError;

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
        /// experts' input (the model fails the sequences holding them).
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
    /// The layer's input could not be read to the host, or its output
    /// made a tensor (libtorch failed): HTTP 500, gRPC INTERNAL.
    #[error("layer {layer}: the hidden states could not be moved to or from the host")]
    Tensor {
        layer: usize,
        #[source]
        source: tch::TchError,
    },
}

/// Only the tokens routed to an expert without a live worker fail.
impl ExpertsError for DispatchError {
    fn failed_rows(&self) -> Option<&[usize]> {
        match self {
            DispatchError::NoLiveReplica { tokens, .. } => Some(tokens),
            _ => None,
        }
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
    /// The worker does not hold these experts of the layer (NOT_FOUND with
    /// [`tramontane_proto::NOT_HELD_METADATA`]): it is alive, its holdings
    /// changed.
    #[error("NOT_FOUND: {message}")]
    NotHeld {
        experts: Vec<usize>,
        message: String,
    },
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
            WorkerError::NotHeld { .. } => "NOT_FOUND",
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
mod tests {
    use super::*;

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
