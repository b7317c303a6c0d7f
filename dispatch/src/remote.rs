//! Dispatch and combine: one MoE layer's routed tokens go to the workers that
//! hold their experts — one Forward per involved worker, all concurrently —
//! and their weighted partial sums are added back per token. A replicated
//! expert's tokens go to its least-loaded live replica; when a worker fails,
//! its share is planned again over the remaining live replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tokio::runtime::Runtime;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;
use tramontane_model::error::ForwardError;
use tramontane_model::gating::Routing;
use tramontane_model::moe::{Experts, InFlight};
use tramontane_policy::dispatch_plan::{RoutedPair, WorkerShare, plan_dispatch};
use tramontane_policy::placement::Placement;
use tramontane_policy::routing_trace::RoutingTrace;
use tramontane_config::Dtype;
use tramontane_proto::codec::{self, CodecError};
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ExpertRows, ForwardRequest, ForwardResponse, TensorPayload};

use crate::cluster::ClusterError;
use crate::dispatch_phases::{DispatchPhases, Phase};
use crate::expert_load::ExpertLoad;
use crate::failure::{
    BadAnswer, DispatchError, EncodeError, WorkerError, WorkerFailure, WorkerRef,
};

/// All pairs of a routing, token by token.
pub fn routed_pairs(routing: &Routing) -> Vec<RoutedPair> {
    routing
        .experts
        .iter()
        .zip(&routing.weights)
        .enumerate()
        .map(|(i, (&expert, &weight))| RoutedPair {
            token: i / routing.k.max(1),
            expert,
            weight,
        })
        .collect()
}

/// Adds a worker's answer (`[share rows, hidden]`) into `out`, the host
/// `[tokens, hidden]` output kept in `precision`.
pub fn combine(
    out: &mut [f32],
    hidden: usize,
    share: &WorkerShare,
    answer: &TensorPayload,
    precision: Dtype,
) -> Result<(), CodecError> {
    codec::add_rows(
        Some(answer),
        "output",
        &token_rows(share),
        hidden,
        out,
        precision,
    )
}

/// The rows of a share's tokens in the layer's `[tokens, hidden]` matrix.
fn token_rows(share: &WorkerShare) -> Vec<usize> {
    share.tokens.iter().map(|&t| t as usize).collect()
}

/// A worker as the router sees it. `client` is for probes and runs on the
/// runtime that connected; the data path makes its own clients from
/// `endpoint` (see [`DataPath`]).
pub struct WorkerLink {
    pub addr: String,
    pub client: ExpertServiceClient<Channel>,
    pub endpoint: Endpoint,
    pub max_message_bytes: usize,
    pub live: AtomicBool,
}

/// The data path's own connections to the workers, on a single-threaded
/// runtime that the engine thread drives itself while it waits for a layer:
/// sending a Forward and reading its answer hand nothing to another thread
/// (each hand-off costs a thread wake-up, tens of µs on a busy host). While
/// no layer is in flight the connections sit idle; probes use the links'
/// own clients on the server's runtime.
struct DataPath {
    /// Always Some until drop.
    runtime: Option<Runtime>,
    clients: Vec<ExpertServiceClient<Channel>>,
}

impl DataPath {
    fn new(workers: &[WorkerLink]) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let clients = {
            let _entered = runtime.enter();
            workers
                .iter()
                .map(|w| crate::cluster::client(&w.endpoint, w.max_message_bytes))
                .collect()
        };
        Ok(Self {
            runtime: Some(runtime),
            clients,
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime().block_on(future)
    }

    /// Starts `task`; it runs whenever the engine thread drives the runtime.
    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(task)
    }

    /// Runs the runtime until what was just spawned has been written out:
    /// a few turns (the call, tonic's buffer task, the HTTP/2 connection's
    /// task each take one; a turn with nothing to do costs about a µs).
    fn push_out(&self) {
        const TURNS: usize = 4;
        self.block_on(async {
            for _ in 0..TURNS {
                tokio::task::yield_now().await;
            }
        });
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        // Also safe where the experts are dropped inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The experts of a model, reached over gRPC.
pub struct RemoteExperts {
    workers: Arc<Vec<WorkerLink>>,
    placement: Placement,
    data: DataPath,
    deadline: Duration,
    wire: Dtype,
    next_dispatch: AtomicU64,
    load: Arc<ExpertLoad>,
    trace: Option<RoutingTrace>,
    phases: Arc<DispatchPhases>,
    micro_batches: MicroBatches,
}

impl RemoteExperts {
    pub fn new(
        workers: Arc<Vec<WorkerLink>>,
        placement: Placement,
        deadline: Duration,
        wire: Dtype,
    ) -> Result<Self, ClusterError> {
        let experts = placement.experts.first().map_or(0, Vec::len);
        let load = Arc::new(ExpertLoad::new(
            placement.experts.len(),
            experts,
            workers.len(),
        ));
        let data = DataPath::new(&workers).map_err(ClusterError::Runtime)?;
        Ok(Self {
            workers,
            placement,
            data,
            deadline,
            wire,
            next_dispatch: AtomicU64::new(1),
            load,
            trace: None,
            phases: Arc::default(),
            micro_batches: MicroBatches::Auto,
        })
    }

    /// The experts on running workers at `addrs`, checked to serve the model
    /// in `model_dir` and to hold what `placement` gives them (waiting up to
    /// 300 s for them to answer); hidden states cross the wire as `wire`.
    pub async fn connect(
        model_dir: &std::path::Path,
        addrs: &[String],
        placement: Placement,
        deadline: Duration,
        wire: Dtype,
    ) -> Result<Self, ClusterError> {
        let model_id = tramontane_config::model_id(model_dir)?;
        let links = crate::cluster::connect(
            addrs,
            &model_id,
            &placement,
            Duration::from_secs(300),
            tramontane_infra::grpc::DEFAULT_MAX_MESSAGE_BYTES,
            None,
        )
        .await?;
        Self::new(links, placement, deadline, wire)
    }

    /// Records every layer's routing into `trace`.
    pub fn with_trace(mut self, trace: RoutingTrace) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Splits steps into micro-batches as `micro_batches` says.
    pub fn with_micro_batches(mut self, micro_batches: MicroBatches) -> Self {
        self.micro_batches = micro_batches;
        self
    }

    /// The load this dispatcher records, for `/v1/experts/stats`.
    pub fn load(&self) -> Arc<ExpertLoad> {
        self.load.clone()
    }

    /// The running times of each dispatch phase.
    pub fn phases(&self) -> Arc<DispatchPhases> {
        self.phases.clone()
    }

    fn worker_ref(&self, index: usize) -> WorkerRef {
        WorkerRef {
            index,
            addr: self.workers[index].addr.clone(),
        }
    }

    /// A worker's request: its share's rows of `xs` (the host copy of the
    /// layer's `[tokens, hidden]` input) in the wire dtype.
    fn request(
        &self,
        layer: usize,
        xs: &[f32],
        hidden: usize,
        share: &WorkerShare,
    ) -> Result<ForwardRequest, ForwardError> {
        let started = Instant::now();
        let hidden_rows = codec::encode_rows(xs, hidden, &token_rows(share), self.wire)
            .map_err(|source| {
                experts_failed(DispatchError::Encode {
                    layer,
                    source: source.into(),
                })
            })?;
        self.phases.record(Phase::Encode, started.elapsed());
        Ok(ForwardRequest {
            dispatch_id: self.next_dispatch.fetch_add(1, Ordering::Relaxed),
            layer: layer as u32,
            hidden: Some(hidden_rows),
            experts: share
                .experts
                .iter()
                .map(|(&expert, (rows, weights))| ExpertRows {
                    expert: expert as u32,
                    rows: rows.clone(),
                    weights: weights.clone(),
                })
                .collect(),
        })
    }
}

/// `xs` `[tokens, hidden]` as host f32 values, row-major.
fn host_rows(xs: &Tensor) -> Result<Vec<f32>, ForwardError> {
    let host = xs
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    Ok(Vec::<f32>::try_from(host.f_flatten(0, -1)?)?)
}

/// A dispatch failure as the model's error: the engine takes it back out.
fn experts_failed(error: DispatchError) -> ForwardError {
    let layer = match &error {
        DispatchError::NoLiveReplica { layer, .. }
        | DispatchError::Encode { layer, .. }
        | DispatchError::Combine { layer, .. } => *layer,
    };
    ForwardError::experts(layer, error)
}

/// The tokens of a layer whose routing is `routed` (the expert of every
/// pair, `k` per token) that are routed to an expert no live worker holds,
/// sorted, each once. Every pair of the layer counts, not only those being
/// planned: the tokens a failed worker's share did not hold route there
/// again when their step is retried.
fn stranded_tokens(
    placement: &Placement,
    layer: usize,
    routed: &[usize],
    k: usize,
    live: &dyn Fn(usize) -> bool,
) -> Vec<usize> {
    let lost: Vec<bool> = placement.experts[layer]
        .iter()
        .map(|workers| !workers.iter().any(|&w| live(w)))
        .collect();
    let mut tokens: Vec<usize> = routed
        .iter()
        .enumerate()
        .filter(|&(_, &expert)| lost.get(expert).copied().unwrap_or(true))
        .map(|(pair, _)| pair / k.max(1))
        .collect();
    tokens.dedup(); // pairs come token by token
    tokens
}

/// One Forward ready to go, owning what it needs: it runs as a task on the
/// data path's runtime. Cloning it is cheap (the rows are shared bytes).
#[derive(Clone)]
struct Forward {
    worker: usize,
    client: ExpertServiceClient<Channel>,
    request: ForwardRequest,
    /// The request's dtype, which the answer must have.
    wire: Dtype,
    rows: usize,
    hidden: i64,
    deadline: Duration,
    phases: Arc<DispatchPhases>,
    /// `dispatch`, made where the layer started (so its parent is the step's span).
    span: tracing::Span,
}

impl Forward {
    /// Sends it with its deadline; returns the checked answer (`[rows,
    /// hidden]`). Its round trip and failures go to its worker's metrics.
    async fn send(self) -> Result<TensorPayload, WorkerError> {
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
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline);
        tramontane_infra::trace_context::inject(request.metadata_mut());
        let response = tokio::time::timeout(deadline, client.forward(request))
            .await
            .map_err(|_| WorkerError::Deadline(deadline))?
            .map_err(|status| WorkerError::Status {
                code: status.code(),
                message: status.message().to_string(),
            })?
            .into_inner();
        let answered = Instant::now();
        phases.record_forward(answered - started, response.timings.as_ref());
        let output = check_answer(response, &sent, rows, hidden).map_err(WorkerError::BadAnswer)?;
        phases.record(Phase::Decode, answered.elapsed());
        Ok(output)
    }
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

type Answer = tokio::task::JoinHandle<Result<TensorPayload, WorkerError>>;

/// A layer's dispatch between its start and its finish.
struct LayerDispatch {
    layer: usize,
    /// The engine thread's time in this layer's start and finish so far.
    engine: Duration,
    /// The layer's input `[tokens, hidden]` on the host, f32.
    host: Vec<f32>,
    tokens: i64,
    hidden: i64,
    kind: Kind,
    device: tch::Device,
    /// The dtype the output is summed in: the layer input's.
    precision: Dtype,
    /// The output being summed, `[tokens, hidden]`.
    out: Vec<f32>,
    /// The expert of every routed pair, token by token (`k` per token).
    routed: Vec<usize>,
    k: usize,
    worker_pairs: Vec<u64>,
    failures: Vec<WorkerFailure>,
    /// The Forwards out now, with their shares.
    out_now: Vec<(WorkerShare, Answer)>,
}

impl RemoteExperts {
    /// Plans `pairs` over the live workers and sends each worker its share.
    fn launch(&self, d: &mut LayerDispatch, pairs: &[RoutedPair]) -> Result<(), ForwardError> {
        let layer = d.layer;
        let live = |w: usize| self.workers[w].live.load(Ordering::Relaxed);
        let shares = plan_dispatch(layer, pairs, &self.placement, &live).map_err(|u| {
            experts_failed(DispatchError::NoLiveReplica {
                layer: u.layer,
                expert: u.expert,
                placed_on: self
                    .placement
                    .replicas(u.layer, u.expert)
                    .iter()
                    .map(|&w| self.worker_ref(w))
                    .collect(),
                tokens: stranded_tokens(&self.placement, layer, &d.routed, d.k, &live),
                failures: std::mem::take(&mut d.failures),
            })
        })?;
        for share in shares {
            let request = self.request(layer, &d.host, d.hidden as usize, &share)?;
            let span = tracing::info_span!(
                "dispatch",
                worker = share.worker,
                worker.addr = %self.workers[share.worker].addr,
                layer,
                rows = share.tokens.len(),
                error = tracing::field::Empty,
            );
            let forward = Forward {
                worker: share.worker,
                client: self.data.clients[share.worker].clone(),
                request,
                wire: self.wire,
                rows: share.tokens.len(),
                hidden: d.hidden,
                deadline: self.deadline,
                phases: self.phases.clone(),
                span,
            };
            d.out_now.push((share, self.data.spawn(forward.send())));
        }
        self.data.push_out();
        Ok(())
    }

    /// Waits for the Forwards out now and adds their answers; returns the
    /// pairs of the workers that failed, marked down.
    fn collect(&self, d: &mut LayerDispatch) -> Result<Vec<RoutedPair>, ForwardError> {
        let layer = d.layer;
        let waiting = Instant::now();
        let (shares, answers): (Vec<_>, Vec<_>) =
            std::mem::take(&mut d.out_now).into_iter().unzip();
        let results = self.data.block_on(futures::future::join_all(answers));
        self.phases.record(Phase::Wait, waiting.elapsed());
        let mut retry = Vec::new();
        for (share, result) in shares.iter().zip(results) {
            let result = result.unwrap_or_else(|e| {
                Err(WorkerError::Status {
                    code: tonic::Code::Internal,
                    message: format!("the dispatch task ended: {e}"),
                })
            });
            match result {
                Ok(answer) => {
                    let combining = Instant::now();
                    combine(&mut d.out, d.hidden as usize, share, &answer, d.precision).map_err(
                        |source| experts_failed(DispatchError::Combine { layer, source }),
                    )?;
                    self.phases.record(Phase::Combine, combining.elapsed());
                    d.worker_pairs[share.worker] += share.pairs.len() as u64;
                }
                Err(error) => {
                    self.workers[share.worker]
                        .live
                        .store(false, Ordering::Relaxed);
                    metrics::gauge!(crate::metrics::WORKER_UP, "worker" => share.worker.to_string())
                        .set(0.0);
                    d.failures.push(WorkerFailure {
                        worker: self.worker_ref(share.worker),
                        error,
                    });
                    retry.extend_from_slice(&share.pairs);
                }
            }
        }
        Ok(retry)
    }
}

impl Experts for RemoteExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        let in_flight = self.start(layer, xs, routing)?;
        self.finish(in_flight)
    }

    /// Sends every worker its share of the layer and returns once the
    /// requests are on their way.
    fn start(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<InFlight, ForwardError> {
        let started = Instant::now();
        let (tokens, hidden) = (xs.size()[0], xs.size()[1]);
        let host = host_rows(xs)?;
        let precision = tramontane_model::dtype::dtype(xs.kind()).ok_or_else(|| {
            experts_failed(DispatchError::Encode {
                layer,
                source: EncodeError::Kind(xs.kind()),
            })
        })?;
        let pairs = routed_pairs(routing);
        let routed: Vec<usize> = pairs.iter().map(|p| p.expert).collect();
        if let Some(trace) = &self.trace {
            trace.record(layer, routing.k, &routed);
        }
        let mut d = LayerDispatch {
            layer,
            engine: Duration::ZERO,
            out: vec![0f32; host.len()],
            host,
            tokens,
            hidden,
            kind: xs.kind(),
            device: xs.device(),
            precision,
            routed,
            k: routing.k,
            worker_pairs: vec![0u64; self.workers.len()],
            failures: Vec::new(),
            out_now: Vec::new(),
        };
        self.launch(&mut d, &pairs)?;
        d.engine += started.elapsed();
        Ok(InFlight::Started(Box::new(d)))
    }

    /// Waits for the layer's answers, sending a failed worker's pairs again
    /// to live replicas, and sums them.
    fn finish(&self, in_flight: InFlight) -> Result<Tensor, ForwardError> {
        let started = Instant::now();
        let mut d = match in_flight {
            InFlight::Started(state) => state
                .downcast::<LayerDispatch>()
                .map_err(|_| ForwardError::NotStartedHere)?,
            InFlight::Done(_) => return Err(ForwardError::NotStartedHere),
        };
        loop {
            let retry = self.collect(&mut d)?;
            if retry.is_empty() {
                break;
            }
            self.launch(&mut d, &retry)?;
        }
        self.load.record(d.layer, &d.routed, &d.worker_pairs);
        let out = Tensor::f_from_slice(&d.out)?
            .f_view([d.tokens, d.hidden])?
            .f_to_kind(d.kind)?
            .f_to_device(d.device)?;
        self.phases
            .record(Phase::Layer, d.engine + started.elapsed());
        Ok(out)
    }

    fn micro_batches(&self, sequences: usize, tokens: usize) -> usize {
        self.micro_batches.groups(sequences, tokens)
    }
}

/// Into how many micro-batches a step splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatches {
    /// 2 for steps of at least [`MicroBatches::AUTO_FROM_TOKENS`] tokens
    /// (and 2 sequences), else 1.
    Auto,
    /// This many (at most one per sequence).
    Fixed(usize),
}

impl std::str::FromStr for MicroBatches {
    type Err = String;

    /// `auto` or a count of at least 1.
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(MicroBatches::Auto);
        }
        match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(MicroBatches::Fixed(n)),
            _ => Err(format!(
                "{text:?} is neither auto nor a count of at least 1"
            )),
        }
    }
}

impl MicroBatches {
    /// Under `Auto`, steps of fewer tokens run as one batch. Each
    /// micro-batch reads every routed expert's weights again: at decode
    /// sizes (a few rows per expert, bound by memory) that costs more than
    /// the overlap hides (on the `bench` model, decode batch 32 fell from
    /// 157 to 114 tokens/s with 2). From a few hundred tokens (prefill) the
    /// experts' GEMMs are bound by compute and a split costs little.
    pub const AUTO_FROM_TOKENS: usize = 256;

    pub fn groups(self, sequences: usize, tokens: usize) -> usize {
        match self {
            MicroBatches::Auto if tokens >= Self::AUTO_FROM_TOKENS && sequences >= 2 => 2,
            MicroBatches::Auto => 1,
            MicroBatches::Fixed(n) => n.clamp(1, sequences.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;
    use tramontane_model::expert::Expert;
    use tramontane_model::gating::route_logits;
    use tramontane_model::moe::{ExpertRows as LocalRows, LocalExperts};

    const HIDDEN: i64 = 8;
    const INTERMEDIATE: i64 = 16;

    fn experts(count: usize, seed: i64) -> LocalExperts {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let layer = (0..count)
            .map(|_| {
                // Unit-variance activations, as in a real model.
                let h = 1.0 / (HIDDEN as f64).sqrt();
                let i = 1.0 / (INTERMEDIATE as f64).sqrt();
                Some(Expert::new(
                    Tensor::randn([INTERMEDIATE, HIDDEN], opts) * h,
                    Tensor::randn([HIDDEN, INTERMEDIATE], opts) * i,
                    Tensor::randn([INTERMEDIATE, HIDDEN], opts) * h,
                ))
            })
            .collect();
        LocalExperts::from_experts(vec![layer])
    }

    /// What a worker answers for a share: its experts on its gathered rows,
    /// on the wire (in f32).
    fn worker_answer(local: &LocalExperts, xs: &Tensor, share: &WorkerShare) -> TensorPayload {
        let gathered = xs.index_select(0, &Tensor::from_slice(&share.tokens));
        let work: Vec<LocalRows> = share
            .experts
            .iter()
            .map(|(&expert, (rows, weights))| LocalRows {
                expert,
                rows: rows.iter().map(|&r| r as usize).collect(),
                weights: weights.clone(),
            })
            .collect();
        let out = local.forward_rows(0, &gathered, &work).unwrap();
        let host = host_rows(&out).unwrap();
        let rows: Vec<usize> = (0..share.tokens.len()).collect();
        codec::encode_rows(&host, HIDDEN as usize, &rows, Dtype::F32).unwrap()
    }

    fn case() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<Vec<bool>>, Vec<bool>, i64)>
    {
        (1usize..24, 2usize..9, 1usize..5).prop_flat_map(|(tokens, num_experts, workers)| {
            (
                Just(tokens),
                Just(num_experts),
                1..=num_experts,
                Just(workers),
                proptest::collection::vec(
                    proptest::collection::vec(any::<bool>(), workers),
                    num_experts,
                ),
                proptest::collection::vec(any::<bool>(), workers),
                any::<i64>(),
            )
        })
    }

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

    #[test]
    fn stranded_tokens_are_every_token_routed_to_an_expert_without_a_live_worker() {
        // Expert e on worker e mod 2, expert 2 also on worker 1; worker 1 down.
        let mut placement = Placement::round_robin(1, 4, 2).unwrap();
        placement.experts[0][2] = vec![0, 1];
        let live = |w: usize| w == 0;
        // Top-2 of 5 tokens: 1 and 3 are lost, 2 lives on worker 0.
        let routed = [0, 1, 2, 0, 0, 2, 3, 1, 2, 3];
        assert_eq!(
            stranded_tokens(&placement, 0, &routed, 2, &live),
            vec![0, 3, 4]
        );
        assert!(stranded_tokens(&placement, 0, &routed, 2, &|_| true).is_empty());
        // Unplaceable as plan_dispatch finds it: one of them.
        let pairs: Vec<RoutedPair> = routed
            .iter()
            .enumerate()
            .map(|(i, &expert)| RoutedPair {
                token: i / 2,
                expert,
                weight: 0.5,
            })
            .collect();
        let unplaceable = plan_dispatch(0, &pairs, &placement, &live).unwrap_err();
        assert_eq!(unplaceable.expert, 1);
    }

    #[test]
    fn micro_batches_parse_and_split_by_batch_size() {
        assert_eq!("auto".parse(), Ok(MicroBatches::Auto));
        assert_eq!("3".parse(), Ok(MicroBatches::Fixed(3)));
        assert!(
            "0".parse::<MicroBatches>()
                .unwrap_err()
                .contains("at least 1")
        );
        assert!("two".parse::<MicroBatches>().is_err());
        let from = MicroBatches::AUTO_FROM_TOKENS;
        assert_eq!(MicroBatches::Auto.groups(32, 32), 1, "decode");
        assert_eq!(MicroBatches::Auto.groups(8, from - 1), 1);
        assert_eq!(MicroBatches::Auto.groups(8, from), 2, "prefill");
        assert_eq!(MicroBatches::Auto.groups(1, 4 * from), 1, "one sequence");
        assert_eq!(MicroBatches::Fixed(4).groups(2, 2), 2);
        assert_eq!(MicroBatches::Fixed(4).groups(0, 0), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn combine_of_dispatch_equals_the_dense_moe(
            (tokens, num_experts, k, workers, holds, live, seed) in case()
        ) {
            let _guard = tch::no_grad_guard();
            // Every expert on at least one live worker: its own worker e mod W
            // (kept live), plus the random extra replicas.
            let mut live = live;
            let mut placement = Placement { workers, experts: vec![vec![]; 1] };
            for (e, extra) in holds.iter().enumerate() {
                let home = e % workers;
                live[home] = true;
                let replicas: Vec<usize> = (0..workers).filter(|&w| w == home || extra[w]).collect();
                placement.experts[0].push(replicas);
            }
            let local = experts(num_experts, seed.rem_euclid(1 << 30));
            tch::manual_seed(seed.rem_euclid(1 << 30) + 1);
            let xs = Tensor::randn([tokens as i64, HIDDEN], (Kind::Float, Device::Cpu));
            let logits = Tensor::randn([tokens as i64, num_experts as i64], (Kind::Float, Device::Cpu));
            let routing = route_logits(&logits, k, Kind::Float).unwrap();

            let dense = local.forward(0, &xs, &routing).unwrap();
            let pairs = routed_pairs(&routing);
            let shares = plan_dispatch(0, &pairs, &placement, &|w| live[w]).unwrap();
            let mut out = vec![0f32; tokens * HIDDEN as usize];
            for share in &shares {
                prop_assert!(live[share.worker]);
                for &expert in share.experts.keys() {
                    prop_assert!(placement.replicas(0, expert).contains(&share.worker));
                }
                let answer = worker_answer(&local, &xs, share);
                combine(&mut out, HIDDEN as usize, share, &answer, Dtype::F32).unwrap();
            }
            let out = Tensor::from_slice(&out).view([tokens as i64, HIDDEN]);
            let planned: usize = shares.iter().map(|s| s.pairs.len()).sum();
            prop_assert_eq!(planned, tokens * k);
            // Only the order of the float additions differs.
            let diff = (&out - &dense).abs().max().double_value(&[]);
            let scale = 1.0 + dense.abs().max().double_value(&[]);
            prop_assert!(diff <= 1e-5 * scale, "max |Δ| {} at scale {}", diff, scale);
        }
    }
}
