//! # tramontane-expert-worker
//!
//! The expert service of one worker process: it loads only the experts placed
//! on it (from an HF checkpoint), keeps them on one device, and computes, for
//! each `Forward`, the weighted sum of its experts' outputs per token row.
//!
//! # Layout
//!
//! - What a worker holds is [`tramontane_policy::held_experts`]'s.
//! - [`compute`]: the dedicated thread that owns the expert tensors.
//! - [`service`]: the gRPC `moe.v1.ExpertService`: validation, then compute.
//! - [`metrics`]: Prometheus metrics, `GET /metrics` on the gRPC port.
//! - [`serve`]: the server entry point, on a given listener with a shutdown future.

pub mod compute;
pub mod metrics;
pub mod service;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tramontane_proto::v1::expert_service_server::ExpertServiceServer;

pub use compute::{ComputeHandle, StartError, WorkerInfo, WorkerModel};
pub use service::ExpertServer;

/// Serves `server` (and grpc.health.v1, and `GET /metrics`) on `listener`
/// until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    server: ExpertServer,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ExpertServiceServer<ExpertServer>>()
        .await;
    let weight_bytes = server.weight_bytes();
    let service = ExpertServiceServer::new(server)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let prometheus = metrics::install();
    ::metrics::gauge!(metrics::MEMORY_BYTES, "kind" => "weights").set(weight_bytes as f64);
    // Prometheus scrapes over HTTP/1.1 on the gRPC port.
    let scrape = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let prometheus = prometheus.clone();
            async move {
                ::metrics::gauge!(metrics::MEMORY_BYTES, "kind" => "rss")
                    .set(tramontane_infra::metrics::rss_bytes() as f64);
                prometheus.render()
            }
        }),
    );
    let routes = Routes::from(scrape)
        .add_service(health)
        .add_service(service);
    Server::builder()
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// The name health checks use for the expert service.
pub fn service_name() -> &'static str {
    <ExpertServiceServer<ExpertServer> as tonic::server::NamedService>::NAME
}
