//! Each family's config.json read into one description: the shapes of
//! published checkpoints, derived by hand from their config fields and
//! transformers' modeling code, and bad configs refused naming the field.

use serde_json::{Value, json};
use tramontane_config::{
    ConfigError, Family, FfnSpec, Gate, ModelSpec, MoeSpec, Parameters, QkNorm, SharedExpertSpec,
};

fn spec(config: &Value) -> Result<ModelSpec, ConfigError> {
    ModelSpec::from_json(&config.to_string())
}

/// The shapes of Qwen3-30B-A3B's config.json.
fn qwen3_30b_a3b() -> Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": false, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": true,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": null,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_sliding_window": false,
        "vocab_size": 151936
    })
}

/// The shapes of OLMoE-1B-7B's config.json.
fn olmoe_1b_7b() -> Value {
    json!({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "attention_bias": false, "clip_qkv": null, "eos_token_id": 50279, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "norm_topk_prob": false, "num_attention_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
        "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "vocab_size": 50304
    })
}

/// A Qwen2-MoE config with a shared expert (Qwen1.5-MoE-A2.7B's shapes).
fn qwen2_moe() -> Value {
    json!({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "vocab_size": 151936, "max_position_embeddings": 8192,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "use_sliding_window": false
    })
}

fn moe(spec: &ModelSpec, layer: usize) -> MoeSpec {
    match spec.layers[layer] {
        FfnSpec::Moe(moe) => moe,
        FfnSpec::Dense { .. } => panic!("layer {layer} is dense"),
    }
}

#[test]
fn qwen3_moe_is_fine_grained_with_per_head_qk_norms() {
    let s = spec(&qwen3_30b_a3b()).unwrap();
    assert_eq!(s.family, Family::Qwen3Moe);
    assert_eq!(s.layers.len(), 48);
    assert_eq!(s.moe_layers().count(), 48);
    let m = moe(&s, 0);
    assert_eq!((m.experts, m.top_k, m.width), (128, 8, 768));
    assert_eq!(m.gate, Gate::SoftmaxThenTopK { renormalize: true });
    assert_eq!(m.shared, None);
    // head_dim is given (128), not hidden/heads (64).
    assert_eq!(s.attention.head_dim, 128);
    assert_eq!(s.attention.qk_norm, QkNorm::PerHead);
    assert!(!s.attention.qkv_bias && !s.attention.o_bias);
    // 3 × 2048 × 768 parameters per expert; 2 × 4 × 128 KV values per
    // position and layer (2 KiB in bf16: 96 KiB per token over 48 layers).
    assert_eq!(ModelSpec::expert_parameters(&m, s.hidden_size), 4_718_592);
    assert_eq!(s.kv_elements_per_position(), 1024);
}

#[test]
fn qwen3_moe_dense_layers_follow_mlp_only_layers_and_the_sparse_step() {
    let mut c = qwen3_30b_a3b();
    c["num_hidden_layers"] = json!(6);
    c["decoder_sparse_step"] = json!(2);
    c["mlp_only_layers"] = json!([3]);
    let s = spec(&c).unwrap();
    // MoE where (i + 1) % 2 == 0 and i is not 3: layers 1 and 5.
    let kinds: Vec<bool> = s
        .layers
        .iter()
        .map(|f| matches!(f, FfnSpec::Moe(_)))
        .collect();
    assert_eq!(kinds, [false, true, false, false, false, true]);
    assert_eq!(s.layers[0], FfnSpec::Dense { width: 6144 });
    // norm_topk_prob defaults to false, as in transformers.
    c.as_object_mut().unwrap().remove("norm_topk_prob");
    let s = spec(&c).unwrap();
    assert_eq!(
        moe(&s, 1).gate,
        Gate::SoftmaxThenTopK { renormalize: false }
    );
    // Without head_dim: hidden / heads.
    c.as_object_mut().unwrap().remove("head_dim");
    assert_eq!(spec(&c).unwrap().attention.head_dim, 64);
}

#[test]
fn qwen2_moe_has_a_sigmoid_gated_shared_expert_and_qkv_biases() {
    let s = spec(&qwen2_moe()).unwrap();
    assert_eq!(s.family, Family::Qwen2Moe);
    let m = moe(&s, 23);
    assert_eq!((m.experts, m.top_k, m.width), (60, 4, 1408));
    assert_eq!(
        m.shared,
        Some(SharedExpertSpec {
            width: 5632,
            sigmoid_gate: true
        })
    );
    assert!(s.attention.qkv_bias, "qkv_bias defaults to true");
    assert!(!s.attention.o_bias);
    assert_eq!(s.attention.qk_norm, QkNorm::None);
    let mut c = qwen2_moe();
    c["qkv_bias"] = json!(false);
    assert!(!spec(&c).unwrap().attention.qkv_bias);
}

#[test]
fn olmoe_norms_whole_projections_and_routes_every_layer() {
    let s = spec(&olmoe_1b_7b()).unwrap();
    assert_eq!(s.family, Family::Olmoe);
    assert_eq!(s.moe_layers().count(), 16);
    let m = moe(&s, 0);
    assert_eq!((m.experts, m.top_k, m.width), (64, 8, 1024));
    assert_eq!(m.gate, Gate::SoftmaxThenTopK { renormalize: false });
    assert_eq!(s.attention.qk_norm, QkNorm::WholeProjection);
    assert_eq!(s.attention.head_dim, 128);
    assert_eq!(s.attention.clip_qkv, None);
    // 64 × 3 × 2048 × 1024 parameters of experts per layer.
    assert_eq!(
        64 * ModelSpec::expert_parameters(&m, s.hidden_size),
        402_653_184
    );
    let mut c = olmoe_1b_7b();
    c["clip_qkv"] = json!(8.0);
    c.as_object_mut().unwrap().remove("num_key_value_heads");
    let s = spec(&c).unwrap();
    assert_eq!(s.attention.clip_qkv, Some(8.0));
    assert_eq!(s.attention.kv_heads, 16, "defaults to the heads");
}

#[test]
fn mixtral_reads_as_before_into_the_description() {
    let c = json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "sliding_window": null
    });
    let s = spec(&c).unwrap();
    assert_eq!(s.family, Family::Mixtral);
    let m = moe(&s, 31);
    assert_eq!((m.experts, m.top_k, m.width), (8, 2, 14336));
    assert_eq!(m.gate, Gate::TopKThenSoftmax);
    assert_eq!(s.attention.head_dim, 128);
    assert_eq!(s.attention.rope_theta, 1e6);
}

/// Total and active parameters summed by hand from each config (embeddings
/// and lm_head, per layer attention, q/k norms, two norms, gate, experts),
/// against what the checkpoints' model cards say: Mixtral-8x7B 46.7B of
/// which 12.9B active, Qwen3-30B-A3B 30.5B / 3.3B, OLMoE-1B-7B 6.9B / 1.3B.
#[test]
fn parameters_add_up_to_the_published_totals() {
    let mixtral = json!({
        "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000
    });
    // Per layer: attention 41,943,040, norms 8,192, gate 32,768, experts
    // 8 × 176,160,768; embeddings and lm_head 2 × 131,072,000, final norm 4,096.
    assert_eq!(
        spec(&mixtral).unwrap().parameters(),
        Parameters {
            total: 46_702_792_704,
            active: 12_879_925_248,
            routed_experts: 45_097_156_608,
        }
    );
    // Per layer: attention 18,874,368, q/k norms 256, norms 4,096, gate
    // 262,144, experts 128 × 4,718,592; embeddings 2 × 311,164,928.
    let qwen3 = spec(&qwen3_30b_a3b()).unwrap();
    assert_eq!(
        qwen3.parameters(),
        Parameters {
            total: 30_532_122_624,
            active: 3_353_032_704,
            routed_experts: 28_991_029_248,
        }
    );
    // 48 layers × 2 × 4 heads × 128 × 2 bytes: 96 KiB of KV per token in bf16.
    assert_eq!(qwen3.kv_bytes_per_token(2), 98_304);
    // Per layer: attention 16,777,216, q/k norms over the projections
    // 4,096, norms 4,096, gate 131,072, experts 64 × 6,291,456.
    assert_eq!(
        spec(&olmoe_1b_7b()).unwrap().parameters(),
        Parameters {
            total: 6_919_161_856,
            active: 1_282_017_280,
            routed_experts: 6_442_450_944,
        }
    );
    // Qwen2-MoE adds q/k/v biases and a gated shared expert to each layer;
    // dense layers count whole.
    let mut c = qwen2_moe();
    c["num_hidden_layers"] = json!(2);
    c["mlp_only_layers"] = json!([0]);
    let p = spec(&c).unwrap().parameters();
    let attention = 2048 * (2048 * 3) + 2048 * 2048 + 3 * 2048;
    let embeddings = 2 * 151_936 * 2048 + 2048;
    let dense = 3 * 2048 * 5632;
    let shared = 3 * 2048 * 5632 + 2048;
    let expert = 3 * 2048 * 1408;
    assert_eq!(p.routed_experts, 60 * expert);
    assert_eq!(
        p.total,
        embeddings + 2 * (attention + 4096) + dense + 60 * 2048 + shared + 60 * expert
    );
    assert_eq!(
        p.active,
        embeddings + 2 * (attention + 4096) + dense + 60 * 2048 + shared + 4 * expert
    );
}

#[test]
fn the_family_comes_from_architectures_or_model_type() {
    let mut c = qwen3_30b_a3b();
    c.as_object_mut().unwrap().remove("architectures");
    assert_eq!(spec(&c).unwrap().family, Family::Qwen3Moe);
    let err = spec(&json!({"architectures": ["LlamaForCausalLM"]})).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("LlamaForCausalLM"), "{message}");
    for family in Family::ALL {
        assert!(message.contains(family.architecture()), "{message}");
    }
    let err = spec(&json!({"model_type": "llama"})).unwrap_err();
    assert!(err.to_string().contains("model_type \"llama\""), "{err}");
    // gpt-oss is served: its model_type alone names the family.
    assert!(matches!(
        Family::of_json(r#"{"model_type": "gpt_oss"}"#),
        Ok(Family::GptOss)
    ));
}

/// (family config, field changed, its value, the field the error names)
fn refused() -> Vec<(Value, &'static str, Value, &'static str)> {
    vec![
        (
            qwen3_30b_a3b(),
            "num_experts_per_tok",
            json!(129),
            "num_experts_per_tok",
        ),
        (
            qwen3_30b_a3b(),
            "mlp_only_layers",
            json!([2, 48]),
            "mlp_only_layers",
        ),
        (
            qwen3_30b_a3b(),
            "decoder_sparse_step",
            json!(0),
            "decoder_sparse_step",
        ),
        (
            qwen3_30b_a3b(),
            "num_key_value_heads",
            json!(5),
            "num_key_value_heads",
        ),
        (qwen3_30b_a3b(), "head_dim", json!(127), "head_dim"),
        (
            qwen3_30b_a3b(),
            "use_sliding_window",
            json!(true),
            "use_sliding_window",
        ),
        (
            qwen3_30b_a3b(),
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling",
        ),
        (
            qwen3_30b_a3b(),
            "moe_intermediate_size",
            json!(0),
            "moe_intermediate_size",
        ),
        (
            qwen2_moe(),
            "shared_expert_intermediate_size",
            json!(0),
            "shared_expert_intermediate_size",
        ),
        (
            qwen2_moe(),
            "num_experts_per_tok",
            json!(61),
            "num_experts_per_tok",
        ),
        (
            olmoe_1b_7b(),
            "num_experts_per_tok",
            json!(65),
            "num_experts_per_tok",
        ),
        (
            olmoe_1b_7b(),
            "num_attention_heads",
            json!(15),
            "num_attention_heads",
        ),
        (olmoe_1b_7b(), "clip_qkv", json!(-1.0), "clip_qkv"),
        (olmoe_1b_7b(), "hidden_act", json!("gelu"), "hidden_act"),
    ]
}

#[test]
fn values_out_of_range_are_refused_naming_the_field() {
    for (mut config, field, value, named) in refused() {
        config[field] = value.clone();
        let err = spec(&config).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, .. } if *field == named),
            "{field} = {value}: {err}"
        );
    }
}

#[test]
fn a_missing_field_the_family_needs_is_named() {
    for (config, field) in [
        (qwen3_30b_a3b(), "moe_intermediate_size"),
        (qwen3_30b_a3b(), "num_experts"),
        (qwen2_moe(), "shared_expert_intermediate_size"),
        (olmoe_1b_7b(), "num_experts_per_tok"),
    ] {
        let mut config = config;
        config.as_object_mut().unwrap().remove(field);
        let err = spec(&config).unwrap_err();
        let named = match &err {
            ConfigError::Parse { error, .. } => error.to_string().contains(field),
            ConfigError::Invalid { field: named, .. } => *named == field,
            _ => false,
        };
        assert!(named, "{field}: {err}");
    }
}

/// The planner's fixture of a published config.json.
fn fixture(name: &str) -> ModelSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../planner/fixtures")
        .join(name)
        .join("config.json");
    ModelSpec::from_file(&path).expect("a fixture reads")
}

/// DeepSeek-V3's config.json: 671 B parameters, 37.6 B active (the model
/// card's 671 B and 37 B), the multi-token-prediction layer not counted;
/// 70,272 bytes of latent cache per token in bf16.
#[test]
fn deepseek_v3_by_hand() {
    use tramontane_config::{Gate, GroupScore, Scoring};
    let m = fixture("deepseek-v3");
    assert_eq!(m.family, Family::DeepseekV3);
    let (h, heads) = (7168, 128);
    // q_a, its norm, q_b; kv_a, its norm, kv_b; o.
    let attention =
        h * 1536 + 1536 + 1536 * heads * 192 + h * 576 + 512 + 512 * heads * 256 + heads * 128 * h;
    assert_eq!(attention, 187_107_328);
    let expert = 3 * h * 2048;
    let (dense, gate, shared) = (3 * h * 18432, 256 * h + 256, expert);
    let embeddings = 2 * 129_280 * h + h;
    let p = m.parameters();
    assert_eq!(
        p.total,
        embeddings + 61 * (attention + 2 * h) + 3 * dense + 58 * (gate + shared + 256 * expert)
    );
    assert_eq!(p.total, 671_026_419_200);
    assert_eq!(p.active, 37_552_297_472);
    assert_eq!(p.routed_experts, 58 * 256 * expert);
    // 61 layers × (512 + 64) values × 2 bytes.
    assert_eq!(m.kv_bytes_per_token(2), 70_272);
    assert_eq!(
        m.layers
            .iter()
            .filter(|l| matches!(l, FfnSpec::Dense { .. }))
            .count(),
        3
    );
    let moe = m.moe(3).expect("layer 3 is routed");
    let Gate::Grouped(g) = moe.gate else {
        panic!("{:?}", moe.gate)
    };
    assert_eq!(
        (
            g.scoring,
            g.groups,
            g.top_groups,
            g.group_score,
            g.correction_bias,
            g.renormalize,
            g.scale
        ),
        (
            Scoring::Sigmoid,
            8,
            4,
            GroupScore::TopTwoSum,
            true,
            true,
            2.5
        )
    );
    assert_eq!(moe.shared.map(|s| s.width), Some(2048));
    let a = &m.attention;
    let latent = a.latent.expect("latent attention");
    assert_eq!((a.heads, a.kv_heads, a.head_dim), (128, 1, 64));
    assert_eq!(
        (latent.q_lora_rank, latent.kv_lora_rank, latent.v_dim),
        (Some(1536), 512, 128)
    );
    // YaRN factor 40, mscale_all_dim 1: 1/√192 × (0.1 ln 40 + 1)².
    let mscale = 0.1 * 40f64.ln() + 1.0;
    assert!((latent.softmax_scale - mscale * mscale / 192f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        a.yarn.map(|y| (y.factor, y.attention_factor)),
        Some((40.0, 1.0))
    );
}

/// DeepSeek-V2-Lite's config.json: 15.7 B parameters, 2.66 B active
/// (the model card's 16 B and 2.4 B, which leaves out the embeddings);
/// 31,104 bytes of latent cache per token in bf16.
#[test]
fn deepseek_v2_lite_by_hand() {
    use tramontane_config::{Gate, Scoring};
    let m = fixture("deepseek-v2-lite");
    assert_eq!(m.family, Family::DeepseekV2);
    let (h, heads) = (2048, 16);
    // q_proj at full rank; kv_a, its norm, kv_b; o.
    let attention = h * heads * 192 + h * 576 + 512 + 512 * heads * 256 + heads * 128 * h;
    let expert = 3 * h * 1408;
    let (dense, gate, shared) = (3 * h * 10944, 64 * h, 2 * expert);
    let embeddings = 2 * 102_400 * h + h;
    let p = m.parameters();
    assert_eq!(
        p.total,
        embeddings + 27 * (attention + 2 * h) + dense + 26 * (gate + shared + 64 * expert)
    );
    assert_eq!(p.total, 15_706_484_224);
    assert_eq!(p.active, 2_661_150_208);
    assert_eq!(m.kv_bytes_per_token(2), 31_104);
    let moe = m.moe(1).expect("layer 1 is routed");
    let Gate::Grouped(g) = moe.gate else {
        panic!("{:?}", moe.gate)
    };
    // Greedy: one group, kept; softmax scores, not renormalised, unscaled.
    assert_eq!(
        (
            g.scoring,
            g.groups,
            g.top_groups,
            g.correction_bias,
            g.renormalize,
            g.scale
        ),
        (Scoring::Softmax, 1, 1, false, false, 1.0)
    );
    let latent = m.attention.latent.expect("latent attention");
    assert_eq!(latent.q_lora_rank, None);
    // transformers' V2 does not correct the softmax scale for YaRN.
    assert!((latent.softmax_scale - 1.0 / 192f64.sqrt()).abs() < 1e-12);
}

/// DeepSeek fields transformers cannot serve are refused by name.
#[test]
fn deepseek_settings_that_cannot_be_served_are_refused_by_name() {
    let base = || {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 96, "moe_intermediate_size": 16, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
            "n_group": 4, "topk_group": 2, "vocab_size": 80
        })
    };
    let cases = [
        ("n_group", json!(3), "n_group"),
        ("topk_group", json!(5), "topk_group"),
        ("num_experts_per_tok", json!(5), "num_experts_per_tok"),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        ("num_key_value_heads", json!(2), "num_key_value_heads"),
        ("qk_rope_head_dim", json!(7), "qk_rope_head_dim"),
        ("first_k_dense_replace", json!(3), "first_k_dense_replace"),
    ];
    for (field, value, named) in cases {
        let mut config = base();
        config[field] = value;
        let message = spec(&config).expect_err(field).to_string();
        assert!(message.contains(named), "{field}: {message}");
    }
    let mut v2 = base();
    v2["architectures"] = json!(["DeepseekV2ForCausalLM"]);
    v2["topk_method"] = json!("noaux_tc");
    let message = spec(&v2).expect_err("topk_method").to_string();
    assert!(
        message.contains("topk_method") && message.contains("noaux_tc"),
        "{message}"
    );
}

/// What gpt-oss-20b and gpt-oss-120b share, read from their config.json:
/// grouped-query attention (64 heads of 64 over 8 kv heads) with q/k/v/o
/// biases and a sink per head, windowed (128) at even layers and full at
/// odd ones, YaRN factor 32 over 4096 positions; every layer routed, top-4,
/// by a biased router (the top-k logits, softmax over them) to experts of
/// width 2880 with biases and the clamped SwiGLU (limit 7, alpha 1.702).
fn gpt_oss_by_hand(m: &ModelSpec, layers: usize, experts: usize) {
    use tramontane_config::{Activation, Yarn};
    assert_eq!(m.family, Family::GptOss);
    assert_eq!((m.hidden_size, m.vocab_size), (2880, 201_088));
    assert_eq!(m.max_position_embeddings, 131_072);
    assert!(!m.tie_word_embeddings);
    assert_eq!(m.rms_norm_eps, 1e-5);
    assert_eq!(
        m.eos_token_id.as_ref().map(|t| t.to_vec()),
        Some(vec![200_002])
    );
    assert_eq!(m.layers.len(), layers);
    assert_eq!(m.moe_layers().count(), layers, "every layer is routed");
    let a = &m.attention;
    assert_eq!((a.heads, a.kv_heads, a.head_dim), (64, 8, 64));
    assert!(a.qkv_bias && a.o_bias && a.sinks);
    assert_eq!(a.qk_norm, QkNorm::None);
    assert_eq!((a.clip_qkv, a.latent), (None, None));
    assert_eq!(a.rope_theta, 150_000.0);
    // layer_types: "sliding_attention" at even layers, "full_attention" at odd.
    assert_eq!(a.sliding_window, Some(128));
    for layer in 0..layers {
        let window = if layer % 2 == 0 { Some(128) } else { None };
        assert_eq!(a.window(layer), window, "layer {layer}");
    }
    assert_eq!(a.window(layers), None, "no layer past the last");
    // YaRN: attention_factor 0.1 · ln 32 + 1 = 1.3466 (no mscale given).
    let yarn = a.yarn.expect("YaRN");
    assert_eq!(
        (
            yarn.factor,
            yarn.original_max_position_embeddings,
            yarn.beta_fast,
            yarn.beta_slow,
            yarn.truncate,
        ),
        (32.0, 4096, 32.0, 1.0, false)
    );
    assert!((yarn.attention_factor - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12);
    assert!((yarn.attention_factor - 1.346_573_590_279_973).abs() < 1e-12);
    assert_eq!(yarn.attention_factor, Yarn::mscale(32.0, 1.0));
    for (_, moe) in m.moe_layers() {
        assert_eq!((moe.experts, moe.top_k, moe.width), (experts, 4, 2880));
        assert_eq!(moe.gate, Gate::TopKThenSoftmax);
        assert!(moe.router_bias && moe.expert_bias);
        assert_eq!(
            moe.activation,
            Activation::ClampedSwiGlu {
                limit: 7.0,
                alpha: 1.702
            }
        );
        assert_eq!(moe.shared, None);
        // gate_up_proj 2880 × 2 · 2880 and its bias 2 · 2880, down_proj
        // 2880 × 2880 and its bias 2880.
        assert_eq!(
            ModelSpec::expert_parameters(moe, m.hidden_size),
            3 * 2880 * 2880 + 2 * 2880 + 2880
        );
    }
}

/// gpt-oss's parameters by hand. h = 2880, q = 64 heads × 64 = 4096,
/// kv = 8 × 64 = 512; per layer:
///
/// - attention: q_proj h·q + q, k_proj and v_proj h·kv + kv each, o_proj
///   q·h + h, sinks 64: 11,796,480 + 4,096 + 2 × (1,474,560 + 512) +
///   11,796,480 + 2,880 + 64 = 26,550,144;
/// - two RMSNorms, 2h = 5,760;
/// - the router, E·h + E;
/// - E experts of 3·h·2880 + 2·2880 + h = 24,883,200 + 8,640 = 24,891,840
///   (4 of them active).
///
/// Outside the layers, embeddings and lm_head (untied) 2 × 201,088 × h =
/// 1,158,266,880 and the final norm h: 1,158,269,760.
///
/// Model cards: 20.9 B (3.6 B active) and 116.8 B (5.1 B active). Their
/// active counts leave out the embedding table (201,088 × 2880 =
/// 579,133,440: a lookup), not lm_head.
fn gpt_oss_parameters(layers: usize, experts: usize) -> Parameters {
    let h = 2880;
    let (q, kv) = (64 * 64, 8 * 64);
    let attention = h * q + q + 2 * (h * kv + kv) + q * h + h + 64;
    assert_eq!(attention, 26_550_144);
    let norms = 2 * h;
    let router = experts * h + experts;
    let expert = 3 * h * 2880 + 2 * 2880 + h;
    assert_eq!(expert, 24_891_840);
    let outside = 2 * 201_088 * h + h;
    assert_eq!(outside, 1_158_269_760);
    Parameters {
        total: outside + layers * (attention + norms + router + experts * expert),
        active: outside + layers * (attention + norms + router + 4 * expert),
        routed_experts: layers * experts * expert,
    }
}

/// gpt-oss-20b: 24 layers of 32 experts. Per layer the router is
/// 32 × 2880 + 32 = 92,192: 20,914,757,184 parameters (20.9 B),
/// 4,187,440,704 active, 3,608,307,264 without the embedding table (the
/// card's 3.6 B); 49,152 bytes of keys and values per token in bf16 (24
/// layers × 2 × 8 kv heads × 64 × 2 bytes).
#[test]
fn gpt_oss_20b_by_hand() {
    let m = fixture("gpt-oss-20b");
    gpt_oss_by_hand(&m, 24, 32);
    let by_hand = gpt_oss_parameters(24, 32);
    assert_eq!(m.parameters(), by_hand);
    assert_eq!(
        by_hand,
        Parameters {
            total: 20_914_757_184,
            active: 4_187_440_704,
            routed_experts: 19_116_933_120,
        }
    );
    assert_eq!(by_hand.active - 201_088 * 2880, 3_608_307_264);
    assert_eq!(m.kv_bytes_per_token(2), 24 * 2 * 8 * 64 * 2);
    assert_eq!(m.kv_bytes_per_token(2), 49_152);
}

/// gpt-oss-120b: 36 layers of 128 experts. Per layer the router is 128 ×
/// 2880 + 128 = 368,768: 116,829,156,672 parameters (116.8 B),
/// 5,711,982,912 active, 5,132,849,472 without the embedding table (the
/// card's 5.1 B); 73,728 bytes of keys and values per token in bf16 (36
/// layers × 2 × 8 kv heads × 64 × 2 bytes).
#[test]
fn gpt_oss_120b_by_hand() {
    let m = fixture("gpt-oss-120b");
    gpt_oss_by_hand(&m, 36, 128);
    let by_hand = gpt_oss_parameters(36, 128);
    assert_eq!(m.parameters(), by_hand);
    assert_eq!(
        by_hand,
        Parameters {
            total: 116_829_156_672,
            active: 5_711_982_912,
            routed_experts: 114_701_598_720,
        }
    );
    assert_eq!(by_hand.active - 201_088 * 2880, 5_132_849_472);
    assert_eq!(m.kv_bytes_per_token(2), 36 * 2 * 8 * 64 * 2);
    assert_eq!(m.kv_bytes_per_token(2), 73_728);
}
