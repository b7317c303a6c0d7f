//! What checkpoint to write ([`Spec`]: a family, a preset and overrides)
//! and the family's config.json it makes, field names as transformers'
//! config class has them.

use std::path::PathBuf;

use serde_json::{Value, json};
use tramontane_config::deepseek::DeepseekConfig;
use tramontane_config::gpt_oss::GptOssConfig;
use tramontane_config::olmoe::OlmoeConfig;
use tramontane_config::qwen_moe::QwenMoeConfig;
use tramontane_config::{Dtype, Family, MixtralConfig, ModelSpec, TokenIds};

use crate::presets::{Shape, shape};
use crate::{Preset, Result, SyntheticError, ensure};

/// The Mistral tokenizer's: its vocabulary and special tokens.
const VOCAB_SIZE: usize = 32000;
const BOS: u32 = 1;
const EOS: u32 = 2;

/// What checkpoint to write: a family's preset, with any field overridden.
/// `Spec::default()` is Mixtral's tiny preset: the demo and test checkpoint.
/// An override a family's config.json has no field for is refused, naming
/// the family.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub family: Family,
    pub preset: Preset,
    /// Seed of the random weights: the same seed writes the same weights.
    pub seed: u64,
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    /// config.json's `intermediate_size`: the experts' width in Mixtral and
    /// OLMoE, the dense MLP layers' width in the Qwen families.
    pub intermediate: Option<usize>,
    /// The routed experts' width of the Qwen families (`moe_intermediate_size`).
    pub moe_width: Option<usize>,
    /// Qwen2-MoE's shared expert width (`shared_expert_intermediate_size`).
    pub shared_expert_width: Option<usize>,
    /// Dense MLP layers among the routed ones (the Qwen families' `mlp_only_layers`).
    pub dense_layers: Option<Vec<usize>>,
    /// Only layers l with (l + 1) a multiple of this are routed (the Qwen
    /// families' `decoder_sparse_step`).
    pub sparse_step: Option<usize>,
    /// Divide the top-k weights by their sum (`norm_topk_prob`: Qwen, OLMoE).
    pub norm_topk_prob: Option<bool>,
    /// Biases of q, k, v and o (`attention_bias`: Qwen3-MoE, OLMoE).
    pub attention_bias: Option<bool>,
    /// Biases of q, k and v (`qkv_bias`: Qwen2-MoE).
    pub qkv_bias: Option<bool>,
    /// Clamp q, k and v to ±this (`clip_qkv`: OLMoE).
    pub clip_qkv: Option<f64>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    /// Head dimension, when not hidden / heads (Mixtral, Qwen3-MoE).
    pub head_dim: Option<usize>,
    /// Mixtral's sliding attention window.
    pub sliding_window: Option<usize>,
    pub max_position: Option<usize>,
    /// Tie lm_head to the token embeddings (no lm_head.weight is written).
    pub tie_embeddings: bool,
    /// dtype of the stored weights (default: the preset's).
    pub dtype: Option<Dtype>,
    /// Store the routed experts in MXFP4 as released gpt-oss checkpoints
    /// do (`_blocks` and `_scales`, `quantization_config` "mxfp4").
    pub mxfp4: bool,
    /// Split the weights over this many safetensors files with an index.
    pub shards: usize,
    /// Skew of the gates, a Zipf exponent (0: none); see the crate docs.
    pub expert_skew: f64,
    /// Python with transformers and mistral-common, used to convert the
    /// tokenizer (default: the project's `.venv`).
    pub python: Option<PathBuf>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            family: Family::Mixtral,
            preset: Preset::Tiny,
            seed: 0,
            experts: None,
            top_k: None,
            layers: None,
            hidden: None,
            intermediate: None,
            moe_width: None,
            shared_expert_width: None,
            dense_layers: None,
            sparse_step: None,
            norm_topk_prob: None,
            attention_bias: None,
            qkv_bias: None,
            clip_qkv: None,
            heads: None,
            kv_heads: None,
            head_dim: None,
            sliding_window: None,
            max_position: None,
            tie_embeddings: false,
            dtype: None,
            mxfp4: false,
            shards: 1,
            expert_skew: 0.0,
            python: None,
        }
    }
}

/// The Qwen families, whose settings most are.
const QWEN: &[Family] = &[Family::Qwen3Moe, Family::Qwen2Moe];
/// The DeepSeek families.
const DEEPSEEK: &[Family] = &[Family::DeepseekV2, Family::DeepseekV3];
/// The families with dense MLP layers, routed experts of their own width
/// and a shared expert.
const FINE: &[Family] = &[
    Family::Qwen3Moe,
    Family::Qwen2Moe,
    Family::DeepseekV2,
    Family::DeepseekV3,
];

impl Spec {
    /// Mixtral's preset, no override.
    pub fn preset(preset: Preset) -> Self {
        Self {
            preset,
            ..Self::default()
        }
    }

    /// A family's preset, no override.
    pub fn family(family: Family, preset: Preset) -> Self {
        Self {
            family,
            preset,
            ..Self::default()
        }
    }

    /// The config.json this spec writes, and the model it describes (as
    /// the server reads it from that file): every override checked against
    /// the family, every field by the family's reader.
    pub fn config(&self) -> Result<(Value, ModelSpec)> {
        let shape = self.shape()?;
        let mut json = config_json(self.family, &shape, self.tie_embeddings);
        if self.mxfp4 {
            applies(self.family, "--mxfp4", Some(()), &[Family::GptOss])?;
            ensure(
                shape.hidden.is_multiple_of(32) && shape.expert_width.is_multiple_of(32),
                || {
                    format!(
                        "--mxfp4: the hidden size {} and the experts' width {} must be multiples \
                         of 32 (MXFP4's block)",
                        shape.hidden, shape.expert_width
                    )
                },
            )?;
            json["quantization_config"] = json!({
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router",
                    "model.embed_tokens", "lm_head"
                ],
            });
        }
        let model = ModelSpec::from_json(&json.to_string())?;
        ensure(model.moe_layers().next().is_some(), || {
            "--dense-layers and --sparse-step leave no routed layer".into()
        })?;
        ensure(self.shards >= 1, || "--shards must be at least 1".into())?;
        ensure(
            self.expert_skew.is_finite() && self.expert_skew >= 0.0,
            || {
                format!(
                    "--expert-skew must be a finite number >= 0 (0: no skew), got {}",
                    self.expert_skew
                )
            },
        )?;
        ensure(self.expert_skew == 0.0 || model.hidden_size >= 2, || {
            "--expert-skew needs a hidden size of at least 2 (one coordinate carries the bias)"
                .into()
        })?;
        Ok((json, model))
    }

    /// The preset's shape with the overrides, each checked against the family.
    fn shape(&self) -> Result<Shape> {
        let f = self.family;
        let mut s = shape(f, self.preset)?;
        s.experts = self.experts.unwrap_or(s.experts);
        s.top_k = self.top_k.unwrap_or(s.top_k);
        s.layers = self.layers.unwrap_or(s.layers);
        s.hidden = self.hidden.unwrap_or(s.hidden);
        s.heads = self.heads.unwrap_or(s.heads);
        s.kv_heads = self.kv_heads.unwrap_or(s.kv_heads);
        s.max_position = self.max_position.unwrap_or(s.max_position);
        s.dtype = self.dtype.unwrap_or(s.dtype);
        if let Some(width) = self.intermediate {
            match f {
                Family::Mixtral | Family::Olmoe => s.expert_width = width,
                _ => s.dense_width = width,
            }
        }
        let (qwen2, olmoe) = (&[Family::Qwen2Moe], &[Family::Olmoe]);
        if let Some(width) = applies(f, "--moe-width", self.moe_width, FINE)? {
            s.expert_width = width;
        }
        let width = self.shared_expert_width;
        let shared = [&[Family::Qwen2Moe], DEEPSEEK].concat();
        if let Some(width) = applies(f, "--shared-expert-width", width, &shared)? {
            s.shared_width = Some(width);
        }
        if let Some(layers) = applies(f, "--dense-layers", self.dense_layers.clone(), FINE)? {
            s.dense_layers = layers;
        }
        if DEEPSEEK.contains(&f) {
            ensure(
                s.dense_layers.iter().copied().eq(0..s.dense_layers.len()),
                || {
                    format!(
                        "{}: --dense-layers must be the first layers in order (first_k_dense_replace), not {:?}",
                        f.model_type(),
                        s.dense_layers
                    )
                },
            )?;
            ensure(
                s.shared_width
                    .is_none_or(|w| w > 0 && w.is_multiple_of(s.expert_width.max(1))),
                || {
                    format!(
                        "{}: --shared-expert-width must be a multiple of the experts' width {} \
                         (n_shared_experts of them)",
                        f.model_type(),
                        s.expert_width
                    )
                },
            )?;
        }
        if let Some(step) = applies(f, "--sparse-step", self.sparse_step, QWEN)? {
            s.sparse_step = step;
        }
        let softmax_first = &[
            Family::Qwen3Moe,
            Family::Qwen2Moe,
            Family::Olmoe,
            Family::DeepseekV3,
        ];
        if let Some(norm) = applies(f, "--norm-topk-prob", self.norm_topk_prob, softmax_first)? {
            s.norm_topk_prob = norm;
        }
        let attention_bias = &[
            Family::Qwen3Moe,
            Family::Olmoe,
            Family::DeepseekV2,
            Family::DeepseekV3,
        ];
        if let Some(bias) = applies(f, "--attention-bias", self.attention_bias, attention_bias)? {
            s.attention_bias = bias;
        }
        if let Some(bias) = applies(f, "--qkv-bias", self.qkv_bias, qwen2)? {
            s.attention_bias = bias;
        }
        if let Some(clip) = applies(f, "--clip-qkv", self.clip_qkv, olmoe)? {
            s.clip_qkv = Some(clip);
        }
        let head_dim = &[Family::Mixtral, Family::Qwen3Moe, Family::GptOss];
        if let Some(dim) = applies(f, "--head-dim", self.head_dim, head_dim)? {
            s.head_dim = Some(dim);
        }
        let window = self.sliding_window;
        let windowed = &[Family::Mixtral, Family::GptOss];
        if let Some(window) = applies(f, "--sliding-window", window, windowed)? {
            s.sliding_window = Some(window);
        }
        // transformers' Qwen2-MoE and OLMoE attention split the hidden size
        // (0 heads is left to the config's reader to name).
        if matches!(f, Family::Qwen2Moe | Family::Olmoe) {
            ensure(s.heads == 0 || s.hidden.is_multiple_of(s.heads), || {
                format!(
                    "{}: the hidden size {} must be a multiple of the heads {} (its head_dim is hidden / heads)",
                    f.model_type(),
                    s.hidden,
                    s.heads
                )
            })?;
        }
        Ok(s)
    }
}

/// `value`, when `family` is one of `families`; a set value is refused for
/// another family, naming it and those that have the setting.
fn applies<T>(
    family: Family,
    flag: &str,
    value: Option<T>,
    families: &[Family],
) -> Result<Option<T>> {
    if value.is_some() && !families.contains(&family) {
        let having: Vec<&str> = families.iter().map(|f| f.model_type()).collect();
        let having = match having.split_last() {
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        };
        return Err(SyntheticError::Spec(format!(
            "{flag} does not apply to {} (only to {having})",
            family.model_type(),
        )));
    }
    Ok(value)
}

/// The config.json of `family` for `shape`: what its reader reads, plus the
/// fields of transformers' config class a published checkpoint has.
fn config_json(family: Family, s: &Shape, tie_embeddings: bool) -> Value {
    let written = |value: Value| match value {
        Value::Object(map) => map,
        _ => unreachable!("a config serialises to an object"),
    };
    let mut config = match family {
        Family::Mixtral => written(
            serde_json::to_value(MixtralConfig {
                architectures: vec![family.architecture().into()],
                model_type: Some(family.model_type().into()),
                hidden_size: s.hidden,
                intermediate_size: s.expert_width,
                num_hidden_layers: s.layers,
                num_attention_heads: s.heads,
                num_key_value_heads: Some(s.kv_heads),
                head_dim: s.head_dim,
                num_local_experts: s.experts,
                num_experts_per_tok: s.top_k,
                rms_norm_eps: s.rms_norm_eps,
                rope_theta: s.rope_theta,
                max_position_embeddings: s.max_position,
                sliding_window: s.sliding_window,
                vocab_size: VOCAB_SIZE,
                tie_word_embeddings: tie_embeddings,
                torch_dtype: Some(s.dtype.hf_name().into()),
                hidden_act: "silu".into(),
                rope_scaling: None,
                bos_token_id: Some(BOS),
                eos_token_id: Some(TokenIds::One(EOS)),
            })
            .expect("a config serialises"),
        ),
        Family::Qwen3Moe | Family::Qwen2Moe => {
            let qwen2 = family == Family::Qwen2Moe;
            let mut config = written(
                serde_json::to_value(QwenMoeConfig {
                    hidden_size: s.hidden,
                    intermediate_size: s.dense_width,
                    num_hidden_layers: s.layers,
                    num_attention_heads: s.heads,
                    num_key_value_heads: Some(s.kv_heads),
                    head_dim: s.head_dim,
                    num_experts: s.experts,
                    num_experts_per_tok: s.top_k,
                    moe_intermediate_size: s.expert_width,
                    shared_expert_intermediate_size: s.shared_width,
                    norm_topk_prob: s.norm_topk_prob,
                    decoder_sparse_step: s.sparse_step,
                    mlp_only_layers: Some(s.dense_layers.clone()),
                    attention_bias: !qwen2 && s.attention_bias,
                    qkv_bias: qwen2.then_some(s.attention_bias),
                    vocab_size: VOCAB_SIZE,
                    max_position_embeddings: s.max_position,
                    rms_norm_eps: s.rms_norm_eps,
                    rope_theta: s.rope_theta,
                    rope_scaling: None,
                    use_sliding_window: false,
                    tie_word_embeddings: tie_embeddings,
                    hidden_act: "silu".into(),
                    bos_token_id: Some(BOS),
                    eos_token_id: Some(TokenIds::One(EOS)),
                })
                .expect("a config serialises"),
            );
            if qwen2 {
                // Qwen2MoeConfig has qkv_bias and no attention_bias.
                config.remove("attention_bias");
            }
            config.extend(written(json!({
                "sliding_window": null,
                "max_window_layers": s.layers,
                "router_aux_loss_coef": 0.001,
            })));
            config
        }
        Family::Olmoe => {
            let mut config = written(
                serde_json::to_value(OlmoeConfig {
                    hidden_size: s.hidden,
                    intermediate_size: s.expert_width,
                    num_hidden_layers: s.layers,
                    num_attention_heads: s.heads,
                    num_key_value_heads: Some(s.kv_heads),
                    num_experts: s.experts,
                    num_experts_per_tok: s.top_k,
                    norm_topk_prob: s.norm_topk_prob,
                    clip_qkv: s.clip_qkv,
                    attention_bias: s.attention_bias,
                    vocab_size: VOCAB_SIZE,
                    max_position_embeddings: s.max_position,
                    rms_norm_eps: s.rms_norm_eps,
                    rope_theta: s.rope_theta,
                    rope_scaling: None,
                    tie_word_embeddings: tie_embeddings,
                    hidden_act: "silu".into(),
                    bos_token_id: Some(BOS),
                    eos_token_id: Some(TokenIds::One(EOS)),
                })
                .expect("a config serialises"),
            );
            config.insert("router_aux_loss_coef".into(), json!(0.01));
            config
        }
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek_json(family, s, tie_embeddings),
        Family::GptOss => {
            let mut config = written(
                serde_json::to_value(GptOssConfig {
                    hidden_size: s.hidden,
                    intermediate_size: s.expert_width,
                    num_hidden_layers: s.layers,
                    num_attention_heads: s.heads,
                    num_key_value_heads: s.kv_heads,
                    head_dim: s.head_dim.unwrap_or(s.hidden / s.heads.max(1)),
                    num_local_experts: s.experts,
                    num_experts_per_tok: s.top_k,
                    sliding_window: s.sliding_window.unwrap_or(128),
                    layer_types: Some(
                        (0..s.layers)
                            .map(|l| match l % 2 {
                                0 => "sliding_attention".into(),
                                _ => "full_attention".into(),
                            })
                            .collect(),
                    ),
                    swiglu_limit: 7.0,
                    vocab_size: VOCAB_SIZE,
                    max_position_embeddings: s.max_position,
                    rms_norm_eps: s.rms_norm_eps,
                    rope_theta: s.rope_theta,
                    rope_scaling: Some(json!({
                        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": false,
                        "original_max_position_embeddings": 4096
                    })),
                    tie_word_embeddings: tie_embeddings,
                    hidden_act: "silu".into(),
                    bos_token_id: Some(BOS),
                    eos_token_id: Some(TokenIds::One(EOS)),
                })
                .expect("a config serialises"),
            );
            config.extend(written(json!({
                "attention_bias": true,
                "experts_per_token": s.top_k,
                "initial_context_length": 4096,
                "router_aux_loss_coef": 0.9,
            })));
            config
        }
    };
    if family == Family::Mixtral {
        config.extend(written(json!({
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
        })));
    } else {
        config.extend(written(json!({
            "architectures": [family.architecture()],
            "model_type": family.model_type(),
            "torch_dtype": s.dtype.hf_name(),
            // The Mistral tokenizer has no padding token (the class's
            // default would name one of its ids).
            "pad_token_id": null,
        })));
    }
    config.extend(written(json!({
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "use_cache": true,
    })));
    Value::Object(config)
}

/// A DeepSeek family's config.json fields for `s`: its latent attention,
/// its first dense layers, its shared experts, its gate.
fn deepseek_json(
    family: Family,
    s: &Shape,
    tie_embeddings: bool,
) -> serde_json::Map<String, Value> {
    let v3 = family == Family::DeepseekV3;
    let latent = s
        .latent
        .expect("the DeepSeek presets have latent attention");
    let grouped = s.groups.0 > 1;
    let config = DeepseekConfig {
        hidden_size: s.hidden,
        intermediate_size: s.dense_width,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: Some(s.heads),
        vocab_size: VOCAB_SIZE,
        moe_intermediate_size: s.expert_width,
        n_routed_experts: s.experts,
        n_shared_experts: s.shared_width.map(|w| w / s.expert_width.max(1)),
        num_experts_per_tok: s.top_k,
        first_k_dense_replace: s.dense_layers.len(),
        q_lora_rank: latent.q_lora_rank,
        kv_lora_rank: latent.kv_lora_rank,
        qk_nope_head_dim: latent.nope,
        qk_rope_head_dim: latent.rope,
        v_head_dim: latent.v,
        topk_method: match (v3, grouped) {
            (true, _) => "noaux_tc",
            (false, true) => "group_limited_greedy",
            (false, false) => "greedy",
        }
        .into(),
        n_group: Some(s.groups.0),
        topk_group: Some(s.groups.1),
        routed_scaling_factor: Some(s.routed_scale),
        norm_topk_prob: Some(s.norm_topk_prob),
        rope_interleave: v3.then_some(true),
        attention_bias: s.attention_bias,
        mlp_bias: false,
        max_position_embeddings: Some(s.max_position),
        rms_norm_eps: s.rms_norm_eps,
        rope_theta: s.rope_theta,
        rope_scaling: None,
        tie_word_embeddings: tie_embeddings,
        hidden_act: "silu".into(),
        bos_token_id: Some(BOS),
        eos_token_id: Some(TokenIds::One(EOS)),
    };
    match serde_json::to_value(config).expect("a config serialises") {
        Value::Object(map) => map,
        _ => unreachable!("a config serialises to an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A family-specific override: its flag, the families that have it, and
    /// a spec of a family setting it.
    type Setting = (&'static str, Vec<Family>, fn(Family) -> Spec);

    fn settings() -> Vec<Setting> {
        fn base(family: Family) -> Spec {
            Spec::family(family, Preset::Tiny)
        }
        vec![
            ("--moe-width", FINE.to_vec(), |f| Spec {
                moe_width: Some(16),
                ..base(f)
            }),
            (
                "--shared-expert-width",
                vec![Family::Qwen2Moe, Family::DeepseekV2, Family::DeepseekV3],
                // A multiple of DeepSeek's expert width (32).
                |f| Spec {
                    shared_expert_width: Some(96),
                    ..base(f)
                },
            ),
            ("--dense-layers", FINE.to_vec(), |f| Spec {
                dense_layers: Some(vec![0]),
                ..base(f)
            }),
            ("--sparse-step", QWEN.to_vec(), |f| Spec {
                sparse_step: Some(2),
                ..base(f)
            }),
            (
                "--norm-topk-prob",
                vec![
                    Family::Qwen3Moe,
                    Family::Qwen2Moe,
                    Family::Olmoe,
                    Family::DeepseekV3,
                ],
                // Other than the preset's (Qwen3-MoE's and V3's renormalise).
                |f| Spec {
                    norm_topk_prob: Some(!matches!(f, Family::Qwen3Moe | Family::DeepseekV3)),
                    ..base(f)
                },
            ),
            (
                "--attention-bias",
                vec![
                    Family::Qwen3Moe,
                    Family::Olmoe,
                    Family::DeepseekV2,
                    Family::DeepseekV3,
                ],
                |f| Spec {
                    attention_bias: Some(true),
                    ..base(f)
                },
            ),
            ("--qkv-bias", vec![Family::Qwen2Moe], |f| Spec {
                qkv_bias: Some(false),
                ..base(f)
            }),
            ("--clip-qkv", vec![Family::Olmoe], |f| Spec {
                clip_qkv: Some(2.0),
                ..base(f)
            }),
            (
                "--head-dim",
                vec![Family::Mixtral, Family::Qwen3Moe, Family::GptOss],
                |f| Spec {
                    head_dim: Some(8),
                    ..base(f)
                },
            ),
            // Other than gpt_oss's preset window (8).
            (
                "--sliding-window",
                vec![Family::Mixtral, Family::GptOss],
                |f| Spec {
                    sliding_window: Some(6),
                    ..base(f)
                },
            ),
            ("--mxfp4", vec![Family::GptOss], |f| Spec {
                mxfp4: true,
                ..base(f)
            }),
        ]
    }

    #[test]
    fn a_setting_is_taken_by_the_families_that_have_it_and_refused_by_name_by_the_others() {
        for (flag, having, spec) in settings() {
            for family in Family::ALL {
                let result = spec(family).config();
                if having.contains(&family) {
                    let (json, model) = result.unwrap_or_else(|e| panic!("{flag} {family:?}: {e}"));
                    assert_ne!(
                        (json, model),
                        Spec::family(family, Preset::Tiny).config().expect("tiny"),
                        "{flag} changed nothing in {family:?}"
                    );
                } else {
                    let message = result.expect_err(flag).to_string();
                    assert!(
                        message.starts_with(&format!(
                            "{flag} does not apply to {}",
                            family.model_type()
                        )),
                        "{message}"
                    );
                    for f in &having {
                        assert!(message.contains(f.model_type()), "{message}");
                    }
                }
            }
        }
    }

    #[test]
    fn settings_reach_the_described_model() -> anyhow::Result<()> {
        use tramontane_config::{FfnSpec, Gate, QkNorm};
        let (_, qwen3) = Spec {
            layers: Some(4),
            dense_layers: Some(vec![0]),
            sparse_step: Some(2),
            moe_width: Some(24),
            intermediate: Some(40),
            norm_topk_prob: Some(false),
            attention_bias: Some(true),
            ..Spec::family(Family::Qwen3Moe, Preset::Tiny)
        }
        .config()?;
        // Layer 0 listed, layer 2 off the step: dense; 1 and 3 routed.
        let dense = FfnSpec::Dense { width: 40 };
        assert_eq!(qwen3.layers[0], dense);
        assert_eq!(qwen3.layers[2], dense);
        let moe = qwen3.moe(3).expect("layer 3 is routed");
        assert_eq!(
            (moe.width, moe.gate),
            (24, Gate::SoftmaxThenTopK { renormalize: false })
        );
        let a = &qwen3.attention;
        assert_eq!(
            (a.head_dim, a.qkv_bias, a.o_bias, a.qk_norm),
            (32, true, true, QkNorm::PerHead)
        );

        let (_, qwen2) = Spec {
            shared_expert_width: Some(48),
            qkv_bias: Some(false),
            ..Spec::family(Family::Qwen2Moe, Preset::Tiny)
        }
        .config()?;
        let shared = qwen2
            .moe(0)
            .and_then(|m| m.shared)
            .expect("a shared expert");
        assert_eq!(shared.width, 48);
        assert!(!qwen2.attention.qkv_bias);

        let (json, olmoe) = Spec {
            clip_qkv: Some(2.5),
            intermediate: Some(20),
            ..Spec::family(Family::Olmoe, Preset::Tiny)
        }
        .config()?;
        assert_eq!(olmoe.attention.clip_qkv, Some(2.5));
        assert_eq!(olmoe.attention.qk_norm, QkNorm::WholeProjection);
        assert_eq!(olmoe.moe(0).map(|m| m.width), Some(20));
        assert_eq!(json["architectures"][0], "OlmoeForCausalLM");
        Ok(())
    }

    #[test]
    fn out_of_range_values_are_named_as_config_json_names_them() {
        let cases = [
            (
                Spec {
                    dense_layers: Some(vec![5]),
                    ..Spec::family(Family::Qwen3Moe, Preset::Tiny)
                },
                "mlp_only_layers",
            ),
            (
                Spec {
                    top_k: Some(17),
                    ..Spec::family(Family::Olmoe, Preset::Tiny)
                },
                "num_experts_per_tok",
            ),
            (
                Spec {
                    dense_layers: Some(vec![0, 1]),
                    ..Spec::family(Family::Qwen2Moe, Preset::Tiny)
                },
                "no routed layer",
            ),
            (
                Spec {
                    heads: Some(3),
                    ..Spec::family(Family::Qwen2Moe, Preset::Tiny)
                },
                "multiple of the heads",
            ),
        ];
        for (spec, expected) in cases {
            let message = spec.config().expect_err(expected).to_string();
            assert!(message.contains(expected), "{message}");
        }
    }
}
