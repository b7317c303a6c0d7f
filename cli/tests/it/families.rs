//! Each family's description against transformers' own classes: for odd
//! configs of every family (head_dim not hidden/heads, dense layers among
//! routed ones, a shared expert, biases, q/k norms of both kinds, tied
//! embeddings, latent attention with and without the queries' low rank,
//! V3's gate correction bias, gpt-oss's sinks, router bias and fused
//! experts), the tensors `ModelSpec::tensors` expects are exactly those,
//! named and shaped, of the model transformers builds from the same
//! config.json (scripts/hf_tensors.py, on the meta device).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tramontane_config::{Dtype, ModelSpec};

use crate::support;

fn transformers_tensors(config: &Value) -> Result<BTreeMap<String, Vec<usize>>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string())?;
    let script = support::scripts_dir().join("hf_tensors.py");
    let output = support::python_ok(
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
        json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 16,
            "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "q_lora_rank": null, "kv_lora_rank": 24,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
            "attention_bias": true, "vocab_size": 80
        }),
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 16,
            "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "q_lora_rank": 20, "kv_lora_rank": 24,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
            "n_group": 4, "topk_group": 2, "vocab_size": 80
        }),
        json!({
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "hidden_size": 64, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 20, "num_local_experts": 5,
            "num_experts_per_tok": 2, "num_hidden_layers": 2, "vocab_size": 70
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

/// A Qwen2-MoE checkpoint (a dense first layer, a shared expert) with
/// Qwen's ChatML template (the one with tools), served over two workers: a chat completion renders the
/// checkpoint's own template as transformers does (apply_chat_template) and
/// answers transformers' greedy tokens; the expert stats count its routed
/// layers and nothing in the dense one.
#[test]
fn a_qwen2_moe_chat_is_its_chatml_template_and_transformers_greedy_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::family_checkpoint(
        &model,
        "qwen2_moe",
        json!({"mlp_only_layers": [0], "num_hidden_layers": 3}),
        &["--chat-template", "qwen-tools", "--seed", "7"],
    )?;
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three colours."}
    ]);
    let max_tokens = 8;
    let request = json!({"chats": [messages], "greedy_tokens": max_tokens});
    let prefix = support::hf_reference(&model, &request, dir.path(), Dtype::F32)?;
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json"))?)?;
    let chat = &reference["chats"][0];
    let prompt_ids = chat["ids"].as_array().context("ids")?.len();
    let greedy: Vec<u32> = serde_json::from_value(chat["greedy"].clone())?;
    // Up to and without an end-of-sequence token, as a chat stops there.
    let expected: Vec<u32> = greedy.into_iter().take_while(|&t| t != 2).collect();
    let tokenizer = tramontane_model::Tokenizer::from_dir(&model)?;
    let expected_text = tokenizer.decode(&expected)?;

    let serve = support::serve_two_workers(&model, &[])?;
    let body = json!({
        "model": "model", "messages": messages, "max_tokens": max_tokens, "temperature": 0
    });
    let (status, _, answer) = support::http(
        &serve.http,
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
    )?;
    ensure!(status == 200, "{status} {answer}");
    let answer: Value = serde_json::from_str(&answer)?;
    ensure!(
        answer["usage"]["prompt_tokens"] == prompt_ids,
        "prompt tokens {} against transformers' {prompt_ids}",
        answer["usage"]["prompt_tokens"]
    );
    ensure!(
        answer["usage"]["completion_tokens"] == expected.len(),
        "{answer}"
    );
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?;
    // The reply keeps its first token's leading space (decoded after the
    // prompt, as vLLM does); a decode from the first token drops it.
    ensure!(
        content.trim_start() == expected_text.trim_start(),
        "ours {content:?}, transformers' {expected_text:?}"
    );

    let (status, _, stats) = support::http(&serve.http, "GET", "/v1/experts/stats", "")?;
    ensure!(status == 200, "{status} {stats}");
    let stats: Value = serde_json::from_str(&stats)?;
    ensure!(stats["layers"] == 3 && stats["experts"] == 8, "{stats}");
    let routed = |layer: usize| -> Result<u64> {
        let counts: Vec<u64> = serde_json::from_value(stats["tokens"][layer].clone())?;
        Ok(counts.iter().sum())
    };
    ensure!(
        routed(0)? == 0 && stats["tokens"][0] == json!([]),
        "{stats}"
    );
    // Every prompt and generated token but the last took its top-2 in
    // each routed layer.
    let pairs = 2 * (prompt_ids + expected.len() - 1) as u64;
    ensure!(routed(1)? == pairs && routed(2)? == pairs, "{stats}");
    Ok(())
}

/// transformers' prompt ids (apply_chat_template with the generation
/// prompt) of `messages` and `tools` in the checkpoint at `model` (the
/// date in the local time zone, which the server inherits too).
fn transformers_chat_ids(model: &Path, messages: &Value, tools: &Value) -> Result<Vec<u32>> {
    const SCRIPT: &str = r#"
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
request = json.loads(sys.argv[2])
ids = tokenizer.apply_chat_template(request["messages"], tools=request["tools"],
    add_generation_prompt=True, return_dict=True)["input_ids"]
print(json.dumps(ids))
"#;
    let request = json!({"messages": messages, "tools": tools});
    let output = support::python_ok(
        std::process::Command::new(support::python())
            .args(["-c", SCRIPT])
            .arg(model)
            .arg(request.to_string()),
    )?;
    serde_json::from_slice(&output.stdout).context("apply_chat_template's ids")
}

/// scripts/hf_reference.py on `request` (its "chats" dated in the local
/// time zone, as the server dates them); the JSON it writes.
fn transformers_reference(model: &Path, request: &Value, work: &Path) -> Result<Value> {
    let prefix = support::hf_reference(model, request, work, Dtype::F32)?;
    Ok(serde_json::from_str(&std::fs::read_to_string(
        prefix.with_extension("json"),
    )?)?)
}

/// The local date: what gpt-oss's template writes.
fn today() -> chrono::NaiveDate {
    chrono::Local::now().date_naive()
}

/// A gpt-oss checkpoint (transformers' class) with the released
/// checkpoints' harmony chat template (chat_template.jinja, today's date
/// in its system message), served over two workers: a chat completion's
/// prompt is transformers' apply_chat_template ids (through /tokenize, and
/// counted in its usage) and its answer transformers' greedy tokens; with
/// tools, an assistant's call (its arguments as JSON text) and the tool's
/// result, /tokenize gives transformers' ids of the same conversation.
#[test]
fn a_gpt_oss_chat_is_its_harmony_template_and_transformers_greedy_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::family_checkpoint(
        &model,
        "gpt_oss",
        json!({}),
        &["--seed", "31", "--chat-template", "gpt-oss"],
    )?;
    ensure!(
        model.join("chat_template.jinja").exists(),
        "no chat_template.jinja"
    );
    let serve = support::serve_two_workers(&model, &[])?;
    // The date is the day's: once more if the day changed on the way.
    let day = today();
    match gpt_oss_chat(&model, dir.path(), &serve.http) {
        Err(error) if today() != day => {
            eprintln!("the day changed during the test ({error:#}): once more");
            gpt_oss_chat(&model, dir.path(), &serve.http)
        }
        result => result,
    }
}

fn gpt_oss_chat(model: &Path, work: &Path, http: &str) -> Result<()> {
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three colours."}
    ]);
    let max_tokens = 8;
    let request = json!({"chats": [messages], "greedy_tokens": max_tokens});
    let reference = transformers_reference(model, &request, work)?;
    let chat = &reference["chats"][0];
    let prompt_ids: Vec<u32> = serde_json::from_value(chat["ids"].clone())?;
    let greedy: Vec<u32> = serde_json::from_value(chat["greedy"].clone())?;
    let expected: Vec<u32> = greedy.into_iter().take_while(|&t| t != 2).collect();
    ensure!(expected.len() > 1, "transformers' answer {expected:?}");
    let tokenizer = tramontane_model::Tokenizer::from_dir(model)?;
    let expected_text = tokenizer.decode(&expected)?;
    ensure!(
        tokenizer
            .decode(&prompt_ids)?
            .contains("<|start|>developer<|message|># Instructions\n\nBe brief."),
        "not the harmony format: {:?}",
        tokenizer.decode(&prompt_ids)?
    );

    let tokenize = |body: Value| -> Result<Vec<u32>> {
        let (status, _, answer) = support::http(http, "POST", "/tokenize", &body.to_string())?;
        ensure!(status == 200, "{status} {answer}");
        let answer: Value = serde_json::from_str(&answer)?;
        Ok(serde_json::from_value(answer["tokens"].clone())?)
    };
    let ours = tokenize(json!({"model": "model", "messages": messages}))?;
    ensure!(
        ours == prompt_ids,
        "prompt ids: ours {:?}, transformers' {:?}",
        tokenizer.decode(&ours)?,
        tokenizer.decode(&prompt_ids)?
    );

    let body = json!({
        "model": "model", "messages": messages, "max_tokens": max_tokens, "temperature": 0
    });
    let (status, _, answer) =
        support::http(http, "POST", "/v1/chat/completions", &body.to_string())?;
    ensure!(status == 200, "{status} {answer}");
    let answer: Value = serde_json::from_str(&answer)?;
    ensure!(
        answer["usage"]["prompt_tokens"] == prompt_ids.len(),
        "prompt tokens {} against transformers' {}",
        answer["usage"]["prompt_tokens"],
        prompt_ids.len()
    );
    ensure!(
        answer["usage"]["completion_tokens"] == expected.len(),
        "{answer}"
    );
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?;
    ensure!(
        content.trim_start() == expected_text.trim_start(),
        "ours {content:?}, transformers' {expected_text:?}"
    );

    // Tools, a call and its result: the request's form (arguments as JSON
    // text, no content) and transformers' (arguments as an object).
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
            "days": {"type": "integer", "description": "Days ahead", "default": 1}
        }, "required": ["city"]}}}]);
    let conversation = |content: Value, arguments: Value| {
        json!([
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather in Nice?"},
            {"role": "assistant", "content": content, "tool_calls": [{"id": "a1b2c3d4e",
                "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "{\"sky\": \"clear\"}"}
        ])
    };
    let arguments = json!({"city": "Nice", "days": 2});
    let theirs = transformers_chat_ids(model, &conversation(json!(""), arguments.clone()), &tools)?;
    let ours = tokenize(json!({
        "model": "model", "tools": tools,
        "messages": conversation(Value::Null, arguments.to_string().into()),
    }))?;
    let text = tokenizer.decode(&theirs)?;
    ensure!(
        text.contains("type get_weather = (_: {")
            && text.contains(r#"commentary json<|message|>{"city": "Nice", "days": 2}<|call|>"#),
        "not harmony's tools and call: {text:?}"
    );
    ensure!(
        ours == theirs,
        "with tools: ours {:?}, transformers' {:?}",
        tokenizer.decode(&ours)?,
        tokenizer.decode(&theirs)?
    );
    Ok(())
}
