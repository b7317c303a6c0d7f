//! The expert pool while it serves: rebalancing over the recent load,
//! workers added and removed, a lost worker's experts healed onto the
//! others, a removed or healed worker rejoining after its restart.
//!
//! Every change goes the same way: plan the new placement
//! ([`tramontane_policy::rebalance`], [`tramontane_policy::membership`]),
//! have the workers load their new pairs (`Hold`), switch the placement
//! between steps ([`PlacementView::switch`]), then have them drop what
//! they no longer need. Until the switch every step plans over the old
//! placement, whose copies are all still held; after it none does. A
//! failed load leaves the old placement in effect (the pairs loaded so far
//! are dropped again). One change at a time.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tonic::transport::ClientTlsConfig;
use tramontane_policy::eplb::EplbError;
use tramontane_policy::membership::{self, Stranded};
use tramontane_policy::placement::Placement;
use tramontane_policy::rebalance::{self, Pair};
use tramontane_proto::v1::{ExpertPair, HoldRequest, InfoRequest};

use crate::cluster::WorkerEvent;
use crate::error::WorkerRef;
use crate::expert_load::ExpertLoad;
use crate::metrics as names;
use crate::placement_view::{Epoch, PlacementView};
use crate::workers::{WorkerLink, Workers};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{worker} is down: it cannot load the experts it is given")]
    WorkerDown { worker: WorkerRef },
    #[error("{worker} could not load its new experts ({code:?}): {message}")]
    Load {
        worker: WorkerRef,
        code: tonic::Code,
        message: String,
    },
    #[error("planning the rebalance: {0}")]
    Plan(#[from] EplbError),
    #[error("there is no worker {index} (the router knows {workers})")]
    UnknownWorker { index: usize, workers: usize },
    #[error("{worker} is not in the pool (removed, or its experts moved while it was down)")]
    NotInPool { worker: WorkerRef },
    #[error("{worker} is in the pool already")]
    AlreadyInPool { worker: WorkerRef },
    #[error(transparent)]
    Stranded(#[from] Stranded),
    #[error("the worker at {addr} did not answer Info: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the worker at {addr} serves model {theirs}, this router serves {ours}")]
    ModelMismatch {
        addr: String,
        ours: String,
        theirs: String,
    },
    #[error(transparent)]
    Address(#[from] crate::cluster::ClusterError),
}

/// What a rebalance did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rebalanced {
    /// The epoch in effect after it (unchanged when nothing moved).
    pub epoch: u64,
    /// Pairs loaded onto workers that did not hold them.
    pub moved: usize,
    /// Mean balancedness of the MoE layers under the recent load, before
    /// and after (as planned).
    pub balancedness_before: f64,
    pub balancedness_after: f64,
    /// Bytes of weights the workers loaded.
    pub bytes_loaded: u64,
}

/// A worker added (or back in the pool).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Joined {
    pub worker: usize,
    pub epoch: u64,
}

/// A worker out of the pool, its experts elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Left {
    pub epoch: u64,
    /// Pairs loaded onto the others to keep every expert served.
    pub moved: usize,
}

/// What a change of placement did.
struct Changed {
    epoch: u64,
    /// Pairs loaded onto workers that did not hold them.
    moved: usize,
    bytes: u64,
}

/// How the pool reaches a worker it is told of.
#[derive(Clone)]
pub struct Connector {
    pub model_id: String,
    pub max_message_bytes: usize,
    pub tls: Option<ClientTlsConfig>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PoolOptions {
    /// Slots per worker and layer beyond the even share (`--spare-slots`).
    pub spare_slots: usize,
    /// Move a lost worker's experts onto the others (`--self-heal`).
    pub self_heal: bool,
}

pub struct ExpertPool {
    workers: Arc<Workers>,
    view: PlacementView,
    load: Arc<ExpertLoad>,
    connector: Connector,
    options: PoolOptions,
    /// One change at a time.
    changing: tokio::sync::Mutex<()>,
    /// Workers out of the pool that went down since: they rejoin when they
    /// answer again (a restart).
    restarting: Mutex<BTreeSet<usize>>,
}

/// Pairs one `Hold` of a change names: a worker's compute thread loads
/// them between Forwards, so a few at a time keeps Forwards flowing.
pub const HOLD_PAIRS: usize = 4;

/// Dispatches of a layer over the placement in effect before a rebalance
/// judges its balance.
pub const MIN_WINDOW: usize = 16;

/// How long an added worker has to answer Info.
const JOIN_WAIT: Duration = Duration::from_secs(10);

impl ExpertPool {
    pub fn new(
        workers: Arc<Workers>,
        view: PlacementView,
        load: Arc<ExpertLoad>,
        connector: Connector,
        options: PoolOptions,
    ) -> Self {
        Self {
            workers,
            view,
            load,
            connector,
            options,
            changing: tokio::sync::Mutex::new(()),
            restarting: Mutex::default(),
        }
    }

    fn restarting(&self) -> std::sync::MutexGuard<'_, BTreeSet<usize>> {
        self.restarting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn view(&self) -> &PlacementView {
        &self.view
    }

    pub fn workers(&self) -> &Arc<Workers> {
        &self.workers
    }

    fn worker_ref(&self, index: usize) -> WorkerRef {
        self.workers.worker_ref(index)
    }

    /// Which workers work may be planned on, by index.
    fn serving(&self) -> Vec<bool> {
        self.workers.all().iter().map(|w| w.serves()).collect()
    }

    /// Rebalances over the recent load (EPLB within the spare slots, over
    /// the serving workers).
    pub async fn rebalance(&self) -> Result<Rebalanced, PoolError> {
        let _one_change = self.changing.lock().await;
        let result = self.rebalance_now().await;
        let outcome = match &result {
            Ok(r) if r.moved > 0 => "moved",
            Ok(_) => "unchanged",
            Err(_) => "failed",
        };
        metrics::counter!(names::REBALANCES_TOTAL, "outcome" => outcome).increment(1);
        result
    }

    async fn rebalance_now(&self) -> Result<Rebalanced, PoolError> {
        let stats = self.load.snapshot();
        let load: Vec<Vec<f64>> = stats
            .recent_tokens
            .iter()
            .map(|row| row.iter().map(|&t| t as f64).collect())
            .collect();
        // As dispatched, over enough of the placement in effect; a layer
        // with too few dispatches since the last change is left alone.
        let measured: Vec<Option<f64>> = stats
            .balancedness
            .iter()
            .zip(&stats.recent_dispatches)
            .map(|(&b, &n)| Some(if n >= MIN_WINDOW { b } else { 1.0 }))
            .collect();
        let current = self.view.latest();
        let plan = rebalance::rebalance_serving(
            &current.placement,
            &load,
            self.options.spare_slots,
            &self.serving(),
            &measured,
        )?;
        let mut done = Rebalanced {
            epoch: current.epoch,
            moved: plan.moved(),
            balancedness_before: plan.balancedness_before,
            balancedness_after: plan.balancedness_after,
            bytes_loaded: 0,
        };
        if done.moved == 0 && plan.placement == current.placement {
            return Ok(done);
        }
        let changed = self.change_to(&current, plan.placement, None).await?;
        done.epoch = changed.epoch;
        done.bytes_loaded = changed.bytes;
        metrics::gauge!(names::REBALANCE_BALANCEDNESS, "when" => "before")
            .set(done.balancedness_before);
        metrics::gauge!(names::REBALANCE_BALANCEDNESS, "when" => "after")
            .set(done.balancedness_after);
        tracing::info!(
            epoch = done.epoch,
            moved = done.moved,
            bytes_loaded = done.bytes_loaded,
            balancedness_before = done.balancedness_before,
            balancedness_after = done.balancedness_after,
            "experts rebalanced"
        );
        Ok(done)
    }

    /// Adds the worker at `addr` to the pool with the experts it holds (a
    /// worker removed before takes its index back).
    pub async fn add(&self, addr: &str) -> Result<Joined, PoolError> {
        let _one_change = self.changing.lock().await;
        let links = self.workers.all();
        let known = links.iter().position(|w| w.addr == addr);
        if let Some(index) = known
            && !links[index].retired.load(Ordering::Relaxed)
        {
            return Err(PoolError::AlreadyInPool {
                worker: self.worker_ref(index),
            });
        }
        let link = match known {
            Some(index) => links[index].clone(),
            None => Arc::new(WorkerLink::new(
                addr,
                self.connector.max_message_bytes,
                self.connector.tls.as_ref(),
            )?),
        };
        let held = self.held_by(&link).await?;
        let index = match known {
            Some(index) => index,
            None => self.workers.push(link.clone()),
        };
        let joined = self.join(index, &link, &held).await;
        tracing::info!(worker = index, addr, pairs = held.len(), "worker added");
        Ok(joined)
    }

    /// The pairs the worker at `link` holds, checked to serve our model.
    async fn held_by(&self, link: &WorkerLink) -> Result<Vec<Pair>, PoolError> {
        let unreachable = |reason: String| PoolError::Unreachable {
            addr: link.addr.clone(),
            reason,
        };
        let mut client = link.client.clone();
        let info = tokio::time::timeout(JOIN_WAIT, client.info(InfoRequest {}))
            .await
            .map_err(|_| unreachable(format!("no answer within {JOIN_WAIT:?}")))?
            .map_err(|status| unreachable(format!("{:?}: {}", status.code(), status.message())))?
            .into_inner();
        if info.model_id != self.connector.model_id {
            return Err(PoolError::ModelMismatch {
                addr: link.addr.clone(),
                ours: self.connector.model_id.clone(),
                theirs: info.model_id,
            });
        }
        Ok(info
            .held
            .iter()
            .flat_map(|h| {
                h.experts
                    .iter()
                    .map(move |&e| (h.layer as usize, e as usize))
            })
            .collect())
    }

    /// Puts worker `index` in the pool holding `held`: nothing to load.
    async fn join(&self, index: usize, link: &WorkerLink, held: &[Pair]) -> Joined {
        let current = self.view.latest();
        let experts_per_layer: Vec<usize> =
            current.placement.experts.iter().map(Vec::len).collect();
        let held: Vec<Pair> = held
            .iter()
            .copied()
            .filter(|&(layer, expert)| experts_per_layer.get(layer).is_some_and(|&n| expert < n))
            .collect();
        let mut placement = membership::with_worker(&current.placement, index, &held);
        placement.workers = placement.workers.max(self.workers.len());
        link.live.store(true, Ordering::Relaxed);
        link.retired.store(false, Ordering::Relaxed);
        self.restarting().remove(&index);
        let epoch = self.view.switch(placement).await;
        self.load.clear_recent();
        Joined {
            worker: index,
            epoch,
        }
    }

    /// Takes worker `index` out of the pool once every expert it holds is
    /// held by another serving worker (copied where none is). It keeps its
    /// experts; it rejoins when it comes back from a restart, or when added.
    pub async fn remove(&self, index: usize) -> Result<Left, PoolError> {
        let _one_change = self.changing.lock().await;
        let link = self.workers.get(index).ok_or(PoolError::UnknownWorker {
            index,
            workers: self.workers.len(),
        })?;
        if link.retired.load(Ordering::Relaxed) {
            return Err(PoolError::NotInPool {
                worker: self.worker_ref(index),
            });
        }
        let left = self.leave(index).await?;
        tracing::info!(worker = index, addr = %link.addr, moved = left.moved, "worker removed");
        Ok(left)
    }

    async fn leave(&self, index: usize) -> Result<Left, PoolError> {
        let current = self.view.latest();
        let mut placement = membership::without_worker(
            &current.placement,
            index,
            &self.serving(),
            self.options.spare_slots,
        )?;
        placement.workers = placement.workers.max(self.workers.len());
        let changed = self.change_to(&current, placement, Some(index)).await?;
        Ok(Left {
            epoch: changed.epoch,
            moved: changed.moved,
        })
    }

    /// Loads what `to` adds to `from`, switches to it, drops what it takes
    /// away. A `leaving` worker keeps its pairs (it may rejoin with them)
    /// and is retired once the switch is in effect (the steps before it
    /// still plan over it).
    async fn change_to(
        &self,
        from: &Epoch,
        to: Placement,
        leaving: Option<usize>,
    ) -> Result<Changed, PoolError> {
        let (loads, mut drops) = rebalance::changes(&from.placement, &to);
        let moved: usize = loads.iter().map(Vec::len).sum();
        if let Some(own) = leaving.and_then(|index| drops.get_mut(index)) {
            own.clear();
        }
        let bytes = self.load_all(&loads, from.epoch + 1).await?;
        let epoch = self.view.switch(to).await;
        self.load.clear_recent();
        if let Some(link) = leaving.and_then(|index| self.workers.get(index)) {
            link.retired.store(true, Ordering::Relaxed);
        }
        self.drop_all(&drops, epoch).await;
        metrics::counter!(names::PAIRS_MOVED_TOTAL).increment(moved as u64);
        metrics::counter!(names::BYTES_LOADED_TOTAL).increment(bytes);
        Ok(Changed {
            epoch,
            moved,
            bytes,
        })
    }

    /// Follows the monitor's events: with self-healing, a lost worker's
    /// experts move onto the others; a worker out of the pool that comes
    /// back from a restart rejoins with what it holds.
    pub async fn follow(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<WorkerEvent>,
    ) {
        while let Some(event) = events.recv().await {
            match event {
                WorkerEvent::Down(index) => self.lost(index).await,
                WorkerEvent::Up(index) => self.returned(index).await,
            }
        }
    }

    async fn lost(&self, index: usize) {
        let Some(link) = self.workers.get(index) else {
            return;
        };
        let _one_change = self.changing.lock().await;
        if link.retired.load(Ordering::Relaxed) {
            self.restarting().insert(index);
            return;
        }
        if !self.options.self_heal || link.live.load(Ordering::Relaxed) {
            return;
        }
        match self.leave(index).await {
            Ok(left) => {
                self.restarting().insert(index);
                metrics::counter!(names::HEALS_TOTAL).increment(1);
                tracing::warn!(
                    worker = index,
                    addr = %link.addr,
                    epoch = left.epoch,
                    moved = left.moved,
                    "worker lost: its experts were moved onto the others"
                );
            }
            Err(error) => tracing::error!(
                worker = index,
                addr = %link.addr,
                error = %tramontane_infra::error::chain(&error),
                "worker lost, and its experts could not be moved: they wait for it"
            ),
        }
    }

    async fn returned(&self, index: usize) {
        let restarted = self.restarting().contains(&index);
        let Some(link) = self.workers.get(index).filter(|_| restarted) else {
            return;
        };
        let _one_change = self.changing.lock().await;
        let joined = match self.held_by(&link).await {
            Ok(held) => Ok(self.join(index, &link, &held).await),
            Err(error) => Err(error),
        };
        match joined {
            Ok(joined) => tracing::info!(
                worker = index,
                addr = %link.addr,
                epoch = joined.epoch,
                "worker back from a restart: it rejoins the pool"
            ),
            Err(error) => tracing::warn!(
                worker = index,
                addr = %link.addr,
                error = %tramontane_infra::error::chain(&error),
                "worker back, but it cannot rejoin"
            ),
        }
    }

    /// Has every worker load its `loads`, all at once; on a failure, drops
    /// again what the others loaded. Returns the bytes loaded.
    async fn load_all(&self, loads: &[Vec<Pair>], epoch: u64) -> Result<u64, PoolError> {
        let links = self.workers.all();
        let involved: Vec<usize> = (0..loads.len()).filter(|&w| !loads[w].is_empty()).collect();
        if let Some(&down) = involved.iter().find(|&&w| !links[w].serves()) {
            return Err(PoolError::WorkerDown {
                worker: self.worker_ref(down),
            });
        }
        let answers = futures::future::join_all(
            involved
                .iter()
                .map(|&w| self.hold(&links[w], &loads[w], &[], epoch)),
        )
        .await;
        let mut bytes = 0;
        let mut failure = None;
        for (&w, answer) in involved.iter().zip(answers) {
            match answer {
                Ok(loaded) => bytes += loaded,
                Err(status) => {
                    failure.get_or_insert(PoolError::Load {
                        worker: self.worker_ref(w),
                        code: status.code(),
                        message: status.message().to_string(),
                    });
                }
            }
        }
        match failure {
            None => Ok(bytes),
            Some(error) => {
                // What the placement in effect does not list is not used.
                self.drop_all(loads, epoch).await;
                Err(error)
            }
        }
    }

    /// Has every worker drop its `drops`; a failure leaves the pairs loaded
    /// (memory, not correctness) and is logged.
    async fn drop_all(&self, drops: &[Vec<Pair>], epoch: u64) {
        let links = self.workers.all();
        let involved: Vec<usize> = (0..drops.len())
            .filter(|&w| !drops[w].is_empty() && links[w].live.load(Ordering::Relaxed))
            .collect();
        let answers = futures::future::join_all(
            involved
                .iter()
                .map(|&w| self.hold(&links[w], &[], &drops[w], epoch)),
        )
        .await;
        for (&w, answer) in involved.iter().zip(answers) {
            if let Err(status) = answer {
                tracing::warn!(
                    worker = w,
                    addr = %links[w].addr,
                    code = ?status.code(),
                    message = status.message(),
                    "a worker could not drop experts it no longer serves"
                );
            }
        }
    }

    /// One worker's loads or drops, in `Hold`s of at most [`HOLD_PAIRS`]
    /// pairs (a worker serves Forwards between them); the bytes loaded.
    async fn hold(
        &self,
        link: &WorkerLink,
        load: &[Pair],
        drop: &[Pair],
        epoch: u64,
    ) -> Result<u64, tonic::Status> {
        let pairs = |pairs: &[Pair]| {
            pairs
                .iter()
                .map(|&(layer, expert)| ExpertPair {
                    layer: layer as u32,
                    expert: expert as u32,
                })
                .collect()
        };
        let mut client = link.client.clone();
        let mut bytes = 0;
        for chunk in load.chunks(HOLD_PAIRS) {
            let request = HoldRequest {
                load: pairs(chunk),
                drop: Vec::new(),
                epoch,
            };
            bytes += client.hold(request).await?.into_inner().loaded_bytes;
        }
        for chunk in drop.chunks(HOLD_PAIRS) {
            let request = HoldRequest {
                load: Vec::new(),
                drop: pairs(chunk),
                epoch,
            };
            client.hold(request).await?;
        }
        Ok(bytes)
    }
}
