//! Top-k gating: router logits → softmax over all experts in fp32 → top-k
//! → renormalise the k weights to sum to 1 (Mixtral's top-k-then-softmax
//! is the same; the Qwen and OLMoE families only with `norm_topk_prob`) →
//! round to the activations' dtype. DeepSeek's gate ([`GroupedGate`]) has
//! its logits computed in fp32, scores each expert by softmax or sigmoid,
//! chooses within the best groups by score plus a correction bias, and
//! scales the weights. Ties go to the lower expert index. The logits
//! (`[tokens, experts]`) are copied to the host once and the rest runs
//! there: every consumer of a routing (the local experts' grouping, the
//! dispatch to workers) reads it on the host, and a handful of experts per
//! token is less work than launching the tensor ops would be.

use tch::{Kind, Tensor};
use tramontane_config::{Gate as GateRule, GroupScore, GroupedGate, Scoring};

/// Which experts each token goes to, and with what weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub k: usize,
    /// `[tokens × k]`, token-major, highest weight first.
    pub experts: Vec<usize>,
    /// `[tokens × k]`, rounded to the hidden states' dtype; each token's
    /// sum to 1 but where the gate scales them or does not renormalise.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k.max(1)
    }
}

pub struct Gate {
    /// `[experts, hidden]`; fp32 for a grouped gate.
    weight: Tensor,
    top_k: usize,
    rule: GateRule,
    /// A grouped gate's correction bias, `[experts]`.
    correction: Option<Vec<f32>>,
    /// The logits' bias, `[experts]` (gpt-oss's router).
    bias: Option<Tensor>,
}

impl Gate {
    pub fn new(weight: Tensor, top_k: usize, rule: GateRule) -> Self {
        Self {
            weight,
            top_k,
            rule,
            correction: None,
            bias: None,
        }
    }

    /// The gate with a bias added to its logits (`[experts]`), where it has one.
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// The gate with its scores' correction bias (`[experts]`) where it has
    /// one; a grouped gate's weight held in fp32, as transformers computes
    /// its logits.
    pub fn with_correction(mut self, correction: Option<Tensor>) -> Result<Self, tch::TchError> {
        if matches!(self.rule, GateRule::Grouped(_)) {
            self.weight = self.weight.f_to_kind(Kind::Float)?;
        }
        self.correction = correction
            .map(|bias| Vec::<f32>::try_from(bias.f_to_kind(Kind::Float)?.f_flatten(0, -1)?))
            .transpose()?;
        Ok(self)
    }

    /// `xs`: `[tokens, hidden]`.
    pub fn route(&self, xs: &Tensor) -> Result<Routing, tch::TchError> {
        let logits = match self.rule {
            GateRule::Grouped(_) => {
                crate::projection::linear(&xs.f_to_kind(Kind::Float)?, &self.weight)?
            }
            _ => crate::projection::linear_biased(xs, &self.weight, self.bias.as_ref())?,
        };
        route_logits_corrected(
            &logits,
            self.top_k,
            self.rule,
            self.correction.as_deref(),
            xs.kind(),
        )
    }
}

/// Routing from router logits `[tokens, experts]` by `rule`, weights
/// rounded to `kind`.
pub fn route_logits(
    logits: &Tensor,
    top_k: usize,
    rule: GateRule,
    kind: Kind,
) -> Result<Routing, tch::TchError> {
    route_logits_corrected(logits, top_k, rule, None, kind)
}

/// Routing from router logits by `rule`, a grouped gate's choice corrected
/// by `correction` (`[experts]`) where given.
pub fn route_logits_corrected(
    logits: &Tensor,
    top_k: usize,
    rule: GateRule,
    correction: Option<&[f32]>,
    kind: Kind,
) -> Result<Routing, tch::TchError> {
    let renormalize = match rule {
        GateRule::TopKThenSoftmax => true,
        GateRule::SoftmaxThenTopK { renormalize } => renormalize,
        GateRule::Grouped(gate) => {
            return route_grouped(logits, top_k, &gate, correction, kind);
        }
    };
    let experts = logits.size().get(1).copied().unwrap_or(0).max(0) as usize;
    let values: Vec<f32> = Vec::try_from(logits.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
    let k = top_k.min(experts);
    let round = rounding(kind);
    let mut routing = Routing {
        k,
        experts: Vec::with_capacity(values.len() / experts.max(1) * k),
        weights: Vec::with_capacity(values.len() / experts.max(1) * k),
    };
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for row in values.chunks_exact(experts.max(1)) {
        let probs = softmax(row);
        // A stable descending sort keeps equal probabilities in expert
        // order, so ties are broken towards the lower expert id.
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let top = &order[..k];
        let sum: f32 = if renormalize {
            top.iter().map(|&e| probs[e]).sum()
        } else {
            1.0
        };
        routing.experts.extend_from_slice(top);
        routing
            .weights
            .extend(top.iter().map(|&e| round(probs[e] / sum)));
    }
    Ok(routing)
}

/// DeepSeek's routing (see [`GroupedGate`]), as transformers computes it:
/// the experts outside the chosen groups count 0 (not minus infinity), and
/// a chosen expert's weight is its score without the correction.
fn route_grouped(
    logits: &Tensor,
    top_k: usize,
    gate: &GroupedGate,
    correction: Option<&[f32]>,
    kind: Kind,
) -> Result<Routing, tch::TchError> {
    let experts = logits.size().get(1).copied().unwrap_or(0).max(0) as usize;
    let values: Vec<f32> = Vec::try_from(logits.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
    let k = top_k.min(experts);
    let round = rounding(kind);
    let group_size = experts / gate.groups.max(1);
    let mut routing = Routing {
        k,
        experts: Vec::with_capacity(values.len() / experts.max(1) * k),
        weights: Vec::with_capacity(values.len() / experts.max(1) * k),
    };
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    let mut groups: Vec<usize> = Vec::with_capacity(gate.groups);
    for row in values.chunks_exact(experts.max(1)) {
        let scores = match gate.scoring {
            Scoring::Softmax => softmax(row),
            Scoring::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        };
        let mut choice: Vec<f32> = match correction {
            Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        if gate.top_groups < gate.groups && group_size > 0 {
            let group_scores: Vec<f32> = choice
                .chunks_exact(group_size)
                .map(|group| match gate.group_score {
                    GroupScore::Max => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    GroupScore::TopTwoSum => {
                        let mut sorted = group.to_vec();
                        sorted.sort_by(|a, b| b.total_cmp(a));
                        sorted.iter().take(2).sum()
                    }
                })
                .collect();
            groups.clear();
            groups.extend(0..gate.groups);
            groups.sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]));
            let kept = &groups[..gate.top_groups];
            for (e, value) in choice.iter_mut().enumerate() {
                if !kept.contains(&(e / group_size)) {
                    *value = 0.0;
                }
            }
        }
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]));
        let top = &order[..k];
        let sum: f32 = match gate.renormalize {
            true => top.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20,
            false => 1.0,
        };
        let scale = gate.scale as f32;
        routing.experts.extend_from_slice(top);
        routing
            .weights
            .extend(top.iter().map(|&e| round(scores[e] / sum * scale)));
    }
    Ok(routing)
}

/// `exp(x - max) / Σ exp(x - max)`, in f32.
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Rounds an f32 to the nearest value of `kind` (and back to f32).
fn rounding(kind: Kind) -> fn(f32) -> f32 {
    match kind {
        Kind::BFloat16 => |v| half::bf16::from_f32(v).to_f32(),
        Kind::Half => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
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
            let routing = route_logits(&logits, k, GateRule::TopKThenSoftmax, Kind::Float).unwrap();
            prop_assert_eq!(routing.k, k);
            prop_assert_eq!(routing.tokens(), tokens);
            let ids: Vec<i64> = routing.experts.iter().map(|&e| e as i64).collect();
            let weights = &routing.weights;
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
                // Each weight is its expert's share of the chosen probabilities.
                let p = &probs[t * experts..(t + 1) * experts];
                let chosen: f32 = row.iter().map(|&c| p[c as usize]).sum();
                for (&c, &w) in row.iter().zip(&weights[t * k..(t + 1) * k]) {
                    prop_assert!((w - p[c as usize] / chosen).abs() < 1e-5, "expert {}: weight {} of {:?}", c, w, p);
                }
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
            let a = route_logits(&logits, k, GateRule::TopKThenSoftmax, Kind::Float).unwrap();
            let b = route_logits(&logits, k, GateRule::TopKThenSoftmax, Kind::Float).unwrap();
            prop_assert_eq!(&a, &b);
            // Softmax, top-k, renormalised: the same routing.
            let c = route_logits(&logits, k, GateRule::SoftmaxThenTopK { renormalize: true }, Kind::Float).unwrap();
            prop_assert_eq!(&a, &c);
        }

        #[test]
        fn without_renormalising_the_weights_are_the_softmax_probabilities((values, tokens, experts, k) in logits_strategy()) {
            let logits = Tensor::from_slice(&values).view([tokens as i64, experts as i64]);
            let renormalized = route_logits(&logits, k, GateRule::TopKThenSoftmax, Kind::Float).unwrap();
            let raw = route_logits(&logits, k, GateRule::SoftmaxThenTopK { renormalize: false }, Kind::Float).unwrap();
            // The same experts; each weight its softmax probability over every expert.
            prop_assert_eq!(&renormalized.experts, &raw.experts);
            let probs: Vec<f32> = Vec::try_from(logits.softmax(1, Kind::Float).flatten(0, -1)).unwrap();
            for t in 0..tokens {
                for j in 0..k {
                    let e = raw.experts[t * k + j];
                    let w = raw.weights[t * k + j];
                    prop_assert!((w - probs[t * experts + e]).abs() < 1e-6, "token {} expert {}: {} vs {}", t, e, w, probs[t * experts + e]);
                }
                let sum: f32 = raw.weights[t * k..(t + 1) * k].iter().sum();
                prop_assert!(sum <= 1.0 + 1e-5);
            }
        }
    }

    #[test]
    fn all_equal_logits_pick_the_lowest_ids_with_equal_weights() {
        let logits = Tensor::zeros([3, 8], (Kind::Float, tch::Device::Cpu));
        let routing = route_logits(&logits, 2, GateRule::TopKThenSoftmax, Kind::Float).unwrap();
        assert_eq!(routing.experts, vec![0, 1, 0, 1, 0, 1]);
        assert!(routing.weights.iter().all(|&w| w == 0.5));
    }
}
