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
//! - [`payload`]: payloads ↔ tensors (the wire's codec is host-only).
//! - [`metrics`]: Prometheus metrics, `GET /metrics` on the gRPC port.
//! - [`serve`]: the server entry point, on a given listener with a shutdown future.

#![forbid(unsafe_code)]

pub mod compute;
pub mod metrics;
pub mod payload;
pub mod service;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tramontane_infra::connections::{Limits, Server};
use tramontane_infra::tls::Tls;
use tramontane_proto::v1::expert_service_server::ExpertServiceServer;

pub use compute::{ComputeHandle, StartError, WorkerInfo, WorkerModel};
pub use service::ExpertServer;

/// Serves `server` (and grpc.health.v1, and `GET /metrics`) on `listener`,
/// over TLS with `tls` (with its CA, only to clients that present a
/// certificate the CA signed), and `GET /metrics` alone on
/// `metrics_listener` where there is one (over TLS with `tls`'s
/// certificate, to any client: scrapers need no key of the cluster's),
/// each connection held to `limits`, until
/// `shutdown` completes, or until the compute thread stops: health
/// then says NOT_SERVING, `Info` fails, and this returns
/// [`ServeError::ComputeStopped`] so that the process exits with an error,
/// for its supervisor to restart it.
pub async fn serve(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    server: ExpertServer,
    max_message_bytes: usize,
    tls: Option<&Tls>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ExpertServiceServer<ExpertServer>>()
        .await;
    let weight_dtypes = server.weight_dtypes().to_vec();
    let compute = server.compute().clone();
    let service = ExpertServiceServer::new(server)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let prometheus = metrics::install();
    for (dtype, bytes) in weight_dtypes {
        ::metrics::gauge!(metrics::MEMORY_BYTES, "kind" => "weights", "dtype" => dtype)
            .set(bytes as f64);
    }
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
    let routes = Routes::from(scrape.clone())
        .add_service(health)
        .add_service(service);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ending = tokio::spawn(async move {
        let compute_failed = until_end(&compute, &reporter, shutdown).await;
        let _ = stop_tx.send(true);
        compute_failed
    });
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|&stop| stop).await;
    };
    let metrics_server = match metrics_listener {
        Some(listener) => Some(
            Server::new("worker-metrics", limits)
                .tls(tls.map(Tls::https_server).transpose()?)
                .serve(listener, scrape, stopped(stop_rx.clone())),
        ),
        None => None,
    };
    let grpc_server = Server::new("worker", limits)
        .tls(tls.map(Tls::server).transpose()?)
        .serve(listener, routes.prepare(), stopped(stop_rx));
    let metrics_served = async {
        match metrics_server {
            Some(server) => server.await,
            None => Ok(()),
        }
    };
    tokio::try_join!(grpc_server, metrics_served)?;
    match ending.await {
        Ok(false) => Ok(()),
        _ => Err(ServeError::ComputeStopped),
    }
}

/// Completes on `shutdown`, or when the compute thread stops: health is
/// then NOT_SERVING (the server's and the expert service's) and the result
/// is true.
pub async fn until_end(
    compute: &ComputeHandle,
    reporter: &tonic_health::server::HealthReporter,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let compute_failed = tokio::select! {
        _ = shutdown => false,
        _ = compute.stopped() => true,
    };
    if compute_failed {
        tracing::error!("the compute thread stopped: the worker stops");
        reporter
            .set_not_serving::<ExpertServiceServer<ExpertServer>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
    compute_failed
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server")]
    Io(#[from] std::io::Error),
    #[error("the compute thread stopped; the worker stops so that it can be restarted")]
    ComputeStopped,
    #[error("TLS")]
    Tls(#[from] tramontane_infra::tls::TlsError),
}

/// The name health checks use for the expert service.
pub fn service_name() -> &'static str {
    <ExpertServiceServer<ExpertServer> as tonic::server::NamedService>::NAME
}

#[cfg(test)]
mod tests {
    //! A worker whose compute thread dies says so and stops: health
    //! NOT_SERVING, `Info` UNAVAILABLE (no router takes it back), and the
    //! serving ends with an error.

    use tch::Tensor;
    use tonic::Request;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::{HealthReporter, HealthService};
    use tramontane_model::LoadOptions;
    use tramontane_policy::held_experts::HeldExperts;
    use tramontane_proto::v1::InfoRequest;
    use tramontane_proto::v1::expert_service_server::ExpertService;

    use super::*;
    use crate::compute::ComputeError;

    #[tokio::test]
    async fn a_dead_compute_thread_turns_health_down_fails_info_and_ends_serving() {
        let dir = tempfile::tempdir().unwrap();
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default()).unwrap();
        let model = WorkerModel {
            dir: dir.path().to_path_buf(),
            held: HeldExperts::Uniform {
                experts: (0..8).collect(),
                layers: None,
            },
            options: LoadOptions::default(),
        };
        let (compute, info) = ComputeHandle::spawn(model, 8).unwrap();
        let server = ExpertServer::new(compute.clone(), info);
        assert!(server.info(Request::new(InfoRequest {})).await.is_ok());
        let reporter = HealthReporter::new();
        reporter
            .set_serving::<ExpertServiceServer<ExpertServer>>()
            .await;
        let health = HealthService::from_health_reporter(reporter.clone());

        // A bug on the compute thread: a job whose tensor is undefined
        // panics there (the service never builds one; this stands for any
        // panic on that thread).
        let failed = compute.forward(0, Tensor::new(), vec![]).await;
        assert!(matches!(failed, Err(ComputeError::Stopped)));
        assert!(until_end(&compute, &reporter, std::future::pending()).await);
        assert!(!compute.is_running());
        for service in ["", service_name()] {
            let status = health
                .check(Request::new(HealthCheckRequest {
                    service: service.into(),
                }))
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::NotServing as i32, "{service:?}");
        }
        let refused = server.info(Request::new(InfoRequest {})).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
    }
}
