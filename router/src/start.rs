//! A router's start: the model's config and tokenizer, the workers
//! connected and checked against the placement, the dense part loaded on
//! the engine thread; what [`crate::serve`] then serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tramontane_config::Dtype;
use tramontane_dispatch::cluster::{self, ClusterError};
use tramontane_dispatch::expert_load::ExpertLoad;
use tramontane_dispatch::pool::{Connector, ExpertPool, PoolOptions};
use tramontane_dispatch::{MicroBatches, RemoteExperts, Workers};
use tramontane_infra::tls::Tls;
use tramontane_model::error::{ConfigError, LoadError, TokenizerError};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{CausalLm, LoadOptions, ModelSpec, Tokenizer};
use tramontane_policy::placement::{Placement, PlacementError};
use tramontane_policy::routing_trace::{self, RoutingTrace};
use tramontane_policy::scheduler::SchedulerConfig;
use tramontane_proto::v1::generation_server::GenerationServer as GenerationService;

use crate::api_keys::ApiKeys;
use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::completion::Generator;
use crate::engine::{EngineError, EngineHandle};
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
    pub micro_batches: MicroBatches,
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
    /// Rebalance the experts every so often; None: on demand only.
    pub rebalance_interval: Option<Duration>,
    /// Expert slots per worker and layer beyond the even share.
    pub spare_slots: usize,
    /// Move a lost worker's experts onto the others.
    pub self_heal: bool,
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
    pub(crate) generator: Generator,
    pub(crate) chat_template: ChatTemplate,
    pub(crate) model_name: String,
    pub(crate) expert_load: Arc<ExpertLoad>,
    pub(crate) config: ModelSpec,
    pub(crate) model_id: String,
    pub(crate) workers: Arc<Workers>,
    /// The expert pool: the dispatch's live view of the placement (the
    /// monitor's and the admin API's), and its changes.
    pub(crate) pool: Arc<ExpertPool>,
    pub(crate) rebalance_interval: Option<Duration>,
    pub(crate) api_keys: ApiKeys,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) health: HealthServer<tonic_health::server::HealthService>,
    pub(crate) drain_timeout: Duration,
    pub(crate) tls: Option<Tls>,
}

impl Router {
    /// Connects to the workers (refusing to start when an expert has no
    /// worker), then loads the dense part of the model on the engine thread.
    pub async fn start(options: RouterOptions) -> Result<Self, RouterError> {
        // Before any metric handle is taken: handles taken earlier record nothing.
        crate::metrics::install();
        let config = ModelSpec::from_file(&options.model_dir.join("config.json"))?;
        let model_id = tramontane_config::model_id(&options.model_dir)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&options.model_dir)?);
        let chat_template = chat_template(&options.model_dir, &tokenizer)?;
        let (experts, workers) = connect_experts(&options, &config, &model_id).await?;
        let expert_load = experts.load();
        let pool = Arc::new(ExpertPool::new(
            workers.clone(),
            experts.placement_view(),
            expert_load.clone(),
            Connector {
                model_id: model_id.clone(),
                max_message_bytes: options.max_message_bytes,
                tls: options.tls.as_ref().map(Tls::client),
            },
            PoolOptions {
                spare_slots: options.spare_slots,
                self_heal: options.self_heal,
            },
        ));
        let engine = spawn_engine(&options, &config, &tokenizer, experts).await?;
        let (reporter, health) = health();
        let readiness = Readiness::new(
            reporter,
            vec![<GenerationService<GenerationServer> as tonic::server::NamedService>::NAME],
        );
        let model_name = served_model_name(&options);
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
            pool,
            rebalance_interval: options.rebalance_interval,
            api_keys: options.api_keys,
            readiness,
            health,
            drain_timeout: options.drain_timeout,
            tls: options.tls,
        })
    }

    pub fn config(&self) -> &ModelSpec {
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

/// The name clients give as `model`: `--served-model-name`, else the model
/// folder's name.
fn served_model_name(options: &RouterOptions) -> String {
    options.served_model_name.clone().unwrap_or_else(|| {
        options
            .model_dir
            .canonicalize()
            .unwrap_or_else(|_| options.model_dir.clone())
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    })
}

/// The checkpoint's chat template, with its tokenizer's BOS and EOS pieces.
fn chat_template(dir: &Path, tokenizer: &Tokenizer) -> Result<ChatTemplate, ChatTemplateError> {
    let piece = |id: Option<u32>| id.and_then(|id| tokenizer.piece(id));
    ChatTemplate::from_dir(
        dir,
        piece(tokenizer.bos_token_id()),
        piece(tokenizer.eos_token_id()),
        tokenizer.control_tokens(),
    )
}

/// The experts on the workers: the placement (the file's, or expert e on
/// worker e mod W), the workers connected and checked against it, and the
/// dispatch over them (recording the routing where asked).
async fn connect_experts(
    options: &RouterOptions,
    config: &ModelSpec,
    model_id: &str,
) -> Result<(RemoteExperts, Arc<Workers>), RouterError> {
    let placement = Placement::from_file_or_round_robin(
        options.placement.as_deref(),
        &config.placed_experts_per_layer(options.load.shared_experts),
        options.workers.len(),
    )?;
    let workers = cluster::connect(
        &options.workers,
        model_id,
        &placement,
        options.startup_timeout,
        options.max_message_bytes,
        options.tls.as_ref().map(Tls::client).as_ref(),
    )
    .await?;
    let mut experts = RemoteExperts::new(
        workers.clone(),
        placement,
        options.dispatch_timeout,
        options.wire,
    )?
    .with_micro_batches(options.micro_batches);
    if let Some(path) = &options.record_routing {
        let trace = routing_trace(path, options, config, model_id)?;
        experts = experts.with_trace(trace);
    }
    Ok((experts, workers))
}

/// The routing trace `--record-routing` writes, with this model's header.
/// A shared expert run on the workers is one more expert every token takes.
fn routing_trace(
    path: &Path,
    options: &RouterOptions,
    config: &ModelSpec,
    model_id: &str,
) -> Result<RoutingTrace, RouterError> {
    let placed = config.placed_experts_per_layer(options.load.shared_experts);
    let shared_placed = placed.iter().max() > Some(&config.max_experts());
    let header = routing_trace::Header {
        format: routing_trace::FORMAT.into(),
        model_id: model_id.to_string(),
        layers: config.layers.len(),
        experts: placed.into_iter().max().unwrap_or(0),
        top_k: config.max_top_k() + usize::from(shared_placed),
    };
    RoutingTrace::create(path, &header, options.record_routing_max_bytes).map_err(|error| {
        RouterError::RoutingTrace {
            path: path.to_path_buf(),
            error,
        }
    })
}

/// The engine thread, which loads the dense part of the model over
/// `experts` (off the async runtime: loading blocks).
async fn spawn_engine(
    options: &RouterOptions,
    config: &ModelSpec,
    tokenizer: &Tokenizer,
    experts: RemoteExperts,
) -> Result<EngineHandle, RouterError> {
    let build_config = config.clone();
    let dir = options.model_dir.clone();
    let load = options.load;
    let build = move || -> Result<CausalLm<RemoteExperts>, LoadError> {
        let checkpoint = Checkpoint::open(&dir)?;
        Ok(CausalLm::load_dense(
            &checkpoint,
            build_config,
            load,
            experts,
        )?)
    };
    let eos: Vec<u32> = tokenizer
        .eos_token_id()
        .into_iter()
        .chain(config.eos_token_id.iter().flat_map(|ids| ids.to_vec()))
        .collect();
    let scheduler = options.scheduler;
    let engine = tokio::task::spawn_blocking(move || EngineHandle::spawn(build, eos, scheduler))
        .await
        .map_err(RouterError::EngineStart)??;
    Ok(engine)
}

/// grpc.health.v1: its reporter (readiness sets it) and its service.
fn health() -> (
    HealthReporter,
    HealthServer<tonic_health::server::HealthService>,
) {
    let reporter = HealthReporter::new();
    let service = HealthServer::new(tonic_health::server::HealthService::from_health_reporter(
        reporter.clone(),
    ));
    (reporter, service)
}
