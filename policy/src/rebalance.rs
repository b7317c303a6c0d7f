//! Rebalancing while serving: from the placement in effect and the recent
//! load per expert, the placement to switch to and what each worker loads
//! and drops to get there.
//!
//! Each MoE layer is placed by EPLB ([`crate::eplb`]) in `slots` slots per
//! worker (so no worker holds more than `slots` experts of a layer: its
//! memory bound), and its workers renamed to keep as many experts where
//! they are as possible (EPLB's workers are interchangeable). A layer keeps
//! its placement while its balancedness is [`BALANCED`] or more, and unless
//! the new one raises it by at least [`MIN_GAIN`]: a rebalance moves only
//! what pays, and a periodic one does not chase the noise of its window.

use crate::eplb::{self, EplbError};
use crate::placement::Placement;

/// The least rise of a layer's balancedness that is worth its moves: the
/// recent window's estimate is noisy, and each move stalls a worker while
/// it loads (a periodic rebalance would otherwise keep moving experts for
/// gains of a percent).
pub const MIN_GAIN: f64 = 0.05;

/// The balancedness from which a layer is left as it is.
pub const BALANCED: f64 = 0.9;

/// A layer's expert on a worker.
pub type Pair = (usize, usize);

#[derive(Debug, Clone, PartialEq)]
pub struct Rebalance {
    /// The placement to switch to (the one in effect when nothing pays).
    pub placement: Placement,
    /// `loads[worker]`: the pairs it must load before the switch.
    pub loads: Vec<Vec<Pair>>,
    /// `drops[worker]`: the pairs it may drop after the switch.
    pub drops: Vec<Vec<Pair>>,
    /// Mean balancedness of the MoE layers under the recent load, in the
    /// placement in effect and in the new one.
    pub balancedness_before: f64,
    pub balancedness_after: f64,
}

impl Rebalance {
    /// Pairs loaded onto a worker that did not hold them.
    pub fn moved(&self) -> usize {
        self.loads.iter().map(Vec::len).sum()
    }
}

/// The slots per worker a rebalance may fill: the most experts a layer
/// spreads over `workers` (rounded up), and `spare` more.
pub fn slots(placement: &Placement, spare: usize) -> usize {
    let experts = placement.experts.iter().map(Vec::len).max().unwrap_or(0);
    experts.div_ceil(placement.workers.max(1)) + spare
}

/// The rebalance of `current` for `load[layer][expert]` (a dense layer's
/// row empty) in `slots` slots per worker. `measured[layer]`, where known,
/// is the layer's balancedness as dispatched (a replicated expert's tokens
/// go to its least loaded replica, which the even split this plans with
/// underrates): a layer measured at [`BALANCED`] is left as it is.
pub fn rebalance(
    current: &Placement,
    load: &[Vec<f64>],
    slots: usize,
    measured: &[Option<f64>],
) -> Result<Rebalance, EplbError> {
    let workers = current.workers;
    let housed = housed(current, load, slots);
    let proposed = eplb::placement_for_load(load, slots, workers)?;
    let before = eplb::balancedness(load, current);
    let kept = eplb::balancedness(load, &housed);
    let after = eplb::balancedness(load, &proposed);
    let mut placement = housed;
    for (layer, row) in proposed.experts.iter().enumerate() {
        let balanced = measured
            .get(layer)
            .copied()
            .flatten()
            .unwrap_or(kept[layer]);
        if row.is_empty() || balanced >= BALANCED || after[layer] < kept[layer] + MIN_GAIN {
            continue;
        }
        placement.experts[layer] = renamed(row, &current.experts[layer], workers);
    }
    let (loads, drops) = changes(current, &placement);
    let mean = |values: Vec<f64>| {
        let moe: Vec<f64> = values
            .into_iter()
            .zip(load)
            .filter(|(_, row)| !row.is_empty())
            .map(|(value, _)| value)
            .collect();
        match moe.len() {
            0 => 1.0,
            n => moe.iter().sum::<f64>() / n as f64,
        }
    };
    let balancedness_after = mean(eplb::balancedness(load, &placement));
    Ok(Rebalance {
        placement,
        loads,
        drops,
        balancedness_before: mean(before),
        balancedness_after,
    })
}

/// [`rebalance`] over the workers with `serving[w]` only, each with
/// [`slots`] of them and `spare`: the others hold nothing after it.
pub fn rebalance_serving(
    current: &Placement,
    load: &[Vec<f64>],
    spare: usize,
    serving: &[bool],
    measured: &[Option<f64>],
) -> Result<Rebalance, EplbError> {
    let ids: Vec<usize> = (0..current.workers)
        .filter(|&w| serving.get(w).copied().unwrap_or(false))
        .collect();
    if ids.is_empty() {
        return Err(EplbError::Zero {
            what: "serving workers",
        });
    }
    let compact_of = |w: usize| ids.iter().position(|&id| id == w);
    let compact = Placement {
        workers: ids.len(),
        experts: current
            .experts
            .iter()
            .map(|row| {
                row.iter()
                    .map(|on| on.iter().filter_map(|&w| compact_of(w)).collect())
                    .collect()
            })
            .collect(),
    };
    let planned = rebalance(&compact, load, slots(&compact, spare), measured)?;
    let placement = Placement {
        workers: current.workers,
        experts: planned
            .placement
            .experts
            .iter()
            .map(|row| {
                row.iter()
                    .map(|on| on.iter().map(|&c| ids[c]).collect())
                    .collect()
            })
            .collect(),
    };
    let (loads, drops) = changes(current, &placement);
    Ok(Rebalance {
        placement,
        loads,
        drops,
        ..planned
    })
}

/// `current` with each expert no worker holds given to the least loaded
/// worker with room (fewer than `slots` experts of the layer).
fn housed(current: &Placement, load: &[Vec<f64>], slots: usize) -> Placement {
    let mut placement = current.clone();
    for (layer, row) in placement.experts.iter_mut().enumerate() {
        if row.iter().all(|on| !on.is_empty()) {
            continue;
        }
        let loads = load.get(layer).map_or(&[][..], Vec::as_slice);
        let mut work = vec![0.0; current.workers];
        let mut held = vec![0usize; current.workers];
        for (expert, on) in row.iter().enumerate() {
            for &w in on {
                work[w] += loads.get(expert).copied().unwrap_or(0.0) / on.len() as f64;
                held[w] += 1;
            }
        }
        for (expert, on) in row.iter_mut().enumerate() {
            if !on.is_empty() {
                continue;
            }
            // Room is at least the even share, so some worker has it.
            let Some(home) = (0..current.workers)
                .filter(|&w| held[w] < slots)
                .min_by(|&a, &b| work[a].total_cmp(&work[b]).then(held[a].cmp(&held[b])))
            else {
                continue;
            };
            on.push(home);
            held[home] += 1;
            work[home] += loads.get(expert).copied().unwrap_or(0.0);
        }
    }
    placement
}

/// Per worker, the pairs `to` gives it that `from` does not (loads) and
/// those `from` gives it that `to` does not (drops).
pub fn changes(from: &Placement, to: &Placement) -> (Vec<Vec<Pair>>, Vec<Vec<Pair>>) {
    let workers = from.workers.max(to.workers);
    let mut loads = vec![Vec::new(); workers];
    let mut drops = vec![Vec::new(); workers];
    let held = |placement: &Placement, layer: usize, expert: usize| -> Vec<usize> {
        placement
            .experts
            .get(layer)
            .and_then(|row| row.get(expert))
            .cloned()
            .unwrap_or_default()
    };
    let layers = from.experts.len().max(to.experts.len());
    for layer in 0..layers {
        let experts = [&from.experts, &to.experts]
            .iter()
            .filter_map(|e| e.get(layer).map(Vec::len))
            .max()
            .unwrap_or(0);
        for expert in 0..experts {
            let (before, after) = (held(from, layer, expert), held(to, layer, expert));
            for &w in after.iter().filter(|w| !before.contains(w)) {
                loads[w].push((layer, expert));
            }
            for &w in before.iter().filter(|w| !after.contains(w)) {
                drops[w].push((layer, expert));
            }
        }
    }
    (loads, drops)
}

/// `row` (a layer's experts -> workers) with its workers renamed so that
/// as many experts as can stay on the worker holding them in `current`.
fn renamed(row: &[Vec<usize>], current: &[Vec<usize>], workers: usize) -> Vec<Vec<usize>> {
    // overlap[new][old]: the experts new worker `new` holds that `old` holds now.
    let mut overlap = vec![vec![0usize; workers]; workers];
    for (expert, on) in row.iter().enumerate() {
        for &new in on {
            for &old in current.get(expert).map_or(&[][..], Vec::as_slice) {
                overlap[new][old] += 1;
            }
        }
    }
    let name = best_matching(&overlap);
    row.iter()
        .map(|on| {
            let mut on: Vec<usize> = on.iter().map(|&w| name[w]).collect();
            on.sort_unstable();
            on
        })
        .collect()
}

/// The permutation `name[new] = old` with the largest total
/// `overlap[new][old]`: exact (over subsets) up to 12 workers, greedy above.
fn best_matching(overlap: &[Vec<usize>]) -> Vec<usize> {
    let n = overlap.len();
    if n <= 12 {
        // best[mask]: the largest overlap naming the first popcount(mask)
        // new workers with the old workers in `mask`.
        let mut best = vec![None::<usize>; 1 << n];
        let mut from = vec![0usize; 1 << n];
        best[0] = Some(0);
        for mask in 0usize..(1 << n) {
            let Some(score) = best[mask] else { continue };
            let new = mask.count_ones() as usize;
            if new == n {
                continue;
            }
            for old in (0..n).filter(|old| mask & (1 << old) == 0) {
                let next = mask | (1 << old);
                let candidate = score + overlap[new][old];
                if best[next].is_none_or(|b| candidate > b) {
                    best[next] = Some(candidate);
                    from[next] = old;
                }
            }
        }
        let mut name = vec![0; n];
        let mut mask = (1usize << n) - 1;
        for new in (0..n).rev() {
            name[new] = from[mask];
            mask &= !(1 << from[mask]);
        }
        return name;
    }
    let mut pairs: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|new| (0..n).map(move |old| (new, old)))
        .map(|(new, old)| (overlap[new][old], new, old))
        .collect();
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut name = vec![usize::MAX; n];
    let mut taken = vec![false; n];
    for (_, new, old) in pairs {
        if name[new] == usize::MAX && !taken[old] {
            name[new] = old;
            taken[old] = true;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_are_the_even_share_and_the_spare() {
        let placement = Placement::round_robin(&[0, 8, 8], 3).unwrap();
        assert_eq!(slots(&placement, 0), 3);
        assert_eq!(slots(&placement, 2), 5);
    }

    #[test]
    fn a_skewed_layer_pairs_hot_experts_with_cold_ones() {
        // 4 experts on 2 workers, round robin: worker 0 holds 0 and 2,
        // worker 1 holds 1 and 3. Experts 0 and 2 are hot: worker 0 does
        // 20 of the 22 tokens: balancedness 11 / 20.
        let current = Placement::round_robin(&[0, 4], 2).unwrap();
        let load = vec![vec![], vec![10.0, 1.0, 10.0, 1.0]];
        let r = rebalance(&current, &load, 2, &[]).unwrap();
        assert!((r.balancedness_before - 0.55).abs() < 1e-12);
        assert!((r.balancedness_after - 1.0).abs() < 1e-12);
        // The hot experts end up apart, the dense layer untouched, and one
        // swap is the fewest moves that does it.
        let row = &r.placement.experts[1];
        assert_ne!(row[0], row[2]);
        assert!(r.placement.experts[0].is_empty());
        assert_eq!(r.moved(), 2);
        assert_eq!(r.drops.iter().map(Vec::len).sum::<usize>(), 2);
        r.placement.validate(&[0, 4]).unwrap();
    }

    #[test]
    fn spare_slots_replicate_the_hottest_expert() {
        // One expert takes nearly everything: only a replica can spread it.
        let current = Placement::round_robin(&[4], 2).unwrap();
        let load = vec![vec![100.0, 1.0, 1.0, 1.0]];
        let without = rebalance(&current, &load, 2, &[]).unwrap();
        let with = rebalance(&current, &load, 3, &[]).unwrap();
        assert!(with.balancedness_after > without.balancedness_after + 0.2);
        assert_eq!(with.placement.experts[0][0], vec![0, 1]);
        // Worker 0 keeps the hot expert; worker 1 adds a copy.
        assert!(with.loads[1].contains(&(0, 0)));
        assert!(!with.drops[0].contains(&(0, 0)));
    }

    #[test]
    fn a_layer_balanced_enough_is_left_as_it_is() {
        // 20 against 17 (0.925) could become 18 against 19 (0.974), a
        // gain over MIN_GAIN; but 0.9 is enough: no move for noise.
        let current = Placement::round_robin(&[4], 2).unwrap();
        let load = vec![vec![10.0, 9.0, 10.0, 8.0]];
        let r = rebalance(&current, &load, 2, &[]).unwrap();
        assert!((r.balancedness_before - 0.925).abs() < 1e-12);
        assert_eq!(r.moved(), 0);
        // Below it, the same layer moves; unless it was measured balanced
        // as dispatched.
        let load = vec![vec![10.0, 6.0, 10.0, 8.0]];
        assert!(rebalance(&current, &load, 2, &[]).unwrap().moved() > 0);
        assert_eq!(
            rebalance(&current, &load, 2, &[Some(0.95)])
                .unwrap()
                .moved(),
            0
        );
        assert!(rebalance(&current, &load, 2, &[Some(0.8)]).unwrap().moved() > 0);
    }

    #[test]
    fn an_even_load_moves_nothing() {
        let current = Placement::round_robin(&[0, 8, 8], 4).unwrap();
        let load = vec![vec![], vec![5.0; 8], vec![5.0; 8]];
        let r = rebalance(&current, &load, 2, &[]).unwrap();
        assert_eq!(r.placement, current);
        assert_eq!(r.moved(), 0);
        assert!(r.drops.iter().all(Vec::is_empty));
    }

    #[test]
    fn changes_list_loads_and_drops_per_worker() {
        let from = Placement {
            workers: 2,
            experts: vec![vec![vec![0], vec![1], vec![0, 1]]],
        };
        let to = Placement {
            workers: 2,
            experts: vec![vec![vec![1], vec![1], vec![0]]],
        };
        let (loads, drops) = changes(&from, &to);
        assert_eq!(loads, vec![vec![], vec![(0, 0)]]);
        assert_eq!(drops, vec![vec![(0, 0)], vec![(0, 2)]]);
    }

    #[test]
    fn a_rebalance_over_the_serving_workers_empties_the_others() {
        // Worker 1 of 3 is down; its experts 1 and 4 find homes on 0 and 2.
        let current = Placement::round_robin(&[6], 3).unwrap();
        let load = vec![vec![1.0; 6]];
        let r = rebalance_serving(&current, &load, 0, &[true, false, true], &[]).unwrap();
        r.placement.validate(&[6]).unwrap();
        assert!(r.placement.experts[0].iter().all(|on| !on.contains(&1)));
        assert_eq!(r.drops[1], vec![(0, 1), (0, 4)]);
        assert_eq!(r.moved(), 2);
        assert!(rebalance_serving(&current, &load, 0, &[false; 3], &[]).is_err());
    }

    proptest! {
        #[test]
        fn a_rebalance_is_valid_within_its_slots_and_never_worse(
            workers in 1usize..6,
            experts in 1usize..12,
            spare in 0usize..3,
            loads in proptest::collection::vec(0u32..1000, 24),
        ) {
            let current = Placement::round_robin(&[experts, 0, experts], workers).unwrap();
            let row: Vec<f64> = (0..experts).map(|e| f64::from(loads[e])).collect();
            let other: Vec<f64> = (0..experts).map(|e| f64::from(loads[12 + e])).collect();
            let load = vec![row, vec![], other];
            let slots = slots(&current, spare);
            let r = rebalance(&current, &load, slots, &[]).unwrap();
            r.placement.validate(&[experts, 0, experts]).unwrap();
            prop_assert!(r.balancedness_after >= r.balancedness_before - 1e-12);
            for w in 0..workers {
                for row in &r.placement.experts {
                    let held = row.iter().filter(|on| on.contains(&w)).count();
                    prop_assert!(held <= slots);
                }
            }
            // Applying the changes to `current` gives the new placement.
            let (loads, drops) = changes(&current, &r.placement);
            let mut applied = current.clone();
            for (w, pairs) in loads.iter().enumerate() {
                for &(l, e) in pairs {
                    applied.experts[l][e].push(w);
                }
            }
            for (w, pairs) in drops.iter().enumerate() {
                for &(l, e) in pairs {
                    applied.experts[l][e].retain(|&x| x != w);
                }
            }
            for row in &mut applied.experts {
                for on in row {
                    on.sort_unstable();
                }
            }
            prop_assert_eq!(applied, r.placement);
        }
    }
}
