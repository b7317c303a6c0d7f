//! `tramontane serve`: a whole cluster on this machine — N worker processes
//! and the router — until Ctrl-C / SIGTERM, which drains the router and
//! then stops every worker. A worker that exits is started again.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tramontane_infra::certs::{CertFiles, Node, write_cluster_certs};
use tramontane_infra::tls::Tls;
use tramontane_launcher::supervisor::supervise;
use tramontane_launcher::{WorkerCommand, spawn_worker, worker_share, write_prometheus_targets};
use tramontane_model::ModelSpec;
use tramontane_policy::placement::Placement;

use crate::options::{ComputeArgs, RouterTuning, parse_device};
use crate::serving::{Addresses, start_and_serve};
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
    /// Run the links to the workers over mTLS and the router's public
    /// listeners over TLS, with a throwaway CA and certificates (for
    /// 127.0.0.1 and localhost) made at start.
    #[arg(long)]
    pub tls: bool,
    /// Where --tls writes its certificates (`ca.pem` is the one clients
    /// verify the router with); default: a temporary folder removed at exit.
    #[arg(long, requires = "tls")]
    pub tls_dir: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: RouterTuning,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    for device in &args.devices {
        parse_device(device)?;
    }
    let admin_key = args.tuning.access.admin_key()?;
    // The router's limits are checked before anything starts.
    args.tuning.scheduler.config()?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            if !args.demo_dir.join("config.json").exists() {
                eprintln!(
                    "no --model given: generating a demo checkpoint in {}",
                    args.demo_dir.display()
                );
                tramontane_synthetic::write(
                    &args.demo_dir,
                    &tramontane_synthetic::Spec::default(),
                )?;
            }
            args.demo_dir.clone()
        }
    };
    let config = ModelSpec::from_file(&model.join("config.json"))?;
    let placement = Placement::from_file_or_round_robin(
        args.tuning.placement.as_deref(),
        &config.placed_experts_per_layer(args.compute.shared_experts),
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
    let (_tls_temp, certs) = if args.tls {
        let (temp, dir) = match &args.tls_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("tramontane-tls-")
                    .tempdir()?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let nodes: Vec<Node> = std::iter::once("router".to_string())
            .chain((0..args.workers).map(|w| format!("worker-{w}")))
            .map(|name| Node {
                name,
                hosts: hosts.clone(),
            })
            .collect();
        let certs = write_cluster_certs(&dir, &nodes, 30)?;
        eprintln!(
            "--tls: certificates in {}; clients verify the router with {}",
            dir.display(),
            certs.ca.display()
        );
        (temp, Some(certs))
    } else {
        (None, None)
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let telemetry = crate::telemetry::init(&args.telemetry, "tramontane-router")?;
        let mut supervisors = Vec::new();
        let mut addrs = Vec::new();
        let exe = std::env::current_exe().context("finding the tramontane binary")?;
        for worker in 0..args.workers {
            let (held, described) =
                worker_share(&placement, args.tuning.placement.as_deref(), worker)?;
            let device = &args.devices[worker % args.devices.len()];
            let tls_args = match &certs {
                Some(certs) => worker_tls_args(certs, worker)?,
                None => Vec::new(),
            };
            let command = WorkerCommand {
                exe: exe.clone(),
                model: model.clone(),
                held,
                device: device.clone(),
                threads,
                // Workers compute in the router's dtype, hold shared
                // experts where the router places them there, and hold
                // their experts quantized where asked.
                extra: args
                    .compute
                    .worker_args()
                    .into_iter()
                    .chain(args.telemetry.to_args())
                    .map(Into::into)
                    .chain(tls_args)
                    .collect(),
            };
            let process = spawn_worker(&command)
                .await
                .with_context(|| format!("starting worker {worker}"))?;
            let addr = process.addr.clone();
            tracing::info!(
                "worker {worker} (pid {}) on {device} at {addr}: {described}",
                process.child.id().unwrap_or_default(),
            );
            // A worker that exits is started again on its address; the
            // router is not ready while an expert has no live worker.
            supervisors.push(tokio::spawn(supervise(worker, command, process)));
            addrs.push(addr);
        }
        let worker_addrs = addrs.clone();
        let router_tls = match &certs {
            Some(certs) => {
                let (cert, key) = certs.node("router").context("the router's certificate")?;
                Tls::from_files(Some(cert), Some(key), Some(&certs.ca))?
            }
            None => None,
        };
        let options = args
            .tuning
            .options(model.clone(), addrs, &args.compute, router_tls)?;
        let targets = args.prometheus_targets.clone();
        let listen = Addresses {
            grpc: args.listen,
            http: args.http_listen,
            metrics: args.tuning.access.metrics_listen,
            admin: args.tuning.access.admin_listen.zip(admin_key),
        };
        let result =
            start_and_serve(
                options,
                listen,
                &args.tuning.connections,
                |bound| match targets {
                    Some(path) => write_prometheus_targets(
                        &path,
                        &bound.metrics_or_http().to_string(),
                        &worker_addrs,
                    )
                    .with_context(|| format!("writing {}", path.display())),
                    None => Ok(()),
                },
            )
            .await;
        // Dropping the workers (with their supervisors) kills them, and
        // closing their stdin tells them to go.
        for supervisor in supervisors {
            supervisor.abort();
            let _ = supervisor.await;
        }
        telemetry.shutdown().await;
        result
    })
}

/// The TLS options of worker `worker` from `serve --tls`'s certificates.
fn worker_tls_args(certs: &CertFiles, worker: usize) -> Result<Vec<std::ffi::OsString>> {
    let (cert, key) = certs
        .node(&format!("worker-{worker}"))
        .with_context(|| format!("worker {worker}'s certificate"))?;
    Ok(vec![
        "--tls-cert".into(),
        cert.into(),
        "--tls-key".into(),
        key.into(),
        "--tls-ca".into(),
        certs.ca.clone().into(),
    ])
}
