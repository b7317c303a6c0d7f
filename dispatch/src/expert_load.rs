//! How the load spreads over experts and workers: tokens routed per
//! (layer, expert) and (token, expert) pairs computed per worker, both
//! cumulative and over a sliding window of recent dispatches, with each
//! layer's balancedness (mean ÷ max pairs per worker over the window; 1 is
//! perfectly even). Exported as Prometheus metrics and served as JSON on
//! `GET /v1/experts/stats`. Layers are decoder layers; a dense one routes
//! nothing, and has no expert counts and no balancedness gauge.

use std::collections::VecDeque;
use std::sync::Mutex;

use metrics::{Counter, Gauge};
use serde::Serialize;

use crate::metrics as names;

/// Dispatches per layer the recent window keeps.
pub const WINDOW_STEPS: usize = 64;

/// One layer's dispatch: per expert tokens routed, per worker pairs computed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dispatch {
    experts: Vec<u64>,
    workers: Vec<u64>,
}

struct LayerLoad {
    /// The layer's routed experts (0 for a dense layer).
    experts: usize,
    /// The workers that held some of its experts at its last dispatch:
    /// balancedness is over them.
    members: Vec<bool>,
    cumulative: Dispatch,
    recent: VecDeque<Dispatch>,
    routed: Vec<Counter>,
    /// None for a dense layer.
    balancedness: Option<Gauge>,
}

pub struct ExpertLoad {
    state: Mutex<State>,
    /// The most routed experts a layer has.
    experts: usize,
}

struct State {
    layers: Vec<LayerLoad>,
    /// By worker; grows as workers are added.
    worker_pairs: Vec<Counter>,
}

impl State {
    fn workers(&self) -> usize {
        self.worker_pairs.len()
    }

    /// Counts `workers` workers (at least).
    fn grow(&mut self, workers: usize) {
        for w in self.worker_pairs.len()..workers {
            self.worker_pairs
                .push(metrics::counter!(names::WORKER_PAIRS_TOTAL, "worker" => w.to_string()));
        }
    }
}

/// `GET /v1/experts/stats`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExpertStats {
    pub layers: usize,
    /// The most routed experts a layer has.
    pub experts: usize,
    pub workers: usize,
    /// Dispatches per layer the `recent` figures cover (at most).
    pub window_steps: usize,
    /// `tokens[layer][expert]`: tokens routed since start (a dense layer's
    /// row is empty).
    pub tokens: Vec<Vec<u64>>,
    /// The same over the recent window.
    pub recent_tokens: Vec<Vec<u64>>,
    /// `worker_load[layer][worker]`: (token, expert) pairs computed since start.
    pub worker_load: Vec<Vec<u64>>,
    pub recent_worker_load: Vec<Vec<u64>>,
    /// Per layer, mean ÷ max of `recent_worker_load` (1 when nothing ran).
    pub balancedness: Vec<f64>,
    /// Per layer, the dispatches the recent figures cover (fewer than
    /// `window_steps` after a start or a change of placement).
    pub recent_dispatches: Vec<usize>,
}

/// mean ÷ max; 1 for no load.
pub fn balancedness(load: &[u64]) -> f64 {
    let max = load.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return 1.0;
    }
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    mean / max as f64
}

/// [`balancedness`] over the workers with `members[w]` (all when none is).
fn balancedness_of(load: &[u64], members: &[bool]) -> f64 {
    let over: Vec<u64> = load
        .iter()
        .enumerate()
        .filter(|&(w, _)| members.get(w).copied().unwrap_or(false))
        .map(|(_, &n)| n)
        .collect();
    match over.is_empty() {
        true => balancedness(load),
        false => balancedness(&over),
    }
}

impl Dispatch {
    fn zero(experts: usize, workers: usize) -> Self {
        Self {
            experts: vec![0; experts],
            workers: vec![0; workers],
        }
    }

    fn add(&mut self, other: &Dispatch) {
        for (a, &b) in self.experts.iter_mut().zip(&other.experts) {
            *a += b;
        }
        if self.workers.len() < other.workers.len() {
            self.workers.resize(other.workers.len(), 0);
        }
        for (a, &b) in self.workers.iter_mut().zip(&other.workers) {
            *a += b;
        }
    }
}

impl ExpertLoad {
    /// The load of a model whose layer l has `experts_per_layer[l]` routed
    /// experts, over `workers` workers.
    pub fn new(experts_per_layer: &[usize], workers: usize) -> Self {
        let layer_loads = experts_per_layer
            .iter()
            .enumerate()
            .map(|(layer, &experts)| LayerLoad {
                experts,
                members: vec![true; workers],
                cumulative: Dispatch::zero(experts, workers),
                recent: VecDeque::with_capacity(WINDOW_STEPS),
                routed: (0..experts)
                    .map(|expert| {
                        metrics::counter!(
                            names::ROUTED_TOKENS_TOTAL,
                            "layer" => layer.to_string(),
                            "expert" => expert.to_string()
                        )
                    })
                    .collect(),
                balancedness: (experts > 0).then(
                    || metrics::gauge!(names::EXPERT_BALANCEDNESS, "layer" => layer.to_string()),
                ),
            })
            .collect();
        let mut state = State {
            layers: layer_loads,
            worker_pairs: Vec::new(),
        };
        state.grow(workers);
        Self {
            state: Mutex::new(state),
            experts: experts_per_layer.iter().copied().max().unwrap_or(0),
        }
    }

    /// Forgets the recent window (a new placement: what the old one did
    /// says little of the new one's balance).
    pub fn clear_recent(&self) {
        let mut state = self.state.lock().expect("expert load lock");
        for layer in &mut state.layers {
            layer.recent.clear();
        }
    }

    /// Records one layer's dispatch: `experts` are the routed expert ids (k
    /// per token), `worker_pairs[w]` the pairs worker w computed, `members`
    /// the workers that held some of the layer's experts.
    pub fn record(&self, layer: usize, experts: &[usize], worker_pairs: &[u64], members: &[bool]) {
        let mut state = self.state.lock().expect("expert load lock");
        state.grow(worker_pairs.len());
        let workers = state.workers();
        let State {
            layers,
            worker_pairs: counters,
        } = &mut *state;
        let Some(load) = layers.get_mut(layer) else {
            return;
        };
        load.members = members.to_vec();
        let mut dispatch = Dispatch::zero(load.experts, workers);
        for &e in experts {
            if let Some(count) = dispatch.experts.get_mut(e) {
                *count += 1;
            }
        }
        for (a, &b) in dispatch.workers.iter_mut().zip(worker_pairs) {
            *a += b;
        }
        for (counter, &n) in counters.iter().zip(&dispatch.workers) {
            counter.increment(n);
        }
        for (counter, &n) in load.routed.iter().zip(&dispatch.experts) {
            counter.increment(n);
        }
        load.cumulative.add(&dispatch);
        if load.recent.len() == WINDOW_STEPS {
            load.recent.pop_front();
        }
        load.recent.push_back(dispatch);
        let recent = window_sum(&load.recent, load.experts, workers);
        if let Some(gauge) = &load.balancedness {
            gauge.set(balancedness_of(&recent.workers, &load.members));
        }
    }

    pub fn snapshot(&self) -> ExpertStats {
        let state = self.state.lock().expect("expert load lock");
        let (layers, workers) = (&state.layers, state.workers());
        let recent: Vec<Dispatch> = layers
            .iter()
            .map(|l| window_sum(&l.recent, l.experts, workers))
            .collect();
        ExpertStats {
            layers: layers.len(),
            experts: self.experts,
            workers,
            window_steps: WINDOW_STEPS,
            tokens: layers
                .iter()
                .map(|l| l.cumulative.experts.clone())
                .collect(),
            recent_tokens: recent.iter().map(|d| d.experts.clone()).collect(),
            worker_load: layers
                .iter()
                .map(|l| {
                    let mut load = l.cumulative.workers.clone();
                    load.resize(workers, 0);
                    load
                })
                .collect(),
            balancedness: recent
                .iter()
                .zip(layers.iter())
                .map(|(d, l)| balancedness_of(&d.workers, &l.members))
                .collect(),
            recent_worker_load: recent.into_iter().map(|d| d.workers).collect(),
            recent_dispatches: layers.iter().map(|l| l.recent.len()).collect(),
        }
    }
}

fn window_sum(recent: &VecDeque<Dispatch>, experts: usize, workers: usize) -> Dispatch {
    let mut sum = Dispatch::zero(experts, workers);
    for d in recent {
        sum.add(d);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancedness_is_mean_over_max() {
        assert_eq!(balancedness(&[4, 4]), 1.0);
        assert_eq!(balancedness(&[6, 2]), 4.0 / 6.0);
        assert_eq!(balancedness(&[0, 0]), 1.0);
    }

    #[test]
    fn a_dense_layer_routes_nothing_and_the_routed_ones_count() {
        // Layer 0 dense, layers 1 and 2 with 4 routed experts.
        let load = ExpertLoad::new(&[0, 4, 4], 2);
        load.record(1, &[0, 3, 3, 2], &[1, 3], &[true, true]);
        load.record(0, &[1], &[1, 0], &[true, true]);
        let stats = load.snapshot();
        assert_eq!((stats.layers, stats.experts), (3, 4));
        assert_eq!(stats.tokens[0], Vec::<u64>::new());
        assert_eq!(stats.tokens[1], [1, 0, 1, 2]);
        assert_eq!(stats.tokens[2], [0, 0, 0, 0]);
        assert_eq!(stats.worker_load[1], [1, 3]);
        assert_eq!(stats.balancedness[1], 2.0 / 3.0);
    }

    #[test]
    fn counts_accumulate_and_the_window_forgets() {
        let load = ExpertLoad::new(&[4, 4], 2);
        load.record(0, &[0, 1, 1, 3], &[3, 1], &[true, true]);
        let stats = load.snapshot();
        assert_eq!(stats.tokens[0], [1, 2, 0, 1]);
        assert_eq!(stats.tokens[1], [0, 0, 0, 0]);
        assert_eq!(stats.worker_load[0], [3, 1]);
        assert_eq!(stats.balancedness[0], 2.0 / 3.0);
        for _ in 0..WINDOW_STEPS {
            load.record(0, &[2, 2], &[1, 1], &[true, true]);
        }
        let stats = load.snapshot();
        assert_eq!(stats.tokens[0], [1, 2, 2 * WINDOW_STEPS as u64, 1]);
        assert_eq!(stats.recent_tokens[0], [0, 0, 2 * WINDOW_STEPS as u64, 0]);
        assert_eq!(stats.balancedness[0], 1.0);
        assert_eq!(stats.recent_dispatches, [WINDOW_STEPS, 0]);
        load.clear_recent();
        let stats = load.snapshot();
        assert_eq!(stats.recent_dispatches, [0, 0]);
        assert_eq!(stats.recent_tokens[0], [0, 0, 0, 0]);
        assert_eq!(stats.tokens[0], [1, 2, 2 * WINDOW_STEPS as u64, 1]);
    }

    #[test]
    fn a_worker_added_is_counted_and_balancedness_is_over_the_members() {
        let load = ExpertLoad::new(&[4], 2);
        // Worker 2 joined; worker 0 left the layer (holds none of it).
        load.record(0, &[0, 1, 2, 3], &[0, 2, 2], &[false, true, true]);
        let stats = load.snapshot();
        assert_eq!(stats.workers, 3);
        assert_eq!(stats.worker_load[0], [0, 2, 2]);
        assert_eq!(stats.balancedness[0], 1.0);
    }
}
