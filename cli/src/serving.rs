//! What `router` and `serve` both do once the router's options are known:
//! start it, bind its listeners, print where it listens (the lines `serve`'s
//! callers and the tests read on stdout), serve until Ctrl-C / SIGTERM.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tramontane_router::{Router, RouterOptions};

/// The first line the router prints on stdout; the gRPC address follows.
pub const GRPC_LISTENING: &str = "tramontane router listening on ";
/// The second line; the HTTP address follows.
pub const HTTP_LISTENING: &str = "tramontane http listening on ";

/// Starts a router and serves it until Ctrl-C / SIGTERM. `on_listening`
/// gets the gRPC and HTTP addresses once bound.
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
    println!("{GRPC_LISTENING}{grpc_addr}");
    println!("{HTTP_LISTENING}{http_addr}");
    tracing::info!(
        "serving `{}` (chat template: {}): OpenAI API at http://{http_addr}/v1, metrics at http://{http_addr}/metrics, moe.v1.Generation at {grpc_addr}",
        router.model_name(),
        router.chat_template_source()
    );
    tramontane_router::serve(grpc, http, router, crate::signals::shutdown())
        .await
        .context("serving")
}
