//! `tramontane plan`: sizes a cluster for a model and a workload — memory per
//! device, expert placement, predicted throughput and latency — as a table,
//! JSON, SVG charts and the router's placement file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, ValueEnum};
use tramontane_model::MixtralConfig;
use tramontane_planner::plan::{ClusterPlan, PlacementPolicy, Planner, Slo};
use tramontane_planner::profile::{ModelShape, Profile};
use tramontane_planner::roofline;
use tramontane_planner::routing::TokenRouting;
use tramontane_planner::svg;
use tramontane_planner::workload::{Arrivals, Lengths, Workload};

use crate::options::WeightDtype;
use crate::router::SchedulerArgs;

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
    pub dtype: Option<WeightDtype>,
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
    /// dtype of hidden states on the wire (the router's --wire-dtype).
    #[arg(long, value_enum, default_value = "f32")]
    pub wire_dtype: WeightDtype,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Write the chosen plan's placement here (the router's and serve's --placement).
    #[arg(long)]
    pub placement_out: Option<PathBuf>,
    /// Write SVG charts into this folder.
    #[arg(long)]
    pub svg_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn dtype_bytes(dtype: WeightDtype) -> usize {
    match dtype {
        WeightDtype::F32 => 4,
        WeightDtype::Bf16 | WeightDtype::F16 => 2,
    }
}

/// The model's config and, for a checkpoint's config.json, its model id.
fn read_model(path: &Path) -> Result<(MixtralConfig, String, String)> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let config =
        MixtralConfig::from_file(&file).with_context(|| format!("--model {}", path.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let id = tramontane_expert_worker::compute::model_id(dir)?;
    let name = if path.is_dir() { path } else { dir };
    let name = name
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    Ok((config, id, name))
}

fn load_profile(spec: &str, model: &ModelShape) -> Result<Profile> {
    if let Some(gpu) = roofline::by_key(spec) {
        return Ok(gpu.profile(model));
    }
    let path = Path::new(spec);
    if !path.exists() {
        bail!(
            "--profile {spec:?}: neither a built-in profile ({}) nor a file",
            roofline::GPUS.map(|g| g.key).join(", ")
        );
    }
    let profile = Profile::from_file(path)?;
    profile.check_model(model)?;
    Ok(profile)
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let (config, model_id, model_name) = read_model(&args.model)?;
    let dtype = match args.dtype {
        Some(d) => d,
        None => WeightDtype::from_hf_name(config.torch_dtype.as_deref().unwrap_or("bfloat16"))?,
    };
    let model = ModelShape::new(&config, dtype_bytes(dtype));
    let profile = load_profile(&args.profile, &model)?;
    let routing = match &args.routing_trace {
        Some(path) => TokenRouting::from_trace(path, &model, Some(&model_id))?,
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
    };
    workload.validate(config.max_position_embeddings)?;
    let scheduler = args.scheduler.config()?;
    let largest = workload.prompt.max() + workload.output.max();
    if largest > scheduler.max_kv_tokens {
        bail!(
            "a request of {largest} tokens is larger than --max-kv-tokens {}: the router would refuse it",
            scheduler.max_kv_tokens
        );
    }
    if args.max_workers == 0 || args.gpus == Some(0) {
        bail!("the cluster needs at least one worker");
    }
    let planner = Planner {
        model,
        profile,
        routing,
        workload,
        scheduler,
        wire_bytes: dtype_bytes(args.wire_dtype),
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
    planner.check_slo()?;

    let (plans, chosen) = match args.gpus {
        Some(workers) if !args.search => {
            // The charts show the sizes up to the one asked for.
            let sizes = if args.svg_dir.is_some() {
                1..=workers
            } else {
                workers..=workers
            };
            let plans = sizes
                .map(|w| planner.plan(w))
                .collect::<Result<Vec<_>, _>>()?;
            (plans, Some(workers))
        }
        _ => planner.search(args.max_workers)?,
    };
    let chosen_plan = chosen.and_then(|w| plans.iter().find(|p| p.workers == w));

    if let Some(path) = &args.placement_out {
        let plan = chosen_plan.context("no cluster meets the objectives: no placement to write")?;
        std::fs::write(path, serde_json::to_string_pretty(&plan.placement)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &args.svg_dir {
        write_charts(dir, &plans, chosen_plan, &planner)?;
    }
    if args.json {
        let report = serde_json::json!({
            "model": {
                "name": model_name,
                "model_id": model_id,
                "shape": planner.model,
                "parameters": planner.model.total_parameters(),
                "dense_bytes": planner.model.dense_bytes(),
                "expert_layer_bytes": planner.model.expert_layer_bytes(),
                "expert_bytes_all_layers": planner.model.expert_bytes_all_layers(),
                "kv_bytes_per_token": planner.model.kv_bytes_per_token(),
            },
            "profile": {
                "device": planner.profile.device,
                "estimate": planner.profile.estimate,
                "source": planner.profile.source,
            },
            "workload": planner.workload,
            "routing": if planner.routing.is_uniform() { "uniform" } else { "trace" },
            "slo": planner.slo,
            "plans": plans,
            "chosen_workers": chosen,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report(&planner, &model_name, &plans, chosen_plan));
    }
    if args.search && chosen.is_none() {
        bail!(
            "no cluster of up to {} workers fits and meets the objectives (see the table)",
            args.max_workers
        );
    }
    Ok(())
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn ms(seconds: f64) -> f64 {
    seconds * 1e3
}

/// The text report: the model, the sizes considered, the chosen plan's memory.
fn report(
    planner: &Planner,
    name: &str,
    plans: &[ClusterPlan],
    chosen: Option<&ClusterPlan>,
) -> String {
    let m = &planner.model;
    let p = &planner.profile;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {name}: {:.2} B parameters, {} layers × {} experts (top-{}), {} bytes per weight; dense part {:.2} GB, one expert {:.3} GB per layer, {:.2} GB across all layers; KV cache {} KiB per token",
        m.total_parameters() as f64 / 1e9,
        m.layers,
        m.experts,
        m.top_k,
        m.dtype_bytes,
        gb(m.dense_bytes()),
        gb(m.expert_layer_bytes()),
        gb(m.expert_bytes_all_layers()),
        m.kv_bytes_per_token() / 1024,
    );
    let _ = writeln!(
        out,
        "profile: {}{} ({}), {:.0} GB per device",
        p.device,
        if p.estimate {
            " — ESTIMATE"
        } else {
            " — measured"
        },
        p.source,
        gb(p.memory_bytes)
    );
    let w = &planner.workload;
    let _ = writeln!(
        out,
        "workload: {}, prompts {} tokens, outputs {} tokens, {} requests simulated; routing {}",
        match w.arrivals {
            Arrivals::Rate(r) => format!("{r} requests/s (Poisson)"),
            Arrivals::Concurrency(c) => format!("{c} concurrent clients"),
        },
        w.prompt,
        w.output,
        w.requests,
        if planner.routing.is_uniform() {
            "uniform"
        } else {
            "from the trace"
        },
    );
    let _ = writeln!(
        out,
        "\nworkers  fits  out tok/s  req/s  TTFT p50/p99 (ms)    ITL p50/p99 (ms)   balancedness default→placed  SLO"
    );
    for plan in plans {
        let pr = &plan.prediction;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let _ = writeln!(
            out,
            "{:>7}  {:>4}  {:>9.1}  {:>5.2}  {:>8.1} / {:>8.1}  {:>7.2} / {:>7.2}   {:>12.3} → {:.3}        {}",
            plan.workers,
            if plan.fits { "yes" } else { "no" },
            pr.output_tokens_per_s,
            pr.requests_per_s,
            ms(pr.ttft.p50),
            ms(pr.ttft.p99),
            ms(pr.itl.p50),
            ms(pr.itl.p99),
            mean(&plan.balancedness_default),
            mean(&plan.balancedness),
            if plan.meets_slo { "met" } else { "-" },
        );
    }
    match chosen {
        None => {
            let _ = writeln!(out, "\nno cluster considered fits and meets the objectives");
        }
        Some(plan) => {
            let _ = writeln!(
                out,
                "\nplan: {} workers, {} expert slots each per layer, placement {}{}",
                plan.workers,
                plan.slots_per_worker,
                plan.placement_name,
                if plan.fits { "" } else { " — DOES NOT FIT" }
            );
            for c in &plan.considered {
                let _ = writeln!(
                    out,
                    "  considered: {:<36} balancedness {:.3}, {:.1} out tok/s, ITL p50 {:.2} ms",
                    c.name,
                    c.balancedness,
                    c.output_tokens_per_s,
                    ms(c.itl_p50)
                );
            }
            let _ = writeln!(
                out,
                "device      experts (layer × expert)  experts GB  dense GB  KV GB  total GB  of GB  fits"
            );
            for d in &plan.memory {
                let _ = writeln!(
                    out,
                    "{:<10}  {:>24}  {:>10.2}  {:>8.2}  {:>5.2}  {:>8.2}  {:>5.0}  {}",
                    d.device,
                    d.expert_slots,
                    gb(d.expert_bytes),
                    gb(d.dense_bytes),
                    gb(d.kv_cache_bytes),
                    gb(d.total_bytes),
                    gb(d.capacity_bytes),
                    if d.fits { "yes" } else { "no" },
                );
            }
            if let Some(total) = plan.shared_host_bytes {
                let _ = writeln!(
                    out,
                    "all processes share one host: {:.2} GB of {:.0} GB",
                    gb(total),
                    gb(p.memory_bytes)
                );
            }
        }
    }
    out
}

fn write_charts(
    dir: &Path,
    plans: &[ClusterPlan],
    chosen: Option<&ClusterPlan>,
    planner: &Planner,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let series = |name: &str, value: &dyn Fn(&ClusterPlan) -> f64| svg::Series {
        name: name.into(),
        points: plans.iter().map(|p| (p.workers as f64, value(p))).collect(),
    };
    let throughput = svg::line_chart(
        "Predicted throughput against cluster size",
        "expert workers",
        "output tokens/s",
        &[series("output tokens/s", &|p| {
            p.prediction.output_tokens_per_s
        })],
    );
    let latency = svg::line_chart(
        "Predicted latency against cluster size",
        "expert workers",
        "milliseconds",
        &[
            series("TTFT p99", &|p| ms(p.prediction.ttft.p99)),
            series("ITL p50", &|p| ms(p.prediction.itl.p50)),
            series("ITL p99", &|p| ms(p.prediction.itl.p99)),
        ],
    );
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("throughput.svg", &throughput)?;
    write("latency.svg", &latency)?;
    let load = planner.routing.load(planner.model.layers);
    let shares: Vec<Vec<f64>> = load
        .iter()
        .map(|row| {
            let total: f64 = row.iter().sum();
            row.iter().map(|l| l / total).collect()
        })
        .collect();
    write(
        "expert-load.svg",
        &svg::heatmap(
            "Expert load (share of each layer's tokens)",
            "layer",
            "expert",
            &shares,
            None,
        ),
    )?;
    if let Some(plan) = chosen {
        let max = plan
            .worker_load_default
            .iter()
            .chain(&plan.worker_load)
            .flatten()
            .copied()
            .fold(0.0, f64::max);
        let before = svg::heatmap(
            "Load per worker, default placement (e mod W)",
            "layer",
            "worker",
            &plan.worker_load_default,
            Some(max),
        );
        let after = svg::heatmap(
            "Load per worker, planned placement",
            "layer",
            "worker",
            &plan.worker_load,
            Some(max),
        );
        write("placement.svg", &svg::stack(&[before, after]))?;
    }
    Ok(())
}
