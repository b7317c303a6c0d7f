//! `tramontane generate`: greedy continuation of one prompt, in process.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tramontane_model::generate::{StopRule, generate_greedy};
use tramontane_model::model::Mixtral;
use tramontane_model::weights::Checkpoint;
use tramontane_model::{MixtralConfig, Tokenizer};

use crate::options::ComputeArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (HF format: config.json, safetensors, tokenizer.json).
    #[arg(long, env = "TRAMONTANE_MODEL")]
    pub model: PathBuf,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most new tokens to generate (fewer when EOS comes first).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Print one JSON object {"text", "prompt_token_ids", "token_ids"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Serialize)]
struct Output {
    text: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
}

/// Loads config, weights (with a progress bar on stderr) and tokenizer.
pub fn load_model(dir: &std::path::Path, compute: &ComputeArgs) -> Result<(Mixtral, Tokenizer)> {
    let options = compute.load_options()?;
    let config = MixtralConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut checkpoint = Checkpoint::open(dir)?;
    let bar = ProgressBar::new(checkpoint.stored_bytes(|_| true)).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} {elapsed}")
            .context("progress template")?,
    );
    let ticker = bar.clone();
    checkpoint.set_progress(Box::new(move |bytes| ticker.inc(bytes)));
    let model = Mixtral::from_checkpoint_in_process(&checkpoint, config, options)?;
    bar.finish_and_clear();
    Ok((model, tokenizer))
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let (model, tokenizer) = load_model(&args.model, &args.compute)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let limit = model.config().max_position_embeddings;
    if prompt.len() + args.max_tokens > limit {
        bail!(
            "prompt of {} tokens plus --max-tokens {} exceeds the model's context of {limit} positions (max_position_embeddings)",
            prompt.len(),
            args.max_tokens
        );
    }
    let stop = StopRule {
        max_new_tokens: args.max_tokens,
        eos_ids: tokenizer.eos_token_id().into_iter().collect(),
    };
    let token_ids = generate_greedy(&model, std::slice::from_ref(&prompt), &stop)?
        .pop()
        .unwrap_or_default();
    let text = continuation_text(&tokenizer, &prompt, &token_ids)?;
    if args.json {
        let output = Output {
            text,
            prompt_token_ids: prompt,
            token_ids,
        };
        println!("{}", serde_json::to_string(&output)?);
    } else {
        println!("{}{}", args.prompt, text);
    }
    Ok(())
}

/// The text the new tokens add to the prompt's text. Decoding them alone would
/// lose the leading space a sentencepiece tokenizer strips from a text's start.
pub fn continuation_text(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    generated: &[u32],
) -> Result<String> {
    let prefix = tokenizer.decode(prompt)?;
    let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let full = tokenizer.decode(&all)?;
    Ok(match full.strip_prefix(&prefix) {
        Some(rest) => rest.to_string(),
        None => tokenizer.decode(generated)?,
    })
}
