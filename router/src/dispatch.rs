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
use tramontane_model::moe::Experts;
use tramontane_policy::dispatch_plan::{RoutedPair, WorkerShare, plan_dispatch};
use tramontane_policy::placement::Placement;
use tramontane_policy::routing_trace::RoutingTrace;
use tramontane_proto::codec::{self, CodecError, Precision};
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{Dtype, ExpertRows, ForwardRequest, TensorPayload};

use crate::cluster::ClusterError;
use crate::dispatch_phases::{DispatchPhases, Phase};
use crate::expert_load::ExpertLoad;
use crate::failure::{BadAnswer, DispatchError, WorkerError, WorkerFailure, WorkerRef};

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
    precision: Precision,
) -> Result<(), CodecError> {
    let rows: Vec<usize> = share.tokens.iter().map(|&t| t as usize).collect();
    codec::add_rows(Some(answer), "output", &rows, hidden, out, precision)
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

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .block_on(future)
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
}

impl RemoteExperts {
    pub fn new(
        workers: Arc<Vec<WorkerLink>>,
        placement: Placement,
        deadline: Duration,
        wire: Kind,
    ) -> Result<Self, ClusterError> {
        let experts = placement.experts.first().map_or(0, Vec::len);
        let load = Arc::new(ExpertLoad::new(
            placement.experts.len(),
            experts,
            workers.len(),
        ));
        let data = DataPath::new(&workers).map_err(ClusterError::Runtime)?;
        let wire = codec::dtype_of(wire).map_err(ClusterError::WireDtype)?;
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
        wire: Kind,
    ) -> Result<Self, ClusterError> {
        let model_id = tramontane_config::model_id(model_dir)?;
        let links = crate::cluster::connect(
            addrs,
            &model_id,
            &placement,
            Duration::from_secs(300),
            tramontane_infra::grpc::DEFAULT_MAX_MESSAGE_BYTES,
        )
        .await?;
        Self::new(links, placement, deadline, wire)
    }

    /// Records every layer's routing into `trace`.
    pub fn with_trace(mut self, trace: RoutingTrace) -> Self {
        self.trace = Some(trace);
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
        let rows: Vec<usize> = share.tokens.iter().map(|&t| t as usize).collect();
        let hidden_rows = codec::encode_rows(xs, hidden, &rows, self.wire)
            .map_err(|source| experts_failed(DispatchError::Encode { layer, source }))?;
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
    ForwardError::Experts {
        layer,
        source: Box::new(error),
    }
}

impl RemoteExperts {
    /// Sends one Forward to worker `index` with the deadline; returns its
    /// checked answer (`[rows, hidden]`). Its round trip and failures go to
    /// that worker's metrics.
    async fn send(
        &self,
        index: usize,
        request: ForwardRequest,
        rows: usize,
        hidden: i64,
    ) -> Result<TensorPayload, WorkerError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "dispatch",
            worker = index,
            worker.addr = %self.workers[index].addr,
            layer = request.layer,
            rows,
            error = tracing::field::Empty,
        );
        let client = &self.data.clients[index];
        let result = send_once(client, request, rows, hidden, self.deadline, &self.phases)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            span.record("error", tramontane_infra::error::chain(e).as_str());
        }
        let worker = index.to_string();
        metrics::histogram!(crate::metrics::DISPATCH_LATENCY, "worker" => worker.clone())
            .record(started.elapsed());
        if let Err(e) = &result {
            metrics::counter!(crate::metrics::DISPATCH_ERRORS_TOTAL, "worker" => worker, "code" => e.code_label())
                .increment(1);
        }
        result
    }
}

async fn send_once(
    client: &ExpertServiceClient<Channel>,
    request: ForwardRequest,
    rows: usize,
    hidden: i64,
    deadline: Duration,
    phases: &DispatchPhases,
) -> Result<TensorPayload, WorkerError> {
    let started = Instant::now();
    let mut client = client.clone();
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
    let (_, shape) = codec::validate(response.output.as_ref(), "output", 2)
        .map_err(|e| WorkerError::BadAnswer(e.into()))?;
    phases.record(Phase::Decode, answered.elapsed());
    if shape != [rows as i64, hidden] {
        return Err(WorkerError::BadAnswer(BadAnswer::Shape {
            answered: shape,
            rows,
            hidden,
        }));
    }
    Ok(response.output.unwrap_or_default())
}

impl Experts for RemoteExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        let started = Instant::now();
        let (tokens, hidden) = (xs.size()[0], xs.size()[1]);
        let width = hidden as usize;
        let host = host_rows(xs)?;
        let precision = Precision::of(xs.kind())
            .map_err(|source| experts_failed(DispatchError::Encode { layer, source }))?;
        let mut out = vec![0f32; host.len()];
        let mut pending = routed_pairs(routing);
        let routed: Vec<usize> = pending.iter().map(|p| p.expert).collect();
        if let Some(trace) = &self.trace {
            trace.record(layer, routing.k, &routed);
        }
        let mut worker_pairs = vec![0u64; self.workers.len()];
        let mut failures: Vec<WorkerFailure> = Vec::new();
        while !pending.is_empty() {
            let live = |w: usize| self.workers[w].live.load(Ordering::Relaxed);
            let shares = plan_dispatch(layer, &pending, &self.placement, &live).map_err(|u| {
                experts_failed(DispatchError::NoLiveReplica {
                    layer: u.layer,
                    expert: u.expert,
                    placed_on: self
                        .placement
                        .replicas(u.layer, u.expert)
                        .iter()
                        .map(|&w| self.worker_ref(w))
                        .collect(),
                    failures: std::mem::take(&mut failures),
                })
            })?;
            let requests = shares
                .iter()
                .map(|share| self.request(layer, &host, width, share))
                .collect::<Result<Vec<_>, _>>()?;
            let waiting = Instant::now();
            let results =
                self.data
                    .block_on(futures::future::join_all(shares.iter().zip(requests).map(
                        |(share, request)| {
                            self.send(share.worker, request, share.tokens.len(), hidden)
                        },
                    )));
            self.phases.record(Phase::Wait, waiting.elapsed());
            pending = Vec::new();
            for (share, result) in shares.iter().zip(results) {
                match result {
                    Ok(answer) => {
                        let combining = Instant::now();
                        combine(&mut out, width, share, &answer, precision).map_err(|source| {
                            experts_failed(DispatchError::Combine { layer, source })
                        })?;
                        self.phases.record(Phase::Combine, combining.elapsed());
                        worker_pairs[share.worker] += share.pairs.len() as u64;
                    }
                    Err(error) => {
                        self.workers[share.worker]
                            .live
                            .store(false, Ordering::Relaxed);
                        metrics::gauge!(crate::metrics::WORKER_UP, "worker" => share.worker.to_string())
                            .set(0.0);
                        failures.push(WorkerFailure {
                            worker: self.worker_ref(share.worker),
                            error,
                        });
                        pending.extend_from_slice(&share.pairs);
                    }
                }
            }
        }
        self.load.record(layer, &routed, &worker_pairs);
        let out = Tensor::f_from_slice(&out)?
            .f_view([tokens, hidden])?
            .f_to_kind(xs.kind())?
            .f_to_device(xs.device())?;
        self.phases.record(Phase::Layer, started.elapsed());
        Ok(out)
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
    /// on the wire.
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
        codec::encode(&local.forward_rows(0, &gathered, &work).unwrap()).unwrap()
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
                combine(&mut out, HIDDEN as usize, share, &answer, Precision::F32).unwrap();
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
