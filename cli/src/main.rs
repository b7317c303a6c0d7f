//! The `tramontane` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod gen_model;
mod generate;
mod options;

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
    /// Write a Hugging Face-format Mixtral checkpoint with random weights and the Mistral tokenizer.
    GenModel(gen_model::GenModelArgs),
    /// Greedy continuation of a prompt, in process.
    Generate(generate::GenerateArgs),
    /// Tokens/s of the in-process forward (prefill and decode shapes).
    BenchForward(bench::BenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::GenModel(args) => gen_model::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::BenchForward(args) => bench::run(&args),
    }
}
