//! The gRPC `moe.v1.ExpertService`: every request is validated (dtype,
//! shape, byte length, layer, experts held, rows, weights) before any tensor
//! is built; bad input is INVALID_ARGUMENT or NOT_FOUND naming the field.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::Device;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tramontane_infra::peer::PeerName;
use tramontane_proto::v1::expert_service_server::ExpertService;
use tramontane_proto::v1::{
    ExpertPair, ForwardRequest, ForwardResponse, HoldRequest, HoldResponse, InfoRequest,
    InfoResponse, LayerExperts, LoadedPair, WorkerTimings,
};
use tramontane_proto::{NOT_HELD_METADATA, codec};

use crate::compute::{ComputeError, ComputeHandle, HoldChange, Holding, WorkItem, WorkerInfo};
use crate::payload;

pub struct ExpertServer {
    compute: ComputeHandle,
    /// What the worker holds (`held`, `weight_dtypes`) changes with `Hold`.
    info: RwLock<WorkerInfo>,
    /// Each (layer, expert) held, with its counter of tokens computed
    /// (registered once here: a Forward of many experts makes no labels).
    held: RwLock<HashMap<(usize, usize), metrics::Counter>>,
    /// One `Hold` at a time, so that what is recorded follows the compute
    /// thread's order.
    holding: tokio::sync::Mutex<()>,
    /// Under mTLS: the certificate name that alone may call `Hold`.
    admin: Option<String>,
    /// The highest router placement epoch a Forward or a Hold named.
    epoch: AtomicU64,
    /// `--max-expert-bytes`: the most expert weights it may hold.
    max_expert_bytes: Option<u64>,
}

/// Pairs one `Hold` may name, loads and drops together.
pub const MAX_HOLD_PAIRS: usize = 4096;

fn tokens_counter(layer: usize, expert: usize) -> metrics::Counter {
    metrics::counter!(
        crate::metrics::EXPERT_TOKENS_TOTAL,
        "layer" => layer.to_string(),
        "expert" => expert.to_string()
    )
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ExpertServer {
    /// The handle of the compute thread.
    pub fn compute(&self) -> &ComputeHandle {
        &self.compute
    }

    pub fn new(compute: ComputeHandle, info: WorkerInfo) -> Self {
        // The recorder first (once per process; `serve` gets the same): the
        // counters below are handles into it, and a handle taken before it
        // is installed counts nowhere.
        crate::metrics::install();
        let held: HashMap<_, _> = info
            .held
            .iter()
            .flat_map(|(layer, experts)| experts.iter().map(move |&e| (*layer, e)))
            .map(|(layer, expert)| ((layer, expert), tokens_counter(layer, expert)))
            .collect();
        metrics::gauge!(crate::metrics::EXPERTS_HELD).set(held.len() as f64);
        Self {
            compute,
            info: RwLock::new(info),
            held: RwLock::new(held),
            holding: tokio::sync::Mutex::new(()),
            admin: None,
            epoch: AtomicU64::new(0),
            max_expert_bytes: None,
        }
    }

    /// Refuses a `Hold` whose loads would take the expert weights held past
    /// `bytes` (RESOURCE_EXHAUSTED; the pairs loaded before it stay).
    pub fn max_expert_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_expert_bytes = bytes;
        self
    }

    /// Lets only the client whose certificate is named `name` (a node of
    /// `tramontane certs`: the router) call `Hold`: for a worker under mTLS,
    /// whose every client has a certificate of the cluster.
    pub fn admin_only(mut self, name: impl Into<String>) -> Self {
        self.admin = Some(name.into());
        self
    }

    /// Bytes of the expert weights this worker holds, per dtype.
    pub fn weight_dtypes(&self) -> Vec<(&'static str, u64)> {
        read(&self.info).weight_dtypes.clone()
    }

    /// The pairs of a `Hold`, checked: pairs of the model's MoE layers, at
    /// most [`MAX_HOLD_PAIRS`], none both loaded and dropped.
    fn validate_hold(&self, request: &HoldRequest) -> Result<HoldChange, Status> {
        let info = read(&self.info);
        let config = &info.config;
        let total = request.load.len() + request.drop.len();
        if total > MAX_HOLD_PAIRS {
            return Err(Status::invalid_argument(format!(
                "load, drop: {total} pairs, more than the {MAX_HOLD_PAIRS} one Hold may name"
            )));
        }
        let pairs = |field: &str, pairs: &[ExpertPair]| -> Result<Vec<(usize, usize)>, Status> {
            pairs
                .iter()
                .enumerate()
                .map(|(i, pair)| {
                    let (layer, expert) = (pair.layer as usize, pair.expert as usize);
                    match config.moe(layer) {
                        Some(moe) if moe.holds_id(expert) => Ok((layer, expert)),
                        Some(_) => Err(Status::invalid_argument(format!(
                            "{field}[{i}]: layer {layer} has no expert {expert}"
                        ))),
                        None => Err(Status::invalid_argument(format!(
                            "{field}[{i}]: layer {layer} is not a MoE layer of the model"
                        ))),
                    }
                })
                .collect()
        };
        let change = HoldChange {
            load: pairs("load", &request.load)?,
            drop: pairs("drop", &request.drop)?,
            max_bytes: self.max_expert_bytes,
        };
        if let Some(&(layer, expert)) = change.load.iter().find(|p| change.drop.contains(p)) {
            return Err(Status::invalid_argument(format!(
                "drop: layer {layer} expert {expert} is also to be loaded"
            )));
        }
        Ok(change)
    }

    /// Records what the compute thread holds after a `Hold`.
    fn record(&self, holding: &Holding) {
        {
            let mut held = write(&self.held);
            for &((layer, expert), took) in &holding.loaded {
                held.insert((layer, expert), tokens_counter(layer, expert));
                metrics::histogram!(crate::metrics::EXPERT_LOAD_DURATION).record(took);
            }
            for pair in &holding.dropped {
                held.remove(pair);
            }
            metrics::gauge!(crate::metrics::EXPERTS_HELD).set(held.len() as f64);
        }
        metrics::counter!(crate::metrics::EXPERTS_LOADED_TOTAL)
            .increment(holding.loaded.len() as u64);
        metrics::counter!(crate::metrics::EXPERTS_DROPPED_TOTAL)
            .increment(holding.dropped.len() as u64);
        let mut info = write(&self.info);
        for (dtype, _) in &info.weight_dtypes {
            if !holding.weight_dtypes.iter().any(|(d, _)| d == dtype) {
                metrics::gauge!(crate::metrics::MEMORY_BYTES, "kind" => "weights", "dtype" => *dtype)
                    .set(0.0);
            }
        }
        for &(dtype, bytes) in &holding.weight_dtypes {
            metrics::gauge!(crate::metrics::MEMORY_BYTES, "kind" => "weights", "dtype" => dtype)
                .set(bytes as f64);
        }
        info.held = holding.held.clone();
        info.weight_dtypes = holding.weight_dtypes.clone();
    }

    /// Checks everything but the tensor bytes' contents; returns the layer and
    /// the work per expert.
    fn validate(&self, request: &ForwardRequest) -> Result<(usize, Vec<WorkItem>), Status> {
        let info = read(&self.info);
        let config = &info.config;
        if request.experts.is_empty() {
            return Err(Status::invalid_argument(
                "experts: empty request, no expert rows to compute",
            ));
        }
        let layer = request.layer as usize;
        if layer >= config.layers.len() {
            return Err(Status::invalid_argument(format!(
                "layer: {layer} is out of range (the model has {} layers)",
                config.layers.len()
            )));
        }
        let Some(moe) = config.moe(layer) else {
            return Err(Status::invalid_argument(format!(
                "layer: {layer} is a dense layer, it has no routed experts"
            )));
        };
        let (_, shape) = codec::validate(request.hidden.as_ref(), "hidden", 2)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (rows, width) = (shape[0], shape[1]);
        if width != config.hidden_size as i64 {
            return Err(Status::invalid_argument(format!(
                "hidden: rows of width {width}, but the model's hidden_size is {}",
                config.hidden_size
            )));
        }
        if rows == 0 {
            return Err(Status::invalid_argument("hidden: no rows"));
        }
        // Experts of the model this worker does not hold (any more): NOT_FOUND
        // naming them all, for the router to plan them elsewhere.
        let not_held: Vec<String> = {
            let held = read(&self.held);
            request
                .experts
                .iter()
                .map(|item| item.expert as usize)
                .filter(|&e| moe.holds_id(e) && !held.contains_key(&(layer, e)))
                .map(|e| e.to_string())
                .collect()
        };
        if let Some(first) = not_held.first() {
            let mut status = Status::not_found(format!(
                "experts: layer {layer} expert {first} is not held by this worker{} (the Forward was planned at placement epoch {}; this worker has seen epoch {})",
                if not_held.len() > 1 {
                    format!(" (nor {})", not_held[1..].join(", "))
                } else {
                    String::new()
                },
                request.epoch,
                self.epoch.load(Ordering::Relaxed),
            ));
            if let Ok(value) = not_held.join(",").parse() {
                status.metadata_mut().insert(NOT_HELD_METADATA, value);
            }
            return Err(status);
        }
        // Which experts and (per expert) rows were seen; each item's rows
        // are cleared again after it.
        let mut seen_experts = vec![false; moe.experts + 1];
        let mut seen_rows = vec![false; rows as usize];
        let mut work = Vec::with_capacity(request.experts.len());
        for (i, item) in request.experts.iter().enumerate() {
            let expert = item.expert as usize;
            if !moe.holds_id(expert) {
                return Err(Status::invalid_argument(format!(
                    "experts[{i}].expert: {expert} is out of range (the model has {} experts{})",
                    moe.experts,
                    if moe.shared.is_some() {
                        " and a shared one"
                    } else {
                        ""
                    }
                )));
            }
            if std::mem::replace(&mut seen_experts[expert], true) {
                return Err(Status::invalid_argument(format!(
                    "experts[{i}].expert: expert {expert} appears twice"
                )));
            }
            if item.rows.is_empty() || item.rows.len() != item.weights.len() {
                return Err(Status::invalid_argument(format!(
                    "experts[{i}]: {} rows and {} weights (need the same number, at least one)",
                    item.rows.len(),
                    item.weights.len()
                )));
            }
            for &row in &item.rows {
                if row as i64 >= rows {
                    return Err(Status::invalid_argument(format!(
                        "experts[{i}].rows: row {row} is out of range (hidden has {rows} rows)"
                    )));
                }
                if std::mem::replace(&mut seen_rows[row as usize], true) {
                    return Err(Status::invalid_argument(format!(
                        "experts[{i}].rows: row {row} appears twice"
                    )));
                }
            }
            for &row in &item.rows {
                seen_rows[row as usize] = false;
            }
            if let Some(w) = item.weights.iter().find(|w| !w.is_finite()) {
                return Err(Status::invalid_argument(format!(
                    "experts[{i}].weights: {w} is not finite"
                )));
            }
            work.push(WorkItem {
                expert,
                rows: item.rows.iter().map(|&r| r as usize).collect(),
                weights: item.weights.clone(),
            });
        }
        Ok((layer, work))
    }
}

fn layer_experts(held: &[(usize, Vec<usize>)]) -> Vec<LayerExperts> {
    held.iter()
        .map(|(layer, experts)| LayerExperts {
            layer: *layer as u32,
            experts: experts.iter().map(|&e| e as u32).collect(),
        })
        .collect()
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

#[tonic::async_trait]
impl ExpertService for ExpertServer {
    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        // A worker whose compute thread is gone is not taken back by a router.
        if !self.compute.is_running() {
            return Err(Status::unavailable(ComputeError::Stopped.to_string()));
        }
        let info = read(&self.info);
        Ok(Response::new(InfoResponse {
            model_id: info.model_id.clone(),
            num_layers: info.config.layers.len() as u32,
            num_experts: info.config.max_experts() as u32,
            hidden_size: info.config.hidden_size as u32,
            held: layer_experts(&info.held),
            device: device_name(info.device),
            dtype: codec::to_wire(info.dtype),
            weight_bytes: info.weight_bytes(),
        }))
    }

    async fn hold(&self, request: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        if let Some(admin) = &self.admin {
            let caller = request.extensions().get::<PeerName>();
            if caller.map(PeerName::as_str) != Some(admin.as_str()) {
                return Err(Status::permission_denied(format!(
                    "hold: only {admin} may change what this worker holds; the caller's certificate is {}",
                    caller.map_or("unnamed", PeerName::as_str)
                )));
            }
        }
        let change = self.validate_hold(request.get_ref())?;
        self.saw_epoch(request.get_ref().epoch);
        let _one_at_a_time = self.holding.lock().await;
        let holding = self.compute.hold(change).await.map_err(|e| match e {
            ComputeError::Stopped => Status::unavailable(e.to_string()),
            ComputeError::Failed(_) => Status::internal(e.to_string()),
        })?;
        self.record(&holding);
        for &((layer, expert), took) in &holding.loaded {
            tracing::info!(
                layer,
                expert,
                load_ms = took.as_secs_f64() * 1e3,
                "expert loaded"
            );
        }
        for &(layer, expert) in &holding.dropped {
            tracing::info!(layer, expert, "expert dropped");
        }
        if let Some(failed) = &holding.failed {
            let message = format!("hold: {failed}");
            return Err(match holding.exhausted {
                true => Status::resource_exhausted(message),
                false => Status::internal(message),
            });
        }
        let pair = |(layer, expert): (usize, usize)| ExpertPair {
            layer: layer as u32,
            expert: expert as u32,
        };
        let info = read(&self.info);
        Ok(Response::new(HoldResponse {
            held: layer_experts(&info.held),
            weight_bytes: info.weight_bytes(),
            loaded: holding
                .loaded
                .iter()
                .map(|&(p, took)| LoadedPair {
                    pair: Some(pair(p)),
                    load_ns: took.as_nanos() as u64,
                })
                .collect(),
            dropped: holding.dropped.iter().map(|&p| pair(p)).collect(),
            loaded_bytes: holding.loaded_bytes,
        }))
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "expert_forward",
            layer = request.get_ref().layer,
            rows = tracing::field::Empty,
            experts = request.get_ref().experts.len(),
            dispatch_id = request.get_ref().dispatch_id,
            epoch = request.get_ref().epoch,
            trace_id = tracing::field::Empty,
        );
        tramontane_infra::trace_context::adopt(&span, request.metadata());
        if let Some(shape) = request.get_ref().hidden.as_ref().map(|h| h.shape.clone()) {
            span.record("rows", shape.first().copied().unwrap_or(0));
        }
        let result = self
            .forward_one(request.into_inner())
            .instrument(span.clone())
            .await;
        metrics::histogram!(crate::metrics::FORWARD_LATENCY).record(started.elapsed());
        if let Err(status) = &result {
            tracing::warn!(parent: &span, code = ?status.code(), message = status.message(), "Forward refused");
            metrics::counter!(crate::metrics::ERRORS_TOTAL, "code" => tramontane_infra::grpc::code_name(status.code()))
                .increment(1);
        }
        result.map(Response::new)
    }
}

impl ExpertServer {
    /// Notes a placement epoch the router named.
    fn saw_epoch(&self, epoch: u64) {
        let before = self.epoch.fetch_max(epoch, Ordering::Relaxed);
        if epoch > before {
            metrics::gauge!(crate::metrics::PLACEMENT_EPOCH).set(epoch as f64);
        }
    }

    async fn forward_one(&self, request: ForwardRequest) -> Result<ForwardResponse, Status> {
        let arrived = Instant::now();
        self.saw_epoch(request.epoch);
        let (layer, work) = self.validate(&request)?;
        for item in &work {
            if let Some(tokens) = read(&self.held).get(&(layer, item.expert)) {
                tokens.increment(item.rows.len() as u64);
            }
        }
        metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(self.compute.queue_depth() as f64);
        let hidden = payload::to_tensor(request.hidden.as_ref(), "hidden", 2)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let decoded = arrived.elapsed();
        let computed = self
            .compute
            .forward(layer, hidden, work)
            .await
            .map_err(|e| {
                let message = tramontane_infra::error::chain(&e);
                match e {
                    ComputeError::Stopped => Status::unavailable(message),
                    ComputeError::Failed(_) => Status::internal(message),
                }
            })?;
        let encoding = Instant::now();
        let output =
            payload::from_tensor(&computed.output).map_err(|e| Status::internal(e.to_string()))?;
        Ok(ForwardResponse {
            dispatch_id: request.dispatch_id,
            output: Some(output),
            timings: Some(WorkerTimings {
                decode_ns: nanos(decoded),
                queue_ns: nanos(computed.queued),
                compute_ns: nanos(computed.compute),
                encode_ns: nanos(encoding.elapsed()),
            }),
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
