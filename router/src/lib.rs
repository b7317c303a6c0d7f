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
//! Placement, the scheduler's step plan and admission, dispatch planning and
//! the routing-trace format are [`tramontane_policy`]'s: policy without
//! tensors, which the capacity planner simulates with the same code.
//!
//! - [`dispatch`]: send each worker its share concurrently, fail over,
//!   combine — [`dispatch::RemoteExperts`] is the model's `Experts` seam over gRPC;
//!   [`dispatch_phases`] times each phase of it.
//! - [`cluster`]: connect and check workers at start, probe them after.
//! - [`engine`]: continuous batching on the thread that owns the model;
//!   [`sampling`] picks each sequence's next token.
//! - [`failure`]: what goes wrong on the data path, typed, mapped once to
//!   HTTP statuses and gRPC codes at the edges.
//! - [`completion`]: one request whichever API it came through; [`text`]
//!   turns tokens into streamed text and applies stop strings.
//! - [`http`] (OpenAI-compatible) and [`service`] (gRPC `moe.v1.Generation`):
//!   the public APIs; [`chat_template`] renders chat messages.
//! - [`metrics`]: the Prometheus metrics; [`expert_load`]: tokens per expert
//!   and worker.
//! - [`Router::start`] and [`serve`]: the entry points.

pub mod chat_template;
pub mod cluster;
pub mod completion;
pub mod dispatch;
pub mod dispatch_phases;
pub mod engine;
pub mod expert_load;
pub mod failure;
pub mod http;
pub mod metrics;
pub mod sampling;
pub mod service;
pub mod text;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::serve::ListenerExt;
use tch::Kind;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tramontane_model::error::{ConfigError, LoadError, TokenizerError};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{LoadOptions, Mixtral, MixtralConfig, Tokenizer};
use tramontane_policy::placement::{Placement, PlacementError};
use tramontane_policy::routing_trace::{self, RoutingTrace};
use tramontane_policy::scheduler::SchedulerConfig;
use tramontane_proto::v1::generation_server::GenerationServer as GenerationService;

use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::cluster::ClusterError;
use crate::completion::Generator;
use crate::dispatch::{RemoteExperts, WorkerLink};
use crate::engine::{EngineError, EngineHandle};
use crate::expert_load::ExpertLoad;
use crate::http::HttpState;
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
    /// Into how many micro-batches a step splits (their layers interleave,
    /// so one's attention runs while another's experts are out).
    pub micro_batches: dispatch::MicroBatches,
    /// Batch, token budget, KV and queue limits.
    pub scheduler: SchedulerConfig,
    pub max_message_bytes: usize,
    /// The name clients give as `model`; None: the model folder's name.
    pub served_model_name: Option<String>,
    /// Where to record every layer's routing (see [`routing_trace`]).
    pub record_routing: Option<PathBuf>,
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
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error("--record-routing {path}")]
    RoutingTrace {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the engine's start was interrupted")]
    EngineStart(#[source] tokio::task::JoinError),
}

/// A started router: workers checked, dense model loaded.
pub struct Router {
    generator: Generator,
    chat_template: ChatTemplate,
    model_name: String,
    expert_load: Arc<ExpertLoad>,
    config: MixtralConfig,
    model_id: String,
    workers: Arc<Vec<WorkerLink>>,
    placement: Placement,
}

impl Router {
    /// Connects to the workers (refusing to start when an expert has no
    /// worker), then loads the dense part of the model on the engine thread.
    pub async fn start(options: RouterOptions) -> Result<Self, RouterError> {
        // Before any metric handle is taken: handles taken earlier record nothing.
        crate::metrics::install();
        let config = MixtralConfig::from_file(&options.model_dir.join("config.json"))?;
        let model_id = tramontane_config::model_id(&options.model_dir)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&options.model_dir)?);
        let piece = |id: Option<u32>| id.and_then(|id| tokenizer.piece(id));
        let chat_template = ChatTemplate::from_dir(
            &options.model_dir,
            piece(tokenizer.bos_token_id()),
            piece(tokenizer.eos_token_id()),
        )?;
        let model_name = options.served_model_name.clone().unwrap_or_else(|| {
            options
                .model_dir
                .canonicalize()
                .unwrap_or_else(|_| options.model_dir.clone())
                .file_name()
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
        });
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
        let mut experts = RemoteExperts::new(
            workers.clone(),
            placement.clone(),
            options.dispatch_timeout,
            options.wire,
        )?
        .with_micro_batches(options.micro_batches);
        if let Some(path) = &options.record_routing {
            let header = routing_trace::Header {
                format: routing_trace::FORMAT.into(),
                model_id: model_id.clone(),
                layers: config.num_hidden_layers,
                experts: config.num_local_experts,
                top_k: config.num_experts_per_tok,
            };
            let trace =
                RoutingTrace::create(path, &header).map_err(|error| RouterError::RoutingTrace {
                    path: path.clone(),
                    error,
                })?;
            experts = experts.with_trace(trace);
        }
        let expert_load = experts.load();
        let build_config = config.clone();
        let dir = options.model_dir.clone();
        let load = options.load;
        let build = move || -> Result<Mixtral, LoadError> {
            let checkpoint = Checkpoint::open(&dir)?;
            Ok(Mixtral::load_dense(
                &checkpoint,
                build_config,
                load,
                Box::new(experts),
            )?)
        };
        let eos: Vec<u32> = tokenizer
            .eos_token_id()
            .into_iter()
            .chain(config.eos_token_id.iter().flat_map(|ids| ids.to_vec()))
            .collect();
        let scheduler = options.scheduler;
        let engine =
            tokio::task::spawn_blocking(move || EngineHandle::spawn(build, eos, scheduler))
                .await
                .map_err(RouterError::EngineStart)??;
        let generator = Generator::new(
            engine,
            tokenizer,
            config.vocab_size,
            config.max_position_embeddings,
            &model_name,
        );
        Ok(Self {
            generator,
            chat_template,
            model_name,
            expert_load,
            config,
            model_id,
            workers,
            placement,
        })
    }

    pub fn config(&self) -> &MixtralConfig {
        &self.config
    }

    /// The name clients give as `model`.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Where the chat template came from.
    pub fn chat_template_source(&self) -> &str {
        &self.chat_template.source
    }
}

/// Serves `moe.v1.Generation` and grpc.health.v1 on `grpc`, and the
/// OpenAI-compatible API on `http`, until `shutdown`. Health (both) is
/// serving only while every expert has a live worker.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ready = Arc::new(AtomicBool::new(true));
    let (reporter, health) = tonic_health::server::health_reporter();
    let monitor_ready = ready.clone();
    let monitor = tokio::spawn(cluster::monitor(
        router.workers.clone(),
        router.model_id.clone(),
        router.placement.clone(),
        move |is_ready| {
            monitor_ready.store(is_ready, Ordering::SeqCst);
            let reporter = reporter.clone();
            tokio::spawn(async move {
                let status = if is_ready {
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
                if !is_ready {
                    tracing::warn!("router not ready: some expert has no live worker");
                }
            });
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&stop| stop).await;
    };
    let state = Arc::new(HttpState {
        generator: router.generator.clone(),
        chat_template: router.chat_template,
        model_name: router.model_name,
        created: http::unix_now(),
        ready,
        metrics: crate::metrics::install(),
        expert_load: router.expert_load,
        workers: router.workers.iter().map(|w| w.addr.clone()).collect(),
    });
    let grpc_server = Server::builder()
        .add_service(health)
        .add_service(GenerationService::new(GenerationServer::new(
            router.generator,
        )))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let http = http.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let http_server = axum::serve(http, http::app(state).into_make_service())
        .with_graceful_shutdown(stopped(stop_rx));
    let result = tokio::try_join!(
        async { grpc_server.await.map_err(ServeError::Grpc) },
        async { http_server.await.map_err(ServeError::Http) },
    );
    monitor.abort();
    result.map(|_| ())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}
