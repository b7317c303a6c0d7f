//! The Hugging Face `config.json` of a `GptOssForCausalLM` checkpoint
//! (gpt-oss-20b, gpt-oss-120b): grouped-query attention with q/k/v/o
//! biases and a learned sink logit per head, windowed and full layers as
//! `layer_types` alternates them, YaRN rotary embeddings; every layer
//! routed by a biased router (the top-k logits, softmax over them) to
//! experts with biases and the clamped SwiGLU, their gate and up
//! projections fused and interleaved. Released checkpoints store the
//! experts in MXFP4 (`quantization_config.quant_method` "mxfp4").

use serde::{Deserialize, Serialize};

use crate::TokenIds;
use crate::error::ConfigError;
use crate::spec::{
    Activation, AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm, check_attention,
    check_positive, check_routing, positive,
};

/// The sigmoid's slope in gpt-oss's clamped SwiGLU (`alpha`; fixed in
/// transformers' `GptOssExperts` and in the reference implementation).
pub const SWIGLU_ALPHA: f64 = 1.702;

/// The fields read (and written by gen-model); defaults follow
/// `transformers.GptOssConfig` where the file may omit one, and the shapes
/// are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptOssConfig {
    pub hidden_size: usize,
    /// Width of each routed expert.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub num_local_experts: usize,
    #[serde(default = "default_top_k")]
    pub num_experts_per_tok: usize,
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    /// Each layer's `sliding_attention` or `full_attention`; default:
    /// windowed at even layers, full at odd ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_swiglu_limit")]
    pub swiglu_limit: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// YaRN (transformers' default: factor 32 over 4096 positions); null: none.
    #[serde(default = "default_rope_scaling")]
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

fn default_head_dim() -> usize {
    64
}
fn default_top_k() -> usize {
    4
}
fn default_sliding_window() -> usize {
    128
}
fn default_swiglu_limit() -> f64 {
    7.0
}
fn default_max_position_embeddings() -> usize {
    131072
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    150000.0
}
fn default_rope_scaling() -> Option<serde_json::Value> {
    Some(serde_json::json!({
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": false, "original_max_position_embeddings": 4096
    }))
}

impl GptOssConfig {
    /// The model's description, once its fields are checked.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        check_positive(&[
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("sliding_window", self.sliding_window),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        check_routing(
            self.num_local_experts,
            self.num_experts_per_tok,
            "num_local_experts",
        )?;
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("{:?} is not supported (only \"silu\")", self.hidden_act),
            ));
        }
        if !positive(self.rms_norm_eps) {
            return Err(invalid("rms_norm_eps", "must be positive".into()));
        }
        if !positive(self.swiglu_limit) {
            return Err(invalid("swiglu_limit", "must be positive".into()));
        }
        let sliding_layers = match &self.layer_types {
            None => (0..self.num_hidden_layers).map(|l| l % 2 == 0).collect(),
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    return Err(invalid(
                        "layer_types",
                        format!(
                            "has {} entries for num_hidden_layers {}",
                            types.len(),
                            self.num_hidden_layers
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(invalid(
                            "layer_types",
                            format!("{other:?} is not \"sliding_attention\" or \"full_attention\""),
                        )),
                    })
                    .collect::<Result<Vec<bool>, _>>()?
            }
        };
        let yarn = crate::spec::yarn(self.rope_scaling.as_ref(), self.max_position_embeddings)?;
        let attention = AttentionSpec {
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            // transformers' GptOssConfig sets `attention_bias` true whatever
            // the file says.
            qkv_bias: true,
            o_bias: true,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: Some(self.sliding_window),
            sliding_layers: Some(sliding_layers),
            sinks: true,
            rope_theta: self.rope_theta,
            yarn: yarn.map(|(yarn, _)| yarn),
            latent: None,
        };
        check_attention(
            &attention,
            ["num_attention_heads", "num_key_value_heads", "head_dim"],
        )?;
        let moe = MoeSpec {
            experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
            width: self.intermediate_size,
            gate: Gate::TopKThenSoftmax,
            router_bias: true,
            activation: Activation::ClampedSwiGlu {
                limit: self.swiglu_limit,
                alpha: SWIGLU_ALPHA,
            },
            expert_bias: true,
            shared: None,
        };
        Ok(ModelSpec {
            family: Family::GptOss,
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
