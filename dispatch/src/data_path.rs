//! The data path's runtime: the connections that carry Forwards, driven by
//! the engine thread itself.

use std::sync::{Mutex, PoisonError};

use tokio::runtime::Runtime;
use tonic::transport::Channel;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;

use crate::workers::WorkerLink;

/// The data path's own connections to the workers, on a single-threaded
/// runtime that the engine thread drives itself while it waits for a layer:
/// sending a Forward and reading its answer hand nothing to another thread
/// (each hand-off costs a thread wake-up, tens of µs on a busy host). While
/// no layer is in flight the connections sit idle; probes use the links'
/// own clients on the server's runtime.
pub(crate) struct DataPath {
    /// Always Some until drop.
    runtime: Option<Runtime>,
    /// By worker index; made at a worker's first Forward.
    clients: Mutex<Vec<Option<ExpertServiceClient<Channel>>>>,
}

impl DataPath {
    pub(crate) fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
            clients: Mutex::default(),
        })
    }

    /// The data path's client of worker `index` (`link`).
    pub(crate) fn client(&self, index: usize, link: &WorkerLink) -> ExpertServiceClient<Channel> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if clients.len() <= index {
            clients.resize(index + 1, None);
        }
        clients[index]
            .get_or_insert_with(|| {
                let _entered = self.runtime().enter();
                crate::cluster::client(&link.endpoint, link.max_message_bytes)
            })
            .clone()
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime().block_on(future)
    }

    /// Starts `task`; it runs whenever the engine thread drives the runtime.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(task)
    }

    /// Runs the runtime until what was just spawned has been written out:
    /// a few turns (the call, tonic's buffer task, the HTTP/2 connection's
    /// task each take one; a turn with nothing to do costs about a µs).
    pub(crate) fn push_out(&self) {
        const TURNS: usize = 4;
        self.block_on(async {
            for _ in 0..TURNS {
                tokio::task::yield_now().await;
            }
        });
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        // Also safe where the experts are dropped inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
