//! `tramontane serve`: a whole cluster on this machine — N worker processes
//! and the router — until Ctrl-C / SIGTERM, which stops every child.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tramontane_expert_worker::spec::format_experts;
use tramontane_model::MixtralConfig;
use tramontane_router::placement::Placement;

use crate::options::{ComputeArgs, parse_device};
use crate::router::RouterTuning;
use crate::telemetry::TelemetryArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Checkpoint folder; without it a demo checkpoint is generated (once) into --demo-dir.
    #[arg(long, env = "TRAMONTANE_MODEL")]
    pub model: Option<PathBuf>,
    /// Where the demo checkpoint lives when no --model is given.
    #[arg(long, default_value = "target/demo-model")]
    pub demo_dir: PathBuf,
    /// Number of expert worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Devices of the workers, comma-separated, used in turn (cpu, cuda:0, ...).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<String>,
    /// CPU threads per worker (default: the cores shared out between router and workers).
    #[arg(long)]
    pub worker_threads: Option<i32>,
    /// Address of the router's Generation service.
    #[arg(long, default_value = "127.0.0.1:50051", env = "TRAMONTANE_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (and /metrics, /health).
    #[arg(long, default_value = "127.0.0.1:8000", env = "TRAMONTANE_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    /// Write the router's and workers' metrics addresses to this file, in
    /// Prometheus file_sd format (see deploy/prometheus/prometheus.yml).
    #[arg(long)]
    pub prometheus_targets: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: RouterTuning,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Starts one worker on a free loopback port; returns it, its address and
/// the pipe whose closing stops it. `held` are the worker's options saying
/// what it holds (`--experts ...`, or `--placement F --worker-index I`).
pub(crate) async fn spawn_worker_with(
    model: &std::path::Path,
    held: &[impl AsRef<std::ffi::OsStr>],
    device: &str,
    threads: i32,
    telemetry: &TelemetryArgs,
) -> Result<(Child, String, ChildStdin)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("worker")
        .arg("--model")
        .arg(model)
        .args(held)
        .args(["--device", device, "--listen", "127.0.0.1:0"])
        // What it holds is in `held` alone, whatever serve's environment says.
        .env_remove("TRAMONTANE_EXPERTS")
        .env_remove("TRAMONTANE_LAYERS")
        .env_remove("TRAMONTANE_PLACEMENT")
        .env_remove("TRAMONTANE_WORKER_INDEX")
        .args(["--threads", &threads.to_string()])
        .args(telemetry.to_args())
        // A worker idles between dispatches: OpenMP threads that spin-wait
        // there steal the cores the router and the other workers need.
        .env(
            "OMP_WAIT_POLICY",
            std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into()),
        )
        // The worker exits when this pipe closes: when serve ends, however it ends.
        .arg("--exit-with-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker")?;
    // Held by serve until it ends (Child::wait would close it).
    let stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
        .await
        .context("worker did not start within 300 s")??
        .context("worker exited before listening")?;
    let addr = line
        .strip_prefix("tramontane worker listening on ")
        .context("unexpected worker output")?
        .to_string();
    // Keep reading: a closed pipe would fail the worker's next print.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr, stdin))
}

/// The options telling worker `worker` what to hold, and their description.
/// With a placement file, the worker reads its own (layer, expert) pairs from
/// it; without, expert e of every layer is on worker e mod W.
fn worker_share(
    placement: &Placement,
    file: Option<&std::path::Path>,
    worker: usize,
) -> Result<(Vec<std::ffi::OsString>, String)> {
    let held = placement.held_by(worker);
    if held.is_empty() {
        bail!("worker {worker} holds no expert in the placement");
    }
    Ok(match file {
        Some(file) => {
            let layers: Vec<String> = held
                .iter()
                .map(|(layer, experts)| format!("layer {layer}: {}", format_experts(experts)))
                .collect();
            (
                vec![
                    "--placement".into(),
                    file.into(),
                    "--worker-index".into(),
                    worker.to_string().into(),
                ],
                format!("experts {}", layers.join("; ")),
            )
        }
        None => {
            let experts = format_experts(&placement.experts_of(worker));
            (
                vec!["--experts".into(), experts.clone().into()],
                format!("experts {experts}"),
            )
        }
    })
}

/// Prometheus file_sd targets: the router (its HTTP port) and every worker
/// (its gRPC port, which also answers `GET /metrics`).
fn write_targets(path: &std::path::Path, router: &str, workers: &[String]) -> Result<()> {
    let mut groups = vec![serde_json::json!({
        "targets": [router],
        "labels": {"component": "router"},
    })];
    for (i, addr) in workers.iter().enumerate() {
        groups.push(serde_json::json!({
            "targets": [addr],
            "labels": {"component": "worker", "worker": i.to_string()},
        }));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Written whole, then renamed: Prometheus never reads half a file.
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(&groups)?)?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    for device in &args.devices {
        parse_device(device)?;
    }
    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            if !args.demo_dir.join("config.json").exists() {
                eprintln!(
                    "no --model given: generating a demo checkpoint in {}",
                    args.demo_dir.display()
                );
                crate::gen_model::run(&crate::gen_model::GenModelArgs::demo(
                    args.demo_dir.clone(),
                ))?;
            }
            args.demo_dir.clone()
        }
    };
    let config = MixtralConfig::from_file(&model.join("config.json"))?;
    let placement = Placement::from_file_or_round_robin(
        args.tuning.placement.as_deref(),
        config.num_hidden_layers,
        config.num_local_experts,
        args.workers,
    )?;
    if placement.workers != args.workers {
        bail!(
            "the placement file names {} workers, --workers is {}",
            placement.workers,
            args.workers
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let threads = args
        .worker_threads
        .unwrap_or_else(|| (cores / (args.workers as i32 + 1)).max(1));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let telemetry = crate::telemetry::init(&args.telemetry, "tramontane-router")?;
        let mut children = Vec::new();
        let mut lifelines = Vec::new();
        let mut addrs = Vec::new();
        for worker in 0..args.workers {
            let (held, described) = worker_share(&placement, args.tuning.placement.as_deref(), worker)?;
            let device = &args.devices[worker % args.devices.len()];
            let (child, addr, stdin) = spawn_worker_with(&model, &held, device, threads, &args.telemetry).await?;
            eprintln!(
                "worker {worker} (pid {}) on {device} at {addr}: {described}",
                child.id().unwrap_or_default(),
            );
            children.push(child);
            lifelines.push(stdin);
            addrs.push(addr);
        }
        let worker_addrs = addrs.clone();
        let options = args.tuning.options(model.clone(), addrs, &args.compute)?;
        let watch = tokio::spawn(async move {
            let exits = children.iter_mut().enumerate().map(|(i, child)| async move {
                let status = child.wait().await;
                eprintln!("worker {i} exited ({status:?}); the router is not ready until every expert has a live worker");
            });
            futures::future::join_all(exits).await;
        });
        let targets = args.prometheus_targets.clone();
        let result = crate::router::start_and_serve(options, args.listen, args.http_listen, |_, http| {
            match targets {
                Some(path) => write_targets(&path, &http.to_string(), &worker_addrs),
                None => Ok(()),
            }
        })
        .await;
        watch.abort(); // dropping the children kills them
        drop(lifelines); // and closing their stdin tells them to go
        telemetry.shutdown().await;
        result
    })
}
