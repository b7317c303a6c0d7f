//! The tensors of a checkpoint layer by layer, with what each is to the
//! residual stream: the same tensors as `ModelSpec::tensors`, each role's
//! shape what it reads or writes, one router gate per routed layer, and
//! every parameter counted once.

use serde_json::json;
use tramontane_config::{ModelSpec, TensorRole};

fn configs() -> Vec<serde_json::Value> {
    vec![
        json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 48, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_local_experts": 3, "num_experts_per_tok": 2, "vocab_size": 90
        }),
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 24, "num_experts": 5, "num_experts_per_tok": 3, "num_hidden_layers": 4,
            "decoder_sparse_step": 2, "mlp_only_layers": [3], "attention_bias": true,
            "vocab_size": 100, "tie_word_embeddings": true
        }),
        json!({
            "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "num_hidden_layers": 3, "mlp_only_layers": [1],
            "vocab_size": 100
        }),
        json!({
            "architectures": ["OlmoeForCausalLM"], "hidden_size": 64, "intermediate_size": 24,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "clip_qkv": 3.0,
            "attention_bias": true, "vocab_size": 70
        }),
        json!({
            "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 2,
            "num_experts_per_tok": 3, "num_hidden_layers": 3, "first_k_dense_replace": 1,
            "num_attention_heads": 4, "q_lora_rank": null, "kv_lora_rank": 24,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
            "attention_bias": true, "vocab_size": 80
        }),
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "first_k_dense_replace": 1,
            "num_attention_heads": 4, "q_lora_rank": 20, "kv_lora_rank": 24,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
            "n_group": 4, "topk_group": 2, "vocab_size": 80
        }),
        json!({
            "architectures": ["GptOssForCausalLM"], "hidden_size": 64, "intermediate_size": 32,
            "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 80
        }),
    ]
}

#[test]
fn every_tensor_has_a_role_its_shape_agrees_with() {
    for config in configs() {
        let spec = ModelSpec::from_json(&config.to_string()).expect("a valid config");
        let family = spec.family;
        let h = spec.hidden_size;
        let listed = spec.tensors_layer_by_layer();

        let mut names: Vec<_> = listed.iter().map(|(t, _)| t.clone()).collect();
        names.sort();
        assert_eq!(names, spec.tensors(), "{family:?}");
        names.dedup();
        assert_eq!(names.len(), listed.len(), "{family:?}: a name twice");

        let roles: Vec<TensorRole> = listed.iter().map(|&(_, role)| role).collect();
        assert_eq!(roles[0], TensorRole::Embeddings, "{family:?}");
        let gates: Vec<usize> = roles
            .iter()
            .filter_map(|role| match role {
                TensorRole::RouterGate { layer } => Some(*layer),
                _ => None,
            })
            .collect();
        let routed: Vec<usize> = spec.moe_layers().map(|(l, _)| l).collect();
        assert_eq!(gates, routed, "{family:?}");
        let ffn_norms = roles
            .iter()
            .filter(|&&r| r == TensorRole::FeedForwardNorm)
            .count();
        assert_eq!(ffn_norms, spec.layers.len(), "{family:?}");

        let mut parameters = 0;
        for (tensor, role) in &listed {
            let shape = tensor.shape.as_slice();
            parameters += shape.iter().product::<usize>();
            let fits = match role {
                TensorRole::Embeddings => shape == [spec.vocab_size, h],
                TensorRole::Norm => shape.len() == 1,
                TensorRole::FeedForwardNorm => shape == [h],
                TensorRole::Reads => shape.len() == 1 || shape[1] == h,
                TensorRole::Writes => shape[0] == h,
                TensorRole::Inner => shape.len() == 2,
                TensorRole::GateCorrection | TensorRole::RouterBias => {
                    shape.len() == 1 && spec.moe_layers().any(|(_, m)| m.experts == shape[0])
                }
                TensorRole::Sinks => shape == [spec.attention.heads],
                // [experts, in, out] weights and [experts, out] biases: the
                // gate/up projection reads the stream, the down one writes it.
                TensorRole::Experts { writes } => {
                    let experts = spec.moe_layers().any(|(_, m)| m.experts == shape[0]);
                    let stream = match (writes, shape.len()) {
                        (false, 3) => shape[1] == h,
                        (true, 3) => shape[2] == h,
                        (true, 2) => shape[1] == h,
                        (false, 2) => true,
                        _ => false,
                    };
                    experts && stream
                }
                TensorRole::RouterGate { layer } => {
                    spec.moe(*layer).map(|m| [m.experts, h].to_vec()) == Some(shape.to_vec())
                }
            };
            assert!(fits, "{family:?}: {} {shape:?} as {role:?}", tensor.name);
        }
        assert_eq!(parameters, spec.parameters().total, "{family:?}");
    }
}
