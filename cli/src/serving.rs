//! What `router` and `serve` both do once the router's options are known:
//! start it, bind its listeners, print where it listens (the lines `serve`'s
//! callers and the tests read on stdout), serve until Ctrl-C / SIGTERM.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tramontane_router::api_keys::ApiKeys;
use tramontane_router::{Listeners, Router, RouterOptions};

use crate::connections::RouterConnectionArgs;

/// The first line the router prints on stdout; the gRPC address follows.
pub const GRPC_LISTENING: &str = "tramontane router listening on ";
/// The second line; the HTTP address follows.
pub const HTTP_LISTENING: &str = "tramontane http listening on ";
/// The third line, with --metrics-listen; the observability address follows.
pub const METRICS_LISTENING: &str = "tramontane metrics listening on ";
/// The last line, with --admin-listen; the admin API's address follows.
pub const ADMIN_LISTENING: &str = "tramontane admin listening on ";

/// Where the router listens: gRPC, the HTTP API, and the observability
/// routes when they have an address of their own.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// The admin API, behind its key.
    pub admin: Option<(SocketAddr, ApiKeys)>,
}

impl Addresses {
    /// Where `/metrics` is served.
    pub fn metrics_or_http(&self) -> SocketAddr {
        self.metrics.unwrap_or(self.http)
    }
}

/// Starts a router and serves it until Ctrl-C / SIGTERM. `on_listening`
/// gets the bound addresses.
pub async fn start_and_serve(
    options: RouterOptions,
    listen: Addresses,
    connections: &RouterConnectionArgs,
    on_listening: impl FnOnce(Addresses) -> Result<()>,
) -> Result<()> {
    let scheme = if options.tls.as_ref().is_some_and(|t| t.has_identity()) {
        "https"
    } else {
        "http"
    };
    let limits = connections
        .limits(1 + usize::from(listen.metrics.is_some()) + usize::from(listen.admin.is_some()));
    let router = Router::start(options).await?;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    };
    let grpc = bind(listen.grpc).await?;
    let http = bind(listen.http).await?;
    let observability = match listen.metrics {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin = match &listen.admin {
        Some((addr, key)) => Some((bind(*addr).await?, key.clone())),
        None => None,
    };
    let bound = Addresses {
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        metrics: observability.as_ref().map(|l| l.local_addr()).transpose()?,
        admin: admin
            .as_ref()
            .map(|(l, key)| l.local_addr().map(|addr| (addr, key.clone())))
            .transpose()?,
    };
    on_listening(bound.clone())?;
    println!("{GRPC_LISTENING}{}", bound.grpc);
    println!("{HTTP_LISTENING}{}", bound.http);
    if let Some(metrics) = bound.metrics {
        println!("{METRICS_LISTENING}{metrics}");
    }
    if let Some((admin, _)) = &bound.admin {
        println!("{ADMIN_LISTENING}{admin}");
    }
    tracing::info!(
        "serving `{}` (chat template: {}): OpenAI API at {scheme}://{}/v1, metrics at {scheme}://{}/metrics, moe.v1.Generation at {}",
        router.model_name(),
        router.chat_template_source(),
        bound.http,
        bound.metrics_or_http(),
        bound.grpc,
    );
    let listeners = Listeners {
        grpc,
        http,
        observability,
        admin,
        http_limits: limits.http,
        grpc_limits: limits.grpc,
    };
    tramontane_router::serve(listeners, router, crate::signals::shutdown())
        .await
        .context("serving")
}
