//! The Hugging Face `config.json` of a `MixtralForCausalLM` checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::spec::{Activation, Family};

/// `eos_token_id` may be one id or a list of ids in HF configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of a Mixtral `config.json` this crate reads. Defaults follow
/// `transformers.MixtralConfig` where the file may omit a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtralConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default = "crate::spec::silu")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    1e6
}
fn default_max_position_embeddings() -> usize {
    4096 * 32
}

/// Refuses a checkpoint of another family (an architecture this project
/// does not serve is refused before, by [`Family::of`]).
fn mixtral_only(family: Family) -> Result<(), ConfigError> {
    match family {
        Family::Mixtral => Ok(()),
        other => Err(ConfigError::Invalid {
            field: "architectures",
            reason: format!(
                "{} is not Mixtral ({})",
                other.architecture(),
                Family::Mixtral.architecture()
            ),
        }),
    }
}

impl MixtralConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        ConfigError::reading(path, Self::from_json)
    }

    /// Parses and validates the text of a Mixtral `config.json`.
    /// The family is checked first: a checkpoint of another one is refused
    /// by name, not by the first Mixtral field it lacks.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let parse = |error| ConfigError::Parse { path: None, error };
        mixtral_only(Family::of_json(text)?)?;
        let config: MixtralConfig = serde_json::from_str(text).map_err(parse)?;
        config.validate()?;
        Ok(config)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Cross-field checks: what the forward relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        mixtral_only(Family::of(&self.architectures, self.model_type.as_deref())?)?;
        let invalid =
            |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads()),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim()),
        ] {
            if value == 0 {
                return invalid(field, "must be greater than 0".into());
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads())
        {
            return invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads(),
                    self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return invalid(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim()),
            );
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return invalid(
                "num_experts_per_tok",
                format!(
                    "{} exceeds num_local_experts {}",
                    self.num_experts_per_tok, self.num_local_experts
                ),
            );
        }
        if self.sliding_window == Some(0) {
            return invalid("sliding_window", "must be greater than 0 or null".into());
        }
        if self.hidden_act != "silu" {
            return invalid(
                "hidden_act",
                format!("{:?} is not supported (only \"silu\")", self.hidden_act),
            );
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return invalid(
                "rope_scaling",
                "scaled rotary embeddings are not supported".into(),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return invalid("rms_norm_eps/rope_theta", "must be positive".into());
        }
        Ok(())
    }

    /// The model's description: every layer routed, top-k then softmax,
    /// no biases or q/k norms.
    pub fn spec(&self) -> crate::spec::ModelSpec {
        use crate::spec::{AttentionSpec, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm};
        let moe = MoeSpec {
            experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
            width: self.intermediate_size,
            gate: Gate::TopKThenSoftmax,
            router_bias: false,
            activation: Activation::SwiGlu,
            expert_bias: false,
            shared: None,
        };
        ModelSpec {
            family: Family::Mixtral,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention: AttentionSpec {
                heads: self.num_attention_heads,
                kv_heads: self.num_key_value_heads(),
                head_dim: self.head_dim(),
                qkv_bias: false,
                o_bias: false,
                qk_norm: QkNorm::None,
                clip_qkv: None,
                sliding_window: self.sliding_window,
                sliding_layers: None,
                sinks: false,
                rope_theta: self.rope_theta,
                yarn: None,
                latent: None,
            },
            layers: vec![FfnSpec::Moe(moe); self.num_hidden_layers],
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
        }
    }

    /// Number of parameters of one expert (w1, w2, w3).
    pub fn expert_parameters(&self) -> usize {
        3 * self.hidden_size * self.intermediate_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 8, "num_experts_per_tok": 2,
            "vocab_size": 32000, "max_position_embeddings": 1024,
            "sliding_window": null, "torch_dtype": "float32"
        })
    }

    #[test]
    fn parses_a_mixtral_config_with_defaults() {
        let c = MixtralConfig::from_json(&tiny().to_string()).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_key_value_heads(), 2);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut v = tiny();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let err = MixtralConfig::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(err, ConfigError::UnsupportedArchitecture { .. }));
        assert!(err.to_string().contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn another_family_is_refused_by_name_before_its_fields_are_read() {
        // A Qwen3-MoE config: no num_local_experts, which Mixtral requires.
        let qwen3 = serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "vocab_size": 151936
        });
        // Served, but not by this reader (ModelSpec reads every family).
        let err = MixtralConfig::from_json(&qwen3.to_string()).unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::Invalid {
                    field: "architectures",
                    ..
                }
            ),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains("Qwen3MoeForCausalLM"), "{message}");
        assert!(message.contains("MixtralForCausalLM"), "{message}");
        assert!(!message.contains("num_local_experts"), "{message}");
        // Without `architectures`, by model_type.
        let err = MixtralConfig::from_json(r#"{"model_type": "olmoe"}"#).unwrap_err();
        assert!(err.to_string().contains("OlmoeForCausalLM"), "{err}");
        let err = MixtralConfig::from_json(r#"{"model_type": "dbrx"}"#).unwrap_err();
        assert!(err.to_string().contains("model_type \"dbrx\""), "{err}");
        let err = MixtralConfig::from_json(r#"{"model_type": "mixtral"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut v = tiny();
        v["num_key_value_heads"] = serde_json::json!(3);
        let err = MixtralConfig::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let mut v = tiny();
        v["num_experts_per_tok"] = serde_json::json!(9);
        let err = MixtralConfig::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("num_experts_per_tok"), "{err}");
    }

    #[test]
    fn missing_field_is_a_parse_error_naming_it() {
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("hidden_size");
        let err = MixtralConfig::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }
}
