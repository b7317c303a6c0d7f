//! Dispatch and combine: one MoE layer's routed tokens go to the workers that
//! hold their experts — one Forward per involved worker, all concurrently —
//! and their weighted partial sums are added back per token. A replicated
//! expert's tokens go to its least-loaded live replica; when a worker fails,
//! its share is planned again over the remaining live replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tokio::runtime::Handle;
use tonic::transport::Channel;
use tracing::Instrument;
use tramontane_model::error::ForwardError;
use tramontane_model::gating::Routing;
use tramontane_model::moe::Experts;
use tramontane_policy::dispatch_plan::{RoutedPair, WorkerShare, plan_dispatch};
use tramontane_policy::placement::Placement;
use tramontane_policy::routing_trace::RoutingTrace;
use tramontane_proto::codec;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ExpertRows, ForwardRequest};

use crate::cluster::ClusterError;
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

/// Adds a worker's partial sums `[share rows, hidden]` into `out` `[tokens, hidden]`.
pub fn combine(
    out: &mut Tensor,
    share: &WorkerShare,
    partial: &Tensor,
) -> Result<(), ForwardError> {
    let rows = Tensor::from_slice(&share.tokens).to_device(out.device());
    let _ = out.f_index_add_(
        0,
        &rows,
        &partial.to_device(out.device()).to_kind(out.kind()),
    )?;
    Ok(())
}

/// A worker as the router sees it.
pub struct WorkerLink {
    pub addr: String,
    pub client: ExpertServiceClient<Channel>,
    pub live: AtomicBool,
}

/// The experts of a model, reached over gRPC.
pub struct RemoteExperts {
    workers: Arc<Vec<WorkerLink>>,
    placement: Placement,
    runtime: Handle,
    deadline: Duration,
    wire: Kind,
    next_dispatch: AtomicU64,
    load: Arc<ExpertLoad>,
    trace: Option<RoutingTrace>,
}

impl RemoteExperts {
    pub fn new(
        workers: Arc<Vec<WorkerLink>>,
        placement: Placement,
        runtime: Handle,
        deadline: Duration,
        wire: Kind,
    ) -> Self {
        let experts = placement.experts.first().map_or(0, Vec::len);
        let load = Arc::new(ExpertLoad::new(
            placement.experts.len(),
            experts,
            workers.len(),
        ));
        Self {
            workers,
            placement,
            runtime,
            deadline,
            wire,
            next_dispatch: AtomicU64::new(1),
            load,
            trace: None,
        }
    }

    /// The experts on running workers at `addrs`, checked to serve the model
    /// in `model_dir` and to hold what `placement` gives them (waiting up to
    /// 300 s for them to answer); f32 on the wire.
    pub async fn connect(
        model_dir: &std::path::Path,
        addrs: &[String],
        placement: Placement,
        deadline: Duration,
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
        Ok(Self::new(
            links,
            placement,
            Handle::current(),
            deadline,
            Kind::Float,
        ))
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

    fn worker_ref(&self, index: usize) -> WorkerRef {
        WorkerRef {
            index,
            addr: self.workers[index].addr.clone(),
        }
    }

    fn request(
        &self,
        layer: usize,
        xs: &Tensor,
        share: &WorkerShare,
    ) -> Result<ForwardRequest, ForwardError> {
        let rows = Tensor::from_slice(&share.tokens).to_device(xs.device());
        let hidden = codec::encode(&xs.f_index_select(0, &rows)?.f_to_kind(self.wire)?)
            .map_err(|source| experts_failed(DispatchError::Encode { layer, source }))?;
        Ok(ForwardRequest {
            dispatch_id: self.next_dispatch.fetch_add(1, Ordering::Relaxed),
            layer: layer as u32,
            hidden: Some(hidden),
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

/// A dispatch failure as the model's error: the engine takes it back out.
fn experts_failed(error: DispatchError) -> ForwardError {
    let layer = match &error {
        DispatchError::NoLiveReplica { layer, .. } | DispatchError::Encode { layer, .. } => *layer,
    };
    ForwardError::Experts {
        layer,
        source: Box::new(error),
    }
}

/// Sends one Forward with a deadline; returns the partial sums. Its round
/// trip and failures go to the metrics of worker `index`.
async fn send(
    index: usize,
    link: &WorkerLink,
    request: ForwardRequest,
    rows: usize,
    hidden: i64,
    deadline: Duration,
) -> Result<Tensor, WorkerError> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "dispatch",
        worker = index,
        worker.addr = %link.addr,
        layer = request.layer,
        rows,
        error = tracing::field::Empty,
    );
    let result = send_once(link, request, rows, hidden, deadline)
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

async fn send_once(
    link: &WorkerLink,
    request: ForwardRequest,
    rows: usize,
    hidden: i64,
    deadline: Duration,
) -> Result<Tensor, WorkerError> {
    let mut client = link.client.clone();
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
    let partial = codec::decode(response.output.as_ref(), "output", 2)
        .map_err(|e| WorkerError::BadAnswer(e.into()))?;
    if partial.size() != [rows as i64, hidden] {
        return Err(WorkerError::BadAnswer(BadAnswer::Shape {
            answered: partial.size(),
            rows,
            hidden,
        }));
    }
    Ok(partial)
}

impl Experts for RemoteExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        let hidden = xs.size()[1];
        let mut out = xs.zeros_like();
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
                .map(|share| self.request(layer, xs, share))
                .collect::<Result<Vec<_>, _>>()?;
            let results =
                self.runtime
                    .block_on(futures::future::join_all(shares.iter().zip(requests).map(
                        |(share, request)| {
                            send(
                                share.worker,
                                &self.workers[share.worker],
                                request,
                                share.tokens.len(),
                                hidden,
                                self.deadline,
                            )
                        },
                    )));
            pending = Vec::new();
            for (share, result) in shares.iter().zip(results) {
                match result {
                    Ok(partial) => {
                        combine(&mut out, share, &partial)?;
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

    /// What a worker computes for a share: its experts on its gathered rows.
    fn worker_partial(local: &LocalExperts, xs: &Tensor, share: &WorkerShare) -> Tensor {
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
        local.forward_rows(0, &gathered, &work).unwrap()
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
            let mut out = xs.zeros_like();
            for share in &shares {
                prop_assert!(live[share.worker]);
                for &expert in share.experts.keys() {
                    prop_assert!(placement.replicas(0, expert).contains(&share.worker));
                }
                combine(&mut out, share, &worker_partial(&local, &xs, share)).unwrap();
            }
            let planned: usize = shares.iter().map(|s| s.pairs.len()).sum();
            prop_assert_eq!(planned, tokens * k);
            // Only the order of the float additions differs.
            let diff = (&out - &dense).abs().max().double_value(&[]);
            let scale = 1.0 + dense.abs().max().double_value(&[]);
            prop_assert!(diff <= 1e-5 * scale, "max |Δ| {} at scale {}", diff, scale);
        }
    }
}
