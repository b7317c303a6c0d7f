//! Benchmarks run on purpose (never as tests):
//! - `tramontane bench-forward`: tokens/s of the forward for the prefill and
//!   decode shapes that benches/forward_vs_hf.py also runs through
//!   transformers, in process or, with `--workers`, sharded over running
//!   workers. Prompts are pseudo-random token ids from a formula both sides
//!   share, so both see the same tokens (and so the same expert load).
//! - `tramontane bench-dispatch`: round trips of one layer's Forward with a
//!   one-row payload to a running worker.

use std::path::PathBuf;
use std::time::Instant;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;
use tch::Kind;
use tramontane_expert_worker::DEFAULT_MAX_MESSAGE_BYTES;
use tramontane_model::kv_cache::KvCache;
use tramontane_model::weights::Checkpoint;
use tramontane_model::{BatchItem, Logits, Mixtral, MixtralConfig};
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{Dtype, ExpertRows, ForwardRequest, InfoRequest, TensorPayload};
use tramontane_router::cluster;
use tramontane_router::dispatch::RemoteExperts;
use tramontane_router::placement::Placement;

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
    /// Run sharded over these running workers (comma-separated, default placement).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Rows to run: prefill and/or decode.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prefill-1x512,prefill-8x128,decode-1,decode-8,decode-32"
    )]
    pub rows: Vec<String>,
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
    Ok(model.prefill(prompts, Logits::LastPosition)?.1)
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

/// The experts of `model` on running workers at `addrs` (checked to serve
/// that model and hold what `placement` gives them), f32 on the wire.
pub fn remote_experts(
    model: &std::path::Path,
    addrs: &[String],
    placement: Placement,
    runtime: &tokio::runtime::Runtime,
    deadline: Duration,
) -> Result<RemoteExperts> {
    let model_id = tramontane_expert_worker::compute::model_id(model)?;
    let links = runtime.block_on(cluster::connect(
        addrs,
        &model_id,
        &placement,
        Duration::from_secs(300),
        DEFAULT_MAX_MESSAGE_BYTES,
    ))?;
    Ok(RemoteExperts::new(
        links,
        placement,
        runtime.handle().clone(),
        deadline,
        Kind::Float,
    ))
}

/// The model with its experts in process, or reached over gRPC.
fn load_bench_model(args: &BenchArgs, runtime: &tokio::runtime::Runtime) -> Result<Mixtral> {
    if args.workers.is_empty() {
        return Ok(load_model(&args.model, &args.compute)?.0);
    }
    let options = args.compute.load_options()?;
    let config = MixtralConfig::from_file(&args.model.join("config.json"))?;
    let placement = Placement::round_robin(
        config.num_hidden_layers,
        config.num_local_experts,
        args.workers.len(),
    )?;
    let experts = remote_experts(
        &args.model,
        &args.workers,
        placement,
        runtime,
        Duration::from_secs(60),
    )?;
    let checkpoint = Checkpoint::open(&args.model)?;
    Ok(Mixtral::load_dense(
        &checkpoint,
        config,
        options,
        Box::new(experts),
    )?)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    ensure!(
        args.repeats >= 1 && args.decode_steps >= 1,
        "--repeats and --decode-steps must be at least 1"
    );
    let _guard = tch::no_grad_guard();
    let runtime = tokio::runtime::Runtime::new()?;
    let model = load_bench_model(args, &runtime)?;
    let mut rows = Vec::new();
    for row in &args.rows {
        rows.push(match row.as_str() {
            "prefill-1x512" => time_prefill(&model, 1, 512, args.repeats)?,
            "prefill-8x128" => time_prefill(&model, 8, 128, args.repeats)?,
            "decode-1" => time_decode(
                &model,
                1,
                args.decode_prompt,
                args.decode_steps,
                args.repeats,
            )?,
            "decode-8" => time_decode(
                &model,
                8,
                args.decode_prompt,
                args.decode_steps,
                args.repeats,
            )?,
            "decode-32" => time_decode(
                &model,
                32,
                args.decode_prompt,
                args.decode_steps,
                args.repeats,
            )?,
            other => bail!("--rows: unknown row {other:?}"),
        });
    }
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

#[derive(Debug, Args)]
pub struct BenchDispatchArgs {
    /// A running worker, host:port.
    #[arg(long)]
    pub worker: String,
    /// Round trips to time (after 20 of warm-up).
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// p-th percentile (0..=100) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn run_dispatch(args: &BenchDispatchArgs) -> Result<()> {
    ensure!(args.samples >= 1, "--samples must be at least 1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let micros = runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{}", args.worker)).await?;
        let info = client.info(InfoRequest {}).await?.into_inner();
        let held = info.held.first().context("the worker holds no expert")?;
        let expert = *held.experts.first().context("the worker holds no expert")?;
        let row: Vec<u8> = (0..info.hidden_size)
            .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
            .collect();
        let request = ForwardRequest {
            dispatch_id: 0,
            layer: held.layer,
            hidden: Some(TensorPayload {
                dtype: Dtype::F32 as i32,
                shape: vec![1, info.hidden_size as i64],
                data: row.into(),
            }),
            experts: vec![ExpertRows {
                expert,
                rows: vec![0],
                weights: vec![1.0],
            }],
        };
        let mut forward = Vec::with_capacity(args.samples);
        let mut info = Vec::with_capacity(args.samples);
        for i in 0..args.samples + 20 {
            let start = Instant::now();
            client.forward(request.clone()).await?;
            let between = Instant::now();
            client.info(InfoRequest {}).await?;
            if i >= 20 {
                forward.push((between - start).as_secs_f64() * 1e6);
                info.push(between.elapsed().as_secs_f64() * 1e6);
            }
        }
        anyhow::Ok((forward, info))
    })?;
    let (mut forward, mut info) = micros;
    forward.sort_by(f64::total_cmp);
    info.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&forward, 50.0), percentile(&forward, 99.0));
    // Info does no compute and no thread hand-off: the bare gRPC round trip.
    let (info_p50, info_p99) = (percentile(&info, 50.0), percentile(&info, 99.0));
    if args.json {
        println!(
            "{}",
            serde_json::json!({"samples": forward.len(), "p50_us": p50, "p99_us": p99,
                               "info_p50_us": info_p50, "info_p99_us": info_p99})
        );
    } else {
        println!(
            "Forward of 1 row: p50 {p50:.0} µs, p99 {p99:.0} µs; bare Info round trip: p50 {info_p50:.0} µs, p99 {info_p99:.0} µs ({} samples)",
            forward.len()
        );
    }
    Ok(())
}
