//! The workers a router knows, by index. Indexes are never reused: a
//! worker added while serving gets the next one, a removed worker keeps
//! its own (retired: in no placement) and takes it back when it rejoins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;

use crate::cluster::ClusterError;

/// How soon the router notices a worker whose host vanished without a
/// reset: an HTTP/2 PING every interval, on idle connections too, which
/// must be answered within the timeout, or the connection is closed (the
/// next call reconnects, resolving the worker's name again: a pod
/// rescheduled elsewhere). Without it, the probes' unacknowledged data
/// keeps a dead connection for the kernel's retransmission timeout, about
/// 15 minutes. TCP keepalive, at the same interval, covers the rest.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker as the router sees it. `client` is for probes and admin calls
/// and runs on the runtime that connected; the data path makes its own
/// clients from `endpoint` (see [`crate::data_path::DataPath`]).
pub struct WorkerLink {
    pub addr: String,
    pub client: ExpertServiceClient<Channel>,
    pub endpoint: Endpoint,
    pub max_message_bytes: usize,
    /// It answers (probes) and its Forwards succeed.
    pub live: AtomicBool,
    /// Taken out of the pool (removed, or its experts healed onto others):
    /// no placement lists it.
    pub retired: AtomicBool,
}

impl WorkerLink {
    /// A link to the worker at `addr` (over TLS with `tls`); it connects on
    /// first use, on the runtime it is used on. Down until checked.
    pub fn new(
        addr: &str,
        max_message_bytes: usize,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, ClusterError> {
        let bad = |e: tonic::transport::Error| ClusterError::Address {
            addr: addr.to_string(),
            reason: tramontane_infra::error::chain(&e),
        };
        let uri = match tls {
            Some(_) => tramontane_infra::grpc::tls_uri(addr),
            None => tramontane_infra::grpc::uri(addr),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
        }
        Ok(Self {
            addr: addr.to_string(),
            client: crate::cluster::client(&endpoint, max_message_bytes),
            endpoint,
            max_message_bytes,
            live: false.into(),
            retired: false.into(),
        })
    }

    /// Live and in the pool: a worker work may be planned on.
    pub fn serves(&self) -> bool {
        self.live.load(Ordering::Relaxed) && !self.retired.load(Ordering::Relaxed)
    }
}

/// The workers, in index order; grows as workers are added.
pub struct Workers {
    links: RwLock<Arc<Vec<Arc<WorkerLink>>>>,
}

impl Workers {
    pub fn new(links: Vec<WorkerLink>) -> Self {
        Self {
            links: RwLock::new(Arc::new(links.into_iter().map(Arc::new).collect())),
        }
    }

    /// Every worker now, by index.
    pub fn all(&self) -> Arc<Vec<Arc<WorkerLink>>> {
        self.links
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn get(&self, index: usize) -> Option<Arc<WorkerLink>> {
        self.all().get(index).cloned()
    }

    pub fn len(&self) -> usize {
        self.all().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Worker `index` as errors name it (its address empty when unknown).
    pub fn worker_ref(&self, index: usize) -> crate::error::WorkerRef {
        crate::error::WorkerRef {
            index,
            addr: self.get(index).map_or_else(String::new, |w| w.addr.clone()),
        }
    }

    /// The worker's address, by index.
    pub fn addrs(&self) -> Vec<String> {
        self.all().iter().map(|w| w.addr.clone()).collect()
    }

    /// Adds `link` as the next worker; its index.
    pub(crate) fn push(&self, link: Arc<WorkerLink>) -> usize {
        let mut links = self.links.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = links.as_ref().clone();
        next.push(link);
        *links = Arc::new(next);
        links.len() - 1
    }
}
