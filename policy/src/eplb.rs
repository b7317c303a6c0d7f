//! Expert replication and placement: DeepSeek's Expert Parallelism Load
//! Balancer (EPLB), ported from `eplb.py` of github.com/deepseek-ai/EPLB.
//!
//! Given each layer's load per logical expert, [`rebalance_experts`] decides
//! how many replicas (physical experts) each logical expert gets and which
//! physical slot each replica fills; slot `s` lives on GPU
//! `s / (num_replicas / num_gpus)`. Two policies, as in the original:
//!
//! - hierarchical (when `num_nodes` divides `num_groups`): pack whole expert
//!   groups onto nodes, replicate the hot experts within each node, then pack
//!   the node's replicas onto its GPUs, so group-limited routing stays on one node;
//! - global (otherwise): the same with one group and one node.
//!
//! # Fidelity
//!
//! The outputs are meant to equal `eplb.py`'s, so the port keeps PyTorch's
//! numerics where they decide a tie:
//! - loads are rounded to `f32` first (`weight.float()`), and every sum,
//!   division and comparison is done in `f32`;
//! - the group sums follow torch's CPU `sum` kernel (`torch_order::torch_sum`);
//! - `torch.sort(descending=True)` on CPU is libstdc++'s `std::sort`, which is
//!   not stable: equal loads come out in introsort's order, and the packing
//!   depends on it (`torch_order::argsort_descending`);
//! - `max(dim=-1).indices` and Python's `min(..., key=...)` pick the first
//!   of equal candidates.
//!
//! Departures: `log2phy` lists each expert's slots in ascending order (the
//! original orders them by replica rank and pads with -1), and the shape checks
//! (experts divisible by groups, GPUs by nodes) apply under either policy.

use crate::placement::Placement;
use crate::torch_order::{argsort_descending, torch_sum};

/// The result of [`rebalance_experts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalanced {
    /// `[layer][physical slot]` -> logical expert.
    pub phy2log: Vec<Vec<usize>>,
    /// `[layer][logical expert]` -> the physical slots holding it (ascending, at least one).
    pub log2phy: Vec<Vec<Vec<usize>>>,
    /// `[layer][logical expert]` -> number of replicas.
    pub logcnt: Vec<Vec<usize>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EplbError {
    #[error("expert loads have no layers")]
    NoLayers,
    #[error("expert loads have no experts")]
    NoExperts,
    #[error("expert loads of layer {layer} have {found} experts, layer 0 has {expected}")]
    LayerLength {
        layer: usize,
        expected: usize,
        found: usize,
    },
    #[error("layer {layer} expert {expert} has load {load}; loads must be finite f32 values >= 0")]
    BadLoad {
        layer: usize,
        expert: usize,
        load: f64,
    },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("{num_replicas} replicas cannot hold {experts} experts: each needs at least one")]
    TooFewReplicas { num_replicas: usize, experts: usize },
    #[error("{num_replicas} replicas do not split evenly over {num_gpus} GPUs")]
    ReplicasPerGpu {
        num_replicas: usize,
        num_gpus: usize,
    },
    #[error("{num_gpus} GPUs do not split evenly over {num_nodes} nodes")]
    GpusPerNode { num_gpus: usize, num_nodes: usize },
    #[error("{experts} experts do not split evenly into {num_groups} groups")]
    ExpertsPerGroup { experts: usize, num_groups: usize },
}

/// Replicate and place the experts of every layer. `weight[layer][expert]` is
/// the expert's load (e.g. tokens routed to it); `num_replicas` physical slots
/// are spread evenly over `num_gpus` GPUs on `num_nodes` nodes, and the
/// experts form `num_groups` contiguous groups (DeepSeek-V3's group-limited
/// routing; pass 1 when the model has none).
pub fn rebalance_experts(
    weight: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<Rebalanced, EplbError> {
    let experts = validate(weight, num_replicas, num_groups, num_nodes, num_gpus)?;
    let (groups, nodes) = if num_groups.is_multiple_of(num_nodes) {
        (num_groups, num_nodes)
    } else {
        (1, 1)
    };
    let cluster = Cluster {
        replicas: num_replicas,
        groups,
        nodes,
        gpus: num_gpus,
    };

    let mut out = Rebalanced {
        phy2log: Vec::with_capacity(weight.len()),
        log2phy: Vec::with_capacity(weight.len()),
        logcnt: Vec::with_capacity(weight.len()),
    };
    for row in weight {
        let load: Vec<f32> = row.iter().map(|&w| w as f32).collect();
        let (phy2log, logcnt) = rebalance_layer(&load, &cluster);
        let mut log2phy = vec![Vec::new(); experts];
        for (slot, &expert) in phy2log.iter().enumerate() {
            log2phy[expert].push(slot);
        }
        out.phy2log.push(phy2log);
        out.log2phy.push(log2phy);
        out.logcnt.push(logcnt);
    }
    Ok(out)
}

impl Rebalanced {
    /// The router's placement: slot `s` is on worker `s / (slots per worker)`.
    /// An expert with two replicas on one worker lists that worker once. When
    /// `workers` does not divide the slots, worker `w` gets the slots `s` with
    /// `s * workers / slots == w`.
    ///
    /// # Panics
    ///
    /// If `workers` is 0.
    pub fn placement(&self, workers: usize) -> Placement {
        assert!(workers > 0, "a placement needs at least one worker");
        let slots = self.phy2log.first().map_or(0, Vec::len);
        let experts = self
            .log2phy
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|held| {
                        // Slots ascend, so their workers do too.
                        let mut on: Vec<usize> = held.iter().map(|s| s * workers / slots).collect();
                        on.dedup();
                        on
                    })
                    .collect()
            })
            .collect();
        Placement { workers, experts }
    }
}

/// Per layer, mean / max of the workers' loads (1.0 = perfectly balanced, and
/// 1.0 for a layer with no load), where an expert's load is split evenly over
/// the workers the placement lists for it.
///
/// # Panics
///
/// If `placement` does not have `weight`'s layers and experts, or names a
/// worker it does not have ([`Placement::validate`] rules both out).
pub fn balancedness(weight: &[Vec<f64>], placement: &Placement) -> Vec<f64> {
    assert_eq!(
        weight.len(),
        placement.experts.len(),
        "the placement has another number of layers than the loads"
    );
    weight
        .iter()
        .zip(&placement.experts)
        .map(|(loads, experts)| {
            assert_eq!(
                loads.len(),
                experts.len(),
                "the placement has another number of experts than the loads"
            );
            let mut per_worker = vec![0.0; placement.workers];
            for (&load, workers) in loads.iter().zip(experts) {
                let share = load / workers.len() as f64;
                for &w in workers {
                    per_worker[w] += share;
                }
            }
            let max = per_worker.iter().copied().fold(0.0, f64::max);
            if max == 0.0 {
                return 1.0;
            }
            per_worker.iter().sum::<f64>() / per_worker.len() as f64 / max
        })
        .collect()
}

/// EPLB's placement of each MoE layer's experts (its `load` row) in
/// `slots` slots per worker; a dense layer's row (empty) stays empty. Each
/// layer is balanced on its own, as `eplb.py` does the layers it is given.
pub fn placement_for_load(
    load: &[Vec<f64>],
    slots: usize,
    workers: usize,
) -> Result<Placement, EplbError> {
    let experts = load
        .iter()
        .map(|row| match row.is_empty() {
            true => Ok(Vec::new()),
            false => {
                let layer =
                    rebalance_experts(std::slice::from_ref(row), slots * workers, 1, 1, workers)?;
                Ok(layer.placement(workers).experts.remove(0))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Placement { workers, experts })
}

/// The checks `eplb.py` asserts, as errors; returns the number of experts.
fn validate(
    weight: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<usize, EplbError> {
    let experts = weight.first().ok_or(EplbError::NoLayers)?.len();
    if experts == 0 {
        return Err(EplbError::NoExperts);
    }
    if let Some((layer, row)) = weight.iter().enumerate().find(|(_, r)| r.len() != experts) {
        return Err(EplbError::LayerLength {
            layer,
            expected: experts,
            found: row.len(),
        });
    }
    for (what, n) in [
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ] {
        if n == 0 {
            return Err(EplbError::Zero { what });
        }
    }
    if num_replicas < experts {
        return Err(EplbError::TooFewReplicas {
            num_replicas,
            experts,
        });
    }
    if !num_replicas.is_multiple_of(num_gpus) {
        return Err(EplbError::ReplicasPerGpu {
            num_replicas,
            num_gpus,
        });
    }
    if !num_gpus.is_multiple_of(num_nodes) {
        return Err(EplbError::GpusPerNode {
            num_gpus,
            num_nodes,
        });
    }
    if !experts.is_multiple_of(num_groups) {
        return Err(EplbError::ExpertsPerGroup {
            experts,
            num_groups,
        });
    }
    for (layer, row) in weight.iter().enumerate() {
        // `>= 0.0` is false for NaN; the cast catches loads beyond f32's range.
        if let Some((expert, &load)) = row
            .iter()
            .enumerate()
            .find(|&(_, &w)| !(w >= 0.0 && (w as f32).is_finite()))
        {
            return Err(EplbError::BadLoad {
                layer,
                expert,
                load,
            });
        }
    }
    Ok(experts)
}

/// The shape one policy balances over (the global policy: one group, one node).
struct Cluster {
    replicas: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
}

/// `rebalance_experts_hierarchical` for one layer: its `phy2log` and `logcnt`.
/// "mlog" numbers the experts node by node after step 1, as in `eplb.py`.
fn rebalance_layer(load: &[f32], cluster: &Cluster) -> (Vec<usize>, Vec<usize>) {
    let experts = load.len();
    let group_size = experts / cluster.groups;
    let groups_per_node = cluster.groups / cluster.nodes;
    let experts_per_node = experts / cluster.nodes;
    let slots_per_node = cluster.replicas / cluster.nodes;
    let gpus_per_node = cluster.gpus / cluster.nodes;
    let slots_per_gpu = cluster.replicas / cluster.gpus;

    // Step 1: whole groups onto nodes.
    let group_load: Vec<f32> = load.chunks(group_size).map(torch_sum).collect();
    let (node_of_group, rank_in_node) = balanced_packing(&group_load, cluster.nodes);
    let log2mlog: Vec<usize> = (0..experts)
        .map(|e| {
            let g = e / group_size;
            (node_of_group[g] * groups_per_node + rank_in_node[g]) * group_size + e % group_size
        })
        .collect();
    let mlog2log = inverse(&log2mlog);

    let mut phy2log = Vec::with_capacity(cluster.replicas);
    let mut mlogcnt = Vec::with_capacity(experts);
    for node_experts in mlog2log.chunks(experts_per_node) {
        let node_load: Vec<f32> = node_experts.iter().map(|&e| load[e]).collect();
        // Step 2: replicas within the node.
        let (phy2mlog, count) = replicate_experts(&node_load, slots_per_node);
        // Step 3: the node's replicas onto its GPUs.
        let slot_load: Vec<f32> = phy2mlog
            .iter()
            .map(|&m| node_load[m] / count[m] as f32)
            .collect();
        let (gpu, rank_in_gpu) = balanced_packing(&slot_load, gpus_per_node);
        let phy2pphy: Vec<usize> = gpu
            .iter()
            .zip(&rank_in_gpu)
            .map(|(g, r)| g * slots_per_gpu + r)
            .collect();
        phy2log.extend(
            inverse(&phy2pphy)
                .iter()
                .map(|&p| node_experts[phy2mlog[p]]),
        );
        mlogcnt.extend(count);
    }
    let logcnt = log2mlog.iter().map(|&m| mlogcnt[m]).collect();
    (phy2log, logcnt)
}

/// Pack `weight.len()` items into `packs` packs of equal count, heaviest item
/// first into the lightest pack that has room (the first such pack on a tie).
/// Returns each item's pack and its rank within the pack.
fn balanced_packing(weight: &[f32], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weight.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut pack_of = vec![0; n];
    let mut rank = vec![0; n];
    let mut pack_load = vec![0.0f32; packs];
    let mut pack_items = vec![0; packs];
    for item in argsort_descending(weight) {
        let pack = (0..packs)
            .filter(|&p| pack_items[p] < per_pack)
            .reduce(|best, p| {
                if pack_load[p] < pack_load[best] {
                    p
                } else {
                    best
                }
            })
            .expect("packs * per_pack == items, so some pack has room");
        pack_of[item] = pack;
        rank[item] = pack_items[pack];
        pack_load[pack] += weight[item];
        pack_items[pack] += 1;
    }
    (pack_of, rank)
}

/// Grow `weight.len()` experts to `slots` replicas, each new one going to the
/// expert with the highest load per replica (the first on a tie). Returns
/// each slot's expert (slot e < `weight.len()` holds expert e) and each
/// expert's replica count.
fn replicate_experts(weight: &[f32], slots: usize) -> (Vec<usize>, Vec<usize>) {
    let mut phy2log: Vec<usize> = (0..weight.len()).collect();
    let mut count = vec![1usize; weight.len()];
    for _ in weight.len()..slots {
        let mut hottest = 0;
        let mut hottest_load = weight[0] / count[0] as f32;
        for (e, (&w, &c)) in weight.iter().zip(&count).enumerate().skip(1) {
            let per_replica = w / c as f32;
            if per_replica > hottest_load {
                hottest = e;
                hottest_load = per_replica;
            }
        }
        phy2log.push(hottest);
        count[hottest] += 1;
    }
    (phy2log, count)
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The example of github.com/deepseek-ai/EPLB's README.md.
    fn readme_weight() -> Vec<Vec<f64>> {
        vec![
            vec![
                90., 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.,
            ],
            vec![
                20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.,
            ],
        ]
    }

    #[test]
    fn eplb_reproduces_the_readme_example() {
        let r = rebalance_experts(&readme_weight(), 16, 4, 2, 8).unwrap();
        // Printed in github.com/deepseek-ai/EPLB's README.md.
        assert_eq!(
            r.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ]
        );
        // Computed with deepseek-ai/EPLB's eplb.py.
        assert_eq!(
            r.logcnt,
            vec![
                vec![1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                vec![1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
            ]
        );
        assert_eq!(r.log2phy[0][4], vec![5, 7]);
        assert_eq!(r.log2phy[1][8], vec![3, 6]);
    }

    #[test]
    fn eplb_global_policy_matches_the_reference() {
        // Computed with deepseek-ai/EPLB's eplb.py, num_groups = num_nodes = 1.
        let expected = vec![
            vec![10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
            vec![1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7],
        ];
        let global = rebalance_experts(&readme_weight(), 16, 1, 1, 8).unwrap();
        assert_eq!(global.phy2log, expected);
        // 3 nodes do not divide 4 groups: eplb.py falls back to the global policy.
        let fallback = rebalance_experts(&readme_weight(), 24, 4, 3, 6).unwrap();
        let reference = rebalance_experts(&readme_weight(), 24, 1, 1, 6).unwrap();
        assert_eq!(fallback, reference);
    }

    #[test]
    fn eplb_tied_loads_follow_torchs_unstable_sort() {
        // Loads 0..=3 repeating: every node-level sort has ties. Computed with
        // deepseek-ai/EPLB's eplb.py; a stable sort gives another placement.
        let weight = vec![(0..32).map(|e| f64::from((e * 7) % 4)).collect()];
        let r = rebalance_experts(&weight, 64, 4, 2, 4).unwrap();
        assert_eq!(
            r.phy2log[0],
            vec![
                18, 17, 18, 22, 22, 17, 6, 21, 5, 5, 5, 2, 2, 3, 16, 4, 21, 6, 23, 21, 19, 7, 17,
                1, 1, 1, 5, 1, 2, 3, 0, 20, 26, 25, 26, 30, 30, 25, 14, 29, 13, 13, 13, 10, 10, 11,
                24, 12, 29, 14, 31, 29, 27, 15, 25, 9, 9, 9, 13, 9, 10, 11, 8, 28,
            ]
        );
    }

    #[test]
    fn eplb_rounds_loads_to_f32_like_the_reference() {
        // Computed with deepseek-ai/EPLB's eplb.py; in f64 layer 0 comes out otherwise.
        let weight = vec![
            vec![
                0.3,
                0.2,
                0.7,
                0.2,
                0.9,
                0.9,
                0.9,
                2.0 / 3.0,
                0.6,
                0.2,
                0.9,
                0.1,
            ],
            vec![
                2.0 / 3.0,
                2.0 / 3.0,
                0.1,
                0.9,
                0.7,
                0.6,
                0.2,
                1.0 / 3.0,
                0.1,
                0.1,
                0.1,
                0.1,
            ],
        ];
        let r = rebalance_experts(&weight, 16, 4, 2, 8).unwrap();
        assert_eq!(
            r.phy2log,
            vec![
                vec![7, 11, 8, 9, 6, 6, 10, 10, 2, 1, 4, 5, 5, 0, 4, 3],
                vec![5, 11, 3, 9, 3, 10, 4, 4, 0, 1, 1, 6, 7, 2, 0, 8],
            ]
        );
    }

    #[test]
    fn eplb_placement_lists_each_worker_once() {
        let r = rebalance_experts(&readme_weight(), 16, 4, 2, 8).unwrap();
        let p = r.placement(8);
        p.validate(&[12; 2]).unwrap();
        // Layer 0 expert 5 fills slots 0 and 2: GPUs 0 and 1 at 2 slots per GPU.
        assert_eq!(p.replicas(0, 5), &[0, 1]);
        // At 4 slots per worker, both are on worker 0, listed once.
        assert_eq!(r.placement(4).replicas(0, 5), &[0]);
        // 3 workers for 16 slots hold 0..=5, 6..=10, 11..=15; expert 4 fills 5 and 7.
        assert_eq!(r.placement(3).replicas(0, 4), &[0, 1]);
    }

    #[test]
    fn eplb_balancedness_is_mean_over_max() {
        let weight = vec![vec![4.0, 2.0, 2.0, 0.0], vec![0.0; 4]];
        let p = Placement::round_robin(&[4; 2], 2).unwrap();
        // Round robin: worker 0 carries experts 0 and 2 (6), worker 1 experts 1 and 3 (2).
        assert_eq!(balancedness(&weight, &p), vec![4.0 / 6.0, 1.0]);
        let r = rebalance_experts(&weight, 8, 1, 1, 2).unwrap();
        let b = balancedness(&weight, &r.placement(2));
        assert!(b[0] > 4.0 / 6.0, "{b:?}");
    }

    #[test]
    fn eplb_refuses_bad_inputs_by_name() {
        let w = readme_weight();
        let err = |w: &[Vec<f64>], r, g, n, gpus| rebalance_experts(w, r, g, n, gpus).unwrap_err();
        assert_eq!(err(&[], 16, 4, 2, 8), EplbError::NoLayers);
        assert_eq!(err(&[vec![], vec![]], 16, 4, 2, 8), EplbError::NoExperts);
        assert_eq!(
            err(&[w[0].clone(), w[1][..11].to_vec()], 16, 4, 2, 8),
            EplbError::LayerLength {
                layer: 1,
                expected: 12,
                found: 11
            }
        );
        assert_eq!(
            err(&w, 0, 4, 2, 8),
            EplbError::Zero {
                what: "num_replicas"
            }
        );
        assert_eq!(err(&w, 16, 0, 2, 8), EplbError::Zero { what: "num_groups" });
        assert_eq!(err(&w, 16, 4, 0, 8), EplbError::Zero { what: "num_nodes" });
        assert_eq!(err(&w, 16, 4, 2, 0), EplbError::Zero { what: "num_gpus" });
        assert_eq!(
            err(&w, 8, 4, 2, 8),
            EplbError::TooFewReplicas {
                num_replicas: 8,
                experts: 12
            }
        );
        assert_eq!(
            err(&w, 18, 4, 2, 8),
            EplbError::ReplicasPerGpu {
                num_replicas: 18,
                num_gpus: 8
            }
        );
        assert_eq!(
            err(&w, 18, 4, 2, 3),
            EplbError::GpusPerNode {
                num_gpus: 3,
                num_nodes: 2
            }
        );
        assert_eq!(
            err(&w, 16, 5, 1, 8),
            EplbError::ExpertsPerGroup {
                experts: 12,
                num_groups: 5
            }
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e300] {
            let mut w = readme_weight();
            w[1][3] = bad;
            assert!(matches!(
                err(&w, 16, 4, 2, 8),
                EplbError::BadLoad {
                    layer: 1,
                    expert: 3,
                    ..
                }
            ));
        }
        assert!(
            err(&w, 16, 4, 2, 0)
                .to_string()
                .contains("num_gpus must be at least 1")
        );
    }

    /// (weight, num_replicas, num_groups, num_nodes, num_gpus), valid; groups
    /// need not split over nodes, so both policies are drawn.
    fn cluster() -> impl Strategy<Value = (Vec<Vec<f64>>, usize, usize, usize, usize)> {
        (
            1..=3usize,
            1..=6usize,
            1..=3usize,
            1..=3usize,
            1..=3usize,
            0..=3usize,
        )
            .prop_flat_map(
                |(layers, groups, group_size, nodes, gpus_per_node, extra)| {
                    let experts = groups * group_size;
                    let gpus = nodes * gpus_per_node;
                    let replicas = gpus * (experts.div_ceil(gpus) + extra);
                    let load =
                        prop_oneof![Just(0.0), (0..4u32).prop_map(f64::from), 0.0..1000.0f64,];
                    let weight =
                        prop::collection::vec(prop::collection::vec(load, experts), layers);
                    (
                        weight,
                        Just(replicas),
                        Just(groups),
                        Just(nodes),
                        Just(gpus),
                    )
                },
            )
    }

    proptest! {
        #[test]
        fn eplb_plans_are_consistent((weight, replicas, groups, nodes, gpus) in cluster()) {
            let r = rebalance_experts(&weight, replicas, groups, nodes, gpus).unwrap();
            let experts = weight[0].len();
            let per_gpu = replicas / gpus;
            for layer in 0..weight.len() {
                let phy2log = &r.phy2log[layer];
                prop_assert_eq!(phy2log.len(), replicas);
                prop_assert_eq!(r.logcnt[layer].iter().sum::<usize>(), replicas);
                let mut slots_per_gpu = vec![0; gpus];
                for slot in 0..replicas {
                    slots_per_gpu[slot / per_gpu] += 1;
                }
                prop_assert!(slots_per_gpu.iter().all(|&n| n == per_gpu));
                prop_assert_eq!(r.log2phy[layer].len(), experts);
                for expert in 0..experts {
                    let slots = &r.log2phy[layer][expert];
                    prop_assert!(!slots.is_empty());
                    prop_assert!(slots.windows(2).all(|w| w[0] < w[1]));
                    prop_assert_eq!(slots.len(), r.logcnt[layer][expert]);
                    for &s in slots {
                        prop_assert_eq!(phy2log[s], expert);
                    }
                }
                if groups.is_multiple_of(nodes) {
                    // Hierarchical: a group's replicas all stay on one node.
                    let group_size = experts / groups;
                    let slots_per_node = replicas / nodes;
                    for group in r.log2phy[layer].chunks(group_size) {
                        let node = group[0][0] / slots_per_node;
                        prop_assert!(group.iter().flatten().all(|s| s / slots_per_node == node));
                    }
                }
            }
            let placement = r.placement(gpus);
            prop_assert_eq!(placement.validate(&vec![experts; weight.len()]), Ok(()));
            for b in balancedness(&weight, &placement) {
                prop_assert!(b > 0.0 && b <= 1.0 + 1e-12, "balancedness {}", b);
            }
        }
    }
}
