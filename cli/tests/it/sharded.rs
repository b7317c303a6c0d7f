//! Sharded execution equals in-process execution: the same logits (within
//! 1e-5) and the same greedy tokens, with experts spread over real worker
//! processes on loopback ports, for several worker counts and placements,
//! with each step run as one batch or as 2 or 3 interleaved micro-batches.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tch::Tensor;
use tramontane_dispatch::{MicroBatches, RemoteExperts};
use tramontane_model::generate::{StopRule, generate_greedy};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{CausalLm, LoadOptions, Logits, ModelSpec, SharedExperts, Tokenizer};
use tramontane_policy::placement::Placement;
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Experts",
    "A mixture of experts routes each token to a few of many feed-forward networks.",
];

/// The placements to check, for a model with `experts_per_layer[l]`
/// routed experts in layer l (none in a dense layer).
fn placements(experts_per_layer: &[usize]) -> Vec<(&'static str, Placement)> {
    let uneven = Placement {
        workers: 3,
        experts: experts_per_layer
            .iter()
            .map(|&experts| {
                (0..experts)
                    .map(|e| vec![if e + 2 < experts { 0 } else { e + 3 - experts }])
                    .collect()
            })
            .collect(),
    };
    let replicated = Placement {
        workers: 3,
        experts: experts_per_layer
            .iter()
            .map(|&experts| (0..experts).map(|e| vec![e % 3, (e + 1) % 3]).collect())
            .collect(),
    };
    let mut all: Vec<(&'static str, Placement)> = [
        (1, "1 worker"),
        (2, "2 workers"),
        (3, "3 workers"),
        (4, "4 workers"),
    ]
    .into_iter()
    .map(|(w, name)| (name, Placement::round_robin(experts_per_layer, w).unwrap()))
    .collect();
    all.push(("uneven 3 workers", uneven));
    all.push(("replicated 3 workers", replicated));
    all
}

fn last_logits_and_tokens<E: tramontane_model::experts::Experts>(
    model: &CausalLm<E>,
    prompts: &[Vec<u32>],
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let kv = model.kv_pool_for(prompts.len(), longest);
    let (logits, _) = model.prefill(&kv, prompts, Logits::AllPositions)?;
    let stop = StopRule {
        max_new_tokens: 12,
        eos_ids: vec![],
    };
    Ok((logits, generate_greedy(model, prompts, &stop)?))
}

fn check_shape(gen_args: &[&str]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    support::gen_model(&model_dir, gen_args)?;
    check_model(&model_dir, &format!("{gen_args:?}"), SharedExperts::Router)
}

/// A checkpoint of `family` made by its transformers class, its small
/// shapes overridden by `config`; its shared experts (if any) run where
/// `shared` says.
fn check_family(family: &str, config: serde_json::Value, shared: SharedExperts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    support::family_checkpoint(&model_dir, family, config.clone(), &["--seed", "21"])?;
    check_model(&model_dir, &format!("{family} {config}"), shared)
}

/// The checkpoint in `model_dir` sharded over workers, in every placement
/// and micro-batch split, gives the in-process logits and greedy tokens;
/// the sharded model's shared experts run where `shared` says (the
/// in-process one's on the router).
fn check_model(model_dir: &Path, label: &str, shared: SharedExperts) -> Result<()> {
    let _guard = tch::no_grad_guard();
    tch::set_num_threads(1);
    let model_dir = model_dir.to_path_buf();
    let config = ModelSpec::from_file(&model_dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<_, _>>()?;
    let local = CausalLm::load_in_process(&model_dir, LoadOptions::default())?;
    let (reference, reference_tokens) = last_logits_and_tokens(&local, &prompts)?;

    let runtime = tokio::runtime::Runtime::new()?;
    let sharded_options = LoadOptions {
        shared_experts: shared,
        ..LoadOptions::default()
    };
    for (name, placement) in placements(&config.placed_experts_per_layer(shared)) {
        let workers = support::workers_for_with(
            &model_dir,
            &placement,
            &["--shared-experts", shared.flag()],
        )?;
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        // One batch, and split in micro-batches whose layers interleave
        // (a group's attention while another's experts are out).
        let splits: &[usize] = if name == "2 workers" {
            &[1, 2, 3]
        } else {
            &[1, 2]
        };
        for &groups in splits {
            let remote = runtime
                .block_on(RemoteExperts::connect(
                    &model_dir,
                    &addrs,
                    placement.clone(),
                    Duration::from_secs(30),
                    tramontane_config::Dtype::F32,
                ))?
                .with_micro_batches(MicroBatches::Fixed(groups));
            let checkpoint = Checkpoint::open(&model_dir)?;
            let sharded =
                CausalLm::load_dense(&checkpoint, config.clone(), sharded_options, remote)?;
            let (logits, tokens) = last_logits_and_tokens(&sharded, &prompts)?;
            let diff = (&logits - &reference).abs().max().double_value(&[]);
            ensure!(
                diff <= 1e-5,
                "{name}, {groups} micro-batches: max |Δlogit| {diff:e} > 1e-5"
            );
            ensure!(
                tokens == reference_tokens,
                "{name}, {groups} micro-batches: greedy tokens differ"
            );
            eprintln!(
                "{label} {name}, {groups} micro-batches: max |Δlogit| {diff:e}, tokens identical"
            );
        }
    }
    Ok(())
}

#[test]
fn sharded_equals_in_process_tiny_top2_of_8() -> Result<()> {
    check_shape(&["--preset", "tiny", "--seed", "11"])
}

#[test]
fn sharded_equals_in_process_top3_of_6_gqa4() -> Result<()> {
    check_shape(&[
        "--preset",
        "tiny",
        "--seed",
        "12",
        "--experts",
        "6",
        "--top-k",
        "3",
        "--hidden",
        "96",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--layers",
        "3",
    ])
}

/// Qwen3-MoE: a dense first layer (its placement row empty), 16 experts
/// top-4, head_dim 24.
#[test]
fn sharded_equals_in_process_qwen3_moe_dense_first_layer() -> Result<()> {
    check_family(
        "qwen3_moe",
        serde_json::json!({
            "mlp_only_layers": [0], "num_hidden_layers": 3, "num_experts": 16,
            "num_experts_per_tok": 4, "head_dim": 24, "norm_topk_prob": true
        }),
        SharedExperts::Router,
    )
}

/// Qwen2-MoE: the shared expert on the router, the routed ones on workers.
#[test]
fn sharded_equals_in_process_qwen2_moe_shared_expert() -> Result<()> {
    check_family(
        "qwen2_moe",
        serde_json::json!({"num_experts": 6, "num_experts_per_tok": 2}),
        SharedExperts::Router,
    )
}

/// Qwen2-MoE: the shared expert on the workers, as expert 6 of each layer
/// (every token takes it with its sigmoid gate as weight), placed like the
/// routed ones: the in-process logits, where it ran on the router.
#[test]
fn sharded_equals_in_process_qwen2_moe_shared_expert_on_workers() -> Result<()> {
    check_family(
        "qwen2_moe",
        serde_json::json!({"num_experts": 6, "num_experts_per_tok": 2}),
        SharedExperts::Workers,
    )
}

/// OLMoE: whole-projection q/k norms, clip_qkv, 8 experts top-3.
#[test]
fn sharded_equals_in_process_olmoe() -> Result<()> {
    check_family(
        "olmoe",
        serde_json::json!({"clip_qkv": 2.0, "num_experts_per_tok": 3}),
        SharedExperts::Router,
    )
}

/// DeepSeek-V2: latent attention on the router, the group-limited gate's
/// weights scaled by 2 (they do not sum to 1), 2 shared experts on the
/// router, a dense first layer.
#[test]
fn sharded_equals_in_process_deepseek_v2() -> Result<()> {
    check_family(
        "deepseek_v2",
        serde_json::json!({
            "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.0
        }),
        SharedExperts::Router,
    )
}

/// DeepSeek-V3: the sigmoid gate with its correction bias, the shared
/// expert on the workers as expert 8 of each routed layer (weight 1).
#[test]
fn sharded_equals_in_process_deepseek_v3_shared_expert_on_workers() -> Result<()> {
    check_family(
        "deepseek_v3",
        serde_json::json!({"num_experts_per_tok": 3}),
        SharedExperts::Workers,
    )
}

/// gpt-oss: the biased router, experts with biases and the clamped SwiGLU,
/// each cut out of the layer's fused tensors by the worker holding it.
#[test]
fn sharded_equals_in_process_gpt_oss() -> Result<()> {
    check_family(
        "gpt_oss",
        serde_json::json!({"num_experts_per_tok": 4}),
        SharedExperts::Router,
    )
}

/// gpt-oss as gen-model writes it with `--mxfp4`: each worker holds its
/// experts' blocks and scales as stored.
#[test]
fn sharded_equals_in_process_gpt_oss_mxfp4() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    support::gen_model(
        &model_dir,
        &["--family", "gpt_oss", "--mxfp4", "--seed", "25"],
    )?;
    check_model(&model_dir, "gpt_oss mxfp4", SharedExperts::Router)
}

/// The whole path: `tramontane router` in front of workers, greedy tokens
/// over gRPC (unary and streamed) equal the in-process ones.
#[test]
fn router_generation_equals_in_process_generation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    support::gen_model(&model_dir, &["--preset", "tiny", "--seed", "13"])?;
    let (prompt, expected) = support::expected_greedy(&model_dir, PROMPTS[2], 16)?;

    let placement = Placement::round_robin(&[8; 2], 2)?;
    let workers = support::workers_for(&model_dir, &placement)?;
    let router = support::router(&model_dir, &support::addrs(&workers), &[])?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut client = GenerationClient::connect(format!("http://{}", router.addr)).await?;
        let request = GenerateRequest {
            prompt: PROMPTS[2].into(),
            max_tokens: 16,
            temperature: Some(0.0),
            ..Default::default()
        };
        let response = client.generate(request.clone()).await?.into_inner();
        ensure!(response.prompt_token_ids == prompt, "prompt ids");
        ensure!(
            response.token_ids == expected,
            "unary tokens {:?} vs {:?}",
            response.token_ids,
            expected
        );
        let reason = if expected.len() < 16 {
            "stop"
        } else {
            "length"
        };
        ensure!(
            response.finish_reason == reason,
            "finish reason {}",
            response.finish_reason
        );

        let mut stream = client.generate_stream(request).await?.into_inner();
        let mut streamed = Vec::new();
        let mut text = String::new();
        let mut last_reason = String::new();
        while let Some(message) = stream.message().await? {
            if message.has_token {
                streamed.push(message.token_id);
            }
            text.push_str(&message.text);
            last_reason = message.finish_reason;
        }
        ensure!(streamed == expected, "streamed tokens differ");
        ensure!(
            last_reason == reason,
            "streamed finish reason {last_reason}"
        );
        ensure!(
            text == response.text,
            "streamed text {text:?} vs {:?}",
            response.text
        );

        // Bad requests are INVALID_ARGUMENT, and the router keeps serving.
        for bad in [
            GenerateRequest {
                prompt: "hi".into(),
                max_tokens: 0,
                temperature: Some(0.0),
                ..Default::default()
            },
            GenerateRequest {
                prompt: String::new(),
                max_tokens: 4,
                temperature: Some(0.0),
                ..Default::default()
            },
            GenerateRequest {
                prompt_token_ids: vec![1, 40000],
                max_tokens: 4,
                temperature: Some(0.0),
                ..Default::default()
            },
            GenerateRequest {
                prompt: "hi".into(),
                max_tokens: 5000,
                temperature: Some(0.0),
                ..Default::default()
            },
        ] {
            let status = client.generate(bad).await.unwrap_err();
            ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
        }
        let again = client
            .generate(GenerateRequest {
                prompt: PROMPTS[2].into(),
                max_tokens: 16,
                temperature: Some(0.0),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(again.token_ids == expected, "after bad requests");

        // The semantics of the HTTP API: seeds, stop strings, logprobs.
        let sampled = GenerateRequest {
            prompt: PROMPTS[1].into(),
            max_tokens: 12,
            temperature: Some(1.0),
            seed: Some(7),
            ignore_eos: true,
            ..Default::default()
        };
        let first = client.generate(sampled.clone()).await?.into_inner();
        let second = client.generate(sampled).await?.into_inner();
        ensure!(
            first.token_ids.len() == 12,
            "ignore_eos gives max_tokens tokens"
        );
        ensure!(
            first.token_ids == second.token_ids,
            "a seed replays the same tokens"
        );

        let text = &response.text;
        let cut = text
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| i >= text.len() / 2 && !text[i..].starts_with(' '))
            .context("a cut point")?;
        let stop: String = text[cut..].chars().take(3).collect();
        let stopped = client
            .generate(GenerateRequest {
                prompt: PROMPTS[2].into(),
                max_tokens: 16,
                temperature: Some(0.0),
                stop: vec![stop.clone()],
                ..Default::default()
            })
            .await?
            .into_inner();
        let before = &text[..text.find(&stop).context("stop in text")?];
        ensure!(
            stopped.text == before && stopped.finish_reason == "stop",
            "stop {stop:?}: {:?} ({}) vs {before:?}",
            stopped.text,
            stopped.finish_reason
        );

        let with_logprobs = client
            .generate(GenerateRequest {
                prompt: PROMPTS[2].into(),
                max_tokens: 6,
                temperature: Some(0.0),
                logprobs: Some(3),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(with_logprobs.logprobs.len() == with_logprobs.token_ids.len());
        for (lp, &id) in with_logprobs.logprobs.iter().zip(&with_logprobs.token_ids) {
            ensure!(lp.token_id == id && lp.top.len() == 3 && lp.logprob <= 0.0);
            // Greedy: the chosen token is the most likely one.
            ensure!(lp.top[0].token_id == id, "{lp:?}");
            ensure!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        }
        let status = client
            .generate(GenerateRequest {
                prompt: "hi".into(),
                max_tokens: 4,
                temperature: Some(3.0),
                ..Default::default()
            })
            .await
            .unwrap_err();
        ensure!(
            status.code() == tonic::Code::InvalidArgument
                && status.message().contains("temperature"),
            "{status:?}"
        );
        Ok(())
    })?;
    Ok(())
}
