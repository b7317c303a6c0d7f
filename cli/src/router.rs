//! `tramontane router`: the dense model, gating and dispatch, serving
//! `moe.v1.Generation` in front of already running workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tch::Kind;
use tramontane_expert_worker::DEFAULT_MAX_MESSAGE_BYTES;
use tramontane_router::scheduler::SchedulerConfig;
use tramontane_router::{Router, RouterOptions};

use crate::options::{ComputeArgs, WeightDtype};
use crate::telemetry::TelemetryArgs;

/// Options of the router that `serve` shares.
#[derive(Debug, Args)]
pub struct RouterTuning {
    /// A placement file (JSON, see the README); default: expert e on worker e mod W.
    #[arg(long, env = "TRAMONTANE_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Deadline of one layer's Forward to one worker, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub dispatch_timeout_ms: u64,
    /// How long to wait at start for every worker to answer, in seconds.
    #[arg(long, default_value_t = 120)]
    pub startup_timeout_s: u64,
    /// dtype of hidden states on the wire.
    #[arg(long, value_enum, default_value = "f32")]
    pub wire_dtype: WeightDtype,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Record the experts every token chose, per step and layer, into this
    /// file (JSON lines; the planner's routing trace).
    #[arg(long)]
    pub record_routing: Option<PathBuf>,
    /// The model name clients send (default: the model folder's name).
    #[arg(long, env = "TRAMONTANE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest gRPC message to a worker, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

/// The scheduler's limits (the planner simulates the same).
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Requests that may wait for admission; beyond it requests are refused
    /// (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Tokens in one forward step: decode tokens first, then prompt chunks.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// KV cache tokens the running sequences may reserve (prompt + max_tokens each).
    #[arg(long, default_value_t = 65_536)]
    pub max_kv_tokens: usize,
}

impl SchedulerArgs {
    pub fn config(&self) -> Result<SchedulerConfig> {
        let config = SchedulerConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_kv_tokens: self.max_kv_tokens,
            max_waiting: self.queue,
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
        Ok(config)
    }
}

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
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl RouterTuning {
    pub fn options(
        &self,
        model: PathBuf,
        workers: Vec<String>,
        compute: &ComputeArgs,
    ) -> Result<RouterOptions> {
        if workers.is_empty() {
            bail!("--workers: at least one worker address is needed");
        }
        if self.dispatch_timeout_ms == 0 {
            bail!("--dispatch-timeout-ms must be at least 1");
        }
        let wire: Kind = self.wire_dtype.kind();
        let scheduler = self.scheduler.config()?;
        Ok(RouterOptions {
            model_dir: model,
            workers,
            placement: self.placement.clone(),
            load: compute.load_options()?,
            dispatch_timeout: Duration::from_millis(self.dispatch_timeout_ms),
            startup_timeout: Duration::from_secs(self.startup_timeout_s),
            wire,
            scheduler,
            max_message_bytes: self.max_message_bytes,
            served_model_name: self.served_model_name.clone(),
            record_routing: self.record_routing.clone(),
        })
    }
}

/// Starts a router and serves it until Ctrl-C / SIGTERM.
/// `on_listening` gets the gRPC and HTTP addresses once bound.
pub async fn start_and_serve(
    options: RouterOptions,
    listen: SocketAddr,
    http_listen: SocketAddr,
    on_listening: impl FnOnce(SocketAddr, SocketAddr) -> Result<()>,
) -> Result<()> {
    let router = Router::start(options).await?;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    };
    let grpc = bind(listen).await?;
    let http = bind(http_listen).await?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    on_listening(grpc_addr, http_addr)?;
    println!("tramontane router listening on {grpc_addr}");
    println!("tramontane http listening on {http_addr}");
    eprintln!(
        "serving `{}` (chat template: {}): OpenAI API at http://{http_addr}/v1, metrics at http://{http_addr}/metrics, moe.v1.Generation at {grpc_addr}",
        router.model_name(),
        router.chat_template_source()
    );
    tramontane_router::serve(grpc, http, router, crate::signals::shutdown())
        .await
        .context("serving")
}

pub fn run(args: &RouterArgs) -> Result<()> {
    let options = args
        .tuning
        .options(args.model.clone(), args.workers.clone(), &args.compute)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let telemetry = crate::telemetry::init(&args.telemetry, "tramontane-router")?;
        let served = start_and_serve(options, args.listen, args.http_listen, |_, _| Ok(())).await;
        telemetry.shutdown().await;
        served
    })
}
