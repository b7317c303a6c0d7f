//! Top-k gating with Mixtral's semantics: router logits → softmax over all
//! experts in fp32 → top-k → renormalise the k weights to sum to 1 → cast
//! back to the activations' dtype. Ties go to the lower expert index.

use tch::{Kind, Tensor};

/// Which experts each token goes to, and with what weight.
pub struct Routing {
    /// `[tokens, k]`, i64 expert ids, highest weight first.
    pub experts: Tensor,
    /// `[tokens, k]`, in the dtype of the hidden states; each row sums to 1.
    pub weights: Tensor,
}

pub struct Gate {
    /// `[experts, hidden]`
    weight: Tensor,
    top_k: i64,
}

impl Gate {
    pub fn new(weight: Tensor, top_k: usize) -> Self {
        Self {
            weight,
            top_k: top_k as i64,
        }
    }

    /// `xs`: `[tokens, hidden]`.
    pub fn route(&self, xs: &Tensor) -> Routing {
        let logits = xs.linear(&self.weight, None::<Tensor>);
        route_logits(&logits, self.top_k, xs.kind())
    }
}

/// Routing from router logits `[tokens, experts]`.
pub fn route_logits(logits: &Tensor, top_k: i64, kind: Kind) -> Routing {
    let probs = logits.softmax(1, Kind::Float);
    // A stable descending sort keeps equal probabilities in expert order, so
    // ties are broken towards the lower expert id, deterministically.
    let (sorted, order) = probs.sort_stable(true, 1, true);
    let top = sorted.narrow(1, 0, top_k);
    let experts = order.narrow(1, 0, top_k);
    let weights = &top / top.sum_dim_intlist(1, true, Kind::Float);
    Routing {
        experts,
        weights: weights.to_kind(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn logits_strategy() -> impl Strategy<Value = (Vec<f32>, usize, usize, usize)> {
        (1usize..12, 1usize..10).prop_flat_map(|(tokens, experts)| {
            (
                proptest::collection::vec(
                    // Few distinct values so ties are common.
                    prop_oneof![(-3i32..3).prop_map(|v| v as f32), -8.0f32..8.0],
                    tokens * experts,
                ),
                Just(tokens),
                Just(experts),
                1..=experts,
            )
        })
    }

    proptest! {
        #[test]
        fn weights_sum_to_one_over_k_distinct_experts((values, tokens, experts, k) in logits_strategy()) {
            let logits = Tensor::from_slice(&values).view([tokens as i64, experts as i64]);
            let routing = route_logits(&logits, k as i64, Kind::Float);
            prop_assert_eq!(routing.experts.size(), vec![tokens as i64, k as i64]);
            let ids: Vec<i64> = Vec::try_from(routing.experts.flatten(0, -1)).unwrap();
            let weights: Vec<f32> = Vec::try_from(routing.weights.flatten(0, -1)).unwrap();
            let probs: Vec<f32> = Vec::try_from(logits.softmax(1, Kind::Float).flatten(0, -1)).unwrap();
            for t in 0..tokens {
                let row = &ids[t * k..(t + 1) * k];
                let mut distinct = row.to_vec();
                distinct.sort();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), k, "experts of a token must be distinct: {:?}", row);
                prop_assert!(row.iter().all(|&e| e >= 0 && (e as usize) < experts));
                let sum: f32 = weights[t * k..(t + 1) * k].iter().sum();
                prop_assert!((sum - 1.0).abs() < 1e-5, "weights sum to {}", sum);
                // The chosen experts are a top-k set: none left out beats a chosen one,
                // and among equals the lower id wins.
                let p = &probs[t * experts..(t + 1) * experts];
                for e in 0..experts {
                    if row.contains(&(e as i64)) { continue; }
                    for &c in row {
                        let c = c as usize;
                        prop_assert!(p[e] <= p[c], "left out expert {} beats chosen {}", e, c);
                        if p[e] == p[c] {
                            prop_assert!(c < e, "tie between {} and {} must go to the lower id", c, e);
                        }
                    }
                }
            }
        }

        #[test]
        fn routing_is_deterministic((values, tokens, experts, k) in logits_strategy()) {
            let logits = Tensor::from_slice(&values).view([tokens as i64, experts as i64]);
            let a = route_logits(&logits, k as i64, Kind::Float);
            let b = route_logits(&logits, k as i64, Kind::Float);
            prop_assert!(a.experts.equal(&b.experts));
            prop_assert!(a.weights.equal(&b.weights));
        }
    }

    #[test]
    fn all_equal_logits_pick_the_lowest_ids_with_equal_weights() {
        let logits = Tensor::zeros([3, 8], (Kind::Float, tch::Device::Cpu));
        let routing = route_logits(&logits, 2, Kind::Float);
        let ids: Vec<i64> = Vec::try_from(routing.experts.flatten(0, -1)).unwrap();
        assert_eq!(ids, vec![0, 1, 0, 1, 0, 1]);
        let weights: Vec<f32> = Vec::try_from(routing.weights.flatten(0, -1)).unwrap();
        assert!(weights.iter().all(|&w| w == 0.5));
    }
}
