//! `tramontane router`: the dense model, gating and dispatch, serving
//! `moe.v1.Generation` in front of already running workers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::options::{ComputeArgs, RouterTuning, TlsArgs};
use crate::serving::{Addresses, start_and_serve};
use crate::telemetry::TelemetryArgs;

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Checkpoint folder (HF format); the router loads only its dense part.
    #[arg(long, env = "TRAMONTANE_MODEL")]
    pub model: PathBuf,
    /// Worker addresses, comma-separated, in worker-index order.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "TRAMONTANE_WORKERS"
    )]
    pub workers: Vec<String>,
    /// Address of the Generation service.
    #[arg(long, default_value = "127.0.0.1:50051", env = "TRAMONTANE_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (and /metrics, /health).
    #[arg(long, default_value = "127.0.0.1:8000", env = "TRAMONTANE_HTTP_LISTEN")]
    pub http_listen: SocketAddr,
    #[command(flatten)]
    pub tuning: RouterTuning,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

pub fn run(args: &RouterArgs) -> Result<()> {
    let admin_key = args.tuning.access.admin_key()?;
    let options = args.tuning.options(
        args.model.clone(),
        args.workers.clone(),
        &args.compute,
        args.tls.load()?,
    )?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let telemetry = crate::telemetry::init(&args.telemetry, "tramontane-router")?;
        let listen = Addresses {
            grpc: args.listen,
            http: args.http_listen,
            metrics: args.tuning.access.metrics_listen,
            admin: args.tuning.access.admin_listen.zip(admin_key),
        };
        let served = start_and_serve(options, listen, &args.tuning.connections, |_| Ok(())).await;
        telemetry.shutdown().await;
        served
    })
}
