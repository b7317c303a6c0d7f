//! One Forward to one worker: sent with its deadline as a task on the data
//! path's runtime, tried once more when its connection broke, and its
//! answer checked against what was sent before it is added back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::Channel;
use tracing::Instrument;
use tramontane_config::Dtype;
use tramontane_proto::codec;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ForwardRequest, ForwardResponse, TensorPayload};

use crate::error::{BadAnswer, WorkerError};
use crate::phases::{DispatchPhases, Phase, Volume};
use tramontane_proto::NOT_HELD_METADATA;

/// One Forward ready to go, owning what it needs: it runs as a task on the
/// data path's runtime. Cloning it is cheap (the rows are shared bytes).
#[derive(Clone)]
pub(crate) struct Forward {
    pub(crate) worker: usize,
    pub(crate) client: ExpertServiceClient<Channel>,
    pub(crate) request: ForwardRequest,
    /// The request's dtype, which the answer must have.
    pub(crate) wire: Dtype,
    pub(crate) rows: usize,
    pub(crate) hidden: i64,
    pub(crate) deadline: Duration,
    pub(crate) phases: Arc<DispatchPhases>,
    /// `dispatch`, made where the layer started (so its parent is the step's span).
    pub(crate) span: tracing::Span,
}

impl Forward {
    /// Sends it with its deadline; returns the checked answer (`[rows,
    /// hidden]`). Its round trip and failures go to its worker's metrics.
    pub(crate) async fn send(self) -> Result<TensorPayload, WorkerError> {
        let started = Instant::now();
        let span = self.span.clone();
        let worker = self.worker.to_string();
        let mut result = self.clone().send_once().instrument(span.clone()).await;
        if matches!(&result, Err(e) if e.is_connection()) {
            // A connection that broke (the worker was restarted, something
            // between reset it) is made again by the next call: one more
            // try before the worker is given up on.
            result = self.send_once().instrument(span.clone()).await;
        }
        if let Err(e) = &result {
            span.record("error", tramontane_infra::error::chain(e).as_str());
        }
        metrics::histogram!(crate::metrics::DISPATCH_LATENCY, "worker" => worker.clone())
            .record(started.elapsed());
        if let Err(e) = &result {
            metrics::counter!(crate::metrics::DISPATCH_ERRORS_TOTAL, "worker" => worker, "code" => e.code_label())
                .increment(1);
        }
        result
    }

    async fn send_once(self) -> Result<TensorPayload, WorkerError> {
        let Forward {
            worker,
            mut client,
            request,
            wire,
            rows,
            hidden,
            deadline,
            phases,
            ..
        } = self;
        let started = Instant::now();
        let sent = Sent {
            dispatch_id: request.dispatch_id,
            dtype: wire,
        };
        let sent_bytes = request.encoded_len() as u64;
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline);
        tramontane_infra::trace_context::inject(request.metadata_mut());
        let response = tokio::time::timeout(deadline, client.forward(request))
            .await
            .map_err(|_| WorkerError::Deadline(deadline))?
            .map_err(worker_error)?
            .into_inner();
        let answered = Instant::now();
        phases.record_forward(answered - started, response.timings.as_ref());
        record_bytes(&phases, worker, sent_bytes, response.encoded_len() as u64);
        let output = check_answer(response, &sent, rows, hidden).map_err(WorkerError::BadAnswer)?;
        phases.record(Phase::Decode, answered.elapsed());
        Ok(output)
    }
}

/// A worker's gRPC error: NOT_FOUND naming the experts it does not hold is
/// [`WorkerError::NotHeld`].
fn worker_error(status: tonic::Status) -> WorkerError {
    let not_held = (status.code() == tonic::Code::NotFound)
        .then(|| status.metadata().get(NOT_HELD_METADATA)?.to_str().ok())
        .flatten()
        .and_then(|list| {
            list.split(',')
                .map(|e| e.trim().parse::<usize>().ok())
                .collect::<Option<Vec<usize>>>()
        })
        .filter(|experts| !experts.is_empty());
    match not_held {
        Some(experts) => WorkerError::NotHeld {
            experts,
            message: status.message().to_string(),
        },
        None => WorkerError::Status {
            code: status.code(),
            message: status.message().to_string(),
        },
    }
}

/// A Forward's messages, each way, to the running totals and the metrics.
fn record_bytes(phases: &DispatchPhases, worker: usize, sent: u64, received: u64) {
    phases.add(Volume::SentBytes, sent);
    phases.add(Volume::ReceivedBytes, received);
    let worker = worker.to_string();
    metrics::counter!(crate::metrics::DISPATCH_BYTES_TOTAL, "worker" => worker.clone(), "direction" => "sent")
        .increment(sent);
    metrics::counter!(crate::metrics::DISPATCH_BYTES_TOTAL, "worker" => worker, "direction" => "received")
        .increment(received);
}

/// What an answer must match of its request.
struct Sent {
    dispatch_id: u64,
    dtype: Dtype,
}

/// The answer's output, once it is for this dispatch, in the request's
/// dtype and shape, and finite: a worker that answers otherwise (a bug, a
/// corrupted link, a diverged computation) fails over as a bad answer
/// rather than poisoning the residual stream.
fn check_answer(
    response: ForwardResponse,
    sent: &Sent,
    rows: usize,
    hidden: i64,
) -> Result<TensorPayload, BadAnswer> {
    if response.dispatch_id != sent.dispatch_id {
        return Err(BadAnswer::DispatchId {
            answered: response.dispatch_id,
            sent: sent.dispatch_id,
        });
    }
    let (dtype, shape) = codec::validate(response.output.as_ref(), "output", 2)?;
    if dtype != sent.dtype {
        return Err(BadAnswer::Dtype {
            answered: dtype,
            sent: sent.dtype,
        });
    }
    if shape != [rows as i64, hidden] {
        return Err(BadAnswer::Shape {
            answered: shape,
            rows,
            hidden,
        });
    }
    let output = response.output.unwrap_or_default();
    if let Some(index) = codec::first_non_finite(&output, dtype) {
        return Err(BadAnswer::NonFinite { index });
    }
    Ok(output)
}

pub(crate) type Answer = tokio::task::JoinHandle<Result<TensorPayload, WorkerError>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_another_dispatch_dtype_shape_or_with_nan_are_bad() {
        let payload =
            |values: &[f32], dtype: Dtype| codec::encode_rows(values, 2, &[0, 1], dtype).unwrap();
        let answer = |dispatch_id, output| ForwardResponse {
            dispatch_id,
            output: Some(output),
            timings: None,
        };
        let sent = Sent {
            dispatch_id: 7,
            dtype: Dtype::Bf16,
        };
        let good = payload(&[1.0, 2.0, 3.0, 4.0], Dtype::Bf16);
        assert_eq!(
            check_answer(answer(7, good.clone()), &sent, 2, 2).unwrap(),
            good
        );
        let bad = |response, rows| check_answer(response, &sent, rows, 2).unwrap_err();
        assert!(matches!(
            bad(answer(8, good.clone()), 2),
            BadAnswer::DispatchId {
                answered: 8,
                sent: 7
            }
        ));
        assert!(matches!(
            bad(answer(7, payload(&[1.0; 4], Dtype::F32)), 2),
            BadAnswer::Dtype {
                answered: Dtype::F32,
                sent: Dtype::Bf16
            }
        ));
        assert!(matches!(
            bad(answer(7, good), 3),
            BadAnswer::Shape { rows: 3, .. }
        ));
        for value in [f32::NAN, f32::INFINITY] {
            let poisoned = payload(&[1.0, 2.0, 3.0, value], Dtype::Bf16);
            assert!(matches!(
                bad(answer(7, poisoned), 2),
                BadAnswer::NonFinite { index: 3 }
            ));
        }
    }
}
