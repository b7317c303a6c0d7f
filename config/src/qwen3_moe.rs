//! The Hugging Face `config.json` of a `Qwen3MoeForCausalLM` checkpoint
//! (Qwen3-30B-A3B, Qwen3-235B-A22B): fine-grained routed experts, softmax
//! over every expert then top-k, dense MLP layers where `mlp_only_layers`
//! and `decoder_sparse_step` say, RMSNorm of each head's q and k.

use serde::Deserialize;

use crate::TokenIds;
use crate::error::ConfigError;
use crate::spec::{
    AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm, check_activation_and_rope,
    check_attention, check_positive, check_routing,
};

/// The fields read; defaults follow `transformers.Qwen3MoeConfig` where
/// the file may omit one, and the shapes are required.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen3MoeConfig {
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "four")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Width of each routed expert.
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
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
    pub attention_bias: bool,
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

pub(crate) fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
pub(crate) fn default_max_position_embeddings() -> usize {
    32768
}
pub(crate) fn default_rms_norm_eps() -> f64 {
    1e-6
}
pub(crate) fn default_rope_theta() -> f64 {
    10000.0
}
pub(crate) fn silu() -> String {
    "silu".into()
}

impl Qwen3MoeConfig {
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
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm: QkNorm::PerHead,
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
            shared: None,
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
            family: Family::Qwen3Moe,
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

/// Which layers are routed-expert layers in the Qwen MoE families: layer
/// `i` unless it is in `mlp_only_layers`, and only where `(i + 1)` is a
/// multiple of `decoder_sparse_step` (transformers' `Qwen3MoeDecoderLayer`).
pub(crate) fn sparse_layers(
    layers: usize,
    mlp_only_layers: &[usize],
    decoder_sparse_step: usize,
) -> Result<Vec<bool>, ConfigError> {
    if decoder_sparse_step == 0 {
        return Err(ConfigError::Invalid {
            field: "decoder_sparse_step",
            reason: "must be greater than 0".into(),
        });
    }
    if let Some(&beyond) = mlp_only_layers.iter().find(|&&l| l >= layers) {
        return Err(ConfigError::Invalid {
            field: "mlp_only_layers",
            reason: format!("layer {beyond} is beyond num_hidden_layers {layers}"),
        });
    }
    Ok((0..layers)
        .map(|i| !mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(decoder_sparse_step))
        .collect())
}

/// The Qwen families' sliding window (`use_sliding_window`, from layer
/// `max_window_layers` on) is not served; published MoE checkpoints leave it off.
pub(crate) fn refuse_sliding_window(use_sliding_window: bool) -> Result<(), ConfigError> {
    if use_sliding_window {
        return Err(ConfigError::Invalid {
            field: "use_sliding_window",
            reason: "sliding-window attention of the Qwen families is not supported".into(),
        });
    }
    Ok(())
}
