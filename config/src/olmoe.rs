//! The Hugging Face `config.json` of an `OlmoeForCausalLM` checkpoint
//! (OLMoE-1B-7B): every layer routed (softmax over every expert, then
//! top-k), RMSNorm over the whole q and k projections before the reshape
//! into heads, q/k/v clamped to `clip_qkv` when set.

use serde::{Deserialize, Serialize};

use crate::TokenIds;
use crate::error::ConfigError;
use crate::spec::{
    Activation, AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm,
    check_activation_and_rope, check_attention, check_positive, check_routing,
};

/// The fields read (and written by gen-model); defaults follow
/// `transformers.OlmoeConfig` where the file may omit one, and the shapes
/// are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OlmoeConfig {
    pub hidden_size: usize,
    /// Width of each routed expert.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f64>,
    #[serde(default)]
    pub attention_bias: bool,
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
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::spec::silu")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_position_embeddings() -> usize {
    4096
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}

impl OlmoeConfig {
    /// The model's description, once its fields are checked.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        check_positive(&[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        check_routing(self.num_experts, self.num_experts_per_tok, "num_experts")?;
        check_activation_and_rope(
            &self.hidden_act,
            self.rope_scaling.as_ref(),
            self.rms_norm_eps,
        )?;
        // OLMoE's heads split the hidden size (its o_proj is hidden × hidden).
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::Invalid {
                field: "num_attention_heads",
                reason: format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            });
        }
        let attention = AttentionSpec {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.hidden_size / self.num_attention_heads,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm: QkNorm::WholeProjection,
            clip_qkv: self.clip_qkv,
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
            width: self.intermediate_size,
            gate: Gate::SoftmaxThenTopK {
                renormalize: self.norm_topk_prob,
            },
            router_bias: false,
            activation: Activation::SwiGlu,
            expert_bias: false,
            shared: None,
        };
        Ok(ModelSpec {
            family: Family::Olmoe,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention,
            layers: vec![FfnSpec::Moe(moe); self.num_hidden_layers],
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
        })
    }
}
