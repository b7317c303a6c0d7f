//! `tramontane profile`: measures on a device what the planner needs for one
//! model and writes the profile file `tramontane plan --profile` reads (see
//! `tramontane_measure::profile`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use tch::Device;
use tramontane_measure::profile::{ProfileOptions, host_memory_bytes, measure};

use crate::options::ComputeArgs;

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Checkpoint folder (HF format).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the profile (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Threads of one worker (default: what `serve --workers 2` gives each: the cores ÷ 3).
    #[arg(long)]
    pub worker_threads: Option<i32>,
    /// Memory of one device in GB (default: this machine's memory for cpu; required for cuda).
    #[arg(long)]
    pub memory_gb: Option<f64>,
    /// Timed repetitions per point; the median is kept.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Largest row / token count measured (powers of two up to it).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// --threads is the router's (the dense part's) thread count.
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(args: &ProfileArgs) -> Result<()> {
    let load = args.compute.load_options()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let worker_threads = args.worker_threads.unwrap_or((cores / 3).max(1));
    let memory_bytes = match (args.memory_gb, load.device) {
        (Some(gb), _) => {
            ensure!(gb.is_finite() && gb > 0.0, "--memory-gb must be positive");
            (gb * 1e9) as u64
        }
        (None, Device::Cpu) => host_memory_bytes()?,
        (None, device) => bail!("--memory-gb is needed for {device:?} (the device's memory)"),
    };
    let profile = measure(&ProfileOptions {
        model: args.model.clone(),
        load,
        device: args.compute.device.clone(),
        worker_threads,
        memory_bytes,
        repeats: args.repeats,
        max_tokens: args.max_tokens,
        exe: std::env::current_exe().context("finding the tramontane binary")?,
    })?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&profile)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
