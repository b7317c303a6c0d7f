//! `tramontane plan`: sizes a cluster for a model and a workload — memory per
//! device, expert placement, predicted throughput and latency — as a table,
//! JSON, SVG charts, the router's placement file and the Helm chart's values
//! (see `tramontane_planner`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, ValueEnum};
use tramontane_model::Dtype;
use tramontane_planner::helm_values::HelmValues;
use tramontane_planner::model::PlannedModel;
use tramontane_planner::plan::{PlacementPolicy, Planner, Sizes, Slo};
use tramontane_planner::profile::Profile;
use tramontane_planner::report::{self, PlanReport};
use tramontane_planner::routing::TokenRouting;
use tramontane_planner::weight_dtype::WeightDtype;
use tramontane_planner::workload::{Arrivals, Lengths, Workload};

use crate::options::SchedulerArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// EPLB: replicas for the hottest experts, then balanced packing.
    Eplb,
    /// Expert e on worker e mod W (the router's default).
    RoundRobin,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("size").required(true).args(["gpus", "search"])))]
#[command(group(ArgGroup::new("load").required(true).args(["rate", "concurrency"])))]
pub struct PlanArgs {
    /// Checkpoint folder, or its config.json (no weights needed).
    #[arg(long)]
    pub model: PathBuf,
    /// Device profile: h100, h200, a100 (datasheet estimates) or a file from `tramontane profile`.
    #[arg(long)]
    pub profile: String,
    /// dtype of weights and activations (default: the config's torch_dtype).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// How the routed experts' weights are stored: f32, bf16, f16, int8
    /// (per-channel scales), fp8 (128×128 block scales) or mxfp4 (default:
    /// the checkpoint's quantization_config, else --dtype).
    #[arg(long)]
    pub weight_dtype: Option<WeightDtype>,
    /// Expert workers (one device each); the router's device comes on top.
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Find the smallest cluster (up to --max-workers) that fits and meets the SLO.
    #[arg(long)]
    pub search: bool,
    /// Largest cluster --search and the charts consider.
    #[arg(long, default_value_t = 16)]
    pub max_workers: usize,
    /// Open loop: requests per second (Poisson arrivals).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: clients, each sending its next request when its last one finishes.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Prompt lengths: N, or A-B (uniform).
    #[arg(long)]
    pub prompt_len: Lengths,
    /// Output lengths: N, or A-B (uniform).
    #[arg(long)]
    pub output_len: Lengths,
    /// Requests simulated.
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// The fraction of every prompt that is a prefix all requests share (a
    /// system prompt), found in the prefix cache after the first request.
    #[arg(long, default_value_t = 0.0)]
    pub prefix_share: f64,
    /// Seed of the simulation (arrivals, lengths, routing draws).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Objective: time to first token p99, seconds.
    #[arg(long)]
    pub slo_ttft_p99: Option<f64>,
    /// Objective: inter-token latency p99, seconds.
    #[arg(long)]
    pub slo_itl_p99: Option<f64>,
    /// Expert load from `router --record-routing` (uniform without one).
    #[arg(long)]
    pub routing_trace: Option<PathBuf>,
    /// How experts are placed on workers.
    #[arg(long, value_enum, default_value = "eplb")]
    pub placement_policy: Policy,
    /// Expert slots per worker beyond an even share, for replicas of hot experts.
    #[arg(long, default_value_t = 1)]
    pub spare_slots: usize,
    /// dtype of hidden states on the wire (the router's --wire-dtype;
    /// default: the compute dtype, as the router's).
    #[arg(long, value_enum)]
    pub wire_dtype: Option<Dtype>,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Write the chosen plan's placement here (the router's and serve's --placement).
    #[arg(long)]
    pub placement_out: Option<PathBuf>,
    /// Write the chosen plan's values of the Helm chart deploy/helm/tramontane
    /// here, as JSON (`helm install -f FILE`): workers, GPU limits, memory
    /// requests (the plan's figure plus 4 GiB, in whole GiB), placement, scheduler.
    #[arg(long)]
    pub helm_values: Option<PathBuf>,
    /// Write SVG charts into this folder.
    #[arg(long)]
    pub svg_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let planned = PlannedModel::read(&args.model)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let dtype = planned.dtype(args.dtype)?;
    let weights = planned.weight_dtype(args.weight_dtype, dtype)?;
    let model = planned.sized(dtype, weights);
    let profile = Profile::load(&args.profile, &model)?;
    // A measured profile's quantized experts were checked with its shape.
    if !profile.estimate && !weights.quantized() && weights != WeightDtype::of(dtype) {
        bail!(
            "--profile {}: a measured profile times the experts as they were measured, in {}; \
             experts stored as {weights} need a datasheet profile (h100, h200, a100)",
            args.profile,
            dtype.flag()
        );
    }
    let routing = match &args.routing_trace {
        Some(path) => TokenRouting::from_trace(path, &model, Some(&planned.model_id))?,
        None => TokenRouting::uniform(&model),
    };
    let arrivals = match (args.rate, args.concurrency) {
        (Some(rate), None) => Arrivals::Rate(rate),
        (None, Some(clients)) => Arrivals::Concurrency(clients),
        _ => bail!("give one of --rate and --concurrency"),
    };
    let workload = Workload {
        arrivals,
        prompt: args.prompt_len,
        output: args.output_len,
        requests: args.requests,
        seed: args.seed,
        prefix_share: args.prefix_share,
    };
    workload.validate(planned.spec.max_position_embeddings)?;
    let scheduler = args.scheduler.config()?;
    if args.max_workers == 0 || args.gpus == Some(0) {
        bail!("the cluster needs at least one worker");
    }
    let planner = Planner {
        model,
        profile,
        routing,
        workload,
        scheduler,
        wire_bytes: args.wire_dtype.unwrap_or(dtype).bytes(),
        policy: match args.placement_policy {
            Policy::Eplb => PlacementPolicy::Eplb,
            Policy::RoundRobin => PlacementPolicy::RoundRobin,
        },
        spare_slots: args.spare_slots,
        slo: Slo {
            ttft_p99: args.slo_ttft_p99,
            itl_p99: args.slo_itl_p99,
        },
    };
    planner.check()?;

    let sizes = match args.gpus {
        // The charts show the sizes up to the one asked for.
        Some(workers) if !args.search => Sizes::Fixed {
            workers,
            up_to: args.svg_dir.is_some(),
        },
        _ => Sizes::Search {
            max_workers: args.max_workers,
        },
    };
    let (plans, chosen) = planner.plans(sizes)?;
    let chosen_plan = chosen.and_then(|w| plans.iter().find(|p| p.workers == w));

    if let Some(path) = &args.placement_out {
        let plan = chosen_plan.context("no cluster meets the objectives: no placement to write")?;
        std::fs::write(path, serde_json::to_string_pretty(&plan.placement)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.helm_values {
        let plan =
            chosen_plan.context("no cluster meets the objectives: no Helm values to write")?;
        let values = HelmValues::new(&planner, plan, dtype).context("--helm-values")?;
        std::fs::write(path, serde_json::to_string_pretty(&values)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &args.svg_dir {
        report::write_charts(dir, &plans, chosen_plan, &planner)
            .with_context(|| format!("writing the charts into {}", dir.display()))?;
    }
    if args.json {
        let report = PlanReport::new(&planner, &planned.name, &planned.model_id, &plans, chosen);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!(
            "{}",
            report::text(&planner, &planned.name, &plans, chosen_plan)
        );
    }
    if args.search && chosen.is_none() {
        bail!(
            "no cluster of up to {} workers fits and meets the objectives (see the table)",
            args.max_workers
        );
    }
    Ok(())
}
