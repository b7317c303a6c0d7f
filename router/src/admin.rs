//! The admin listener (`--admin-listen`): the expert pool's own surface,
//! behind its own key (`--admin-key`; the API keys do not open it).
//! `GET /admin/placement` answers the router's view of who holds what, in
//! the placement file's format, with its epoch; `POST /admin/rebalance`
//! rebalances the experts over their recent load now; `POST /admin/workers`
//! adds a worker (`{"address": "HOST:PORT"}`) with what it holds, and
//! `DELETE /admin/workers/{index}` takes one out once its experts are
//! elsewhere.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use tramontane_dispatch::pool::{ExpertPool, Joined, Left, PoolError, Rebalanced};

use crate::api_keys::ApiKeys;
use crate::http::ApiError;

/// What the admin routes share.
pub struct AdminState {
    pub pool: Arc<ExpertPool>,
    /// The admin key (one); never open.
    pub key: ApiKeys,
}

/// `GET /admin/placement`'s answer: the placement file's fields and the
/// epoch of this view.
#[derive(Debug, Serialize)]
pub struct PlacementAnswer {
    pub epoch: u64,
    pub workers: usize,
    /// `experts[layer][expert]`: the workers holding it.
    pub experts: Vec<Vec<Vec<usize>>>,
}

pub fn app(state: Arc<AdminState>) -> axum::Router {
    axum::Router::new()
        .route("/admin/placement", get(placement))
        .route("/admin/rebalance", post(rebalance))
        .route("/admin/workers", post(add_worker))
        .route("/admin/workers/{index}", delete(remove_worker))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ))
        .with_state(state)
}

async fn placement(State(state): State<Arc<AdminState>>) -> Json<PlacementAnswer> {
    let current = state.pool.view().current();
    Json(PlacementAnswer {
        epoch: current.epoch,
        workers: current.placement.workers,
        experts: current.placement.experts.clone(),
    })
}

async fn rebalance(State(state): State<Arc<AdminState>>) -> Result<Json<Rebalanced>, Response> {
    state.pool.rebalance().await.map(Json).map_err(pool_error)
}

/// `POST /admin/workers`' body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddWorker {
    /// `HOST:PORT` of its expert service.
    pub address: String,
}

async fn add_worker(
    State(state): State<Arc<AdminState>>,
    body: Result<Json<AddWorker>, JsonRejection>,
) -> Result<Json<Joined>, Response> {
    let Json(body) = body.map_err(|rejection| {
        ApiError::invalid(
            "address",
            format!(
                "the body must be {{\"address\": \"HOST:PORT\"}}: {}",
                rejection.body_text()
            ),
        )
        .into_response()
    })?;
    if body.address.is_empty() || body.address.parse::<axum::http::uri::Authority>().is_err() {
        return Err(ApiError::invalid(
            "address",
            format!("{:?} is not a HOST:PORT address", body.address),
        )
        .into_response());
    }
    state
        .pool
        .add(&body.address)
        .await
        .map(Json)
        .map_err(pool_error)
}

async fn remove_worker(
    State(state): State<Arc<AdminState>>,
    Path(index): Path<String>,
) -> Result<Json<Left>, Response> {
    let index: usize = index.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{index:?} is not a worker index"),
        )
        .into_response()
    })?;
    state.pool.remove(index).await.map(Json).map_err(pool_error)
}

/// A change of the pool that could not be made: 404 for an unknown
/// worker; 409 where the pool's state forbids it (a pair with nowhere to
/// go, a worker already in or out, another model, a worker's memory full); 503 while a worker it
/// needs is down; 502 when a worker refused or did not answer.
fn pool_error(error: PoolError) -> Response {
    let (status, code) = match &error {
        PoolError::UnknownWorker { .. } => (StatusCode::NOT_FOUND, "unknown_worker"),
        PoolError::Stranded(_) => (StatusCode::CONFLICT, "expert_stranded"),
        PoolError::NotInPool { .. } => (StatusCode::CONFLICT, "not_in_pool"),
        PoolError::AlreadyInPool { .. } => (StatusCode::CONFLICT, "already_in_pool"),
        PoolError::ModelMismatch { .. } => (StatusCode::CONFLICT, "model_mismatch"),
        PoolError::Address(_) => (StatusCode::BAD_REQUEST, "invalid_address"),
        PoolError::WorkerDown { .. } => (StatusCode::SERVICE_UNAVAILABLE, "worker_down"),
        PoolError::Load {
            code: tonic::Code::ResourceExhausted,
            ..
        } => (StatusCode::CONFLICT, "worker_memory_full"),
        PoolError::Load { .. } | PoolError::Unreachable { .. } => {
            (StatusCode::BAD_GATEWAY, "worker_refused")
        }
        PoolError::Plan(_) => (StatusCode::INTERNAL_SERVER_ERROR, "plan_failed"),
    };
    ApiError::new(status, tramontane_infra::error::chain(&error))
        .with_code(code)
        .into_response()
}

/// Refuses a request without the admin key: 401 with an OpenAI-style
/// body and `WWW-Authenticate: Bearer`.
async fn require_admin_key(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !state.key.is_open() && state.key.allows(authorization) {
        return next.run(request).await;
    }
    ApiError::unauthorized(
        "the admin API needs the admin key (Authorization: Bearer KEY)",
        "invalid_admin_key",
    )
}
