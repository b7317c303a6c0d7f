//! The host side of a layer's dispatch, without tensors: the routed
//! (token, expert) pairs of a routing, a worker's answer added back into
//! the layer's output, and the tokens stranded when an expert has no live
//! worker.

use tramontane_config::Dtype;
use tramontane_model::gating::Routing;
use tramontane_policy::dispatch_plan::{RoutedPair, WorkerShare};
use tramontane_policy::placement::Placement;
use tramontane_proto::codec::{self, CodecError};
use tramontane_proto::v1::TensorPayload;

/// All pairs of a routing, token by token.
pub fn routed_pairs(routing: &Routing) -> Vec<RoutedPair> {
    routing
        .experts
        .iter()
        .zip(&routing.weights)
        .enumerate()
        .map(|(i, (&expert, &weight))| RoutedPair {
            token: i / routing.k.max(1),
            expert,
            weight,
        })
        .collect()
}

/// Adds a worker's answer (`[share rows, hidden]`) into `out`, the host
/// `[tokens, hidden]` output kept in `precision`.
pub fn combine(
    out: &mut [f32],
    hidden: usize,
    share: &WorkerShare,
    answer: &TensorPayload,
    precision: Dtype,
) -> Result<(), CodecError> {
    codec::add_rows(
        Some(answer),
        "output",
        &token_rows(share),
        hidden,
        out,
        precision,
    )
}

/// The rows of a share's tokens in the layer's `[tokens, hidden]` matrix.
pub(crate) fn token_rows(share: &WorkerShare) -> Vec<usize> {
    share.tokens.iter().map(|&t| t as usize).collect()
}

/// The tokens of a layer whose routing is `routed` (the expert of every
/// pair, `k` per token) that are routed to an expert no live worker holds,
/// sorted, each once. Every pair of the layer counts, not only those being
/// planned: the tokens a failed worker's share did not hold route there
/// again when their step is retried.
pub(crate) fn stranded_tokens(
    placement: &Placement,
    layer: usize,
    routed: &[usize],
    k: usize,
    live: &dyn Fn(usize) -> bool,
) -> Vec<usize> {
    let lost: Vec<bool> = placement.experts[layer]
        .iter()
        .map(|workers| !workers.iter().any(|&w| live(w)))
        .collect();
    let mut tokens: Vec<usize> = routed
        .iter()
        .enumerate()
        .filter(|&(_, &expert)| lost.get(expert).copied().unwrap_or(true))
        .map(|(pair, _)| pair / k.max(1))
        .collect();
    tokens.dedup(); // pairs come token by token
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::{Device, Kind, Tensor};
    use tramontane_model::expert::Expert;
    use tramontane_model::gating::route_logits;
    use tramontane_model::moe::{ExpertRows as LocalRows, LocalExperts};
    use tramontane_policy::dispatch_plan::plan_dispatch;

    use crate::remote::host_rows;

    const HIDDEN: i64 = 8;
    const INTERMEDIATE: i64 = 16;

    fn experts(count: usize, seed: i64) -> LocalExperts {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let layer = (0..count)
            .map(|_| {
                // Unit-variance activations, as in a real model.
                let h = 1.0 / (HIDDEN as f64).sqrt();
                let i = 1.0 / (INTERMEDIATE as f64).sqrt();
                Some(Expert::new(
                    Tensor::randn([INTERMEDIATE, HIDDEN], opts) * h,
                    Tensor::randn([HIDDEN, INTERMEDIATE], opts) * i,
                    Tensor::randn([INTERMEDIATE, HIDDEN], opts) * h,
                ))
            })
            .collect();
        LocalExperts::from_experts(vec![layer])
    }

    /// What a worker answers for a share: its experts on its gathered rows,
    /// on the wire (in f32).
    fn worker_answer(local: &LocalExperts, xs: &Tensor, share: &WorkerShare) -> TensorPayload {
        let gathered = xs.index_select(0, &Tensor::from_slice(&share.tokens));
        let work: Vec<LocalRows> = share
            .experts
            .iter()
            .map(|(&expert, (rows, weights))| LocalRows {
                expert,
                rows: rows.iter().map(|&r| r as usize).collect(),
                weights: weights.clone(),
            })
            .collect();
        let out = local.forward_rows(0, &gathered, &work).unwrap();
        let host = host_rows(&out).unwrap();
        let rows: Vec<usize> = (0..share.tokens.len()).collect();
        codec::encode_rows(&host, HIDDEN as usize, &rows, Dtype::F32).unwrap()
    }

    fn case() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<Vec<bool>>, Vec<bool>, i64)>
    {
        (1usize..24, 2usize..9, 1usize..5).prop_flat_map(|(tokens, num_experts, workers)| {
            (
                Just(tokens),
                Just(num_experts),
                1..=num_experts,
                Just(workers),
                proptest::collection::vec(
                    proptest::collection::vec(any::<bool>(), workers),
                    num_experts,
                ),
                proptest::collection::vec(any::<bool>(), workers),
                any::<i64>(),
            )
        })
    }

    #[test]
    fn stranded_tokens_are_every_token_routed_to_an_expert_without_a_live_worker() {
        // Expert e on worker e mod 2, expert 2 also on worker 1; worker 1 down.
        let mut placement = Placement::round_robin(&[4; 1], 2).unwrap();
        placement.experts[0][2] = vec![0, 1];
        let live = |w: usize| w == 0;
        // Top-2 of 5 tokens: 1 and 3 are lost, 2 lives on worker 0.
        let routed = [0, 1, 2, 0, 0, 2, 3, 1, 2, 3];
        assert_eq!(
            stranded_tokens(&placement, 0, &routed, 2, &live),
            vec![0, 3, 4]
        );
        assert!(stranded_tokens(&placement, 0, &routed, 2, &|_| true).is_empty());
        // Unplaceable as plan_dispatch finds it: one of them.
        let pairs: Vec<RoutedPair> = routed
            .iter()
            .enumerate()
            .map(|(i, &expert)| RoutedPair {
                token: i / 2,
                expert,
                weight: 0.5,
            })
            .collect();
        let unplaceable = plan_dispatch(0, &pairs, &placement, &live).unwrap_err();
        assert_eq!(unplaceable.expert, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn combine_of_dispatch_equals_the_dense_moe(
            (tokens, num_experts, k, workers, holds, live, seed) in case()
        ) {
            let _guard = tch::no_grad_guard();
            // Every expert on at least one live worker: its own worker e mod W
            // (kept live), plus the random extra replicas.
            let mut live = live;
            let mut placement = Placement { workers, experts: vec![vec![]; 1] };
            for (e, extra) in holds.iter().enumerate() {
                let home = e % workers;
                live[home] = true;
                let replicas: Vec<usize> = (0..workers).filter(|&w| w == home || extra[w]).collect();
                placement.experts[0].push(replicas);
            }
            let local = experts(num_experts, seed.rem_euclid(1 << 30));
            tch::manual_seed(seed.rem_euclid(1 << 30) + 1);
            let xs = Tensor::randn([tokens as i64, HIDDEN], (Kind::Float, Device::Cpu));
            let logits = Tensor::randn([tokens as i64, num_experts as i64], (Kind::Float, Device::Cpu));
            let routing =
                route_logits(&logits, k, tramontane_config::Gate::TopKThenSoftmax, Kind::Float).unwrap();

            let dense = local.forward(0, &xs, &routing).unwrap();
            let pairs = routed_pairs(&routing);
            let shares = plan_dispatch(0, &pairs, &placement, &|w| live[w]).unwrap();
            let mut out = vec![0f32; tokens * HIDDEN as usize];
            for share in &shares {
                prop_assert!(live[share.worker]);
                for &expert in share.experts.keys() {
                    prop_assert!(placement.replicas(0, expert).contains(&share.worker));
                }
                let answer = worker_answer(&local, &xs, share);
                combine(&mut out, HIDDEN as usize, share, &answer, Dtype::F32).unwrap();
            }
            let out = Tensor::from_slice(&out).view([tokens as i64, HIDDEN]);
            let planned: usize = shares.iter().map(|s| s.pairs.len()).sum();
            prop_assert_eq!(planned, tokens * k);
            // Only the order of the float additions differs.
            let diff = (&out - &dense).abs().max().double_value(&[]);
            let scale = 1.0 + dense.abs().max().double_value(&[]);
            prop_assert!(diff <= 1e-5 * scale, "max |Δ| {} at scale {}", diff, scale);
        }
    }
}
