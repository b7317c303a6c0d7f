//! The expert pool while it serves: rebalancing over the recent load.
//!
//! A rebalance plans the new placement ([`tramontane_policy::rebalance`]),
//! has every worker load its new pairs (`Hold`), switches the placement
//! between steps ([`PlacementView::switch`]), then has the workers drop
//! what they no longer need. Until the switch every step plans over the
//! old placement, whose copies are all still held; after it none does. A
//! failed load leaves the old placement in effect (the pairs loaded so far
//! are dropped again). One change of the pool at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tramontane_policy::eplb::EplbError;
use tramontane_policy::rebalance::{self, Pair};
use tramontane_proto::v1::{ExpertPair, HoldRequest};

use crate::error::WorkerRef;
use crate::expert_load::ExpertLoad;
use crate::metrics as names;
use crate::placement_view::PlacementView;
use crate::remote::WorkerLink;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{worker} is down: it cannot load the experts a rebalance gives it")]
    WorkerDown { worker: WorkerRef },
    #[error("{worker} could not load its new experts ({code:?}): {message}")]
    Load {
        worker: WorkerRef,
        code: tonic::Code,
        message: String,
    },
    #[error("planning the rebalance: {0}")]
    Plan(#[from] EplbError),
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

/// Pairs one `Hold` of a rebalance names: a worker's compute thread loads
/// them between Forwards, so a few at a time keeps Forwards flowing.
pub const HOLD_PAIRS: usize = 4;

pub struct ExpertPool {
    workers: Arc<Vec<WorkerLink>>,
    view: PlacementView,
    load: Arc<ExpertLoad>,
    /// Slots per worker beyond the even share (`--spare-slots`).
    spare_slots: usize,
    /// One change at a time.
    changing: tokio::sync::Mutex<()>,
}

impl ExpertPool {
    pub fn new(
        workers: Arc<Vec<WorkerLink>>,
        view: PlacementView,
        load: Arc<ExpertLoad>,
        spare_slots: usize,
    ) -> Self {
        Self {
            workers,
            view,
            load,
            spare_slots,
            changing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn view(&self) -> &PlacementView {
        &self.view
    }

    fn worker_ref(&self, index: usize) -> WorkerRef {
        WorkerRef {
            index,
            addr: self.workers[index].addr.clone(),
        }
    }

    /// Rebalances over the recent load (EPLB within the spare slots).
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
        let load: Vec<Vec<f64>> = self
            .load
            .snapshot()
            .recent_tokens
            .into_iter()
            .map(|row| row.into_iter().map(|t| t as f64).collect())
            .collect();
        let current = self.view.latest();
        let slots = rebalance::slots(&current.placement, self.spare_slots);
        let plan = rebalance::rebalance(&current.placement, &load, slots)?;
        let mut done = Rebalanced {
            epoch: current.epoch,
            moved: plan.moved(),
            balancedness_before: plan.balancedness_before,
            balancedness_after: plan.balancedness_after,
            bytes_loaded: 0,
        };
        if done.moved == 0 {
            return Ok(done);
        }
        let next_epoch = current.epoch + 1;
        done.bytes_loaded = self.load_all(&plan.loads, next_epoch).await?;
        done.epoch = self.view.switch(plan.placement).await;
        self.drop_all(&plan.drops, done.epoch).await;
        metrics::counter!(names::PAIRS_MOVED_TOTAL).increment(done.moved as u64);
        metrics::counter!(names::BYTES_LOADED_TOTAL).increment(done.bytes_loaded);
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

    /// Has every worker load its `loads`, all at once; on a failure, drops
    /// again what the others loaded. Returns the bytes loaded.
    async fn load_all(&self, loads: &[Vec<Pair>], epoch: u64) -> Result<u64, PoolError> {
        let involved: Vec<usize> = (0..loads.len()).filter(|&w| !loads[w].is_empty()).collect();
        if let Some(&down) = involved
            .iter()
            .find(|&&w| !self.workers[w].live.load(Ordering::Relaxed))
        {
            return Err(PoolError::WorkerDown {
                worker: self.worker_ref(down),
            });
        }
        let answers = futures::future::join_all(
            involved
                .iter()
                .map(|&w| self.hold(w, &loads[w], &[], epoch)),
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
        let involved: Vec<usize> = (0..drops.len()).filter(|&w| !drops[w].is_empty()).collect();
        let answers = futures::future::join_all(
            involved
                .iter()
                .map(|&w| self.hold(w, &[], &drops[w], epoch)),
        )
        .await;
        for (&w, answer) in involved.iter().zip(answers) {
            if let Err(status) = answer {
                tracing::warn!(
                    worker = w,
                    addr = %self.workers[w].addr,
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
        worker: usize,
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
        let mut client = self.workers[worker].client.clone();
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
