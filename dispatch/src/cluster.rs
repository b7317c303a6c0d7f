//! The router's view of its workers: connect, check that every worker serves
//! the same model and that the placement is covered, then keep probing so a
//! failed worker comes back (with backoff) and readiness follows liveness.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tramontane_config::ConfigError;
use tramontane_policy::placement::Placement;
use tramontane_proto::v1::InfoRequest;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;

use crate::placement_view::PlacementView;
use crate::workers::{WorkerLink, Workers};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("worker address {addr:?} is invalid: {reason}")]
    Address { addr: String, reason: String },
    #[error("worker {index} at {addr} did not answer Info within {waited:?}: {reason}")]
    Unreachable {
        index: usize,
        addr: String,
        waited: Duration,
        reason: String,
    },
    #[error("worker {index} at {addr} serves model {theirs}, the router serves {ours}")]
    ModelMismatch {
        index: usize,
        addr: String,
        ours: String,
        theirs: String,
    },
    #[error("placement names {placement} workers but {given} worker addresses were given")]
    WorkerCount { placement: usize, given: usize },
    #[error("cannot start the data path's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("layer {layer} expert {expert} has no worker: {detail}")]
    Uncovered {
        layer: usize,
        expert: usize,
        detail: String,
    },
}

/// Asks worker `index` for its Info until it answers or `wait` runs out.
async fn info_with_retry(
    index: usize,
    link: &WorkerLink,
    wait: Duration,
) -> Result<tramontane_proto::v1::InfoResponse, ClusterError> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        let mut client = link.client.clone();
        let reason =
            match tokio::time::timeout(Duration::from_secs(2), client.info(InfoRequest {})).await {
                Ok(Ok(info)) => return Ok(info.into_inner()),
                Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                Err(_) => "timed out".to_string(),
            };
        if start.elapsed() >= wait {
            return Err(ClusterError::Unreachable {
                index,
                addr: link.addr.clone(),
                waited: wait,
                reason,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// A client of `endpoint` that connects on first use, on the runtime it is
/// made in.
pub fn client(endpoint: &Endpoint, max_message_bytes: usize) -> ExpertServiceClient<Channel> {
    ExpertServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// How long start-up waits for the other workers once those that answered
/// cover the placement.
pub const STRAGGLERS: Duration = Duration::from_secs(3);

/// Connects to the workers and checks their model and what they hold;
/// returns once those that answered cover the placement and the others
/// have answered too or had [`STRAGGLERS`] more.
pub async fn connect(
    addrs: &[String],
    model_id: &str,
    placement: &Placement,
    wait: Duration,
    max_message_bytes: usize,
    tls: Option<&ClientTlsConfig>,
) -> Result<Arc<Workers>, ClusterError> {
    if placement.workers != addrs.len() {
        return Err(ClusterError::WorkerCount {
            placement: placement.workers,
            given: addrs.len(),
        });
    }
    let links = addrs
        .iter()
        .map(|addr| WorkerLink::new(addr, max_message_bytes, tls))
        .collect::<Result<Vec<_>, _>>()?;
    // Every worker is asked at once; the router starts as soon as the
    // workers that answered cover the placement (the others join when they
    // answer: the monitor probes them).
    let mut asking: futures::stream::FuturesUnordered<_> = links
        .iter()
        .enumerate()
        .map(|(i, link)| async move { (i, info_with_retry(i, link, wait).await) })
        .collect();
    let mut answered = vec![false; links.len()];
    let mut unreachable = None;
    // Once covered, the others get a little longer: workers started
    // together answer within it, and start-up does not wait on one down.
    let mut covered_at: Option<tokio::time::Instant> = None;
    loop {
        let next = futures::StreamExt::next(&mut asking);
        let answer = match covered_at {
            None => next.await,
            Some(at) => match tokio::time::timeout_at(at + STRAGGLERS, next).await {
                Ok(answer) => answer,
                Err(_) => break,
            },
        };
        let Some((index, info)) = answer else { break };
        let info = match info {
            Ok(info) => info,
            Err(error) => {
                unreachable.get_or_insert(error);
                continue;
            }
        };
        let link = &links[index];
        if info.model_id != model_id {
            return Err(ClusterError::ModelMismatch {
                index,
                addr: link.addr.clone(),
                ours: model_id.to_string(),
                theirs: info.model_id.clone(),
            });
        }
        check_holds(placement, index, link, &info)?;
        link.live.store(true, Ordering::Relaxed);
        answered[index] = true;
        let answered_by = |w: usize| answered.get(w).copied().unwrap_or(false);
        if covered_at.is_none() && placement.uncovered(answered_by).is_none() {
            covered_at = Some(tokio::time::Instant::now());
        }
    }
    drop(asking);
    if let Some((layer, expert)) = placement.uncovered(|w| answered[w]) {
        return Err(unreachable.unwrap_or(ClusterError::Uncovered {
            layer,
            expert,
            detail: "no worker placed on it answered".into(),
        }));
    }
    let waiting: Vec<&str> = links
        .iter()
        .zip(&answered)
        .filter(|(_, answered)| !**answered)
        .map(|(link, _)| link.addr.as_str())
        .collect();
    if !waiting.is_empty() {
        tracing::info!(
            ?waiting,
            "every expert has a live worker: serving; the other workers join when they answer"
        );
    }
    Ok(Arc::new(Workers::new(links)))
}

/// Worker `index` (`link`, answering `info`) holds what `placement` gives it.
fn check_holds(
    placement: &Placement,
    index: usize,
    link: &WorkerLink,
    info: &tramontane_proto::v1::InfoResponse,
) -> Result<(), ClusterError> {
    for (layer, row) in placement.experts.iter().enumerate() {
        for (expert, replicas) in row.iter().enumerate() {
            let holds = || {
                info.held
                    .iter()
                    .any(|h| h.layer as usize == layer && h.experts.contains(&(expert as u32)))
            };
            if replicas.contains(&index) && !holds() {
                return Err(ClusterError::Uncovered {
                    layer,
                    expert,
                    detail: format!(
                        "it is placed on worker {index} at {}, which does not hold it (start that worker with --experts including {expert}, or with --placement of this placement file)",
                        link.addr
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Whether every (layer, expert) has a live replica in the pool.
pub fn all_covered(workers: &[Arc<WorkerLink>], placement: &Placement) -> bool {
    placement
        .uncovered(|w| workers.get(w).is_some_and(|w| w.serves()))
        .is_none()
}

/// What the monitor saw change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The worker stopped answering (or a Forward to it failed).
    Down(usize),
    /// It answers again, with the right model.
    Up(usize),
}

/// Probes every worker (those added later too) forever: a worker that
/// answers Info with the right model is live, one that does not is down;
/// a down worker is probed with exponential backoff. `on_change` gets the
/// new readiness (every expert of the placement in effect has a live
/// worker in the pool) when it changes; `events` gets each worker going
/// down or coming up.
pub async fn monitor(
    workers: Arc<Workers>,
    model_id: String,
    placement: PlacementView,
    on_change: impl Fn(bool),
    events: Option<tokio::sync::mpsc::UnboundedSender<WorkerEvent>>,
) {
    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);
    let mut backoff = Vec::new();
    let mut next_probe = Vec::new();
    // What the monitor last reported of each worker.
    let mut seen: Vec<bool> = Vec::new();
    let mut ready = all_covered(&workers.all(), &placement.current().placement);
    on_change(ready);
    loop {
        tokio::time::sleep(BASE).await;
        let now = tokio::time::Instant::now();
        let links = workers.all();
        for (i, link) in links.iter().enumerate().skip(seen.len()) {
            backoff.push(BASE);
            next_probe.push(now);
            seen.push(link.live.load(Ordering::Relaxed));
            debug_assert_eq!(seen.len(), i + 1);
        }
        for (i, link) in links.iter().enumerate() {
            // A Forward that failed marks its worker down between probes.
            let failed = seen[i] && !link.live.load(Ordering::Relaxed);
            if now < next_probe[i] && !failed {
                continue;
            }
            let mut client = link.client.clone();
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(1), client.info(InfoRequest {})).await,
                Ok(Ok(ref info)) if info.get_ref().model_id == model_id
            );
            link.live.store(ok, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::WORKER_UP, "worker" => i.to_string()).set(if ok {
                1.0
            } else {
                0.0
            });
            if ok {
                backoff[i] = BASE;
                next_probe[i] = now + Duration::from_millis(500);
            } else {
                next_probe[i] = now + backoff[i];
                backoff[i] = (backoff[i] * 2).min(MAX);
            }
            if ok != seen[i] {
                seen[i] = ok;
                if ok {
                    tracing::info!(worker = i, addr = %link.addr, "worker is live");
                } else {
                    tracing::warn!(worker = i, addr = %link.addr, "worker is down");
                }
                if let Some(events) = &events {
                    let _ = events.send(if ok {
                        WorkerEvent::Up(i)
                    } else {
                        WorkerEvent::Down(i)
                    });
                }
            }
        }
        let now_ready = all_covered(&links, &placement.current().placement);
        if now_ready != ready {
            ready = now_ready;
            on_change(ready);
        }
    }
}
