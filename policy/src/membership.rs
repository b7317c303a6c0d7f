//! Workers joining and leaving the pool while it serves: the placement
//! after a worker joins with the experts it holds, and after one leaves,
//! its experts that no serving worker would still hold given new homes.
//!
//! A worker's room is the even share of a layer's experts over the workers
//! that serve, and its spare slots: `ceil(experts / serving) + spare`.

use crate::placement::Placement;
use crate::rebalance::Pair;

/// A pair that no serving worker can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "layer {layer} expert {expert} cannot move: no other serving worker has room for it (add a worker, or start the router with more --spare-slots)"
)]
pub struct Stranded {
    pub layer: usize,
    pub expert: usize,
}

/// `placement` with `worker` (given the workers count, grown to hold it)
/// holding `held` besides the others.
pub fn with_worker(placement: &Placement, worker: usize, held: &[Pair]) -> Placement {
    let mut next = placement.clone();
    next.workers = next.workers.max(worker + 1);
    for &(layer, expert) in held {
        if let Some(on) = next
            .experts
            .get_mut(layer)
            .and_then(|row| row.get_mut(expert))
            && !on.contains(&worker)
        {
            on.push(worker);
            on.sort_unstable();
        }
    }
    next
}

/// `placement` without `worker`: each of its experts that no other worker
/// with `serving[w]` holds goes to the serving worker (not `worker`) with
/// room that holds the fewest experts of the layer.
pub fn without_worker(
    placement: &Placement,
    worker: usize,
    serving: &[bool],
    spare: usize,
) -> Result<Placement, Stranded> {
    let serves = |w: usize| w != worker && serving.get(w).copied().unwrap_or(false);
    let others = (0..placement.workers).filter(|&w| serves(w)).count();
    let mut next = placement.clone();
    for (layer, row) in next.experts.iter_mut().enumerate() {
        let room = match others {
            0 => 0,
            n => row.len().div_ceil(n) + spare,
        };
        let mut held = vec![0usize; placement.workers];
        for on in row.iter() {
            for &w in on {
                held[w] += 1;
            }
        }
        for (expert, on) in row.iter_mut().enumerate() {
            if !on.contains(&worker) {
                continue;
            }
            on.retain(|&w| w != worker);
            if on.iter().any(|&w| serves(w)) {
                continue;
            }
            let home = (0..placement.workers)
                .filter(|&w| serves(w) && held[w] < room)
                .min_by_key(|&w| held[w])
                .ok_or(Stranded { layer, expert })?;
            held[home] += 1;
            on.push(home);
            on.sort_unstable();
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joining_worker_is_added_to_what_it_holds() {
        let placement = Placement::round_robin(&[0, 4], 2).unwrap();
        let next = with_worker(&placement, 2, &[(1, 0), (1, 3)]);
        assert_eq!(next.workers, 3);
        assert_eq!(
            next.experts[1],
            vec![vec![0, 2], vec![1], vec![0], vec![1, 2]]
        );
        next.validate(&[0, 4]).unwrap();
    }

    #[test]
    fn a_leaving_worker_spreads_its_experts_over_the_others_with_room() {
        // 3 workers, 6 experts: each holds 2; worker 0 leaves.
        let placement = Placement::round_robin(&[6], 3).unwrap();
        let next = without_worker(&placement, 0, &[true; 3], 0).unwrap();
        // Room is 3 each: experts 0 and 3 go one to each of the others.
        assert_eq!(
            next.experts[0],
            vec![vec![1], vec![1], vec![2], vec![2], vec![1], vec![2]]
        );
        next.validate(&[6]).unwrap();
    }

    #[test]
    fn a_replica_elsewhere_is_enough() {
        let mut placement = Placement::round_robin(&[2], 2).unwrap();
        placement.experts[0][0] = vec![0, 1];
        let next = without_worker(&placement, 0, &[true, true], 0).unwrap();
        assert_eq!(next.experts[0], vec![vec![1], vec![1]]);
    }

    #[test]
    fn a_replica_on_a_down_worker_is_kept_but_does_not_count() {
        let mut placement = Placement::round_robin(&[3], 3).unwrap();
        placement.experts[0][0] = vec![0, 1];
        // Worker 1 is down: expert 0 needs a serving home, worker 2.
        let next = without_worker(&placement, 0, &[true, false, true], 0).unwrap();
        assert_eq!(next.experts[0], vec![vec![1, 2], vec![1], vec![2]]);
    }

    #[test]
    fn the_last_serving_worker_cannot_leave() {
        let placement = Placement::round_robin(&[0, 2], 2).unwrap();
        assert_eq!(
            without_worker(&placement, 0, &[true, false], 1),
            Err(Stranded {
                layer: 1,
                expert: 0
            })
        );
    }

    #[test]
    fn without_room_a_pair_is_stranded() {
        // 6 experts on 3 workers; the two staying have room for 3 each, and
        // hold 3 each already (worker 2 two copies).
        let placement = Placement {
            workers: 3,
            experts: vec![vec![
                vec![0],
                vec![0],
                vec![1, 2],
                vec![1, 2],
                vec![1],
                vec![2],
            ]],
        };
        assert_eq!(
            without_worker(&placement, 0, &[true; 3], 0),
            Err(Stranded {
                layer: 0,
                expert: 0
            })
        );
        let spared = without_worker(&placement, 0, &[true; 3], 1).unwrap();
        assert_eq!(spared.experts[0][0..2], [vec![1], vec![2]]);
    }
}
