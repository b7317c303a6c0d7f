//! The Hugging Face `config.json` of the Qwen MoE families:
//! `Qwen3MoeForCausalLM` (Qwen3-30B-A3B, Qwen3-235B-A22B: fine-grained
//! experts, RMSNorm of each head's q and k) and `Qwen2MoeForCausalLM`
//! (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B: a shared expert on every token
//! scaled by `sigmoid(shared_expert_gate · x)`, q/k/v biases). Both route
//! with a softmax over every expert then top-k, and have dense MLP layers
//! where `mlp_only_layers` and `decoder_sparse_step` say.

use serde::{Deserialize, Serialize};

use crate::TokenIds;
use crate::error::ConfigError;
use crate::spec::{
    Activation, AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm, SharedExpertSpec,
    check_activation_and_rope, check_attention, check_positive, check_routing,
};

/// The fields read (and written by gen-model); defaults follow
/// `transformers.Qwen3MoeConfig` and `Qwen2MoeConfig` where the file may
/// omit one, and the shapes are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenMoeConfig {
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Default 4 (Qwen3-MoE) or 16 (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Width of each routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the shared expert (Qwen2-MoE, required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen3-MoE: biases of q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen2-MoE: biases of q, k and v (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "crate::spec::rope_theta_10000")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::spec::silu")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

fn one() -> usize {
    1
}
fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl QwenMoeConfig {
    /// The description of `family` (Qwen3-MoE or Qwen2-MoE), once the
    /// fields are checked.
    pub fn spec(&self, family: Family) -> Result<ModelSpec, ConfigError> {
        let qwen2 = family == Family::Qwen2Moe;
        let shared = match (qwen2, self.shared_expert_intermediate_size) {
            (true, None) => {
                return Err(ConfigError::Invalid {
                    field: "shared_expert_intermediate_size",
                    reason: "Qwen2-MoE needs it (the shared expert's width)".into(),
                });
            }
            (true, Some(width)) => Some(SharedExpertSpec {
                width,
                sigmoid_gate: true,
            }),
            (false, _) => None,
        };
        check_positive(&[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
            (
                "shared_expert_intermediate_size",
                shared.map_or(1, |s| s.width),
            ),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        check_routing(self.num_experts, self.num_experts_per_tok, "num_experts")?;
        check_activation_and_rope(
            &self.hidden_act,
            self.rope_scaling.as_ref(),
            self.rms_norm_eps,
        )?;
        if self.use_sliding_window {
            // From layer max_window_layers on; published MoE checkpoints leave it off.
            return Err(ConfigError::Invalid {
                field: "use_sliding_window",
                reason: "sliding-window attention of the Qwen families is not supported".into(),
            });
        }
        let attention = AttentionSpec {
            heads: self.num_attention_heads,
            kv_heads: self
                .num_key_value_heads
                .unwrap_or(if qwen2 { 16 } else { 4 }),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            qkv_bias: if qwen2 {
                self.qkv_bias.unwrap_or(true)
            } else {
                self.attention_bias
            },
            o_bias: !qwen2 && self.attention_bias,
            qk_norm: if qwen2 { QkNorm::None } else { QkNorm::PerHead },
            clip_qkv: None,
            sliding_window: None,
            sliding_layers: None,
            sinks: false,
            rope_theta: self.rope_theta,
            yarn: None,
            latent: None,
        };
        check_attention(
            &attention,
            ["num_attention_heads", "num_key_value_heads", "head_dim"],
        )?;
        let moe = MoeSpec {
            experts: self.num_experts,
            top_k: self.num_experts_per_tok,
            width: self.moe_intermediate_size,
            gate: Gate::SoftmaxThenTopK {
                renormalize: self.norm_topk_prob,
            },
            router_bias: false,
            activation: Activation::SwiGlu,
            expert_bias: false,
            shared,
        };
        let layers = self
            .sparse_layers()?
            .into_iter()
            .map(|sparse| match sparse {
                true => FfnSpec::Moe(moe),
                false => FfnSpec::Dense {
                    width: self.intermediate_size,
                },
            })
            .collect();
        Ok(ModelSpec {
            family,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention,
            layers,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
        })
    }

    /// Which layers are routed: layer `i` unless it is in
    /// `mlp_only_layers`, and only where `(i + 1)` is a multiple of
    /// `decoder_sparse_step` (transformers' decoder layers).
    fn sparse_layers(&self) -> Result<Vec<bool>, ConfigError> {
        let (layers, step) = (self.num_hidden_layers, self.decoder_sparse_step);
        let dense = self.mlp_only_layers.as_deref().unwrap_or_default();
        if step == 0 {
            return Err(ConfigError::Invalid {
                field: "decoder_sparse_step",
                reason: "must be greater than 0".into(),
            });
        }
        if let Some(&beyond) = dense.iter().find(|&&l| l >= layers) {
            return Err(ConfigError::Invalid {
                field: "mlp_only_layers",
                reason: format!("layer {beyond} is beyond num_hidden_layers {layers}"),
            });
        }
        Ok((0..layers)
            .map(|i| !dense.contains(&i) && (i + 1).is_multiple_of(step))
            .collect())
    }
}
