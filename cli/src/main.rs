//! The `tramontane` command line: one module per subcommand, each parsing
//! its flags and calling the libraries; `options` holds the flag groups
//! several share, `serving`, `telemetry` and `signals` what the long-running
//! ones (router, serve, worker) share.

#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};

mod admin;
mod bench;
mod certs;
mod connections;
mod gen_model;
mod generate;
mod openmp_env;
mod options;
mod plan;
mod profile;
mod router;
mod serve;
mod serving;
mod signals;
mod telemetry;
mod worker;

#[derive(Parser)]
#[command(
    name = "tramontane",
    version,
    about = "Serve Mixture-of-Experts language models with sharded experts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a Hugging Face-format checkpoint (Mixtral, Qwen3-MoE, Qwen2-MoE or OLMoE) with random weights and the Mistral tokenizer.
    GenModel(gen_model::GenModelArgs),
    /// Greedy continuation of a prompt, in process.
    Generate(generate::GenerateArgs),
    /// Tokens/s of the forward (prefill and decode shapes), in process or over workers.
    BenchForward(bench::BenchArgs),
    /// Round trips of a one-row Forward to a running worker.
    BenchDispatch(bench::BenchDispatchArgs),
    /// A TCP proxy that adds latency both ways (for benchmarks over a slower network).
    DelayProxy(bench::DelayProxyArgs),
    /// A model's perplexity on a text file, in process (to compare dtypes and quantizations).
    Perplexity(bench::PerplexityArgs),
    /// Serve some experts of a model on one device (the expert service).
    Worker(worker::WorkerArgs),
    /// Serve the dense model and dispatch MoE layers to running workers.
    Router(router::RouterArgs),
    /// Start N workers and the router on this machine (a generated demo model without --model).
    Serve(serve::ServeArgs),
    /// Measure on a device what the planner needs (expert FFN, dense step, dispatch round trip).
    Profile(profile::ProfileArgs),
    /// Size a cluster: memory per device, expert placement, predicted throughput and latency.
    Plan(plan::PlanArgs),
    /// Make a CA and per-node certificates for a cluster's mTLS and HTTPS.
    Certs(certs::CertsArgs),
    /// Drive a running router's expert pool (its --admin-listen).
    Admin(admin::AdminArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::GenModel(args) => gen_model::run(&args),
        Command::Admin(args) => admin::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::BenchForward(args) => {
            if !args.workers.is_empty() {
                openmp_env::passive_while_dispatching();
            }
            bench::run(&args)
        }
        Command::BenchDispatch(args) => bench::run_dispatch(&args),
        Command::DelayProxy(args) => bench::run_delay_proxy(&args),
        Command::Perplexity(args) => bench::run_perplexity(&args),
        Command::Worker(args) => {
            openmp_env::passive_while_dispatching();
            worker::run(&args)
        }
        Command::Router(args) => {
            openmp_env::passive_while_dispatching();
            router::run(&args)
        }
        Command::Serve(args) => {
            openmp_env::passive_while_dispatching();
            serve::run(&args)
        }
        Command::Profile(args) => profile::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Certs(args) => certs::run(&args),
    }
}
