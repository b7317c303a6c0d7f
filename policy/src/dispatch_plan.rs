//! Dispatch planning: which live worker computes each routed (token,
//! expert) pair of one MoE layer, and what each worker's Forward carries —
//! the token rows it needs (each once) and, per expert, indexes into them
//! with their weights. The router runs it on every layer; the planner's
//! simulation runs the very same function.

use std::collections::BTreeMap;

use crate::placement::Placement;

/// One routed (token, expert) pair with its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutedPair {
    pub token: usize,
    pub expert: usize,
    pub weight: f32,
}

/// One worker's share of a layer: the token rows it needs (each once) and,
/// per expert, indexes into those rows with their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerShare {
    pub worker: usize,
    /// Token rows of the layer's hidden states, in first-use order.
    pub tokens: Vec<i64>,
    /// expert -> (indexes into `tokens`, weights)
    pub experts: BTreeMap<usize, (Vec<u32>, Vec<f32>)>,
    /// The pairs this share computes, to plan again if the worker fails.
    pub pairs: Vec<RoutedPair>,
}

/// The (layer, expert) that no live worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unplaceable {
    pub layer: usize,
    pub expert: usize,
}

/// Assigns each pair to a live replica of its expert, the least loaded so far
/// (ties to the lowest worker id), and groups the pairs by worker.
pub fn plan_dispatch(
    layer: usize,
    pairs: &[RoutedPair],
    placement: &Placement,
    live: &dyn Fn(usize) -> bool,
) -> Result<Vec<WorkerShare>, Unplaceable> {
    let mut load = vec![0usize; placement.workers];
    let mut shares: BTreeMap<usize, (WorkerShare, BTreeMap<usize, u32>)> = BTreeMap::new();
    for &pair in pairs {
        let worker = placement
            .replicas(layer, pair.expert)
            .iter()
            .copied()
            .filter(|&w| live(w))
            .min_by_key(|&w| (load[w], w))
            .ok_or(Unplaceable {
                layer,
                expert: pair.expert,
            })?;
        load[worker] += 1;
        let (share, index_of) = shares.entry(worker).or_insert_with(|| {
            (
                WorkerShare {
                    worker,
                    tokens: Vec::new(),
                    experts: BTreeMap::new(),
                    pairs: Vec::new(),
                },
                BTreeMap::new(),
            )
        });
        let row = *index_of.entry(pair.token).or_insert_with(|| {
            share.tokens.push(pair.token as i64);
            (share.tokens.len() - 1) as u32
        });
        let (rows, weights) = share.experts.entry(pair.expert).or_default();
        rows.push(row);
        weights.push(pair.weight);
        share.pairs.push(pair);
    }
    Ok(shares.into_values().map(|(share, _)| share).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expert_without_live_replica_is_unplaceable() {
        let placement = Placement::round_robin(&[4; 1], 2).unwrap();
        let pairs = [RoutedPair {
            token: 0,
            expert: 3,
            weight: 1.0,
        }];
        let err = plan_dispatch(0, &pairs, &placement, &|w| w == 0).unwrap_err();
        assert_eq!(
            err,
            Unplaceable {
                layer: 0,
                expert: 3
            }
        );
    }

    #[test]
    fn replicas_share_load_and_a_token_is_sent_once_per_worker() {
        let placement = Placement {
            workers: 2,
            experts: vec![vec![vec![0, 1], vec![0, 1]]],
        };
        let pairs: Vec<RoutedPair> = (0..4)
            .flat_map(|t| {
                (0..2).map(move |e| RoutedPair {
                    token: t,
                    expert: e,
                    weight: 0.5,
                })
            })
            .collect();
        let shares = plan_dispatch(0, &pairs, &placement, &|_| true).unwrap();
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].pairs.len(), 4);
        assert_eq!(shares[1].pairs.len(), 4);
        for share in &shares {
            let mut tokens = share.tokens.clone();
            tokens.sort_unstable();
            tokens.dedup();
            assert_eq!(tokens.len(), share.tokens.len());
        }
    }
}
