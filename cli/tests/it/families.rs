//! Each family's description against transformers' own classes: for odd
//! configs of every family (head_dim not hidden/heads, dense layers among
//! routed ones, a shared expert, biases, q/k norms of both kinds, tied
//! embeddings), the tensors `ModelSpec::tensors` expects are exactly those,
//! named and shaped, of the model transformers builds from the same
//! config.json (scripts/hf_tensors.py, on the meta device).

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tramontane_config::ModelSpec;

use crate::support;

fn transformers_tensors(config: &Value) -> Result<BTreeMap<String, Vec<usize>>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string())?;
    let script = support::scripts_dir().join("hf_tensors.py");
    let output = support::run_ok(
        std::process::Command::new(support::python())
            .arg(script)
            .arg(&path),
    )?;
    serde_json::from_slice(&output.stdout).context("hf_tensors.py output")
}

fn configs() -> Vec<Value> {
    vec![
        json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_local_experts": 3, "num_experts_per_tok": 2, "vocab_size": 90
        }),
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 24,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
            "num_experts": 5, "num_experts_per_tok": 3, "num_hidden_layers": 4,
            "decoder_sparse_step": 2, "mlp_only_layers": [3], "attention_bias": true,
            "norm_topk_prob": true, "vocab_size": 100, "tie_word_embeddings": true
        }),
        json!({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "num_hidden_layers": 3, "mlp_only_layers": [1], "vocab_size": 100
        }),
        json!({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_experts": 3, "num_experts_per_tok": 1, "num_hidden_layers": 2,
            "qkv_bias": false, "vocab_size": 50
        }),
        json!({
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "hidden_size": 64, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2,
            "num_hidden_layers": 2, "clip_qkv": 3.0, "attention_bias": true, "vocab_size": 70
        }),
    ]
}

#[test]
fn every_family_names_and_shapes_its_tensors_as_transformers_does() -> Result<()> {
    for config in configs() {
        let family = config["model_type"].clone();
        let ours: BTreeMap<String, Vec<usize>> = ModelSpec::from_json(&config.to_string())?
            .tensors()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        let theirs = transformers_tensors(&config)?;
        let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        ensure!(
            missing.is_empty() && extra.is_empty(),
            "{family}: transformers has {missing:?} that we do not; we have {extra:?} that it does not"
        );
        for (name, shape) in &theirs {
            ensure!(
                &ours[name] == shape,
                "{family} {name}: ours {:?}, transformers {shape:?}",
                ours[name]
            );
        }
    }
    Ok(())
}
