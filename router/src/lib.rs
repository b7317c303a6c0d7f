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

pub mod api_keys;
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
pub mod readiness;
pub mod sampling;
pub mod service;
pub mod text;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tramontane_config::Dtype;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tramontane_model::error::{ConfigError, LoadError, TokenizerError};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{LoadOptions, Mixtral, MixtralConfig, Tokenizer};
use tramontane_policy::placement::{Placement, PlacementError};
use tramontane_policy::routing_trace::{self, RoutingTrace};
use tramontane_policy::scheduler::SchedulerConfig;
use tramontane_proto::v1::generation_server::GenerationServer as GenerationService;

use tramontane_infra::tls::Tls;

use crate::api_keys::ApiKeys;
use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::cluster::ClusterError;
use crate::completion::Generator;
use crate::dispatch::{RemoteExperts, WorkerLink};
use crate::engine::{EngineError, EngineHandle};
use crate::expert_load::ExpertLoad;
use crate::http::HttpState;
use crate::readiness::Readiness;
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
    pub wire: Dtype,
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
    /// The routing trace rotates to `FILE.1` once it holds this many bytes.
    pub record_routing_max_bytes: u64,
    /// Keys the public APIs (HTTP and gRPC `Generation`) need; none: open.
    pub api_keys: ApiKeys,
    /// How long a shutdown waits for the requests in flight to finish.
    pub drain_timeout: Duration,
    /// TLS: the CA verifies the workers (and the links to them are TLS);
    /// the certificate and key are presented to the workers and serve the
    /// public listeners (HTTPS, gRPC over TLS).
    pub tls: Option<Tls>,
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
    api_keys: ApiKeys,
    readiness: Arc<Readiness>,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    drain_timeout: Duration,
    tls: Option<Tls>,
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
            options.tls.as_ref().map(Tls::client).as_ref(),
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
            let trace = RoutingTrace::create(path, &header, options.record_routing_max_bytes)
                .map_err(|error| RouterError::RoutingTrace {
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
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let readiness = Readiness::new(
            reporter,
            vec![<GenerationService<GenerationServer> as tonic::server::NamedService>::NAME],
        );
        let generator = Generator::new(
            engine,
            tokenizer,
            config.vocab_size,
            config.max_position_embeddings,
            &model_name,
            readiness.clone(),
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
            api_keys: options.api_keys,
            readiness,
            health,
            drain_timeout: options.drain_timeout,
            tls: options.tls,
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

/// Where a router listens.
pub struct Listeners {
    /// `moe.v1.Generation` and grpc.health.v1.
    pub grpc: TcpListener,
    /// The OpenAI-compatible API.
    pub http: TcpListener,
    /// `/metrics`, `/v1/experts/stats` and `/health` without a key; None:
    /// they are on `http`, behind the key.
    pub observability: Option<TcpListener>,
}

/// Serves `moe.v1.Generation` and grpc.health.v1, the OpenAI-compatible
/// API, and the observability routes on their listeners until `shutdown`
/// (then drains, see [`until_end`]) or until the engine stops (an error).
/// Health (both) is serving only while every expert has a live worker, the
/// engine runs and the router is not draining.
pub async fn serve(
    listeners: Listeners,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let monitor_readiness = router.readiness.clone();
    let monitor = tokio::spawn(cluster::monitor(
        router.workers.clone(),
        router.model_id.clone(),
        router.placement.clone(),
        move |covered| monitor_readiness.set_experts_covered(covered),
    ));
    // Shutdown drains: new requests are refused (health says so) while
    // those in flight finish, for up to the drain timeout. An engine that
    // stops ends the serving at once, and the process with an error.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ending = until_end(
        router.generator.clone(),
        router.readiness.clone(),
        shutdown,
        router.drain_timeout,
    );
    let ending = tokio::spawn(async move {
        let engine_failed = ending.await;
        let _ = stop_tx.send(true);
        engine_failed
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&stop| stop).await;
    };
    let state = Arc::new(HttpState {
        generator: router.generator.clone(),
        chat_template: router.chat_template,
        model_name: router.model_name,
        created: http::unix_now(),
        readiness: router.readiness.clone(),
        metrics: crate::metrics::install(),
        expert_load: router.expert_load,
        workers: router.workers.iter().map(|w| w.addr.clone()).collect(),
        api_keys: router.api_keys.clone(),
    });
    let keys = router.api_keys;
    // The public listeners are TLS when the router has a certificate.
    let public_tls = router.tls.as_ref().filter(|tls| tls.has_identity());
    let mut grpc_server = tramontane_infra::grpc::server();
    if let Some(tls) = public_tls {
        grpc_server = grpc_server.tls_config(tls.public_server()?)?;
    }
    let grpc_server = grpc_server
        .add_service(router.health)
        .add_service(InterceptedService::new(
            GenerationService::new(GenerationServer::new(router.generator))
                .max_decoding_message_size(http::MAX_BODY_BYTES),
            move |request: tonic::Request<()>| {
                let authorization = request.metadata().get("authorization");
                if keys.allows(authorization.map(|v| v.as_bytes())) {
                    Ok(request)
                } else {
                    Err(tonic::Status::unauthenticated(api_keys::REFUSED))
                }
            },
        ))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let https = public_tls.map(Tls::https_server).transpose()?;
    let observability_apart = listeners.observability.is_some();
    let observability_server = listeners.observability.map(|listener| {
        serve_http(
            listener,
            https.clone(),
            http::observability_app(state.clone()),
            stopped(stop_rx.clone()),
        )
    });
    let http_server = serve_http(
        listeners.http,
        https,
        http::app(state, observability_apart),
        stopped(stop_rx),
    );
    let result = tokio::try_join!(
        async { grpc_server.await.map_err(ServeError::Grpc) },
        async { http_server.await.map_err(ServeError::Http) },
        async {
            match observability_server {
                Some(server) => server.await.map_err(ServeError::Http),
                None => Ok(()),
            }
        },
    );
    monitor.abort();
    result?;
    match ending.await {
        Ok(false) => Ok(()),
        _ => Err(ServeError::EngineStopped),
    }
}

/// Serves `app` on `listener` (over TLS with `https`) until `stopped`.
async fn serve_http(
    listener: TcpListener,
    https: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    app: axum::Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match https {
        Some(config) => {
            axum::serve(
                http::tls_listener::TlsListener::new(listener, config)?,
                app.into_make_service(),
            )
            .with_graceful_shutdown(stopped)
            .await
        }
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app.into_make_service())
                .with_graceful_shutdown(stopped)
                .await
        }
    }
}

/// Completes when the serving should end: on `shutdown`, after draining
/// (new requests refused, those in flight finished or `drain_timeout`
/// passed); at once when the engine thread stops. True when the engine
/// stopped: the process then exits with an error, for its supervisor to
/// restart it.
pub async fn until_end(
    generator: Generator,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> bool {
    let engine_failed = tokio::select! {
        _ = shutdown => false,
        _ = generator.engine_stopped() => true,
    };
    if engine_failed {
        readiness.set_engine_stopped();
    } else {
        readiness.set_draining();
        drain(&generator, drain_timeout).await;
    }
    engine_failed
}

/// Waits until every request in flight was delivered, or `timeout`.
async fn drain(generator: &Generator, timeout: Duration) {
    let started = tokio::time::Instant::now();
    let in_flight = generator.in_flight();
    tracing::info!(in_flight, "draining: new requests are refused");
    while generator.in_flight() > 0 && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match generator.in_flight() {
        0 => tracing::info!("drained {in_flight} requests in {:?}", started.elapsed()),
        left => {
            tracing::warn!("drain timeout ({timeout:?}): {left} requests still in flight are cut")
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("the engine thread stopped; the router stops so that it can be restarted")]
    EngineStopped,
    #[error("TLS of the public listeners")]
    Tls(#[from] tramontane_infra::tls::TlsError),
}

#[cfg(test)]
mod tests {
    //! How serving ends: a drain lets the requests in flight finish and
    //! refuses new ones; an engine thread that dies fails its requests with
    //! "engine stopped" (503 / UNAVAILABLE), and health says so.

    use super::*;
    use crate::completion::GenerationRequest;
    use crate::failure::GenerationError;
    use crate::readiness::NotReady;
    use crate::sampling::SamplingParams;
    use tramontane_model::moe::Experts;
    use tramontane_model::{ForwardError, gating::Routing};

    /// Experts whose computation panics, as a bug on the engine thread would.
    struct Panicking;

    impl Experts for Panicking {
        fn forward(
            &self,
            _layer: usize,
            _xs: &tch::Tensor,
            _routing: &Routing,
        ) -> Result<tch::Tensor, ForwardError> {
            panic!("an expert computation panicked")
        }
    }

    fn generator(dir: &std::path::Path, panicking: bool) -> (Generator, Arc<Readiness>) {
        tramontane_synthetic::write(dir, &tramontane_synthetic::Spec::default()).unwrap();
        let config = MixtralConfig::from_file(&dir.join("config.json")).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_dir(dir).unwrap());
        let model_dir = dir.to_path_buf();
        let build_config = config.clone();
        let build = move || -> Result<Mixtral, LoadError> {
            if panicking {
                let checkpoint = Checkpoint::open(&model_dir)?;
                Ok(Mixtral::load_dense(
                    &checkpoint,
                    build_config,
                    LoadOptions::default(),
                    Box::new(Panicking),
                )?)
            } else {
                Mixtral::load_in_process(&model_dir, LoadOptions::default())
            }
        };
        let engine = EngineHandle::spawn(build, vec![], SchedulerConfig::default()).unwrap();
        let readiness = Readiness::new(tonic_health::server::HealthReporter::new(), vec![]);
        let generator = Generator::new(
            engine,
            tokenizer,
            config.vocab_size,
            config.max_position_embeddings,
            "tiny",
            readiness.clone(),
        );
        (generator, readiness)
    }

    fn request(max_tokens: usize) -> GenerationRequest {
        GenerationRequest {
            prompt: vec![1, 415, 2936],
            max_tokens: Some(max_tokens),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: crate::text::StopList::default(),
            ignore_eos: true,
            operation: "generate",
        }
    }

    #[tokio::test]
    async fn a_dead_engine_fails_its_requests_ends_the_serving_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (generator, readiness) = generator(dir.path(), true);
        let mut slots = generator.reserve(1).unwrap();
        let stream = generator.start(request(4), &mut slots).unwrap();
        let failure = stream.collect().await.unwrap_err();
        assert!(
            matches!(*failure, GenerationError::EngineStopped),
            "{failure:?}"
        );
        let engine_failed = until_end(
            generator.clone(),
            readiness.clone(),
            std::future::pending(),
            Duration::from_secs(30),
        )
        .await;
        assert!(engine_failed);
        assert_eq!(readiness.state(), Err(NotReady::EngineStopped));
        assert!(matches!(
            generator.reserve(1),
            Err(GenerationError::EngineStopped)
        ));
    }

    #[tokio::test]
    async fn a_drain_refuses_new_requests_and_waits_for_those_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (generator, readiness) = generator(dir.path(), false);
        let mut slots = generator.reserve(1).unwrap();
        let mut stream = generator.start(request(24), &mut slots).unwrap();
        assert_eq!(generator.in_flight(), 1);
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.token.is_some());
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let ending = tokio::spawn(until_end(
            generator.clone(),
            readiness.clone(),
            async move {
                let _ = shutdown_rx.await;
            },
            Duration::from_secs(60),
        ));
        shutdown_tx.send(()).unwrap();
        // Draining: new requests are refused, health says why.
        while readiness.state().is_ok() {
            tokio::task::yield_now().await;
        }
        assert_eq!(readiness.state(), Err(NotReady::Draining));
        assert!(matches!(
            generator.reserve(1),
            Err(GenerationError::Draining)
        ));
        assert!(!ending.is_finished());
        // The request in flight runs to its end; then the drain is over.
        let mut tokens = 1;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            tokens += usize::from(chunk.token.is_some());
            if chunk.finish.is_some() {
                break;
            }
        }
        assert_eq!(tokens, 24);
        assert!(
            !ending.is_finished(),
            "the drain ended before the stream was let go"
        );
        drop(stream);
        assert!(!ending.await.unwrap(), "a drain is not an engine failure");
        assert_eq!(generator.in_flight(), 0);
    }
}
