//! The admin listener (`--admin-listen`): the expert pool's own surface,
//! behind its own key (`--admin-key`; the API keys do not open it).
//! `GET /admin/placement` answers the router's view of who holds what, in
//! the placement file's format, with its epoch; `POST /admin/rebalance`
//! rebalances the experts over their recent load now.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Serialize;
use tramontane_dispatch::pool::{ExpertPool, PoolError, Rebalanced};

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

/// A change of the pool that could not be made: 503 while a worker it
/// needs is down, 502 when a worker refused, 500 otherwise.
fn pool_error(error: PoolError) -> Response {
    let status = match &error {
        PoolError::WorkerDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
        PoolError::Load { .. } => StatusCode::BAD_GATEWAY,
        PoolError::Plan(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, tramontane_infra::error::chain(&error)).into_response()
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
