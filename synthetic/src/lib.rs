//! # tramontane-synthetic
//!
//! Writes a Hugging Face-format checkpoint of any served family (Mixtral,
//! Qwen3-MoE, Qwen2-MoE, OLMoE) with deterministic random weights and the
//! real Mistral tokenizer, for demos, tests and benchmarks (`tramontane
//! gen-model`, `serve`'s demo model, the tests' checkpoints): [`Spec`] says
//! what to write (a family, a [`Preset`], overrides), [`write`] writes it.
//!
//! # Layout
//!
//! - `spec`: [`Spec`] and the family's config.json it makes (the fields of
//!   transformers' config class); the model it describes is read back from
//!   that JSON by `tramontane_config::ModelSpec`, as the server reads it.
//! - `presets`: each family's shapes for tests and benchmarks.
//! - `weights`: the tensors `ModelSpec::tensors_layer_by_layer` lists
//!   (names, shapes and roles: nothing here knows a family's tensor names),
//!   drawn from one seeded stream in that order, every norm's scale away
//!   from 1 and every bias away from 0; the skew; safetensors.
//! - here: [`write`], and the tokenizer (Python: `scripts/convert_tokenizer.py`,
//!   with its ChatML template for the Qwen families and the released
//!   checkpoints' harmony template for gpt-oss).
//!
//! A Mixtral checkpoint is byte for byte the one this crate wrote before it
//! knew other families, for the same arguments and seed (benchmark figures
//! and the parity tests' checkpoints stay as they were).
//!
//! # Skewed gates (`--expert-skew X`)
//!
//! Random gates spread tokens about evenly over the experts; capacity planning
//! needs checkpoints whose gates prefer some experts, as trained ones do. With
//! `X > 0` the weights keep their shapes and keys (a plain HF checkpoint of
//! the family), but the last hidden coordinate becomes a constant "bias
//! feature" that every router reads:
//!
//! - every token embedding holds 1 there, and no layer writes to it (that row
//!   of every `o_proj` and down projection, and that element of o's bias,
//!   is 0), so the residual stream carries it unchanged to every layer;
//! - no other weight reads it (that column of `q/k/v_proj`, of every gate and
//!   up projection, of the shared expert's gate and of `lm_head` is 0), so
//!   attention, the experts, dense layers and the logits ignore it (with
//!   `--tie-embeddings` it adds the same to every token's logit);
//! - column `h-1` of every routed layer's gate is then a per-expert logit
//!   bias (a softmax over the top-k logits or over all of them alike): the
//!   expert of popularity rank r (0 = hottest) gets `-X · ln(1 + r)` times
//!   the spread (standard deviation) of the token-dependent part of the
//!   logits. Alone, that bias makes the gate's softmax ∝ `(1 + r)^-X`: X is
//!   a Zipf exponent. The spread grows with depth, so the bias is scaled per
//!   layer (see `weights::residual_rms`) and the skew is about the same in
//!   every layer.
//!
//! Measured on Mixtral's presets (8 experts top-2, 1024 pseudo-random tokens; load
//! of each expert ÷ the mean load, hottest first, range over layers):
//!
//! | X   | 0         | 4         | 2         | 6         | 1         | 5         | 3         | 7         |
//! |-----|-----------|-----------|-----------|-----------|-----------|-----------|-----------|-----------|
//! | 0.5 | 1.8 - 2.2 | 1.3 - 1.6 | 0.9 - 1.4 | 0.7 - 1.1 | 0.5 - 0.8 | 0.6 - 0.9 | 0.4 - 0.8 | 0.5 - 0.8 |
//! | 1   | 2.7 - 3.1 | 1.7 - 2.0 | 0.9 - 1.3 | 0.5 - 1.0 | 0.3 - 0.6 | 0.3 - 0.5 | 0.2 - 0.5 | 0.2 - 0.3 |
//! | 2   | 3.8       | 2.3 - 2.7 | 0.8 - 1.1 | 0.3 - 0.5 | 0.1 - 0.2 | 0.0 - 0.2 | 0.0 - 0.1 | 0.0       |
//!
//! (the most a top-2 expert of 8 can get is 4×). With X = 1 and the default
//! placement on 2 workers, worker 0 computes 80-85% of the expert rows.
//!
//! The popularity order is the same in every layer: expert ids sorted by
//! their bits read from the lowest (by `e mod 2`, then `e mod 4`, `e mod 8`,
//! ...), i.e. 0, 4, 2, 6, 1, 5, 3, 7 for 8 experts. So the default placement
//! "expert e on worker e mod W" puts the E/W hottest experts together on
//! worker 0 whenever W is a power of two: the worst case a load-aware
//! placement should fix. `X = 0` writes exactly the weights of an unskewed
//! checkpoint.

#![forbid(unsafe_code)]

mod presets;
mod spec;
mod weights;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use tramontane_config::{ConfigError, Family};

pub use presets::Preset;
pub use spec::Spec;
pub use weights::popularity_order;

/// Converts the tokenizer shipped in mistral-common to tokenizer.json (and
/// writes Qwen's ChatML template with tools with `--chat-template qwen-tools`,
/// gpt-oss's harmony template as chat_template.jinja with `gpt-oss`).
const CONVERT_TOKENIZER: &str = include_str!("../../scripts/convert_tokenizer.py");

/// Why a checkpoint cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Spec(String),
    #[error("writing {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("writing safetensors")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("{}: {reason}", python.display())]
    Tokenizer { python: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, SyntheticError>;

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(SyntheticError::Spec(message()))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyntheticError + '_ {
    move |error| SyntheticError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Writes the checkpoint `spec` describes into `out` (created if missing):
/// config.json, generation_config.json, the weights (replacing any there)
/// and the tokenizer, with a ChatML chat template for the Qwen families and
/// the released checkpoints' harmony template (chat_template.jinja) for gpt-oss.
pub fn write(out: &Path, spec: &Spec) -> Result<()> {
    let (config, model) = spec.config()?;
    let dtype = tramontane_config::Dtype::from_hf_name(
        config["torch_dtype"].as_str().unwrap_or("float32"),
    )?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text).map_err(io(&path))
    };
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": 1, "eos_token_id": 2}),
    )?;
    let skew = (spec.expert_skew > 0.0).then(|| weights::Skew::new(&model, spec.expert_skew));
    let stored = weights::Stored {
        dtype,
        mxfp4: spec.mxfp4,
    };
    weights::write_weights(out, &model, stored, spec.seed, spec.shards, skew.as_ref())?;
    let chat_template = match spec.family {
        Family::Qwen3Moe | Family::Qwen2Moe => Some("qwen-tools"),
        Family::GptOss => Some("gpt-oss"),
        Family::Mixtral | Family::Olmoe | Family::DeepseekV2 | Family::DeepseekV3 => None,
    };
    write_tokenizer(out, spec.python.as_deref(), chat_template)?;
    Ok(())
}

/// The tokenizer files, and `chat_template` (a name convert_tokenizer.py
/// knows) in tokenizer_config.json or chat_template.jinja.
fn write_tokenizer(out: &Path, python: Option<&Path>, chat_template: Option<&str>) -> Result<()> {
    let python = python.map(Path::to_path_buf).unwrap_or_else(default_python);
    let mut command = Command::new(&python);
    command.arg("-c").arg(CONVERT_TOKENIZER).arg(out);
    // The conversion needs transformers' tokenizers only: without torch
    // (and its advice that models are then missing) it starts in a
    // quarter of the time.
    command.envs([
        ("USE_TORCH", "0"),
        ("USE_TF", "0"),
        ("USE_FLAX", "0"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ]);
    if let Some(template) = chat_template {
        command.args(["--chat-template", template]);
    }
    let status = command.status().map_err(|e| SyntheticError::Tokenizer {
        python: python.clone(),
        reason: format!("cannot run it to convert the tokenizer: {e}"),
    })?;
    if !status.success() {
        return Err(SyntheticError::Tokenizer {
            python,
            reason: "could not write the tokenizer (it needs transformers, sentencepiece and mistral-common: run `make setup`, or pass --python)".into(),
        });
    }
    Ok(())
}

/// The project's `.venv` when the binary runs from its target folder, else python3.
fn default_python() -> PathBuf {
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        return PathBuf::from(venv).join("bin/python");
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .map(|dir| dir.join(".venv/bin/python"))
            .find(|p| p.exists())
    });
    from_exe.unwrap_or_else(|| PathBuf::from("python3"))
}

#[cfg(test)]
mod skew_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The Qwen families' tokenizer_config.json has Qwen's ChatML template
    /// with tools (scripts/convert_tokenizer.py's); the others' has none.
    #[test]
    fn qwen_checkpoints_chat_through_chatml() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for (family, chatml) in [(Family::Qwen2Moe, true), (Family::Olmoe, false)] {
            let out = dir.path().join(family.model_type());
            let spec = Spec {
                layers: Some(1),
                ..Spec::family(family, Preset::Tiny)
            };
            write(&out, &spec)?;
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json"))?)?;
            let template = config["chat_template"].as_str().unwrap_or_default();
            assert_eq!(
                template.contains("<|im_start|>assistant") && template.contains("<tool_call>"),
                chatml,
                "{family:?}: {template:?}"
            );
        }
        Ok(())
    }
}
