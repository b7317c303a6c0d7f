//! `tramontane worker`: the expert service for some experts of a model on
//! one device: the same experts in every layer served (`--experts`,
//! `--layers`), or exactly the (layer, expert) pairs a placement file gives
//! it (`--placement --worker-index`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tramontane_expert_worker::{ComputeHandle, ExpertServer, WorkerModel};
use tramontane_infra::grpc::DEFAULT_MAX_MESSAGE_BYTES;
use tramontane_model::ModelSpec;
use tramontane_model::weights::Checkpoint;
use tramontane_policy::held_experts::{HeldExperts, format_per_layer, parse_experts};

use crate::connections::GrpcConnectionArgs;
use crate::options::{ComputeArgs, TlsArgs};
use crate::telemetry::TelemetryArgs;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Checkpoint folder (HF format).
    #[arg(long, env = "TRAMONTANE_MODEL")]
    pub model: PathBuf,
    /// Experts held in every layer served: `all`, or ids and ranges (`0,2,5-7`).
    #[arg(long, default_value = "all", env = "TRAMONTANE_EXPERTS")]
    pub experts: String,
    /// Layers served: ids and ranges (default: all).
    #[arg(long, env = "TRAMONTANE_LAYERS")]
    pub layers: Option<String>,
    /// A placement file (JSON, as `serve --placement` takes): hold exactly the
    /// (layer, expert) pairs it gives worker --worker-index, which may differ
    /// from layer to layer. Instead of --experts / --layers.
    #[arg(
        long,
        env = "TRAMONTANE_PLACEMENT",
        requires = "worker_index",
        conflicts_with_all = ["experts", "layers"]
    )]
    pub placement: Option<PathBuf>,
    /// This worker's index in the --placement file (0-based), or a
    /// StatefulSet pod's name, whose ordinal suffix is its index (`NAME-3`).
    #[arg(
        long,
        env = "TRAMONTANE_WORKER_INDEX",
        requires = "placement",
        value_parser = worker_index
    )]
    pub worker_index: Option<usize>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50061", env = "TRAMONTANE_LISTEN")]
    pub listen: SocketAddr,
    /// Also serve `GET /metrics` alone on this address: over TLS with
    /// --tls-cert, without asking for a client certificate, so that
    /// scrapers need none of the cluster's keys (the gRPC port serves it
    /// too).
    #[arg(long, env = "TRAMONTANE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Forward requests that may wait for the compute thread.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Exit when stdin closes (serve starts its workers so: they go with it,
    /// even when it is killed).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
    #[command(flatten)]
    pub connections: GrpcConnectionArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Under mTLS (--tls-ca): the name of the only certificate that may
    /// change what the worker holds (`Hold`): the router's node name in
    /// `tramontane certs`.
    #[arg(long, env = "TRAMONTANE_ADMIN_CLIENT", default_value = "router")]
    pub admin_client: String,
    /// The most bytes of expert weights this worker may hold: a `Hold`
    /// (the router moving experts onto it) past it is refused with
    /// RESOURCE_EXHAUSTED, and the router's change is undone. Default: no
    /// limit beyond the device's.
    #[arg(long, env = "TRAMONTANE_MAX_EXPERT_BYTES")]
    pub max_expert_bytes: Option<u64>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    if args.exit_with_stdin {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let options = args.compute.load_options()?;
    let tls = args.tls.load()?;
    if tls.as_ref().is_some_and(|t| !t.has_identity()) {
        anyhow::bail!("--tls-ca on a worker needs --tls-cert and --tls-key (its own certificate)");
    }
    let config = ModelSpec::from_file(&args.model.join("config.json"))?;
    // The ids this worker may hold: routed experts, and shared ones where
    // they run on workers.
    let shared = options.shared_experts;
    let placed = config.placed_experts_per_layer(shared);
    let held = match (&args.placement, args.worker_index) {
        (Some(path), Some(index)) => {
            HeldExperts::from_placement_file(path, index, &config.placed_experts_per_layer(shared))?
        }
        _ => HeldExperts::Uniform {
            experts: parse_experts(&args.experts, placed.into_iter().max().unwrap_or(0))?,
            layers: args
                .layers
                .as_deref()
                .map(|spec| parse_experts(spec, config.layers.len()).context("--layers"))
                .transpose()?,
        },
    };
    let model = WorkerModel {
        dir: args.model.clone(),
        held,
        options,
    };
    let model_bytes = Checkpoint::open(&args.model)?.stored_bytes(|_| true);
    let (compute, info) = ComputeHandle::spawn(model, args.queue)?;
    let held: usize = info.held.iter().map(|(_, e)| e.len()).sum();
    if let Some(max) = args
        .max_expert_bytes
        .filter(|&max| info.weight_bytes() > max)
    {
        anyhow::bail!(
            "--max-expert-bytes {max}: the experts this worker holds at start take {} bytes already",
            info.weight_bytes()
        );
    }
    // One I/O thread: the work is on the compute thread, and fewer threads wake faster.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let telemetry = crate::telemetry::init(&args.telemetry, "tramontane-worker")?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match args.metrics_listen {
            Some(metrics) => {
                let listener = tokio::net::TcpListener::bind(metrics)
                    .await
                    .with_context(|| format!("binding --metrics-listen {metrics}"))?;
                tracing::info!("metrics on {}", listener.local_addr()?);
                Some(listener)
            }
            None => None,
        };
        tracing::info!(
            "worker holds {held} (layer, expert) pairs: {} MiB of expert weights ({}), of a {} MiB checkpoint; RSS {} MiB",
            info.weight_bytes() >> 20,
            info.weight_dtypes
                .iter()
                .map(|(dtype, bytes)| format!("{dtype} {} MiB", bytes >> 20))
                .collect::<Vec<_>>()
                .join(", "),
            model_bytes >> 20,
            tramontane_infra::metrics::rss_bytes() >> 20,
        );
        if args.placement.is_some() {
            tracing::info!(
                "worker holds, per layer, experts {}",
                format_per_layer(&info.held)
            );
        }
        println!("{}{addr}", tramontane_launcher::LISTENING);
        let mut server = ExpertServer::new(compute, info).max_expert_bytes(args.max_expert_bytes);
        if tls.as_ref().is_some_and(|t| t.verifies_clients()) {
            server = server.admin_only(&args.admin_client);
        }
        let served = tramontane_expert_worker::serve(
            listener,
            metrics_listener,
            server,
            args.max_message_bytes,
            tls.as_ref(),
            args.connections.worker_limits(),
            crate::signals::shutdown(),
        )
        .await
        .context("serving");
        telemetry.shutdown().await;
        served
    })
}

/// A worker index: a number, or a StatefulSet pod's name (`NAME-N`), whose
/// ordinal is its index on every Kubernetes version (the pod-index label
/// is beta from 1.28).
pub fn worker_index(text: &str) -> Result<usize, String> {
    let ordinal = match text.rsplit_once('-') {
        Some((name, ordinal)) if !name.is_empty() => ordinal,
        _ => text,
    };
    let digits = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
    match ordinal.parse::<usize>() {
        Ok(index) if digits => Ok(index),
        _ => Err(format!(
            "expected a worker index (0, 1, ...) or a StatefulSet pod's name ending in one (NAME-3), not {text:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::worker_index;

    #[test]
    fn an_index_is_a_number_or_a_pod_names_ordinal() {
        assert_eq!(worker_index("0"), Ok(0));
        assert_eq!(worker_index("12"), Ok(12));
        assert_eq!(worker_index("moe-tramontane-workers-3"), Ok(3));
        for bad in ["", "-3", "+3", "workers", "workers-", "workers-3a", "3.0"] {
            let error = worker_index(bad).expect_err(bad);
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}
