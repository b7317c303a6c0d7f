//! The OpenAI-compatible HTTP API (axum): `/v1/completions`,
//! `/v1/chat/completions` (both streamed as server-sent events when asked),
//! `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health` and the
//! Prometheus `/metrics`, behind API keys
//! when the server has any.

mod chat;
mod chat_tools;
mod completions;
mod error;
mod json;
mod openai;
mod response_format;
mod tokenize;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, BoxStream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;

pub use error::ApiError;

use crate::api_keys::{self, ApiKeys};
use crate::chat_template::ChatTemplate;
use crate::completion::{Chunk, CompletionStream, GenerationFailed, Generator};
use crate::excerpt::Excerpt;
use crate::metrics;
use crate::readiness::Readiness;
use openai::{ModelCard, ModelList, Usage};
use tramontane_dispatch::expert_load::{ExpertLoad, ExpertStats};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the handlers share.
pub struct HttpState {
    pub generator: Generator,
    pub chat_template: ChatTemplate,
    /// The name clients put in `model`.
    pub model_name: String,
    /// When the server started (seconds since the epoch), for /v1/models.
    pub created: u64,
    /// Whether the router serves (for /health).
    pub readiness: Arc<Readiness>,
    pub metrics: PrometheusHandle,
    pub expert_load: Arc<ExpertLoad>,
    /// Worker addresses, by index.
    pub workers: Arc<tramontane_dispatch::Workers>,
    /// Who holds what, by epoch.
    pub placement: tramontane_dispatch::placement_view::PlacementView,
    /// Keys the API needs (none: open).
    pub api_keys: ApiKeys,
}

impl HttpState {
    /// Refuses a request for another model, as OpenAI does (404, model_not_found).
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model {} does not exist; this server serves {:?}",
                    Excerpt(model),
                    self.model_name
                ),
            )
            .with_code("model_not_found"))
        }
    }
}

/// The public API. The generation routes (and `/metrics` and
/// `/v1/experts/stats` unless `observability_apart`, when they are served by
/// [`observability_app`] on their own address) need an API key when the
/// server has any; `/health` stays open for probes.
pub fn app(state: Arc<HttpState>, observability_apart: bool) -> Router {
    let mut keyed = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize));
    if !observability_apart {
        keyed = keyed.merge(observability_routes());
    }
    let keyed = keyed.route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(keyed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

/// `/metrics`, `/v1/experts/stats` and `/health` on an address of their own
/// (`--metrics-listen`), without a key: for a scraper inside the cluster.
pub fn observability_app(state: Arc<HttpState>) -> Router {
    observability_routes()
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state)
}

fn observability_routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/v1/experts/stats", get(expert_stats))
}

/// Refuses a request without one of the server's API keys: 401 with an
/// OpenAI-style body and `WWW-Authenticate: Bearer`.
async fn require_key(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if state.api_keys.allows(authorization) {
        return next.run(request).await;
    }
    ApiError::unauthorized(api_keys::REFUSED, "invalid_api_key")
}

async fn models(State(state): State<Arc<HttpState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "tramontane",
            max_model_len: state.generator.max_positions(),
        }],
    })
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    match state.readiness.state() {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why.message()).into_response(),
    }
}

#[derive(serde::Serialize)]
struct ExpertStatsBody {
    model: String,
    /// Worker addresses, by index (the `worker` of the load figures).
    worker_addrs: Vec<String>,
    /// Per worker: live (answering) and in the pool (not removed).
    worker_up: Vec<bool>,
    worker_in_pool: Vec<bool>,
    /// Who holds what now: `experts[layer][expert]` lists its workers.
    placement_epoch: u64,
    placement: Vec<Vec<Vec<usize>>>,
    #[serde(flatten)]
    stats: ExpertStats,
}

async fn expert_stats(State(state): State<Arc<HttpState>>) -> Json<ExpertStatsBody> {
    let workers = state.workers.all();
    let current = state.placement.current();
    Json(ExpertStatsBody {
        model: state.model_name.clone(),
        worker_addrs: workers.iter().map(|w| w.addr.clone()).collect(),
        worker_up: workers
            .iter()
            .map(|w| w.live.load(std::sync::atomic::Ordering::Relaxed))
            .collect(),
        worker_in_pool: workers
            .iter()
            .map(|w| !w.retired.load(std::sync::atomic::Ordering::Relaxed))
            .collect(),
        placement_epoch: current.epoch,
        placement: current.placement.experts.clone(),
        stats: state.expert_load.snapshot(),
    })
}

async fn render_metrics(State(state): State<Arc<HttpState>>) -> String {
    state.metrics.render()
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            Excerpt(request.method().as_str()),
            Excerpt(request.uri().path())
        ),
    )
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {} {}",
            Excerpt(request.method().as_str()),
            Excerpt(request.uri().path())
        ),
    )
}

/// Counts requests of the API routes by endpoint and status.
async fn count_requests(request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let response = next.run(request).await;
    if let Some(endpoint) = endpoint.filter(|e| e.starts_with("/v1/")) {
        ::metrics::counter!(
            metrics::REQUESTS_TOTAL,
            "endpoint" => endpoint,
            "status" => response.status().as_u16().to_string()
        )
        .increment(1);
    }
    response
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// What the choices of one request produce, merged.
enum ChoiceEvent {
    Chunk {
        index: usize,
        chunk: Chunk,
    },
    Failed(GenerationFailed),
    /// Every choice finished; the usage of all of them.
    Done(Usage),
}

/// The chunks of every choice as they come, then `Done` with the usage.
/// Dropping the stream cancels every choice.
fn merge_choices(streams: Vec<CompletionStream>) -> BoxStream<'static, ChoiceEvent> {
    struct Step {
        index: usize,
        chunk: Option<Result<Chunk, GenerationFailed>>,
        prompt_tokens: usize,
        completion_tokens: usize,
    }
    let choices = streams.into_iter().enumerate().map(|(index, stream)| {
        stream::unfold(Some(stream), move |stream| async move {
            let mut stream = stream?;
            let chunk = stream.next().await?;
            let finished = !matches!(chunk, Ok(Chunk { finish: None, .. }));
            let step = Step {
                index,
                prompt_tokens: stream.usage_prompt_tokens(),
                completion_tokens: stream.completion_tokens(),
                chunk: Some(chunk),
            };
            Some((step, (!finished).then_some(stream)))
        })
        .boxed()
    });
    let count = choices.len();
    let merged = stream::select_all(choices);
    stream::unfold(
        (merged, count, openai::empty_usage(), false),
        |(mut merged, mut left, mut usage, over)| async move {
            if over {
                return None;
            }
            if left == 0 {
                return Some((ChoiceEvent::Done(usage), (merged, 0, usage, true)));
            }
            let step = merged.next().await?;
            let event = match step.chunk.expect("set") {
                Err(failure) => {
                    return Some((ChoiceEvent::Failed(failure), (merged, 0, usage, true)));
                }
                Ok(chunk) => {
                    if chunk.finish.is_some() {
                        usage.add(step.prompt_tokens, step.completion_tokens);
                        left -= 1;
                    }
                    ChoiceEvent::Chunk {
                        index: step.index,
                        chunk,
                    }
                }
            };
            Some((event, (merged, left, usage, false)))
        },
    )
    .boxed()
}

/// The server-sent events of a streamed request: `head` first, then each
/// choice's chunks through `on_chunk` (a chunk with no text and no finish
/// reason is skipped unless `keep_empty`, e.g. when it carries logprobs;
/// one `on_chunk` answers None for is skipped), a
/// failure as an OpenAI error event, the usage through `on_usage` when
/// `include_usage`, and `data: [DONE]`.
pub fn sse_response<T, F, U>(
    streams: Vec<CompletionStream>,
    head: Option<T>,
    keep_empty: bool,
    include_usage: bool,
    mut on_chunk: F,
    mut on_usage: U,
) -> Response
where
    T: serde::Serialize,
    F: FnMut(usize, Chunk) -> Option<T> + Send + 'static,
    U: FnMut(Usage) -> T + Send + 'static,
{
    let head = head.map(|h| sse_json(&h));
    let events = merge_choices(streams).filter_map(move |event| {
        futures::future::ready(match event {
            ChoiceEvent::Chunk { index, chunk } => {
                (keep_empty || !chunk.text.is_empty() || chunk.finish.is_some())
                    .then(|| on_chunk(index, chunk))
                    .flatten()
                    .map(|event| sse_json(&event))
            }
            ChoiceEvent::Failed(failure) => {
                Some(axum::response::sse::Event::default().data(ApiError::from(failure).body()))
            }
            ChoiceEvent::Done(usage) => include_usage.then(|| sse_json(&on_usage(usage))),
        })
    });
    let done = axum::response::sse::Event::default().data("[DONE]");
    let events = stream::iter(head)
        .chain(events)
        .chain(stream::once(futures::future::ready(done)))
        .map(Ok::<_, std::convert::Infallible>);
    axum::response::sse::Sse::new(events).into_response()
}

/// A server-sent event carrying `value` as JSON.
fn sse_json<T: serde::Serialize>(value: &T) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .data(serde_json::to_string(value).expect("response types serialize"))
}
