//! The admin listener (`--admin-listen`): the expert pool's own surface,
//! behind its own key (`--admin-key`; the API keys do not open it).
//! `GET /admin/placement` answers the router's view of who holds what, in
//! the placement file's format, with its epoch.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use serde::Serialize;
use tramontane_dispatch::placement_view::PlacementView;

use crate::api_keys::ApiKeys;
use crate::http::ApiError;

/// What the admin routes share.
pub struct AdminState {
    pub placement: PlacementView,
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
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ))
        .with_state(state)
}

async fn placement(State(state): State<Arc<AdminState>>) -> Json<PlacementAnswer> {
    let current = state.placement.current();
    Json(PlacementAnswer {
        epoch: current.epoch,
        workers: current.placement.workers,
        experts: current.placement.experts.clone(),
    })
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
