//! A broken checkpoint or an impossible request is a clear error naming the
//! problem, from the library and from the CLI (exit code 1, not a panic).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use tempfile::TempDir;
use tramontane_model::error::{ForwardError, LoadError, StepError, WeightsError};
use tramontane_model::{BatchItem, CausalLm, LoadOptions, Logits};

use crate::support;

/// One tiny checkpoint for the whole file; each test works on its own copy.
fn base_checkpoint() -> &'static Path {
    static BASE: OnceLock<TempDir> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        support::gen_model(dir.path(), &["--preset", "tiny", "--layers", "1"]).expect("gen-model");
        dir
    })
    .path()
}

fn copy_of_checkpoint() -> Result<(TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    for entry in std::fs::read_dir(base_checkpoint())? {
        let entry = entry?;
        std::fs::copy(entry.path(), model.join(entry.file_name()))?;
    }
    Ok((dir, model))
}

/// Rewrites model.safetensors through `edit`, which may drop or replace tensors.
fn rewrite_weights(
    model: &Path,
    edit: impl Fn(&str, TensorView<'_>) -> Option<(Vec<usize>, Vec<u8>)>,
) -> Result<()> {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let mut owned = Vec::new();
    for (name, view) in tensors.tensors() {
        let dtype = view.dtype();
        if let Some((shape, data)) = edit(&name, view) {
            owned.push((name, dtype, shape, data));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &path)?;
    Ok(())
}

fn keep(_: &str, view: TensorView<'_>) -> Option<(Vec<usize>, Vec<u8>)> {
    Some((view.shape().to_vec(), view.data().to_vec()))
}

fn load_error(model: &Path) -> LoadError {
    match CausalLm::load_in_process(model, LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", model.display()),
        Err(e) => e,
    }
}

/// Runs `tramontane generate` and returns its stderr, checking it failed
/// with exit code 1 (an error, not a panic).
fn generate_fails(model: &Path, prompt: &str) -> Result<String> {
    let output = support::tramontane()
        .args([
            "generate",
            "--max-tokens",
            "4",
            "--prompt",
            prompt,
            "--model",
        ])
        .arg(model)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected a clean error exit, got {}: {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(stderr)
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let (_dir, model) = copy_of_checkpoint()?;
    let key = "model.layers.0.block_sparse_moe.experts.3.w2.weight";
    rewrite_weights(
        &model,
        |name, view| if name == key { None } else { keep(name, view) },
    )?;
    let err = load_error(&model);
    assert!(
        matches!(&err, LoadError::Weights(WeightsError::MissingTensor { key: k }) if k == key),
        "{err}"
    );
    let stderr = generate_fails(&model, "hello")?;
    assert!(
        stderr.contains(&format!("missing tensor {key}")),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn wrong_shape_names_key_expected_and_actual() -> Result<()> {
    let (_dir, model) = copy_of_checkpoint()?;
    let key = "model.layers.0.block_sparse_moe.gate.weight";
    rewrite_weights(&model, |name, view| {
        if name == key {
            // 7 experts' rows instead of 8.
            let data = view.data()[..7 * 64 * 4].to_vec();
            Some((vec![7, 64], data))
        } else {
            keep(name, view)
        }
    })?;
    let message = load_error(&model).to_string();
    assert!(
        message.contains(key) && message.contains("[8, 64]") && message.contains("[7, 64]"),
        "{message}"
    );
    let stderr = generate_fails(&model, "hello")?;
    assert!(
        stderr.contains(key) && stderr.contains("[7, 64]"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn truncated_safetensors_is_reported() -> Result<()> {
    let (_dir, model) = copy_of_checkpoint()?;
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = load_error(&model);
    assert!(
        matches!(err, LoadError::Weights(WeightsError::Corrupt { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
    let stderr = generate_fails(&model, "hello")?;
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn unsupported_architecture_is_named() -> Result<()> {
    let (_dir, model) = copy_of_checkpoint()?;
    let path = model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    config["model_type"] = serde_json::json!("llama");
    std::fs::write(&path, config.to_string())?;
    let message = load_error(&model).to_string();
    assert!(
        message.contains("unsupported architecture LlamaForCausalLM"),
        "{message}"
    );
    let stderr = generate_fails(&model, "hello")?;
    assert!(
        stderr.contains("unsupported architecture LlamaForCausalLM"),
        "{stderr}"
    );
    Ok(())
}

/// gen-model refuses a setting the family's config.json has no field for
/// and a preset the family has not, naming the flag and the family; a value
/// out of range is named as config.json names it. Exit code 1, nothing
/// written.
#[test]
fn gen_model_refuses_what_the_family_does_not_have() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("model");
    let cases: [(&[&str], &str); 7] = [
        (
            &["--family", "qwen3_moe", "--clip-qkv", "1"],
            "--clip-qkv does not apply to qwen3_moe (only to olmoe)",
        ),
        (
            &["--moe-width", "16"],
            "--moe-width does not apply to mixtral (only to qwen3_moe, qwen2_moe, deepseek_v2 and deepseek_v3)",
        ),
        (
            &["--family", "olmoe", "--head-dim", "32"],
            "--head-dim does not apply to olmoe (only to mixtral, qwen3_moe and gpt_oss)",
        ),
        (
            &["--family", "olmoe", "--mxfp4"],
            "--mxfp4 does not apply to olmoe (only to gpt_oss)",
        ),
        (
            &["--family", "qwen2_moe", "--preset", "bench-fine"],
            "--preset bench-fine: qwen2_moe has no fine-grained preset",
        ),
        (
            &["--family", "qwen3_moe", "--dense-layers", "0,2"],
            "mlp_only_layers: layer 2 is beyond num_hidden_layers 2",
        ),
        (
            &["--family", "olmoe", "--top-k", "17"],
            "num_experts_per_tok: 17 exceeds num_experts 16",
        ),
    ];
    for (args, expected) in cases {
        let output = support::tramontane()
            .arg("gen-model")
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // An unknown family is clap's usage error, listing the families.
    let output = support::tramontane()
        .arg("gen-model")
        .arg("--out")
        .arg(&out)
        .args(["--family", "dbrx"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mixtral, qwen3_moe, qwen2_moe, olmoe"),
        "{stderr}"
    );
    assert!(!out.exists(), "gen-model wrote {}", out.display());
    Ok(())
}

#[test]
fn prompt_longer_than_the_context_is_refused() -> Result<()> {
    let _guard = tch::no_grad_guard();
    let model_dir = base_checkpoint();
    let model = CausalLm::load_in_process(model_dir, LoadOptions::default())?;
    let limit = model.config().max_position_embeddings;

    // Library: a step past the context fails and leaves the cache as it was.
    let kv = model.kv_pool(limit);
    let mut cache = kv.new_cache();
    let fits: Vec<u32> = vec![100; 8];
    let _ = model.forward(
        &kv,
        &mut [BatchItem {
            tokens: &fits,
            cache: &mut cache,
        }],
        Logits::LastPosition,
    )?;
    let too_long: Vec<u32> = vec![100; limit];
    let err = model
        .forward(
            &kv,
            &mut [BatchItem {
                tokens: &too_long,
                cache: &mut cache,
            }],
            Logits::LastPosition,
        )
        .unwrap_err();
    assert!(
        matches!(err, StepError::Forward(ForwardError::ContextOverflow { positions, limit: l, .. }) if positions == limit + 8 && l == limit),
        "{err}"
    );
    assert_eq!(cache.positions(), 8);
    let next = model.forward(
        &kv,
        &mut [BatchItem {
            tokens: &[7],
            cache: &mut cache,
        }],
        Logits::LastPosition,
    )?;
    assert_eq!(next.size(), vec![1, model.config().vocab_size as i64]);

    // CLI: the prompt's token count and the limit are named.
    let prompt = "wind ".repeat(limit + 10);
    let stderr = generate_fails(model_dir, &prompt)?;
    assert!(
        stderr.contains("max_position_embeddings") && stderr.contains(&limit.to_string()),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() -> Result<()> {
    let _guard = tch::no_grad_guard();
    let model = CausalLm::load_in_process(base_checkpoint(), LoadOptions::default())?;
    let kv = model.kv_pool(16);
    let mut cache = kv.new_cache();
    let err = model
        .forward(
            &kv,
            &mut [BatchItem {
                tokens: &[5, 32000],
                cache: &mut cache,
            }],
            Logits::LastPosition,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            StepError::Forward(ForwardError::TokenOutOfRange { id: 32000, .. })
        ),
        "{err}"
    );
    let err = model
        .forward(
            &kv,
            &mut [BatchItem {
                tokens: &[],
                cache: &mut cache,
            }],
            Logits::LastPosition,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            StepError::Forward(ForwardError::EmptySequence { sequence: 0 })
        ),
        "{err}"
    );
    assert_eq!(cache.positions(), 0);
    Ok(())
}
