//! Serving a started [`Router`]: the gRPC and HTTP listeners, health that
//! follows the workers, and the end (a drain on shutdown, at once when the
//! engine stops).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;
use tramontane_dispatch::cluster;
use tramontane_dispatch::pool::ExpertPool;
use tramontane_infra::connections::{Limits, Server};
use tramontane_infra::tls::Tls;
use tramontane_proto::v1::generation_server::GenerationServer as GenerationService;

use crate::admin::AdminState;
use crate::api_keys::{self, ApiKeys};
use crate::completion::Generator;
use crate::http::{self, HttpState};
use crate::readiness::Readiness;
use crate::service::GenerationServer;
use crate::start::Router;

/// Where a router listens.
pub struct Listeners {
    /// `moe.v1.Generation` and grpc.health.v1.
    pub grpc: TcpListener,
    /// The OpenAI-compatible API.
    pub http: TcpListener,
    /// `/metrics`, `/v1/experts/stats` and `/health` without a key; None:
    /// they are on `http`, behind the key.
    pub observability: Option<TcpListener>,
    /// The admin API, behind its own key; None: off.
    pub admin: Option<(TcpListener, ApiKeys)>,
    /// What each connection of the HTTP listeners (API and observability)
    /// is held to.
    pub http_limits: Limits,
    /// What each connection of the gRPC listener is held to.
    pub grpc_limits: Limits,
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
    let Router {
        generator,
        chat_template,
        model_name,
        expert_load,
        model_id,
        workers,
        pool,
        rebalance_interval,
        api_keys,
        readiness,
        health,
        drain_timeout,
        tls,
        config: _,
    } = router;
    let monitor_readiness = readiness.clone();
    let (events, worker_events) = tokio::sync::mpsc::unbounded_channel();
    let monitor = tokio::spawn(cluster::monitor(
        workers.clone(),
        model_id,
        pool.view().clone(),
        move |covered| monitor_readiness.set_experts_covered(covered),
        Some(events),
    ));
    let following = tokio::spawn(pool.clone().follow(worker_events));
    let (stop, ending) = Stop::on(until_end(
        generator.clone(),
        readiness.clone(),
        shutdown,
        drain_timeout,
    ));
    let state = Arc::new(HttpState {
        generator: generator.clone(),
        chat_template,
        model_name,
        created: http::unix_now(),
        readiness,
        metrics: crate::metrics::install(),
        expert_load,
        workers: workers.clone(),
        placement: pool.view().clone(),
        api_keys: api_keys.clone(),
    });
    // The public listeners are TLS when the router has a certificate.
    let public_tls = tls.as_ref().filter(|tls| tls.has_identity());
    let Listeners {
        grpc,
        http,
        observability,
        admin,
        http_limits,
        grpc_limits,
    } = listeners;
    let admin = admin.map(|(listener, key)| {
        let state = Arc::new(AdminState {
            pool: pool.clone(),
            key,
        });
        let https = public_tls.map(Tls::https_server).transpose();
        (listener, state, https)
    });
    let admin = match admin {
        Some((listener, state, https)) => {
            Some(Server::new("admin", http_limits).tls(https?).serve(
                listener,
                crate::admin::app(state),
                stop.wait(),
            ))
        }
        None => None,
    };
    let grpc = Server::new("grpc", grpc_limits)
        .tls(public_tls.map(Tls::https_server).transpose()?)
        .http2_only()
        .serve(grpc, grpc_routes(health, generator, api_keys), stop.wait());
    let http = http_servers(http, observability, http_limits, public_tls, state, &stop)?;
    let admin = async {
        match admin {
            Some(server) => server.await.map_err(ServeError::Http),
            None => Ok(()),
        }
    };
    let rebalancing = rebalance_interval.map(|every| tokio::spawn(rebalance_every(pool, every)));
    let result = tokio::try_join!(async { grpc.await.map_err(ServeError::Grpc) }, http, admin);
    monitor.abort();
    following.abort();
    if let Some(rebalancing) = rebalancing {
        rebalancing.abort();
    }
    result?;
    match ending.await {
        Ok(false) => Ok(()),
        _ => Err(ServeError::EngineStopped),
    }
}

/// When the listeners stop: once the serving ends (see [`until_end`]).
#[derive(Clone)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    /// Runs `end` (true when the engine stopped) and stops the listeners
    /// when it completes: a shutdown drains first (new requests are refused,
    /// health says so, those in flight finish), an engine that stops ends
    /// the serving at once, and the process with an error.
    fn on(end: impl Future<Output = bool> + Send + 'static) -> (Self, JoinHandle<bool>) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ending = tokio::spawn(async move {
            let engine_failed = end.await;
            let _ = stop_tx.send(true);
            engine_failed
        });
        (Self(stop_rx), ending)
    }

    /// Completes when the listeners stop.
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    }
}

/// The OpenAI-compatible API on `api`, and the observability routes on
/// their own listener or (without one) on `api` behind the keys, over TLS
/// with `tls`, until `stop`.
fn http_servers(
    api: TcpListener,
    observability: Option<TcpListener>,
    limits: Limits,
    tls: Option<&Tls>,
    state: Arc<HttpState>,
    stop: &Stop,
) -> Result<impl Future<Output = Result<(), ServeError>>, ServeError> {
    let https = tls.map(Tls::https_server).transpose()?;
    let server = |name| Server::new(name, limits).tls(https.clone());
    let observability_apart = observability.is_some();
    let observability_server = observability.map(|listener| {
        server("observability").serve(
            listener,
            http::observability_app(state.clone()),
            stop.wait(),
        )
    });
    let api_server = server("http").serve(api, http::app(state, observability_apart), stop.wait());
    Ok(async move {
        let observability = async {
            match observability_server {
                Some(server) => server.await,
                None => Ok(()),
            }
        };
        tokio::try_join!(api_server, observability)
            .map(|_| ())
            .map_err(ServeError::Http)
    })
}

/// grpc.health.v1 and `moe.v1.Generation` (behind `keys`).
fn grpc_routes(health: HealthServer<HealthService>, generator: Generator, keys: ApiKeys) -> Routes {
    let generation = GenerationService::new(GenerationServer::new(generator))
        .max_decoding_message_size(http::MAX_BODY_BYTES);
    let authorized = move |request: tonic::Request<()>| {
        let authorization = request.metadata().get("authorization");
        if keys.allows(authorization.map(|v| v.as_bytes())) {
            Ok(request)
        } else {
            Err(tonic::Status::unauthenticated(api_keys::REFUSED))
        }
    };
    Routes::new(health)
        .add_service(InterceptedService::new(generation, authorized))
        .prepare()
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
    Grpc(std::io::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("the engine thread stopped; the router stops so that it can be restarted")]
    EngineStopped,
    #[error("TLS of the public listeners")]
    Tls(#[from] tramontane_infra::tls::TlsError),
}

/// Rebalances the experts every `every` (`--rebalance-interval`).
async fn rebalance_every(pool: Arc<ExpertPool>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = pool.rebalance().await {
            tracing::warn!(error = %tramontane_infra::error::chain(&error), "rebalance failed: the placement in effect stays");
        }
    }
}

#[cfg(test)]
mod tests {
    //! How serving ends: a drain lets the requests in flight finish and
    //! refuses new ones; an engine thread that dies fails its requests with
    //! "engine stopped" (503 / UNAVAILABLE), and health says so.

    use super::*;
    use crate::completion::GenerationRequest;
    use crate::engine::EngineHandle;
    use crate::failure::GenerationError;
    use crate::readiness::NotReady;
    use crate::sampling::SamplingParams;
    use tramontane_model::testing::{TestExperts, dense_over};
    use tramontane_model::{ModelSpec, Tokenizer};
    use tramontane_policy::scheduler::SchedulerConfig;

    fn generator(dir: &std::path::Path, panicking: bool) -> (Generator, Arc<Readiness>) {
        tramontane_synthetic::write(dir, &tramontane_synthetic::Spec::default()).unwrap();
        let config = ModelSpec::from_file(&dir.join("config.json")).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_dir(dir).unwrap());
        let model_dir = dir.to_path_buf();
        // Experts whose computation panics, as a bug on the engine thread
        // would; or the in-process experts as they are.
        let build = move || {
            dense_over(&model_dir, tch::Kind::Float, |local| {
                TestExperts::new(local).hook(move |_, _, _| {
                    if panicking {
                        panic!("an expert computation panicked");
                    }
                    Ok::<_, std::convert::Infallible>(())
                })
            })
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
            prompt_logprobs: None,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: crate::text::StopList::default(),
            ignore_eos: true,
            operation: "generate",
            guide: None,
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
