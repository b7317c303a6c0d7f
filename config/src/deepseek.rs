//! The Hugging Face `config.json` of the DeepSeek families:
//! `DeepseekV2ForCausalLM` (DeepSeek-V2, V2-Lite: softmax gate, greedy or
//! group-limited) and `DeepseekV3ForCausalLM` (DeepSeek-V3, R1 and the
//! models built on them: sigmoid gate with a correction bias, grouped).
//! Both have multi-head latent attention, `first_k_dense_replace` dense
//! layers first, then routed layers with `n_shared_experts` shared experts
//! (one MLP of `n_shared_experts × moe_intermediate_size`), weights scaled
//! by `routed_scaling_factor`. The multi-token-prediction layer V3
//! checkpoints carry after the last decoder layer is not served.

use serde::{Deserialize, Serialize};

use crate::TokenIds;
use crate::error::ConfigError;
use crate::spec::{
    Activation, AttentionSpec, Family, FfnSpec, Gate, GroupScore, GroupedGate, LatentAttention,
    ModelSpec, MoeSpec, QkNorm, Scoring, SharedExpertSpec, Yarn, check_activation_and_rope,
    check_attention, check_positive, check_routing,
};

/// The fields read (and written by gen-model); defaults follow
/// `transformers.DeepseekV2Config` and `DeepseekV3Config` where they agree,
/// and each family's own where they differ (Option fields); the shapes are
/// required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeepseekConfig {
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// What transformers repeats the expanded keys and values to: the
    /// heads (every published checkpoint says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    /// Width of each routed expert (and of each shared one).
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    /// V2: may be null (no shared expert); V3: default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// Null: queries are projected at full rank (V2-Lite). Default 1536.
    #[serde(default = "default_q_lora_rank")]
    pub q_lora_rank: Option<usize>,
    #[serde(default = "default_kv_lora_rank")]
    pub kv_lora_rank: usize,
    #[serde(default = "default_nope")]
    pub qk_nope_head_dim: usize,
    #[serde(default = "default_rope")]
    pub qk_rope_head_dim: usize,
    #[serde(default = "default_nope")]
    pub v_head_dim: usize,
    /// V2: `greedy` (default) or `group_limited_greedy`; V3 always groups.
    #[serde(default = "default_topk_method")]
    pub topk_method: String,
    /// V2: required with `group_limited_greedy`; V3: default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_group: Option<usize>,
    /// V2: required with `group_limited_greedy`; V3: default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_group: Option<usize>,
    /// V2: default 1; V3: default 2.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_scaling_factor: Option<f64>,
    /// V3 only (transformers' V2 gate never renormalises); default true there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// V3: the rotary part's values in adjacent pairs (default true); V2's always are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_interleave: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// V2: default 2048; V3: default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "crate::spec::rope_theta_10000")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::spec::silu")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

fn default_q_lora_rank() -> Option<usize> {
    Some(1536)
}
fn default_kv_lora_rank() -> usize {
    512
}
fn default_nope() -> usize {
    128
}
fn default_rope() -> usize {
    64
}
fn default_topk_method() -> String {
    "greedy".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl DeepseekConfig {
    /// The description of `family` (DeepSeek-V2 or V3), once the fields are
    /// checked.
    pub fn spec(&self, family: Family) -> Result<ModelSpec, ConfigError> {
        let v3 = family == Family::DeepseekV3;
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        check_positive(&[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(1)),
            ("n_shared_experts", self.n_shared_experts.unwrap_or(1)),
        ])?;
        check_routing(
            self.n_routed_experts,
            self.num_experts_per_tok,
            "n_routed_experts",
        )?;
        check_activation_and_rope(&self.hidden_act, None, self.rms_norm_eps)?;
        if self.mlp_bias {
            return Err(invalid(
                "mlp_bias",
                "biased MLPs are not supported (DeepSeek's checkpoints have none)".into(),
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(invalid(
                "first_k_dense_replace",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
            ));
        }
        if let Some(kv_heads) = self
            .num_key_value_heads
            .filter(|&n| n != self.num_attention_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{kv_heads} is not num_attention_heads {}: latent attention expands a key \
                     and a value for every head",
                    self.num_attention_heads
                ),
            ));
        }
        let yarn = self.yarn(v3)?;
        let mut softmax_scale =
            1.0 / ((self.qk_nope_head_dim + self.qk_rope_head_dim) as f64).sqrt();
        // transformers' V3 attention corrects the scale for YaRN; its V2 does not.
        if let (true, Some((yarn, Some(all_dim)))) = (v3, yarn) {
            let m = Yarn::mscale(yarn.factor, all_dim);
            softmax_scale *= m * m;
        }
        let attention = AttentionSpec {
            heads: self.num_attention_heads,
            kv_heads: 1,
            head_dim: self.qk_rope_head_dim,
            qkv_bias: false,
            o_bias: self.attention_bias,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            sliding_layers: None,
            sinks: false,
            rope_theta: self.rope_theta,
            yarn: yarn.map(|(yarn, _)| yarn),
            latent: Some(LatentAttention {
                q_lora_rank: self.q_lora_rank,
                kv_lora_rank: self.kv_lora_rank,
                nope_dim: self.qk_nope_head_dim,
                rope_dim: self.qk_rope_head_dim,
                v_dim: self.v_head_dim,
                bias: self.attention_bias,
                interleaved_rope: !v3 || self.rope_interleave.unwrap_or(true),
                softmax_scale,
            }),
        };
        check_attention(
            &attention,
            [
                "num_attention_heads",
                "num_key_value_heads",
                "qk_rope_head_dim",
            ],
        )?;
        let shared = match (v3, self.n_shared_experts) {
            (true, None) => Some(1),
            (_, n) => n,
        }
        .map(|n| SharedExpertSpec {
            width: n * self.moe_intermediate_size,
            sigmoid_gate: false,
        });
        let moe = MoeSpec {
            experts: self.n_routed_experts,
            top_k: self.num_experts_per_tok,
            width: self.moe_intermediate_size,
            gate: Gate::Grouped(self.gate(v3)?),
            router_bias: false,
            activation: Activation::SwiGlu,
            expert_bias: false,
            shared,
        };
        let layers = (0..self.num_hidden_layers)
            .map(|i| match i < self.first_k_dense_replace {
                true => FfnSpec::Dense {
                    width: self.intermediate_size,
                },
                false => FfnSpec::Moe(moe),
            })
            .collect();
        Ok(ModelSpec {
            family,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(if v3 {
                4096
            } else {
                2048
            }),
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention,
            layers,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
        })
    }

    /// The gate: V2's softmax scores, greedy or group-limited by each
    /// group's best score; V3's sigmoid scores with the correction bias,
    /// grouped by each group's two best.
    fn gate(&self, v3: bool) -> Result<GroupedGate, ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        let experts = self.n_routed_experts;
        let (groups, top_groups) = if v3 {
            (self.n_group.unwrap_or(8), self.topk_group.unwrap_or(4))
        } else {
            match self.topk_method.as_str() {
                "greedy" => (1, 1),
                "group_limited_greedy" => (
                    self.n_group.ok_or_else(|| {
                        invalid("n_group", "group_limited_greedy needs it".into())
                    })?,
                    self.topk_group.ok_or_else(|| {
                        invalid("topk_group", "group_limited_greedy needs it".into())
                    })?,
                ),
                other => {
                    return Err(invalid(
                        "topk_method",
                        format!("{other:?} is not one of \"greedy\", \"group_limited_greedy\""),
                    ));
                }
            }
        };
        if groups == 0 || !experts.is_multiple_of(groups) {
            return Err(invalid(
                "n_group",
                format!("{groups} does not divide n_routed_experts {experts}"),
            ));
        }
        if top_groups == 0 || top_groups > groups {
            return Err(invalid(
                "topk_group",
                format!("{top_groups} must be between 1 and n_group {groups}"),
            ));
        }
        if v3 && experts / groups < 2 {
            return Err(invalid(
                "n_group",
                format!(
                    "groups of {} expert: V3 ranks a group by its two best",
                    experts / groups
                ),
            ));
        }
        let reachable = top_groups * (experts / groups);
        if self.num_experts_per_tok > reachable {
            return Err(invalid(
                "num_experts_per_tok",
                format!(
                    "{} exceeds the {reachable} experts of topk_group {top_groups} groups",
                    self.num_experts_per_tok
                ),
            ));
        }
        let scale = self
            .routed_scaling_factor
            .unwrap_or(if v3 { 2.5 } else { 1.0 });
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(invalid("routed_scaling_factor", "must be positive".into()));
        }
        Ok(GroupedGate {
            scoring: if v3 {
                Scoring::Sigmoid
            } else {
                Scoring::Softmax
            },
            groups,
            top_groups,
            group_score: if v3 {
                GroupScore::TopTwoSum
            } else {
                GroupScore::Max
            },
            correction_bias: v3,
            renormalize: v3 && self.norm_topk_prob.unwrap_or(true),
            scale,
        })
    }

    /// `rope_scaling`: none, or YaRN over the rotary part (with
    /// `mscale_all_dim`, which V3 corrects the softmax scale by).
    fn yarn(&self, v3: bool) -> Result<Option<(Yarn, Option<f64>)>, ConfigError> {
        let max_positions = self
            .max_position_embeddings
            .unwrap_or(if v3 { 4096 } else { 2048 });
        crate::spec::yarn(self.rope_scaling.as_ref(), max_positions)
    }
}
