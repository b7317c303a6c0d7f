//! # tramontane-router
//!
//! The router holds everything of a Mixtral-style model that is not an
//! expert (embeddings, attention and KV caches, norms, gates, lm_head). For
//! every MoE layer it routes each token to its top-k experts and dispatches
//! the token rows to the expert workers that hold them, then adds their
//! partial sums back into the residual stream.
//!
//! # Layout
//!
//! - [`placement`]: which worker holds which expert (default or file, replicas).
//! - [`dispatch`]: plan per worker, send concurrently, fail over, combine —
//!   [`dispatch::RemoteExperts`] is the model's `Experts` seam over gRPC.
//! - [`cluster`]: connect and check workers at start, probe them after.
//! - [`engine`]: the thread that owns the model and batches running sequences.
//! - [`service`]: the public gRPC `moe.v1.Generation`.
//! - [`Router::start`] and [`serve`]: the entry points.

pub mod cluster;
pub mod dispatch;
pub mod engine;
pub mod placement;
pub mod service;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tch::Kind;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tramontane_model::error::{ConfigError, LoadError, TokenizerError};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{LoadOptions, Mixtral, MixtralConfig, Tokenizer};
use tramontane_proto::v1::generation_server::GenerationServer as GenerationService;

use crate::cluster::ClusterError;
use crate::dispatch::{RemoteExperts, WorkerLink};
use crate::engine::{EngineError, EngineHandle};
use crate::placement::{Placement, PlacementError};
use crate::service::GenerationServer;

#[derive(Debug, Clone)]
pub struct RouterOptions {
    pub model_dir: PathBuf,
    /// Worker addresses, `host:port`, in worker-index order.
    pub workers: Vec<String>,
    /// A placement file; None for expert e on worker e mod W.
    pub placement: Option<PathBuf>,
    pub load: LoadOptions,
    /// Deadline of one Forward to one worker.
    pub dispatch_timeout: Duration,
    /// How long to wait for workers to answer at start.
    pub startup_timeout: Duration,
    /// dtype of hidden states on the wire.
    pub wire: Kind,
    /// Requests that may wait for the engine.
    pub queue: usize,
    pub max_message_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A started router: workers checked, dense model loaded.
pub struct Router {
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    config: MixtralConfig,
    model_id: String,
    workers: Arc<Vec<WorkerLink>>,
    placement: Placement,
}

impl Router {
    /// Connects to the workers (refusing to start when an expert has no
    /// worker), then loads the dense part of the model on the engine thread.
    pub async fn start(options: RouterOptions) -> Result<Self, RouterError> {
        let config = MixtralConfig::from_file(&options.model_dir.join("config.json"))?;
        let model_id = tramontane_expert_worker::compute::model_id(&options.model_dir)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&options.model_dir)?);
        let placement = Placement::from_file_or_round_robin(
            options.placement.as_deref(),
            config.num_hidden_layers,
            config.num_local_experts,
            options.workers.len(),
        )?;
        let workers = cluster::connect(
            &options.workers,
            &model_id,
            &placement,
            options.startup_timeout,
            options.max_message_bytes,
        )
        .await?;
        let experts = RemoteExperts::new(
            workers.clone(),
            placement.clone(),
            tokio::runtime::Handle::current(),
            options.dispatch_timeout,
            options.wire,
        );
        let build_config = config.clone();
        let dir = options.model_dir.clone();
        let load = options.load;
        let build = move || -> Result<Mixtral, String> {
            let checkpoint = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
            Mixtral::load_dense(&checkpoint, build_config, load, Box::new(experts))
                .map_err(|e| e.to_string())
        };
        let eos: Vec<u32> = tokenizer
            .eos_token_id()
            .into_iter()
            .chain(config.eos_token_id.iter().flat_map(|ids| ids.to_vec()))
            .collect();
        let engine =
            tokio::task::spawn_blocking(move || EngineHandle::spawn(build, eos, options.queue))
                .await
                .map_err(|e| EngineError::Start(e.to_string()))??;
        Ok(Self {
            engine,
            tokenizer,
            config,
            model_id,
            workers,
            placement,
        })
    }

    pub fn config(&self) -> &MixtralConfig {
        &self.config
    }
}

/// Serves `moe.v1.Generation` and grpc.health.v1 on `listener` until
/// `shutdown`; health is SERVING only while every expert has a live worker.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let monitor_reporter = reporter.clone();
    let monitor = tokio::spawn(cluster::monitor(
        router.workers.clone(),
        router.model_id.clone(),
        router.placement.clone(),
        move |ready| {
            let reporter = monitor_reporter.clone();
            tokio::spawn(async move {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                reporter
                    .set_service_status(
                        <GenerationService<GenerationServer> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                if !ready {
                    eprintln!("router not ready: some expert has no live worker");
                }
            });
        },
    ));
    let service = GenerationServer::new(
        router.engine.clone(),
        router.tokenizer.clone(),
        router.config.vocab_size,
        router.config.max_position_embeddings,
    );
    let result = Server::builder()
        .add_service(health)
        .add_service(GenerationService::new(service))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    monitor.abort();
    result
}
