//! A plan for one cluster size: where the experts go (EPLB over the expert
//! load), what each device holds, and what the simulation predicts; and the
//! search for the smallest cluster that meets the SLO.

use serde::Serialize;
use tramontane_policy::placement::Placement;
use tramontane_policy::scheduler::SchedulerConfig;

use crate::memory::{DeviceMemory, USABLE_FRACTION};
use crate::model::SizedModel;
use crate::profile::Profile;
use crate::routing::TokenRouting;
use crate::simulate::{Cluster, Prediction};
use crate::workload::Workload;
use tramontane_policy::eplb;

/// Latency objectives, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_p99: Option<f64>,
    pub itl_p99: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementPolicy {
    /// Expert e on worker e mod W, what the router does without a placement file.
    RoundRobin,
    /// EPLB over the expert load: replicas for the hottest experts, then
    /// balanced packing.
    Eplb,
}

/// Everything a plan depends on but the cluster size.
pub struct Planner {
    pub model: SizedModel,
    pub profile: Profile,
    pub routing: TokenRouting,
    pub workload: Workload,
    pub scheduler: SchedulerConfig,
    pub wire_bytes: usize,
    pub policy: PlacementPolicy,
    /// Expert slots per worker beyond an even share, for replicas.
    pub spare_slots: usize,
    pub slo: Slo,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterPlan {
    pub workers: usize,
    /// Which candidate placement was kept, and every one considered.
    pub placement_name: String,
    pub considered: Vec<Considered>,
    /// Expert slots per worker and MoE layer.
    pub slots_per_worker: usize,
    /// A row per decoder layer; a dense layer's is empty.
    pub placement: Placement,
    /// Per MoE layer (in decoder order), mean ÷ max of the per-worker load
    /// under the default placement and under this plan's placement.
    pub balancedness_default: Vec<f64>,
    pub balancedness: Vec<f64>,
    /// `[layer][worker]` per decoder layer: each worker's share of the
    /// layer's token-expert pairs (a row sums to 1; a dense layer's is 0).
    pub worker_load_default: Vec<Vec<f64>>,
    pub worker_load: Vec<Vec<f64>>,
    /// The router, then each worker.
    pub memory: Vec<DeviceMemory>,
    /// Every process on one host (CPU profile): their sum against the host's memory.
    pub shared_host_bytes: Option<u64>,
    pub fits: bool,
    pub prediction: Prediction,
    pub meets_slo: bool,
}

/// A placement the plan may choose.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub placement: Placement,
    pub slots_per_worker: usize,
}

/// A candidate placement and what the simulation predicts with it.
#[derive(Debug, Clone, Serialize)]
pub struct Considered {
    pub name: String,
    pub slots_per_worker: usize,
    /// Mean over MoE layers of the per-worker balancedness.
    pub balancedness: f64,
    pub output_tokens_per_s: f64,
    pub itl_p50: f64,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the cluster needs at least one worker")]
    NoWorkers,
    #[error("placement: {0}")]
    Placement(#[from] eplb::EplbError),
    #[error("{0} must be a positive number of seconds")]
    Slo(&'static str),
    #[error(
        "no cluster can meet an inter-token latency p99 of {slo_ms:.3} ms: one decode step of a single sequence already takes {floor_ms:.3} ms on this profile"
    )]
    ImpossibleItl { slo_ms: f64, floor_ms: f64 },
    #[error(
        "no cluster can meet a time-to-first-token p99 of {slo_ms:.3} ms: the prefill of one prompt alone takes {floor_ms:.3} ms on this profile"
    )]
    ImpossibleTtft { slo_ms: f64, floor_ms: f64 },
    #[error(
        "a request of {tokens} tokens is larger than --max-kv-tokens {max_kv_tokens}: the router would refuse it"
    )]
    RequestOverKv { tokens: usize, max_kv_tokens: usize },
}

/// Which cluster sizes to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizes {
    /// Exactly this many workers; with `up_to`, every size from 1 to it
    /// (for the charts), the answer being the last.
    Fixed { workers: usize, up_to: bool },
    /// 1 to `max_workers`: the smallest that fits and meets the SLO.
    Search { max_workers: usize },
}

impl Planner {
    /// Refuses a workload the router would refuse (a request over the KV
    /// bound), and SLOs no cluster can meet ([`Planner::check_slo`]).
    pub fn check(&self) -> Result<(), PlanError> {
        let tokens = self.workload.prompt.max() + self.workload.output.max();
        if tokens > self.scheduler.max_kv_tokens {
            return Err(PlanError::RequestOverKv {
                tokens,
                max_kv_tokens: self.scheduler.max_kv_tokens,
            });
        }
        self.check_slo()
    }

    /// Refuses SLOs that are not positive, or that even an idle cluster with
    /// every expert on its own device cannot meet.
    pub fn check_slo(&self) -> Result<(), PlanError> {
        let profile = &self.profile;
        let hidden = self.model.spec.hidden_size;
        // A lone token: its k experts on k devices, in parallel; in every
        // MoE layer (a dense layer's MLP is in the dense step). `rows` of
        // a layer of `top_k`: how many rows a device gets.
        let layers_floor = |rows: &dyn Fn(usize) -> usize| -> f64 {
            self.model
                .spec
                .moe_layers()
                .map(|(_, moe)| {
                    let rows = rows(moe.top_k);
                    profile.dispatch_seconds(2 * rows * hidden * self.wire_bytes)
                        + profile.expert_seconds(rows.div_ceil(moe.experts).max(1))
                })
                .sum()
        };
        if let Some(itl) = self.slo.itl_p99 {
            if !(itl.is_finite() && itl > 0.0) {
                return Err(PlanError::Slo("--slo-itl-p99"));
            }
            let floor = profile.dense_seconds(std::iter::once((1, 0))) + layers_floor(&|_| 1);
            if floor > itl {
                return Err(PlanError::ImpossibleItl {
                    slo_ms: itl * 1e3,
                    floor_ms: floor * 1e3,
                });
            }
        }
        if let Some(ttft) = self.slo.ttft_p99 {
            if !(ttft.is_finite() && ttft > 0.0) {
                return Err(PlanError::Slo("--slo-ttft-p99"));
            }
            let prompt = match self.workload.prompt {
                crate::workload::Lengths::Fixed(n) => n,
                crate::workload::Lengths::Uniform { min, .. } => min,
            };
            let chunk = prompt.min(self.scheduler.max_batch_tokens);
            let steps = prompt.div_ceil(self.scheduler.max_batch_tokens) as f64;
            let floor = steps
                * (profile.dense_seconds(std::iter::once((chunk, 0)))
                    + layers_floor(&|top_k| chunk * top_k));
            if floor > ttft {
                return Err(PlanError::ImpossibleTtft {
                    slo_ms: ttft * 1e3,
                    floor_ms: floor * 1e3,
                });
            }
        }
        Ok(())
    }

    /// The placements considered for `workers` workers: the default one,
    /// and under EPLB one per number of spare slots per worker that fits
    /// (0 up to `spare_slots`), each with its slots per worker.
    pub fn candidates(&self, workers: usize) -> Result<Vec<Candidate>, PlanError> {
        if workers == 0 {
            return Err(PlanError::NoWorkers);
        }
        let spec = &self.model.spec;
        let even = spec.max_experts().div_ceil(workers);
        let mut candidates = vec![Candidate {
            name: "default (e mod W)".into(),
            placement: Placement::round_robin(&spec.experts_per_layer(), workers)
                .map_err(|_| PlanError::NoWorkers)?,
            slots_per_worker: even,
        }];
        if self.policy == PlacementPolicy::Eplb {
            let load = self.routing.load();
            for spare in 0..=self.spare_slots_that_fit(workers, even) {
                let slots = even + spare;
                candidates.push(Candidate {
                    name: format!("EPLB, {spare} spare slots per worker"),
                    placement: eplb::placement_for_load(&load, slots, workers)?,
                    slots_per_worker: slots,
                });
            }
        }
        Ok(candidates)
    }

    /// Spare slots (replicas) only where they help and fit: with more than
    /// one worker, and within a dedicated device's memory.
    fn spare_slots_that_fit(&self, workers: usize, even: usize) -> usize {
        if workers == 1 {
            return 0;
        }
        if self.profile.shared_lanes.is_some() {
            return self.spare_slots;
        }
        let usable = self.profile.memory_bytes as f64 * USABLE_FRACTION;
        let per_slot = self.model.expert_bytes_all_layers() as f64;
        let fit = (usable / per_slot).floor() as usize;
        self.spare_slots.min(fit.saturating_sub(even))
    }

    fn simulate(&self, placement: &Placement) -> Prediction {
        let cluster = Cluster {
            profile: &self.profile,
            placement,
            routing: &self.routing,
            scheduler: self.scheduler,
            wire_bytes: self.wire_bytes,
        };
        cluster.simulate(&self.workload)
    }

    /// The plan for `workers` workers: every candidate placement simulated,
    /// the one with the highest predicted throughput kept — the default
    /// placement when no EPLB placement beats it (where an expert's cost is
    /// reading its weights rather than its rows, replicas and balance may not
    /// pay).
    pub fn plan(&self, workers: usize) -> Result<ClusterPlan, PlanError> {
        let model = &self.model;
        let load = self.routing.load();
        let balancedness =
            |placement: &Placement| moe_rows(&load, eplb::balancedness(&load, placement));
        let candidates = self.candidates(workers)?;
        let default = candidates[0].placement.clone();
        let mut considered = Vec::new();
        let mut best: Option<(Candidate, Prediction)> = None;
        for candidate in candidates {
            let prediction = self.simulate(&candidate.placement);
            considered.push(Considered {
                name: candidate.name.clone(),
                slots_per_worker: candidate.slots_per_worker,
                balancedness: mean(&balancedness(&candidate.placement)),
                output_tokens_per_s: prediction.output_tokens_per_s,
                itl_p50: prediction.itl.p50,
            });
            if best
                .as_ref()
                .is_none_or(|(_, b)| prediction.output_tokens_per_s > b.output_tokens_per_s)
            {
                best = Some((candidate, prediction));
            }
        }
        let (chosen, prediction) = best.expect("the default placement is always a candidate");
        let (placement, slots_per_worker, placement_name) =
            (chosen.placement, chosen.slots_per_worker, chosen.name);

        let capacity = self.profile.memory_bytes;
        let kv_bytes = prediction.peak_kv_tokens as u64 * model.kv_bytes_per_token();
        let mut memory = vec![DeviceMemory::new(
            "router".into(),
            0,
            0,
            model.dense_bytes(),
            kv_bytes,
            capacity,
        )];
        for worker in 0..workers {
            // Its (layer, expert) pairs, each of its layer's size.
            let held: Vec<(usize, usize)> = placement
                .held_by(worker)
                .into_iter()
                .map(|(layer, experts)| (layer, experts.len()))
                .collect();
            let slots = held.iter().map(|&(_, n)| n).sum();
            let bytes = held
                .iter()
                .map(|&(layer, n)| n as u64 * model.expert_bytes(layer))
                .sum();
            memory.push(DeviceMemory::new(
                format!("worker {worker}"),
                slots,
                bytes,
                0,
                0,
                capacity,
            ));
        }
        let shared_host_bytes = self
            .profile
            .shared_lanes
            .map(|_| memory.iter().map(|m| m.total_bytes).sum::<u64>());
        let fits = match shared_host_bytes {
            Some(total) => total as f64 <= capacity as f64 * USABLE_FRACTION,
            None => memory.iter().all(|m| m.fits),
        };
        let meets_slo = fits
            && prediction.refused == 0
            && prediction.completed == self.workload.requests
            && self.slo.ttft_p99.is_none_or(|s| prediction.ttft.p99 <= s)
            && self.slo.itl_p99.is_none_or(|s| prediction.itl.p99 <= s);
        Ok(ClusterPlan {
            workers,
            placement_name,
            considered,
            slots_per_worker,
            balancedness_default: balancedness(&default),
            balancedness: balancedness(&placement),
            worker_load_default: worker_load(&load, &default),
            worker_load: worker_load(&load, &placement),
            placement,
            memory,
            shared_host_bytes,
            fits,
            prediction,
            meets_slo,
        })
    }

    /// Plans for 1..=max_workers workers; the smallest that fits and meets
    /// the SLO is the answer.
    pub fn search(
        &self,
        max_workers: usize,
    ) -> Result<(Vec<ClusterPlan>, Option<usize>), PlanError> {
        let mut plans = Vec::new();
        for workers in 1..=max_workers {
            plans.push(self.plan(workers)?);
        }
        let chosen = plans.iter().find(|p| p.meets_slo).map(|p| p.workers);
        Ok((plans, chosen))
    }

    /// The plans for `sizes` and the number of workers chosen.
    pub fn plans(&self, sizes: Sizes) -> Result<(Vec<ClusterPlan>, Option<usize>), PlanError> {
        match sizes {
            Sizes::Fixed { workers, up_to } => {
                let first = if up_to { 1 } else { workers };
                let plans = (first..=workers)
                    .map(|w| self.plan(w))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((plans, Some(workers)))
            }
            Sizes::Search { max_workers } => self.search(max_workers),
        }
    }
}

/// Of per-layer `values`, the MoE layers' (those with a row in `load`).
fn moe_rows(load: &[Vec<f64>], values: Vec<f64>) -> Vec<f64> {
    values
        .into_iter()
        .zip(load)
        .filter(|(_, row)| !row.is_empty())
        .map(|(value, _)| value)
        .collect()
}

/// `[layer][worker]`: each worker's share of the layer's token-expert pairs,
/// an expert's load split evenly over its replicas.
pub fn worker_load(load: &[Vec<f64>], placement: &Placement) -> Vec<Vec<f64>> {
    load.iter()
        .enumerate()
        .map(|(layer, experts)| {
            let tokens: f64 = experts.iter().sum();
            let mut per_worker = vec![0.0; placement.workers];
            for (expert, &l) in experts.iter().enumerate() {
                let replicas = placement.replicas(layer, expert);
                for &w in replicas {
                    per_worker[w] += l / replicas.len() as f64 / tokens.max(f64::MIN_POSITIVE);
                }
            }
            per_worker
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures;
    use crate::weight_dtype::WeightDtype;
    use crate::workload::{Arrivals, Lengths};

    fn shape() -> SizedModel {
        test_fixtures::shape(2, 4, 2)
    }

    /// An expert call costs `fixed` plus `per_row` per row; the rest is free.
    fn profile(fixed: f64, per_row: f64) -> Profile {
        test_fixtures::profile(&shape(), 0.0, fixed, per_row)
    }

    /// Experts 0 and 2 (both on worker 0 by default) get 3 of 4 tokens.
    fn skewed_routing(dir: &std::path::Path) -> TokenRouting {
        let path = test_fixtures::trace(dir, "m", 2, 4, &[0, 2, 0, 2, 0, 2, 1, 3]);
        TokenRouting::from_trace(&path, &shape(), Some("m")).unwrap()
    }

    fn planner(profile: Profile, routing: TokenRouting) -> Planner {
        Planner {
            model: shape(),
            profile,
            routing,
            workload: Workload {
                arrivals: Arrivals::Concurrency(16),
                prompt: Lengths::Fixed(8),
                output: Lengths::Fixed(8),
                requests: 32,
                seed: 1,
                prefix_share: 0.0,
            },
            scheduler: SchedulerConfig::default(),
            wire_bytes: 4,
            policy: PlacementPolicy::Eplb,
            spare_slots: 1,
            slo: Slo::default(),
        }
    }

    #[test]
    fn rows_bound_experts_get_the_balanced_placement() {
        let dir = tempfile::tempdir().unwrap();
        let plan = planner(profile(0.0, 1e-3), skewed_routing(dir.path()))
            .plan(2)
            .unwrap();
        assert_eq!(plan.considered.len(), 3, "{:?}", plan.considered);
        assert!(
            plan.placement_name.starts_with("EPLB"),
            "{}",
            plan.placement_name
        );
        let default = &plan.considered[0];
        assert!(plan.prediction.output_tokens_per_s > 1.2 * default.output_tokens_per_s);
        assert!(mean(&plan.balancedness) > mean(&plan.balancedness_default));
        assert!(mean(&plan.balancedness_default) < 0.8);
    }

    #[test]
    fn weight_bound_experts_keep_the_default_when_balance_does_not_pay() {
        // Every call costs the same whatever its rows: two experts per worker
        // in any arrangement cost the same, and a replica costs a call more.
        let dir = tempfile::tempdir().unwrap();
        let plan = planner(profile(1e-3, 0.0), skewed_routing(dir.path()))
            .plan(2)
            .unwrap();
        let best = plan
            .considered
            .iter()
            .map(|c| c.output_tokens_per_s)
            .fold(0.0, f64::max);
        assert_eq!(plan.prediction.output_tokens_per_s, best);
        assert_ne!(plan.placement_name, "EPLB, 1 spare slots per worker");
    }

    #[test]
    fn objectives_below_a_lone_step_are_refused() {
        let mut p = planner(profile(1e-3, 0.0), TokenRouting::uniform(&shape()));
        p.slo.itl_p99 = Some(1e-4);
        assert!(matches!(
            p.check_slo(),
            Err(PlanError::ImpossibleItl { .. })
        ));
        p.slo.itl_p99 = Some(f64::NAN);
        assert!(matches!(p.check_slo(), Err(PlanError::Slo(_))));
        p.slo.itl_p99 = Some(1.0);
        p.check_slo().unwrap();
    }

    #[test]
    fn dense_layers_get_empty_rows_and_no_expert_memory() {
        // Four decoder layers, 0 and 2 dense; experts 0 and 2 hot in 1 and 3.
        let model = test_fixtures::with_dense_layers(4, 4, 2, &[0, 2], 24);
        let dir = tempfile::tempdir().unwrap();
        let path = test_fixtures::trace_of_layers(
            dir.path(),
            "m",
            4,
            4,
            &[1, 3],
            &[0, 2, 0, 2, 0, 2, 1, 3],
        );
        let routing = TokenRouting::from_trace(&path, &model, Some("m")).unwrap();
        let profile = test_fixtures::profile(&model, 0.0, 0.0, 1e-3);
        let planner = Planner {
            model: model.clone(),
            ..planner(profile, routing)
        };
        let plan = planner.plan(2).unwrap();
        assert!(
            plan.placement_name.starts_with("EPLB"),
            "{}",
            plan.placement_name
        );
        plan.placement.validate(&[0, 4, 0, 4]).unwrap();
        for candidate in planner.candidates(2).unwrap() {
            candidate.placement.validate(&[0, 4, 0, 4]).unwrap();
        }
        // Balance is of the two MoE layers; load rows are every layer's.
        assert_eq!(plan.balancedness.len(), 2);
        assert!(mean(&plan.balancedness) > mean(&plan.balancedness_default));
        assert_eq!(plan.worker_load[0], vec![0.0, 0.0]);
        assert!((plan.worker_load[1].iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Each worker's bytes: its slots of the two MoE layers, 3 × 8 × 16
        // parameters of 4 bytes each.
        for worker in &plan.memory[1..] {
            assert_eq!(
                worker.expert_bytes,
                worker.expert_slots as u64 * 3 * 8 * 16 * 4
            );
        }
        let slots: usize = plan.memory[1..].iter().map(|w| w.expert_slots).sum();
        assert!(
            (8..=2 * 2 * plan.slots_per_worker).contains(&slots),
            "{slots}"
        );
        // The router holds the dense layers' MLPs.
        assert_eq!(plan.memory[0].dense_bytes, model.dense_bytes());
    }

    #[test]
    fn the_search_on_h100s_finds_what_holds_each_familys_experts() {
        // Memory decides here: the smallest cluster whose workers hold the
        // experts (by hand in `memory`'s tests) is the answer.
        for (name, weights, workers) in [
            ("mixtral-8x7b", None, 2),
            ("qwen3-30b-a3b", None, 1),
            ("qwen3-235b-a22b", None, 7),
            ("qwen2-57b-a14b", None, 2),
            ("olmoe-1b-7b-0924", None, 1),
            ("gpt-oss-20b", None, 1),
            ("gpt-oss-120b", None, 4),
            // As published: its experts in MXFP4.
            ("gpt-oss-120b", Some(WeightDtype::Mxfp4), 1),
        ] {
            let mut model = test_fixtures::fixture(name);
            if let Some(weights) = weights {
                model.experts = weights;
            }
            let planner = Planner {
                routing: TokenRouting::uniform(&model),
                profile: crate::roofline::by_key("h100").unwrap().profile(&model),
                workload: Workload {
                    arrivals: Arrivals::Concurrency(1),
                    prompt: Lengths::Fixed(16),
                    output: Lengths::Fixed(4),
                    requests: 2,
                    seed: 1,
                    prefix_share: 0.0,
                },
                model,
                ..planner(profile(0.0, 0.0), TokenRouting::uniform(&shape()))
            };
            let (plans, chosen) = planner.search(8).unwrap();
            assert_eq!(chosen, Some(workers), "{name}");
            let plan = &plans[workers - 1];
            assert!(plan.fits && plan.meets_slo, "{name}");
            if workers > 1 {
                assert!(!plans[workers - 2].fits, "{name}");
            }
        }
    }
}
