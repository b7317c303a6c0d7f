//! The router's view of which worker holds which expert, by epoch.
//!
//! Every change is a new epoch. A switch (a rebalance, a worker added or
//! removed) is published and takes effect between steps: at the next step's
//! start, or at once when no step runs. Every layer of a step is planned
//! over the placement in effect ([`PlacementView::current`]) and its
//! Forwards name that epoch. Once [`PlacementView::switch`] returns, no step
//! plans over an older placement: copies only it listed can be dropped.
//! A worker's answer that it no longer holds an expert takes it off that
//! expert at once, in the placement in effect and in one waiting to be.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tramontane_policy::placement::Placement;

/// A placement and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: u64,
    pub placement: Placement,
}

struct State {
    current: Arc<Epoch>,
    /// A switch waiting for the next step, and its number.
    published: Option<(Arc<Epoch>, u64)>,
    stepping: bool,
    last_epoch: u64,
    /// Switches published so far.
    switches: u64,
}

impl State {
    fn next_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    fn take_effect(&mut self, next: Arc<Epoch>) {
        metrics::gauge!(crate::metrics::PLACEMENT_EPOCH).set(next.epoch as f64);
        self.current = next;
    }
}

/// Cheap to clone: the clones share the view.
#[derive(Clone)]
pub struct PlacementView {
    state: Arc<Mutex<State>>,
    /// The number of the last switch in effect, for those waiting on one.
    switched: watch::Sender<u64>,
}

impl PlacementView {
    /// `placement` in effect, at epoch 0.
    pub fn new(placement: Placement) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                current: Arc::new(Epoch {
                    epoch: 0,
                    placement,
                }),
                published: None,
                stepping: false,
                last_epoch: 0,
                switches: 0,
            })),
            switched: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The placement in effect.
    pub fn current(&self) -> Arc<Epoch> {
        self.lock().current.clone()
    }

    /// The placement a switch waits to put in effect, else the one in effect:
    /// what the next change starts from.
    pub fn latest(&self) -> Arc<Epoch> {
        let state = self.lock();
        state
            .published
            .as_ref()
            .map_or(&state.current, |(next, _)| next)
            .clone()
    }

    /// A step begins: a published switch takes effect.
    pub(crate) fn begin_step(&self) {
        let mut state = self.lock();
        if let Some((next, switch)) = state.published.take() {
            state.take_effect(next);
            self.switched.send_replace(switch);
        }
        state.stepping = true;
    }

    pub(crate) fn end_step(&self) {
        self.lock().stepping = false;
    }

    /// Publishes `placement` as a new epoch and returns once it is in
    /// effect (at the next step's start, at once when no step runs): from
    /// then on no step plans over the placements before it. One switch at
    /// a time: a second one published before the first takes effect
    /// replaces it.
    pub async fn switch(&self, placement: Placement) -> u64 {
        let mut switched = self.switched.subscribe();
        let (epoch, switch) = {
            let mut state = self.lock();
            let epoch = state.next_epoch();
            state.switches += 1;
            let switch = state.switches;
            let next = Arc::new(Epoch { epoch, placement });
            if state.stepping {
                state.published = Some((next, switch));
            } else {
                state.take_effect(next);
                self.switched.send_replace(switch);
            }
            (epoch, switch)
        };
        // The sender lives in `self`: the wait ends with the switch.
        let _ = switched.wait_for(|&s| s >= switch).await;
        epoch
    }

    /// Takes `worker` off `experts` of `layer` at once, in the placement in
    /// effect and in a published one (each a new epoch, where it changes).
    pub(crate) fn drop_holder(&self, layer: usize, experts: &[usize], worker: usize) {
        let mut state = self.lock();
        let without = |epoch: u64, from: &Epoch| {
            let mut placement = from.placement.clone();
            let mut changed = false;
            if let Some(row) = placement.experts.get_mut(layer) {
                for &expert in experts {
                    if let Some(replicas) = row.get_mut(expert) {
                        let before = replicas.len();
                        replicas.retain(|&w| w != worker);
                        changed |= replicas.len() != before;
                    }
                }
            }
            (changed, Arc::new(Epoch { epoch, placement }))
        };
        let (changed, current) = without(state.last_epoch + 1, &state.current);
        if changed {
            state.next_epoch();
            state.take_effect(current);
        }
        if let Some((published, switch)) = state.published.take() {
            let (changed, next) = without(state.last_epoch + 1, &published);
            if changed {
                state.next_epoch();
                state.published = Some((next, switch));
            } else {
                state.published = Some((published, switch));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_workers() -> Placement {
        Placement::round_robin(&[4, 4], 2).unwrap()
    }

    fn moved() -> Placement {
        let mut placement = two_workers();
        placement.experts[0][0] = vec![0, 1];
        placement
    }

    #[tokio::test]
    async fn a_switch_without_a_running_step_takes_effect_at_once() {
        let view = PlacementView::new(two_workers());
        assert_eq!(view.switch(moved()).await, 1);
        assert_eq!(
            *view.current(),
            Epoch {
                epoch: 1,
                placement: moved()
            }
        );
    }

    /// A switch to `moved()` published while `view` runs a step.
    async fn switch_during_a_step(view: &PlacementView) -> tokio::task::JoinHandle<u64> {
        view.begin_step();
        let switch = tokio::spawn({
            let view = view.clone();
            async move { view.switch(moved()).await }
        });
        while view.latest().epoch == 0 {
            tokio::task::yield_now().await;
        }
        switch
    }

    #[tokio::test]
    async fn a_switch_during_a_step_waits_for_the_next_step() {
        let view = PlacementView::new(two_workers());
        let switch = switch_during_a_step(&view).await;
        // The running step keeps planning over epoch 0.
        assert_eq!(view.current().epoch, 0);
        assert!(!switch.is_finished());
        view.end_step();
        assert_eq!(view.current().epoch, 0, "no step has begun since");
        view.begin_step();
        assert_eq!(view.current().epoch, 1);
        assert_eq!(switch.await.unwrap(), 1);
        view.end_step();
    }

    #[tokio::test]
    async fn a_dropped_holder_leaves_the_placement_in_effect_and_the_published_one() {
        let view = PlacementView::new(two_workers());
        let switch = switch_during_a_step(&view).await;
        // Worker 0 held expert 0 of layer 0 (and 2); it answers it does not.
        view.drop_holder(0, &[0], 0);
        view.drop_holder(0, &[1], 0); // worker 0 never held expert 1: no change
        let current = view.current();
        assert_eq!(current.epoch, 2);
        assert!(current.placement.experts[0][0].is_empty());
        let published = view.latest();
        assert_eq!(published.epoch, 3);
        assert_eq!(published.placement.experts[0][0], vec![1]);
        view.end_step();
        view.begin_step();
        assert_eq!(view.current().epoch, 3);
        assert_eq!(switch.await.unwrap(), 1, "the switch's own epoch");
    }
}
