//! The Hugging Face `config.json` of a `Qwen2MoeForCausalLM` checkpoint
//! (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen routed experts plus a
//! shared expert on every token scaled by `sigmoid(shared_expert_gate · x)`,
//! q/k/v biases, no q/k norms.

use serde::Deserialize;

use crate::TokenIds;
use crate::error::ConfigError;
use crate::qwen3_moe::{
    default_max_position_embeddings, default_rms_norm_eps, default_rope_theta, one,
    refuse_sliding_window, silu, sparse_layers,
};
use crate::spec::{
    AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm, SharedExpertSpec,
    check_activation_and_rope, check_attention, check_positive, check_routing,
};

/// The fields read; defaults follow `transformers.Qwen2MoeConfig` where
/// the file may omit one, and the shapes are required.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen2MoeConfig {
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "sixteen")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Width of each routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the shared expert.
    pub shared_expert_intermediate_size: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn sixteen() -> usize {
    16
}
fn yes() -> bool {
    true
}

impl Qwen2MoeConfig {
    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            serde_json::from_str(text).map_err(|error| ConfigError::Parse { path: None, error })?;
        config.spec()?;
        Ok(config)
    }

    /// The model's description, once its fields are checked.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        check_positive(&[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
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
        refuse_sliding_window(self.use_sliding_window)?;
        let attention = AttentionSpec {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            qkv_bias: self.qkv_bias,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            rope_theta: self.rope_theta,
        };
        check_attention(&attention, "num_attention_heads", "num_key_value_heads")?;
        let moe = MoeSpec {
            experts: self.num_experts,
            top_k: self.num_experts_per_tok,
            width: self.moe_intermediate_size,
            gate: Gate::SoftmaxThenTopK {
                renormalize: self.norm_topk_prob,
            },
            shared: Some(SharedExpertSpec {
                width: self.shared_expert_intermediate_size,
                sigmoid_gate: true,
            }),
        };
        let layers = sparse_layers(
            self.num_hidden_layers,
            self.mlp_only_layers.as_deref().unwrap_or_default(),
            self.decoder_sparse_step,
        )?
        .into_iter()
        .map(|sparse| match sparse {
            true => FfnSpec::Moe(moe),
            false => FfnSpec::Dense {
                width: self.intermediate_size,
            },
        })
        .collect();
        Ok(ModelSpec {
            family: Family::Qwen2Moe,
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
}
