//! What a plan reports: [`PlanReport`] (`plan --json`, typed), the text
//! tables, and the SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::plan::{ClusterPlan, Planner, Slo};
use crate::profile::ModelShape;
use crate::svg;
use crate::weight_dtype::WeightDtype;
use crate::workload::{Arrivals, Workload};

/// Everything `plan --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport<'a> {
    pub model: ModelReport<'a>,
    pub profile: ProfileReport<'a>,
    pub workload: &'a Workload,
    /// `uniform`, or `trace` for load from a routing trace.
    pub routing: &'static str,
    pub slo: Slo,
    /// Every cluster size considered.
    pub plans: &'a [ClusterPlan],
    /// The size chosen, if any fits and meets the objectives.
    pub chosen_workers: Option<usize>,
}

/// The model planned and its sizes.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport<'a> {
    pub name: &'a str,
    pub model_id: &'a str,
    pub shape: ModelShape,
    /// All parameters.
    pub parameters: u64,
    /// Those one token uses (the top-k routed experts of each MoE layer).
    pub active_parameters: u64,
    /// The routed experts' (the workers').
    pub routed_expert_parameters: u64,
    /// How the routed experts' weights are stored.
    pub weight_dtype: WeightDtype,
    /// Everything else, on the router: embeddings, lm_head, attention,
    /// norms, gates, dense-layer MLPs, shared experts.
    pub dense_bytes: u64,
    /// One routed expert of one MoE layer.
    pub expert_layer_bytes: u64,
    /// One expert id across every MoE layer.
    pub expert_bytes_all_layers: u64,
    pub kv_bytes_per_token: u64,
}

/// Where the costs come from.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport<'a> {
    pub device: &'a str,
    pub estimate: bool,
    pub source: &'a str,
}

impl<'a> PlanReport<'a> {
    pub fn new(
        planner: &'a Planner,
        name: &'a str,
        model_id: &'a str,
        plans: &'a [ClusterPlan],
        chosen_workers: Option<usize>,
    ) -> Self {
        let m = &planner.model;
        let parameters = m.parameters();
        Self {
            model: ModelReport {
                name,
                model_id,
                shape: m.shape(),
                parameters: parameters.total as u64,
                active_parameters: parameters.active as u64,
                routed_expert_parameters: parameters.routed_experts as u64,
                weight_dtype: m.experts,
                dense_bytes: m.dense_bytes(),
                expert_layer_bytes: m.expert_layer_bytes(),
                expert_bytes_all_layers: m.expert_bytes_all_layers(),
                kv_bytes_per_token: m.kv_bytes_per_token(),
            },
            profile: ProfileReport {
                device: &planner.profile.device,
                estimate: planner.profile.estimate,
                source: &planner.profile.source,
            },
            workload: &planner.workload,
            routing: if planner.routing.is_uniform() {
                "uniform"
            } else {
                "trace"
            },
            slo: planner.slo,
            plans,
            chosen_workers,
        }
    }
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn ms(seconds: f64) -> f64 {
    seconds * 1e3
}

/// The text report: the model, the sizes considered, the chosen plan's memory.
pub fn text(
    planner: &Planner,
    name: &str,
    plans: &[ClusterPlan],
    chosen: Option<&ClusterPlan>,
) -> String {
    let m = &planner.model;
    let p = &planner.profile;
    let shape = m.shape();
    let parameters = m.parameters();
    let mut out = String::new();
    let moe_layers = m.spec.moe_layers().count();
    let mut layers = format!("{} layers", shape.layers);
    if moe_layers < shape.layers {
        layers += &format!(
            " ({} dense, MLP width {})",
            shape.layers - moe_layers,
            shape.dense_width.unwrap_or(0)
        );
    }
    let shared = shape
        .shared_expert_width
        .map(|width| format!(", a shared expert of width {width} on the router"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "model {name}: {:.2} B parameters ({:.2} B active), {layers}, {} routed experts of width {} (top-{}){shared}, {} bytes per weight, experts stored as {}; dense part {:.2} GB, one expert {:.1} MB per layer, {:.2} GB across all {moe_layers} MoE layers; KV cache {} KiB per token",
        parameters.total as f64 / 1e9,
        parameters.active as f64 / 1e9,
        shape.experts,
        shape.intermediate_size,
        shape.top_k,
        shape.dtype_bytes,
        m.experts,
        gb(m.dense_bytes()),
        m.expert_layer_bytes() as f64 / 1e6,
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
        "workload: {}, prompts {} tokens{}, outputs {} tokens, {} requests simulated; routing {}",
        match w.arrivals {
            Arrivals::Rate(r) => format!("{r} requests/s (Poisson)"),
            Arrivals::Concurrency(c) => format!("{c} concurrent clients"),
        },
        w.prompt,
        match (w.prefix_share, plans.first()) {
            (share, Some(plan)) if share > 0.0 => format!(
                " ({:.0}% a shared prefix: {:.0}% of prompt tokens from the prefix cache)",
                share * 100.0,
                plan.prediction.prefix_cache_hit_rate * 100.0
            ),
            _ => String::new(),
        },
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

/// Writes the charts into `dir`: throughput.svg and latency.svg (against
/// cluster size), expert-load.svg (layer × expert), and for a chosen plan
/// placement.svg (load per worker, default against planned, one scale).
pub fn write_charts(
    dir: &Path,
    plans: &[ClusterPlan],
    chosen: Option<&ClusterPlan>,
    planner: &Planner,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
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
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text);
    write("throughput.svg", &throughput)?;
    write("latency.svg", &latency)?;
    // A dense layer's row is empty: it routes nothing.
    let load = planner.routing.load();
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
