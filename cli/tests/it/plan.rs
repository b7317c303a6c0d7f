//! `tramontane plan` and `tramontane profile` through the binary: memory of
//! the public Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE configurations against
//! hand-computed values and the H100s each needs, the search, the outputs
//! (JSON, SVG, placement file, Helm values), bad input refused with a clear
//! message, and the prediction-against-measurement bench on a small
//! configuration (finite figures; no timing is asserted).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::support;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../planner/fixtures")
        .join(name)
        .join("config.json")
}

/// `tramontane plan ARGS --json`, parsed.
fn plan_json(args: &[&str]) -> Result<Value> {
    let out = support::run_ok(support::tramontane().arg("plan").args(args).arg("--json"))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `tramontane plan ARGS`, expected to fail: its stderr.
fn plan_error(args: &[&str]) -> Result<String> {
    let out = support::tramontane()
        .arg("plan")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    ensure!(!out.status.success(), "plan {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !stderr.contains("panicked"),
        "plan {args:?} panicked: {stderr}"
    );
    Ok(stderr)
}

fn workers_plan(report: &Value, workers: u64) -> &Value {
    report["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .find(|p| p["workers"] == workers)
        .expect("a plan for that size")
}

const LOAD: [&str; 8] = [
    "--concurrency",
    "8",
    "--prompt-len",
    "512",
    "--output-len",
    "128",
    "--requests",
    "40",
];

/// The plan of `model` on `gpus` H100 workers under [`LOAD`].
fn plan_on_h100s(model: &str, gpus: usize) -> Result<Value> {
    let gpus = gpus.to_string();
    plan_json(
        &[
            &["--model", model, "--profile", "h100", "--gpus", &gpus],
            &LOAD[..],
        ]
        .concat(),
    )
}

#[test]
fn mixtral_8x7b_memory_matches_hand_computed_values() -> Result<()> {
    let model = fixture("mixtral-8x7b");
    let model = model.to_str().context("path")?;
    let one = plan_on_h100s(model, 1)?;
    let m = &one["model"];
    // 3 × 4096 × 14336 parameters per expert and layer, 2 bytes each.
    assert_eq!(m["expert_layer_bytes"], 352_321_536u64);
    // × 32 layers: about 11.3 GB per expert.
    assert_eq!(m["expert_bytes_all_layers"], 11_274_289_152u64);
    assert_eq!(m["parameters"], 46_702_792_704u64);
    // Embeddings and lm_head, attention, norms and gates: 1.6 B parameters.
    assert_eq!(m["dense_bytes"], 2 * 1_605_636_096u64);
    assert_eq!(m["kv_bytes_per_token"], 131_072);

    // One worker holds all 256 (layer, expert) pairs: 90.2 GB, more than an H100.
    let plan = workers_plan(&one, 1);
    let worker = &plan["memory"][1];
    assert_eq!(worker["expert_slots"], 256);
    assert_eq!(worker["expert_bytes"], 256 * 352_321_536u64);
    assert_eq!(worker["fits"], false);
    assert_eq!(plan["fits"], false);
    assert_eq!(plan["meets_slo"], false);
    // The router holds the dense part and the KV cache of the running requests.
    let router = &plan["memory"][0];
    assert_eq!(router["dense_bytes"], 2 * 1_605_636_096u64);
    let peak_kv = plan["prediction"]["peak_kv_tokens"]
        .as_u64()
        .context("peak")?;
    assert_eq!(peak_kv, 8 * (512 + 128));
    assert_eq!(router["kv_cache_bytes"], peak_kv * 131_072);

    // Two workers: four experts each and a replica slot, 45 to 56 GB: it fits.
    let two = plan_on_h100s(model, 2)?;
    let plan = workers_plan(&two, 2);
    assert_eq!(plan["fits"], true);
    for w in 1..=2 {
        let slots = plan["memory"][w]["expert_slots"]
            .as_u64()
            .context("slots")?;
        assert!((128..=160).contains(&slots), "{slots}");
    }
    let p = &plan["prediction"];
    for key in ["output_tokens_per_s", "requests_per_s", "seconds"] {
        assert!(
            p[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
            "{key}: {p}"
        );
    }
    assert_eq!(p["completed"], 40);
    Ok(())
}

#[test]
fn mixtral_8x22b_needs_two_experts_per_h100_at_most() -> Result<()> {
    let model = fixture("mixtral-8x22b");
    let model = model.to_str().context("path")?;
    let report = plan_on_h100s(model, 4)?;
    let m = &report["model"];
    // 3 × 6144 × 16384 × 2 bytes per layer, × 56 layers: 33.8 GB per expert.
    assert_eq!(m["expert_layer_bytes"], 603_979_776u64);
    assert_eq!(m["expert_bytes_all_layers"], 33_822_867_456u64);
    assert_eq!(m["parameters"], 140_620_634_112u64);
    // Four workers hold two experts each (67.6 GB); a third would not fit,
    // so no replica slot is given.
    let plan = workers_plan(&report, 4);
    assert_eq!(plan["slots_per_worker"], 2);
    assert_eq!(plan["fits"], true);
    for w in 1..=4 {
        assert_eq!(plan["memory"][w]["expert_bytes"], 2 * 33_822_867_456u64);
    }
    Ok(())
}

#[test]
fn the_search_finds_the_smallest_cluster_and_writes_charts_and_placement() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-8x7b");
    let svg = dir.path().join("charts");
    let placement = dir.path().join("placement.json");
    let report = plan_json(&[
        "--model",
        model.to_str().context("path")?,
        "--profile",
        "h200",
        "--search",
        "--max-workers",
        "4",
        "--rate",
        "2",
        "--prompt-len",
        "256-1024",
        "--output-len",
        "64-256",
        "--requests",
        "60",
        "--slo-ttft-p99",
        "5",
        "--slo-itl-p99",
        "0.5",
        "--svg-dir",
        svg.to_str().context("path")?,
        "--placement-out",
        placement.to_str().context("path")?,
    ])?;
    // An H200 (141 GB) holds all 90 GB of experts: one worker is enough.
    assert_eq!(report["chosen_workers"], 1);
    assert_eq!(report["profile"]["estimate"], true);
    assert_eq!(report["plans"].as_array().context("plans")?.len(), 4);
    for name in [
        "throughput.svg",
        "latency.svg",
        "expert-load.svg",
        "placement.svg",
    ] {
        let text = std::fs::read_to_string(svg.join(name)).with_context(|| name.to_string())?;
        ensure!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{name}"
        );
        ensure!(!text.contains("NaN"), "{name}");
    }
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&placement)?)?;
    assert_eq!(written["workers"], 1);
    assert_eq!(written["experts"].as_array().context("layers")?.len(), 32);
    Ok(())
}

/// The committed Helm values fixture the chart's tests render, written by
/// (from the repository root):
///
/// ```sh
/// tramontane plan --model planner/fixtures/mixtral-8x7b/config.json --profile h100 --gpus 8 \
///     --concurrency 8 --prompt-len 512 --output-len 128 --requests 40 \
///     --helm-values deploy/helm/tests/mixtral-8x7b-values.json
/// ```
const HELM_FIXTURE: &str = "deploy/helm/tests/mixtral-8x7b-values.json";
const HELM_FIXTURE_COMMAND: &str = "tramontane plan --model planner/fixtures/mixtral-8x7b/config.json --profile h100 --gpus 8 --concurrency 8 --prompt-len 512 --output-len 128 --requests 40 --helm-values deploy/helm/tests/mixtral-8x7b-values.json";

/// A Kubernetes memory quantity in whole GiB ("25Gi"): its GiB.
fn gibibytes(quantity: &Value) -> Option<u64> {
    let digits = quantity.as_str()?.strip_suffix("Gi")?;
    digits
        .parse()
        .ok()
        .filter(|_| digits.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn helm_values_for_mixtral_8x7b_on_8_h100s_carry_the_plan() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-8x7b");
    let placement = dir.path().join("placement.json");
    let values = dir.path().join("values.json");
    let report = plan_json(
        &[
            &[
                "--model",
                model.to_str().context("path")?,
                "--profile",
                "h100",
                "--gpus",
                "8",
                "--placement-out",
                placement.to_str().context("path")?,
                "--helm-values",
                values.to_str().context("path")?,
            ][..],
            &LOAD[..],
        ]
        .concat(),
    )?;
    let plan = workers_plan(&report, 8);
    let text = std::fs::read_to_string(&values).context("the values file")?;
    let v: Value = serde_json::from_str(&text)?;

    assert_eq!(v["workers"]["replicas"], 8);
    assert_eq!(
        v["model"],
        serde_json::json!({"dtype": "bf16", "numLayers": 32, "numExperts": 8, "denseLayers": []})
    );
    const GIB: u64 = 1 << 30;
    for (pod, memory) in [
        ("workers", &plan["memory"][1]),
        ("router", &plan["memory"][0]),
    ] {
        let resources = &v[pod]["resources"];
        assert_eq!(
            resources["limits"]["nvidia.com/gpu"], 1,
            "{pod}: {resources}"
        );
        assert_eq!(v[pod]["device"], "cuda:0", "{pod}");
        // The plan's bytes for the process plus 4 GiB, rounded up to whole GiB.
        let gib = gibibytes(&resources["requests"]["memory"])
            .with_context(|| format!("{pod}: not a quantity: {resources}"))?;
        let bytes = memory["total_bytes"].as_u64().context("total_bytes")?;
        assert_eq!(gib, (bytes + 4 * GIB).div_ceil(GIB), "{pod}: {bytes} bytes");
    }
    // Every worker holds the same slots (EPLB packs them evenly), so the
    // StatefulSet's one request is each worker's.
    let slots = plan["slots_per_worker"].as_u64().context("slots")?;
    for w in 1..=8 {
        assert_eq!(plan["memory"][w]["total_bytes"], 32 * slots * 352_321_536);
    }
    // The router: the dense part and the KV cache of 8 running requests.
    assert_eq!(
        plan["memory"][0]["total_bytes"],
        2 * 1_605_636_096u64 + 8 * (512 + 128) * 131_072
    );
    // The scheduler limits simulated: the router's defaults here.
    assert_eq!(
        v["router"]["scheduler"],
        serde_json::json!({"queue": 256, "maxRunning": 64, "maxBatchTokens": 512, "maxKvTokens": 65536})
    );
    // The chart's placement ConfigMap is the plan's placement file.
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&placement)?)?;
    assert_eq!(v["placement"], written);
    assert_eq!(written["workers"], 8);

    // The committed fixture is what this command writes now.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixture = repo.join(HELM_FIXTURE);
    let out = dir.path().join("fixture.json");
    let args: Vec<&str> = HELM_FIXTURE_COMMAND.split(' ').skip(2).collect();
    let (helm, rest) = args.split_last().context("command")?;
    ensure!(*helm == HELM_FIXTURE);
    support::run_ok(
        support::tramontane()
            .current_dir(&repo)
            .arg("plan")
            .args(rest)
            .arg(&out),
    )?;
    let now: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&fixture).with_context(|| fixture.display().to_string())?,
    )?;
    ensure!(
        committed == now,
        "{HELM_FIXTURE} is stale: write it again from the repository root with\n  {HELM_FIXTURE_COMMAND}"
    );
    // The fixture's command is the one tested above but for --placement-out.
    assert_eq!(now, v);
    Ok(())
}

/// A light load: the families' searches simulate up to 8 cluster sizes of
/// up to 94 layers of 128 experts.
const LIGHT_LOAD: [&str; 8] = [
    "--concurrency",
    "4",
    "--prompt-len",
    "64",
    "--output-len",
    "16",
    "--requests",
    "8",
];

/// A published MoE configuration's figures, computed by hand from its
/// config.json (bf16, 2 bytes a parameter).
struct Figures {
    name: &'static str,
    /// All parameters, and those one token uses.
    parameters: u64,
    active_parameters: u64,
    /// The router's: everything but the routed experts.
    dense_parameters: u64,
    /// 3 × hidden × expert width, per MoE layer; and the MoE layers.
    expert_parameters: u64,
    moe_layers: u64,
    experts: u64,
    /// 2 (K and V) × layers × KV heads × head_dim × 2 bytes.
    kv_bytes_per_token: u64,
    /// The fewest H100 workers (72 GB usable each) holding every expert.
    workers: u64,
}

const FAMILIES: [Figures; 4] = [
    // 48 layers, hidden 2048, 32 heads of 128 over 4 KV heads, q/k norms,
    // 128 experts of width 768, top-8, vocabulary 151936 untied.
    // Per layer: q and o 2 × 2048 × 4096, k and v 2 × 2048 × 512, norms
    // 2 × 128 + 2 × 2048, gate 128 × 2048: 19_140_864; embeddings and
    // lm_head 2 × 151936 × 2048, a final norm 2048.
    Figures {
        name: "qwen3-30b-a3b",
        parameters: 30_532_122_624,
        active_parameters: 3_353_032_704,
        dense_parameters: 48 * 19_140_864 + 2 * 151_936 * 2048 + 2048,
        expert_parameters: 3 * 2048 * 768,
        moe_layers: 48,
        experts: 128,
        kv_bytes_per_token: 2 * 48 * 4 * 128 * 2,
        // 128 × 48 × 9.4 MB = 58 GB: one worker.
        workers: 1,
    },
    // 94 layers, hidden 4096, 64 heads of 128 over 4, q/k norms, 128
    // experts of width 1536, top-8. Per layer: q and o 2 × 4096 × 8192,
    // k and v 2 × 4096 × 512, norms 256 + 8192, gate 128 × 4096.
    Figures {
        name: "qwen3-235b-a22b",
        parameters: 235_093_634_560,
        active_parameters: 22_190_763_520,
        dense_parameters: 94 * 71_835_904 + 2 * 151_936 * 4096 + 4096,
        expert_parameters: 3 * 4096 * 1536,
        moe_layers: 94,
        experts: 128,
        kv_bytes_per_token: 2 * 94 * 4 * 128 * 2,
        // An expert id over 94 layers is 3.55 GB: 20 fit in 72 GB, and
        // 128 ids need 7 workers.
        workers: 7,
    },
    // 28 layers, hidden 3584, 28 heads of 128 over 4, q/k/v biases, 64
    // experts of width 2560, top-8, and a shared expert of width 20480
    // with its sigmoid gate on every token. Per layer: q and o
    // 2 × 3584², k and v 2 × 3584 × 512, biases 3584 + 2 × 512, norms
    // 2 × 3584, gate 64 × 3584, shared expert 3 × 3584 × 20480 + 3584.
    Figures {
        name: "qwen2-57b-a14b",
        parameters: 57_408_658_944,
        active_parameters: 14_249_270_784,
        dense_parameters: 28 * 249_805_824 + 2 * 151_936 * 3584 + 3584,
        expert_parameters: 3 * 3584 * 2560,
        moe_layers: 28,
        experts: 64,
        kv_bytes_per_token: 2 * 28 * 4 * 128 * 2,
        // An expert id is 1.54 GB: 46 fit, 64 need 2 workers.
        workers: 2,
    },
    // 16 layers, hidden 2048, 16 heads of 128 (as many KV heads), q and k
    // norms over the whole projections, 64 experts of width 1024, top-8,
    // vocabulary 50304. Per layer: q, k, v, o 4 × 2048², norms
    // 2 × 2048 + 2 × 2048, gate 64 × 2048.
    Figures {
        name: "olmoe-1b-7b-0924",
        parameters: 6_919_161_856,
        active_parameters: 1_282_017_280,
        dense_parameters: 16 * 16_916_480 + 2 * 50_304 * 2048 + 2048,
        expert_parameters: 3 * 2048 * 1024,
        moe_layers: 16,
        experts: 64,
        kv_bytes_per_token: 2 * 16 * 16 * 128 * 2,
        workers: 1,
    },
];

#[test]
fn every_familys_sizes_match_hand_computed_values_and_the_search_finds_its_h100s() -> Result<()> {
    for f in &FAMILIES {
        let name = f.name;
        let model = fixture(name);
        let report = plan_json(
            &[
                &[
                    "--model",
                    model.to_str().context("path")?,
                    "--profile",
                    "h100",
                    "--search",
                    "--max-workers",
                    "8",
                ][..],
                &LIGHT_LOAD[..],
            ]
            .concat(),
        )?;
        let m = &report["model"];
        assert_eq!(m["parameters"], f.parameters, "{name}");
        assert_eq!(m["active_parameters"], f.active_parameters, "{name}");
        assert_eq!(m["dense_bytes"], 2 * f.dense_parameters, "{name}");
        assert_eq!(
            m["routed_expert_parameters"],
            f.parameters - f.dense_parameters,
            "{name}"
        );
        assert_eq!(
            f.parameters - f.dense_parameters,
            f.moe_layers * f.experts * f.expert_parameters,
            "{name}"
        );
        assert_eq!(m["expert_layer_bytes"], 2 * f.expert_parameters, "{name}");
        assert_eq!(
            m["expert_bytes_all_layers"],
            2 * f.expert_parameters * f.moe_layers,
            "{name}"
        );
        assert_eq!(m["kv_bytes_per_token"], f.kv_bytes_per_token, "{name}");
        assert_eq!(m["shape"]["experts"], f.experts, "{name}");

        // The smallest cluster that holds the experts; one fewer does not.
        assert_eq!(report["chosen_workers"], f.workers, "{name}");
        let plan = workers_plan(&report, f.workers);
        assert_eq!(plan["fits"], true, "{name}");
        assert_eq!(plan["prediction"]["completed"], 8, "{name}");
        if f.workers > 1 {
            assert_eq!(
                workers_plan(&report, f.workers - 1)["fits"],
                false,
                "{name}"
            );
        }
        // The router holds the dense part and the running requests' cache.
        let router = &plan["memory"][0];
        let peak_kv = plan["prediction"]["peak_kv_tokens"]
            .as_u64()
            .context("peak")?;
        assert_eq!(
            router["total_bytes"],
            2 * f.dense_parameters + peak_kv * f.kv_bytes_per_token,
            "{name}"
        );
        // Each worker holds its (layer, expert) pairs, all its MoE layers'.
        let mut slots = 0;
        for w in 1..=f.workers as usize {
            let worker = &plan["memory"][w];
            let held = worker["expert_slots"].as_u64().context("slots")?;
            assert_eq!(
                worker["expert_bytes"],
                held * 2 * f.expert_parameters,
                "{name}"
            );
            slots += held;
        }
        assert!(slots >= f.moe_layers * f.experts, "{name}: {slots}");
    }
    Ok(())
}

#[test]
fn helm_values_follow_each_family_and_its_placement() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for f in &FAMILIES {
        let name = f.name;
        let model = fixture(name);
        let values = dir.path().join(format!("{name}.json"));
        let workers = f.workers.to_string();
        let report = plan_json(
            &[
                &[
                    "--model",
                    model.to_str().context("path")?,
                    "--profile",
                    "h100",
                    "--gpus",
                    &workers,
                    "--helm-values",
                    values.to_str().context("path")?,
                ][..],
                &LIGHT_LOAD[..],
            ]
            .concat(),
        )?;
        let plan = workers_plan(&report, f.workers);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&values)?)?;
        assert_eq!(
            v["model"],
            serde_json::json!({"dtype": "bf16", "numLayers": f.moe_layers, "numExperts": f.experts, "denseLayers": []}),
            "{name}"
        );
        assert_eq!(v["workers"]["replicas"], f.workers, "{name}");
        assert_eq!(v["placement"], plan["placement"], "{name}");
        // A row per decoder layer, every expert of it on a worker.
        let rows = v["placement"]["experts"].as_array().context("rows")?;
        assert_eq!(rows.len() as u64, f.moe_layers, "{name}");
        for row in rows {
            let row = row.as_array().context("row")?;
            assert_eq!(row.len() as u64, f.experts, "{name}");
            assert!(
                row.iter()
                    .all(|held| held.as_array().is_some_and(|w| !w.is_empty())),
                "{name}"
            );
        }
        // The workers' request: the largest worker's bytes and 4 GiB.
        const GIB: u64 = 1 << 30;
        let largest = plan["memory"].as_array().context("memory")?[1..]
            .iter()
            .filter_map(|w| w["total_bytes"].as_u64())
            .max()
            .context("workers")?;
        assert_eq!(
            gibibytes(&v["workers"]["resources"]["requests"]["memory"]),
            Some((largest + 4 * GIB).div_ceil(GIB)),
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn bad_input_gets_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-8x7b");
    let model = model.to_str().context("path")?;
    let base = ["--model", model, "--profile", "h100", "--gpus", "2"];
    let lengths = ["--prompt-len", "128", "--output-len", "64"];

    // Zero traffic.
    let err = plan_error(&[&base[..], &lengths[..], &["--rate", "0"]].concat())?;
    assert!(err.contains("request rate must be a positive"), "{err}");
    let err = plan_error(&[&base[..], &lengths[..], &["--concurrency", "0"]].concat())?;
    assert!(err.contains("concurrency must be at least 1"), "{err}");
    let err = plan_error(&[&base[..], &lengths[..]].concat())?;
    assert!(
        err.contains("--rate") && err.contains("--concurrency"),
        "{err}"
    );
    // Lengths.
    let err = plan_error(
        &[
            &base[..],
            &["--rate", "1", "--prompt-len", "0", "--output-len", "64"],
        ]
        .concat(),
    )?;
    assert!(err.contains("not a length distribution"), "{err}");
    let err = plan_error(
        &[
            &base[..],
            &[
                "--rate",
                "1",
                "--prompt-len",
                "32000",
                "--output-len",
                "1000",
            ],
        ]
        .concat(),
    )?;
    assert!(err.contains("context of 32768"), "{err}");
    // Impossible objectives.
    let err = plan_error(
        &[
            &base[..],
            &lengths[..],
            &["--rate", "1", "--slo-itl-p99", "0.00001"],
        ]
        .concat(),
    )?;
    assert!(
        err.contains("no cluster can meet an inter-token latency"),
        "{err}"
    );
    let err = plan_error(
        &[
            &base[..],
            &lengths[..],
            &["--rate", "1", "--slo-ttft-p99=-1"],
        ]
        .concat(),
    )?;
    assert!(err.contains("--slo-ttft-p99 must be a positive"), "{err}");
    // A search that cannot succeed says so (and still prints its table).
    let err = plan_error(&[
        "--model",
        model,
        "--profile",
        "a100",
        "--search",
        "--max-workers",
        "1",
        "--rate",
        "1",
        "--prompt-len",
        "128",
        "--output-len",
        "64",
    ])?;
    assert!(err.contains("no cluster of up to 1 workers"), "{err}");

    // A config.json with a field missing names it.
    let broken = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(model)?)?;
    config
        .as_object_mut()
        .context("object")?
        .remove("num_local_experts");
    std::fs::write(&broken, config.to_string())?;
    let err = plan_error(&[
        "--model",
        broken.to_str().context("path")?,
        "--profile",
        "h100",
        "--gpus",
        "1",
        "--rate",
        "1",
        "--prompt-len",
        "8",
        "--output-len",
        "8",
    ])?;
    assert!(err.contains("num_local_experts"), "{err}");

    // So does another family's, and one out of range; an architecture not
    // served is named with those that are.
    let qwen3 = fixture("qwen3-30b-a3b");
    let qwen3: Value = serde_json::from_str(&std::fs::read_to_string(qwen3)?)?;
    let plan_config = |config: &Value| -> Result<String> {
        std::fs::write(&broken, config.to_string())?;
        plan_error(&[
            "--model",
            broken.to_str().context("path")?,
            "--profile",
            "h100",
            "--gpus",
            "1",
            "--rate",
            "1",
            "--prompt-len",
            "8",
            "--output-len",
            "8",
        ])
    };
    let mut config = qwen3.clone();
    config
        .as_object_mut()
        .context("object")?
        .remove("moe_intermediate_size");
    let err = plan_config(&config)?;
    assert!(err.contains("moe_intermediate_size"), "{err}");
    let mut config = qwen3.clone();
    config["num_experts_per_tok"] = 129.into();
    let err = plan_config(&config)?;
    assert!(err.contains("num_experts_per_tok"), "{err}");
    let mut config = qwen3.clone();
    config["mlp_only_layers"] = serde_json::json!([48]);
    let err = plan_config(&config)?;
    assert!(err.contains("mlp_only_layers"), "{err}");
    let mut config = qwen3;
    config["architectures"] = serde_json::json!(["DbrxForCausalLM"]);
    let err = plan_config(&config)?;
    assert!(
        err.contains("DbrxForCausalLM") && err.contains("Qwen3MoeForCausalLM"),
        "{err}"
    );

    // Unknown profiles, and profile files with a field missing.
    let err = plan_error(
        &[
            &[
                "--model",
                model,
                "--profile",
                "v100",
                "--gpus",
                "1",
                "--rate",
                "1",
            ][..],
            &lengths[..],
        ]
        .concat(),
    )?;
    assert!(err.contains("h100, h200, a100"), "{err}");
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"format": "tramontane-profile-v1", "device": "x"}"#,
    )?;
    let err = plan_error(
        &[
            &[
                "--model",
                model,
                "--profile",
                profile.to_str().context("path")?,
                "--gpus",
                "1",
                "--rate",
                "1",
            ][..],
            &lengths[..],
        ]
        .concat(),
    )?;
    assert!(err.contains("missing field"), "{err}");

    // A routing trace recorded on another model.
    let trace = dir.path().join("routing.jsonl");
    std::fs::write(
        &trace,
        "{\"format\":\"tramontane-routing-v1\",\"model_id\":\"0123\",\"layers\":32,\"experts\":8,\"top_k\":2}\n\
         {\"step\":1,\"layer\":0,\"experts\":[[0,1]]}\n",
    )?;
    let err = plan_error(
        &[
            &base[..],
            &lengths[..],
            &[
                "--rate",
                "1",
                "--routing-trace",
                trace.to_str().context("path")?,
            ],
        ]
        .concat(),
    )?;
    assert!(err.contains("recorded on another model"), "{err}");
    Ok(())
}

/// The documented prediction-against-measurement command on a tiny model:
/// profile, plan, serve and load, uniform and skewed; every figure finite.
#[test]
fn plan_against_measurement_runs_on_a_small_configuration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    let skewed = dir.path().join("skewed");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "3"])?;
    support::gen_model(
        &skewed,
        &["--preset", "tiny", "--seed", "3", "--expert-skew", "1"],
    )?;
    let out = dir.path().join("result.json");
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/plan_vs_measured.py");
    support::run_ok(
        std::process::Command::new(support::python())
            .arg(&bench)
            .args(["--bin", env!("CARGO_BIN_EXE_tramontane")])
            .arg("--model")
            .arg(&model)
            .arg("--skewed-model")
            .arg(&skewed)
            .args([
                "--workers",
                "1",
                "--concurrency",
                "2",
                "--skew-workers",
                "2",
                "--skew-concurrency",
                "2",
                "--waves",
                "1",
                "--min-requests",
                "2",
                "--input-len",
                "8",
                "--output-len",
                "4",
                "--profile-repeats",
                "1",
                "--threads",
                "1",
                "--json",
            ])
            .arg(&out),
    )?;
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let rows = result["rows"].as_array().context("rows")?;
    assert_eq!(rows.len(), 3, "{result}");
    for row in rows {
        for side in ["predicted", "measured"] {
            for key in ["output_tokens_per_s", "itl_p50_ms"] {
                let v = row[side][key].as_f64().context("figure")?;
                assert!(v.is_finite() && v > 0.0, "{side} {key}: {row}");
            }
        }
    }
    let skew = &result["skew"][0];
    // The plan keeps the default placement unless it predicts a faster one,
    // and its placement went through serve's --placement (measured above).
    assert!(skew["predicted_gain"].as_f64() >= Some(1.0), "{skew}");
    assert!(
        skew["balancedness_planned"].as_f64() >= skew["balancedness_default"].as_f64()
            || skew["planned_placement"] != "default (e mod W)",
        "{skew}"
    );
    assert!(
        result["median_abs_throughput_error"]
            .as_f64()
            .is_some_and(f64::is_finite)
    );
    Ok(())
}

/// `tramontane profile` on a Qwen3-MoE whose first layer is dense: it
/// profiles the MoE layers only (its workers hold those), records the
/// family's shape, and `plan` takes the profile for that model.
#[test]
fn profile_measures_a_model_with_dense_layers_and_plan_takes_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(
        &model,
        &[
            "--family",
            "qwen3_moe",
            "--preset",
            "tiny",
            "--layers",
            "3",
            "--dense-layers",
            "0",
            "--seed",
            "5",
        ],
    )?;
    // `tramontane profile` of the model into `out`, one repeat on one
    // thread each for router and workers, then `extra`.
    let profile_into = |out: &Path, extra: &[&str]| -> Result<()> {
        support::run_ok(
            support::tramontane()
                .args(["profile", "--model"])
                .arg(&model)
                .arg("--out")
                .arg(out)
                .args(["--repeats", "1", "--worker-threads", "1", "--threads", "1"])
                .args(extra),
        )?;
        Ok(())
    };
    let profile = dir.path().join("profile.json");
    profile_into(&profile, &["--max-tokens", "4"])?;
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&profile)?)?;
    let shape = &written["model"];
    assert_eq!(shape["experts"], 16, "{shape}");
    assert_eq!(shape["top_k"], 4, "{shape}");
    assert_eq!(shape["layers"], 3, "{shape}");
    assert_eq!(shape["dense_layers"], serde_json::json!([0]), "{shape}");
    for curve in ["expert_ffn", "dense_step", "dispatch"] {
        let points = written[curve].as_array().context("points")?;
        ensure!(!points.is_empty(), "{curve}: {written}");
        for p in points {
            let s = p["seconds"].as_f64().context("seconds")?;
            ensure!(s.is_finite() && s >= 0.0, "{curve}: {p}");
        }
    }
    let report = plan_json(&[
        "--model",
        model.to_str().context("path")?,
        "--profile",
        profile.to_str().context("path")?,
        "--gpus",
        "2",
        "--concurrency",
        "2",
        "--prompt-len",
        "16",
        "--output-len",
        "8",
        "--requests",
        "10",
    ])?;
    let tokens = workers_plan(&report, 2)["prediction"]["output_tokens_per_s"].as_f64();
    ensure!(tokens.is_some_and(|t| t.is_finite() && t > 0.0), "{report}");

    // Measured with int8 experts: the profile says so, plans for int8
    // experts take it, and plans for bf16 ones are refused.
    let int8 = dir.path().join("profile-int8.json");
    let quantized = ["--max-tokens", "2", "--dtype", "bf16", "--quantize", "int8"];
    profile_into(&int8, &quantized)?;
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&int8)?)?;
    assert_eq!(
        written["model"]["expert_weights"], "int8",
        "{}",
        written["model"]
    );
    let on_int8 = [
        "--model",
        model.to_str().context("path")?,
        "--profile",
        int8.to_str().context("path")?,
        "--gpus",
        "1",
        "--concurrency",
        "2",
        "--prompt-len",
        "16",
        "--output-len",
        "8",
        "--requests",
        "4",
        "--dtype",
        "bf16",
    ];
    let report = plan_json(&[&on_int8[..], &["--weight-dtype", "int8"]].concat())?;
    assert_eq!(report["model"]["weight_dtype"], "int8");
    let err = plan_error(&on_int8)?;
    ensure!(err.contains("experts held in int8"), "{err}");
    Ok(())
}

/// `--weight-dtype`: Mixtral-8x7B's experts in int8 fit one H100 worker,
/// in bf16 they do not; a checkpoint's `quantization_config` is the
/// default; an unknown weight dtype or quantization method is refused by
/// name.
#[test]
fn the_experts_weight_dtype_sizes_the_workers() -> Result<()> {
    let model = fixture("mixtral-8x7b");
    let model = model.to_str().context("path")?;
    let one_worker = |weights: &[&str]| -> Result<Value> {
        plan_json(
            &[
                &["--model", model, "--profile", "h100", "--gpus", "1"],
                weights,
                &LOAD[..],
            ]
            .concat(),
        )
    };
    let int8 = one_worker(&["--weight-dtype", "int8"])?;
    assert_eq!(int8["model"]["weight_dtype"], "int8");
    assert_eq!(int8["model"]["expert_layer_bytes"], 176_291_840u64);
    assert_eq!(workers_plan(&int8, 1)["fits"], true);
    assert_eq!(
        workers_plan(&int8, 1)["memory"][1]["expert_bytes"],
        256 * 176_291_840u64
    );
    let bf16 = one_worker(&[])?;
    assert_eq!(bf16["model"]["weight_dtype"], "bf16");
    assert_eq!(workers_plan(&bf16, 1)["fits"], false);

    let err = plan_error(
        &[
            &["--model", model, "--profile", "h100", "--gpus", "1"],
            &["--weight-dtype", "int4"][..],
            &LOAD[..],
        ]
        .concat(),
    )?;
    assert!(
        err.contains("int4") && err.contains("int8, fp8, mxfp4"),
        "{err}"
    );

    // The checkpoint's own quantization: fp8 by default, and a method the
    // planner cannot size refused by name.
    let dir = tempfile::tempdir()?;
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mixtral-8x7b"))?)?;
    for (method, sized) in [("fp8", true), ("gptq", false)] {
        config["quantization_config"] =
            serde_json::json!({"quant_method": method, "weight_block_size": [128, 128]});
        let path = dir.path().join(method).join("config.json");
        std::fs::create_dir_all(path.parent().context("folder")?)?;
        std::fs::write(&path, config.to_string())?;
        let args = [
            &["--model", path.to_str().context("path")?][..],
            &["--profile", "h100", "--gpus", "1"],
            &LOAD[..],
        ]
        .concat();
        if sized {
            let report = plan_json(&args)?;
            assert_eq!(report["model"]["weight_dtype"], "fp8");
            assert_eq!(workers_plan(&report, 1)["fits"], true);
        } else {
            let err = plan_error(&args)?;
            assert!(
                err.contains("quant_method")
                    && err.contains("gptq")
                    && err.contains("--weight-dtype"),
                "{err}"
            );
        }
    }
    Ok(())
}
