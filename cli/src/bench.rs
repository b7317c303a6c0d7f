//! Benchmarks run on purpose (never as tests), over `tramontane_measure`:
//! - `tramontane bench-forward`: tokens/s of the forward for the prefill and
//!   decode shapes benches/forward_vs_hf.py also runs through transformers,
//!   in process or, with `--workers`, sharded over running workers.
//! - `tramontane bench-dispatch`: round trips of one layer's Forward with a
//!   one-row payload to a running worker.
//! - `tramontane delay-proxy`: a TCP proxy adding latency, to run the
//!   sharded benchmarks over a slower network.
//! - `tramontane perplexity`: a model's perplexity on a text file, to
//!   compare dtypes and quantizations on the same text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tramontane_dispatch::MicroBatches;
use tramontane_measure::forward::{self, Shape, Timing};
use tramontane_measure::perplexity::{self, Scoring};

use crate::options::ComputeArgs;

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Checkpoint folder, run in process.
    #[arg(long)]
    pub model: PathBuf,
    /// The text (UTF-8), tokenized whole.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window; windows do not overlap and each starts from an
    /// empty cache.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Tokens of the text scored at most (whole windows).
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Windows prefilled in one step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Print JSON instead of a line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run_perplexity(args: &PerplexityArgs) -> Result<()> {
    let options = args.compute.load_options()?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading --text {}", args.text.display()))?;
    let scoring = Scoring {
        window: args.window,
        max_tokens: args.max_tokens,
        batch: args.batch,
    };
    let measured = perplexity::measure(&args.model, options, &text, scoring)?;
    if args.json {
        println!("{}", serde_json::to_string(&measured)?);
    } else {
        println!(
            "perplexity {:.3} (mean NLL {:.4} nats) over {} tokens in {} windows of {}",
            measured.perplexity, measured.nll, measured.tokens, measured.windows, args.window
        );
    }
    Ok(())
}

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
    /// With --workers: micro-batches per step (`auto` or a count).
    #[arg(long, default_value = "auto")]
    pub micro_batches: MicroBatches,
    /// Rows to run: prefill and/or decode.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prefill-1x512,prefill-8x128,decode-1,decode-8,decode-32"
    )]
    pub rows: Vec<Shape>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let options = args.compute.load_options()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let timing = Timing {
        repeats: args.repeats,
        decode_steps: args.decode_steps,
        decode_prompt: args.decode_prompt,
    };
    let rows = forward::measure(
        &args.model,
        &args.workers,
        options,
        args.micro_batches,
        &runtime,
        &args.rows,
        &timing,
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "rows": rows }))?
        );
    } else {
        for row in &rows {
            println!("{:<20} {:>10.1} tokens/s", row.name, row.tokens_per_s);
            if let Some(d) = &row.dispatch {
                let p = &d.phases;
                println!(
                    "  per layer: {:.0} µs = dense {:.0} + dispatch {:.0} (encode {:.0}, wait {:.0}, decode {:.0}, combine {:.0})",
                    d.step_us,
                    d.dense_us,
                    p.layer_us,
                    p.encode_us,
                    p.wait_us,
                    p.decode_us,
                    p.combine_us
                );
                println!(
                    "  {:.2} Forwards per layer, summed: round trip {:.0} µs = transport {:.0} + worker decode {:.0}, queue {:.0}, compute {:.0}, encode {:.0}",
                    p.forwards_per_layer,
                    p.round_trip_us,
                    p.transport_us,
                    p.worker_decode_us,
                    p.worker_queue_us,
                    p.worker_compute_us,
                    p.worker_encode_us
                );
                println!(
                    "  on the wire per token and layer: {:.0} bytes sent, {:.0} received",
                    p.sent_bytes_per_token, p.received_bytes_per_token
                );
            }
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

pub fn run_dispatch(args: &BenchDispatchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let trips = runtime.block_on(tramontane_measure::dispatch::round_trips(
        &args.worker,
        args.samples,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string(&trips)?);
    } else {
        println!(
            "Forward of 1 row: p50 {:.0} µs, p99 {:.0} µs; bare Info round trip: p50 {:.0} µs, p99 {:.0} µs ({} samples)",
            trips.p50_us, trips.p99_us, trips.info_p50_us, trips.info_p99_us, trips.samples
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct DelayProxyArgs {
    /// Where to accept connections, host:port (port 0: any free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Where to forward them, host:port.
    #[arg(long)]
    pub upstream: String,
    /// Added round trip in milliseconds: half of it each way.
    #[arg(long)]
    pub rtt_ms: f64,
}

pub fn run_delay_proxy(args: &DelayProxyArgs) -> Result<()> {
    if !(args.rtt_ms.is_finite() && args.rtt_ms >= 0.0) {
        anyhow::bail!(
            "--rtt-ms must be a finite number of at least 0, got {}",
            args.rtt_ms
        );
    }
    let listener = std::net::TcpListener::bind(&args.listen)?;
    println!(
        "tramontane delay-proxy listening on {}",
        listener.local_addr()?
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let one_way = std::time::Duration::from_secs_f64(args.rtt_ms / 2e3);
    tramontane_measure::delay_proxy::serve(listener, args.upstream.clone(), one_way)?;
    Ok(())
}
