//! `tramontane bench-forward`: tokens/s of the in-process forward for the
//! prefill and decode shapes that benches/forward_vs_hf.py also runs through
//! transformers. Prompts are pseudo-random token ids from a formula both
//! sides share, so both see the same tokens (and so the same expert load).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, ensure};
use clap::Args;
use serde::Serialize;
use tramontane_model::kv_cache::KvCache;
use tramontane_model::{BatchItem, Logits, Mixtral};

use crate::generate::load_model;
use crate::options::ComputeArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Timed repetitions of each row; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Decode steps timed per decode row.
    #[arg(long, default_value_t = 16)]
    pub decode_steps: usize,
    /// Prompt length before the decode rows.
    #[arg(long, default_value_t = 128)]
    pub decode_prompt: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Token `position` of prompt `sequence`: ids in [3, vocab), skipping the
/// special tokens 0..3. benches/forward_vs_hf.py computes the same.
pub fn bench_token(sequence: usize, position: usize, vocab: usize) -> u32 {
    let mixed =
        ((sequence as u64) * 7919 + (position as u64) * 104_729).wrapping_mul(2_654_435_761);
    3 + (mixed % (vocab as u64 - 3)) as u32
}

fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|s| (0..len).map(|p| bench_token(s, p, vocab)).collect())
        .collect()
}

fn prefill(model: &Mixtral, prompts: &[Vec<u32>]) -> Result<Vec<KvCache>> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<BatchItem<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| BatchItem { tokens, cache })
        .collect();
    let _ = model.forward(&mut batch, Logits::LastPosition)?;
    Ok(caches)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time_prefill(model: &Mixtral, batch: usize, len: usize, repeats: usize) -> Result<Row> {
    let prompts = prompts(batch, len, model.config().vocab_size);
    prefill(model, &prompts)?; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        prefill(model, &prompts)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let seconds = median(times);
    Ok(Row {
        name: format!("prefill {batch}x{len}"),
        tokens: batch * len,
        seconds,
        tokens_per_s: (batch * len) as f64 / seconds,
    })
}

fn time_decode(
    model: &Mixtral,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    repeats: usize,
) -> Result<Row> {
    let prompts = prompts(batch, prompt_len, model.config().vocab_size);
    let mut times = Vec::with_capacity(repeats);
    for repeat in 0..=repeats {
        let mut caches = prefill(model, &prompts)?;
        let mut next: Vec<u32> = (0..batch)
            .map(|s| bench_token(s, prompt_len, model.config().vocab_size))
            .collect();
        let start = Instant::now();
        for _ in 0..steps {
            let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut items: Vec<BatchItem<'_>> = tokens
                .iter()
                .zip(caches.iter_mut())
                .map(|(tokens, cache)| BatchItem { tokens, cache })
                .collect();
            let logits = model.forward(&mut items, Logits::LastPosition)?;
            let ids: Vec<i64> = Vec::try_from(logits.argmax(-1, false))?;
            next = ids.into_iter().map(|t| t as u32).collect();
        }
        if repeat > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let seconds = median(times);
    Ok(Row {
        name: format!("decode batch {batch}"),
        tokens: batch * steps,
        seconds,
        tokens_per_s: (batch * steps) as f64 / seconds,
    })
}

pub fn run(args: &BenchArgs) -> Result<()> {
    ensure!(
        args.repeats >= 1 && args.decode_steps >= 1,
        "--repeats and --decode-steps must be at least 1"
    );
    let _guard = tch::no_grad_guard();
    let (model, _) = load_model(&args.model, &args.compute)?;
    let rows = vec![
        time_prefill(&model, 1, 512, args.repeats)?,
        time_prefill(&model, 8, 128, args.repeats)?,
        time_decode(
            &model,
            1,
            args.decode_prompt,
            args.decode_steps,
            args.repeats,
        )?,
        time_decode(
            &model,
            8,
            args.decode_prompt,
            args.decode_steps,
            args.repeats,
        )?,
        time_decode(
            &model,
            32,
            args.decode_prompt,
            args.decode_steps,
            args.repeats,
        )?,
    ];
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "rows": rows }))?
        );
    } else {
        for row in &rows {
            println!("{:<20} {:>10.1} tokens/s", row.name, row.tokens_per_s);
        }
    }
    Ok(())
}
