//! Dispatch and combine: one MoE layer's routed tokens go to the workers that
//! hold their experts — one Forward per involved worker, all concurrently —
//! and their weighted partial sums are added back per token. A replicated
//! expert's tokens go to its least-loaded live replica; when a worker fails,
//! its share is planned again over the remaining live replicas.
//! [`RemoteExperts`] is the model's `Experts` seam over gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tramontane_config::Dtype;
use tramontane_model::experts::Experts;
use tramontane_model::gating::Routing;
use tramontane_policy::dispatch_plan::{RoutedPair, WorkerShare, plan_dispatch};
use tramontane_policy::placement::Placement;
use tramontane_policy::routing_trace::RoutingTrace;
use tramontane_proto::codec;
use tramontane_proto::v1::{ExpertRows, ForwardRequest};

use crate::cluster::ClusterError;
use crate::combine::{combine, routed_pairs, stranded_tokens, token_rows};
use crate::data_path::DataPath;
use crate::error::{DispatchError, EncodeError, WorkerError, WorkerFailure, WorkerRef};
use crate::expert_load::ExpertLoad;
use crate::forward::{Answer, Forward};
use crate::micro_batches::MicroBatches;
use crate::phases::{DispatchPhases, Phase, Volume};
use crate::placement_view::PlacementView;
use crate::workers::Workers;

/// The experts of a model, reached over gRPC.
pub struct RemoteExperts {
    workers: Arc<Workers>,
    /// Which workers hold which experts, as far as the router knows: a
    /// worker that answers that it no longer holds some is taken off them.
    placement: PlacementView,
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
        workers: Arc<Workers>,
        placement: Placement,
        deadline: Duration,
        wire: Dtype,
    ) -> Result<Self, ClusterError> {
        let experts_per_layer: Vec<usize> = placement.experts.iter().map(Vec::len).collect();
        let load = Arc::new(ExpertLoad::new(&experts_per_layer, workers.len()));
        let data = DataPath::new().map_err(ClusterError::Runtime)?;
        Ok(Self {
            workers,
            placement: PlacementView::new(placement),
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
        self.workers.worker_ref(index)
    }

    /// A worker's request: its share's rows of `xs` (the host copy of the
    /// layer's `[tokens, hidden]` input) in the wire dtype.
    fn request(
        &self,
        layer: usize,
        xs: &[f32],
        hidden: usize,
        share: &WorkerShare,
        epoch: u64,
    ) -> Result<ForwardRequest, DispatchError> {
        let started = Instant::now();
        let hidden_rows =
            codec::encode_rows(xs, hidden, &token_rows(share), self.wire).map_err(|source| {
                DispatchError::Encode {
                    layer,
                    source: source.into(),
                }
            })?;
        self.phases.record(Phase::Encode, started.elapsed());
        Ok(ForwardRequest {
            dispatch_id: self.next_dispatch.fetch_add(1, Ordering::Relaxed),
            epoch,
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

/// Of `workers` workers, those `placement` gives some expert of `layer`.
fn layer_members(placement: &Placement, layer: usize, workers: usize) -> Vec<bool> {
    let mut members = vec![false; workers];
    for on in placement.experts.get(layer).into_iter().flatten() {
        for &w in on {
            if let Some(m) = members.get_mut(w) {
                *m = true;
            }
        }
    }
    members
}

/// `xs` `[tokens, hidden]` as host f32 values, row-major.
pub(crate) fn host_rows(xs: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let host = xs
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    Vec::<f32>::try_from(host.f_flatten(0, -1)?)
}

/// A layer's dispatch between its start and its finish (what
/// [`RemoteExperts`]' `start` gives and its `finish` takes).
pub struct LayerDispatch {
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
    fn launch(&self, d: &mut LayerDispatch, pairs: &[RoutedPair]) -> Result<(), DispatchError> {
        let layer = d.layer;
        let workers = self.workers.all();
        let live = |w: usize| workers.get(w).is_some_and(|w| w.serves());
        let current = self.placement.current();
        let placement = &current.placement;
        let shares = plan_dispatch(layer, pairs, placement, &live).map_err(|u| {
            DispatchError::NoLiveReplica {
                layer: u.layer,
                expert: u.expert,
                placed_on: placement
                    .replicas(u.layer, u.expert)
                    .iter()
                    .map(|&w| self.worker_ref(w))
                    .collect(),
                tokens: stranded_tokens(placement, layer, &d.routed, d.k, &live),
                failures: std::mem::take(&mut d.failures),
            }
        })?;
        for share in shares {
            let request = self.request(layer, &d.host, d.hidden as usize, &share, current.epoch)?;
            let span = tracing::info_span!(
                "dispatch",
                worker = share.worker,
                worker.addr = %workers[share.worker].addr,
                layer,
                epoch = current.epoch,
                rows = share.tokens.len(),
                error = tracing::field::Empty,
            );
            let forward = Forward {
                worker: share.worker,
                client: self.data.client(share.worker, &workers[share.worker]),
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

    /// The router's view of who holds what, shared (for the admin API).
    pub fn placement_view(&self) -> PlacementView {
        self.placement.clone()
    }

    /// `share`'s worker answered that it does not hold `experts` of
    /// `layer`: it is taken off those it was asked for (a new placement
    /// epoch, unless another answer did so already), and true is returned;
    /// false when none of them was in its share (an answer that makes no
    /// progress: a failure).
    fn no_longer_held(&self, layer: usize, share: &WorkerShare, experts: &[usize]) -> bool {
        let asked: Vec<usize> = experts
            .iter()
            .copied()
            .filter(|e| share.experts.contains_key(e))
            .collect();
        if asked.is_empty() {
            return false;
        }
        self.placement.drop_holder(layer, &asked, share.worker);
        true
    }

    /// Waits for the Forwards out now and adds their answers; returns the
    /// pairs of the workers that failed, marked down, and of those that no
    /// longer hold what they were asked (taken off those experts).
    fn collect(&self, d: &mut LayerDispatch) -> Result<Vec<RoutedPair>, DispatchError> {
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
                    combine(&mut d.out, d.hidden as usize, share, &answer, d.precision)
                        .map_err(|source| DispatchError::Combine { layer, source })?;
                    self.phases.record(Phase::Combine, combining.elapsed());
                    d.worker_pairs[share.worker] += share.pairs.len() as u64;
                }
                Err(WorkerError::NotHeld { experts, message })
                    if self.no_longer_held(layer, share, &experts) =>
                {
                    tracing::warn!(
                        worker = share.worker,
                        layer,
                        ?experts,
                        message,
                        "a worker no longer holds experts: planning again over their other replicas"
                    );
                    retry.extend_from_slice(&share.pairs);
                }
                Err(error) => {
                    if let Some(worker) = self.workers.get(share.worker) {
                        worker.live.store(false, Ordering::Relaxed);
                    }
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
    type Pending = LayerDispatch;
    type Error = DispatchError;

    /// Sends every worker its share of the layer and returns once the
    /// requests are on their way.
    fn start(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<LayerDispatch, DispatchError> {
        let started = Instant::now();
        let tensor = |source| DispatchError::Tensor { layer, source };
        let (tokens, hidden) = (xs.size()[0], xs.size()[1]);
        let host = host_rows(xs).map_err(tensor)?;
        let precision = tramontane_model::dtype::dtype(xs.kind()).ok_or(DispatchError::Encode {
            layer,
            source: EncodeError::Kind(xs.kind()),
        })?;
        self.phases.add(Volume::Tokens, tokens as u64);
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
        Ok(d)
    }

    /// Waits for the layer's answers, sending a failed worker's pairs again
    /// to live replicas, and sums them.
    fn finish(&self, mut d: LayerDispatch) -> Result<Tensor, DispatchError> {
        let started = Instant::now();
        loop {
            let retry = self.collect(&mut d)?;
            if retry.is_empty() {
                break;
            }
            self.launch(&mut d, &retry)?;
        }
        let members = layer_members(
            &self.placement.current().placement,
            d.layer,
            d.worker_pairs.len(),
        );
        self.load
            .record(d.layer, &d.routed, &d.worker_pairs, &members);
        let layer = d.layer;
        let out = Tensor::f_from_slice(&d.out)
            .and_then(|t| t.f_view([d.tokens, d.hidden]))
            .and_then(|t| t.f_to_kind(d.kind))
            .and_then(|t| t.f_to_device(d.device))
            .map_err(|source| DispatchError::Tensor { layer, source })?;
        self.phases
            .record(Phase::Layer, d.engine + started.elapsed());
        Ok(out)
    }

    fn micro_batches(&self, sequences: usize, tokens: usize) -> usize {
        self.micro_batches.groups(sequences, tokens)
    }

    /// A placement switch waiting for this step takes effect.
    fn begin_step(&self) {
        self.placement.begin_step();
    }

    fn end_step(&self) {
        self.placement.end_step();
    }
}
