//! The compute thread: it loads the worker's experts and owns their tensors
//! (tch tensors are Send, not Sync), with no_grad held, and serves jobs from a
//! bounded channel. tokio tasks only decode, validate and reply.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};
use tramontane_model::error::{ForwardError, LoadError};
use tramontane_model::moe::{ExpertRows, LocalExperts};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{LoadOptions, MixtralConfig};

use tramontane_policy::held_experts::HeldExperts;

/// What a worker loads.
#[derive(Debug, Clone)]
pub struct WorkerModel {
    pub dir: PathBuf,
    /// The (layer, expert) pairs held.
    pub held: HeldExperts,
    pub options: LoadOptions,
}

/// What a worker holds, as its Info RPC reports it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Hex SHA-256 of config.json.
    pub model_id: String,
    pub config: MixtralConfig,
    /// Per layer, the experts held (layers with none are left out).
    pub held: Vec<(usize, Vec<usize>)>,
    pub device: Device,
    pub kind: Kind,
    pub weight_bytes: u64,
}

/// One expert's share of a Forward: row indexes and their routing weights.
pub type WorkItem = ExpertRows;

struct Job {
    layer: usize,
    hidden: Tensor,
    work: Vec<WorkItem>,
    queued: Instant,
    reply: oneshot::Sender<Result<Computed, ForwardError>>,
}

/// A job's output and where its time went.
pub struct Computed {
    pub output: Tensor,
    /// From the job's send to the compute thread taking it.
    pub queued: Duration,
    /// The expert computation.
    pub compute: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("the compute thread has stopped")]
    Stopped,
    #[error("expert computation failed")]
    Failed(#[source] ForwardError),
}

/// Why the compute thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the compute thread")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the compute thread exited while loading the experts")]
    Exited,
}

/// Sends jobs to the compute thread. Cheap to clone.
#[derive(Clone)]
pub struct ComputeHandle {
    jobs: mpsc::Sender<Job>,
}

impl ComputeHandle {
    /// Starts the compute thread, loads the experts on it, and returns once
    /// they are loaded. `queue` bounds the jobs waiting for the thread.
    pub fn spawn(model: WorkerModel, queue: usize) -> Result<(Self, WorkerInfo), StartError> {
        let (jobs_tx, mut jobs_rx) = mpsc::channel::<Job>(queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("expert-compute".into())
            .spawn(move || {
                let _guard = tch::no_grad_guard();
                let (experts, info) = match load(&model) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let options = model.options;
                let _ = ready_tx.send(Ok(info));
                while let Some(job) = jobs_rx.blocking_recv() {
                    let started = Instant::now();
                    let queued = started - job.queued;
                    let result = run(&experts, options, job.layer, &job.hidden, &job.work);
                    let compute = started.elapsed();
                    metrics::histogram!(crate::metrics::QUEUE_WAIT).record(queued);
                    metrics::histogram!(crate::metrics::COMPUTE_DURATION).record(compute);
                    let _ = job.reply.send(result.map(|output| Computed {
                        output,
                        queued,
                        compute,
                    }));
                }
            })
            .map_err(StartError::Spawn)?;
        let info = ready_rx.recv().map_err(|_| StartError::Exited)??;
        Ok((Self { jobs: jobs_tx }, info))
    }

    /// Computes one layer's work; `hidden` is `[rows, hidden]` on the CPU in
    /// the wire dtype, and so is the result.
    pub async fn forward(
        &self,
        layer: usize,
        hidden: Tensor,
        work: Vec<WorkItem>,
    ) -> Result<Computed, ComputeError> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job {
                layer,
                hidden,
                work,
                queued: Instant::now(),
                reply,
            })
            .await
            .map_err(|_| ComputeError::Stopped)?;
        result
            .await
            .map_err(|_| ComputeError::Stopped)?
            .map_err(ComputeError::Failed)
    }

    /// Jobs waiting for the compute thread.
    pub fn queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

fn load(model: &WorkerModel) -> Result<(LocalExperts, WorkerInfo), LoadError> {
    let config = MixtralConfig::from_file(&model.dir.join("config.json"))?;
    let model_id = tramontane_config::model_id(&model.dir)?;
    let checkpoint = Checkpoint::open(&model.dir)?;
    let held = |layer: usize, expert: usize| model.held.holds(layer, expert);
    let experts = LocalExperts::load(
        &checkpoint,
        &config,
        &held,
        model.options.kind,
        model.options.device,
    )?;
    let info = WorkerInfo {
        model_id,
        held: experts
            .held()
            .into_iter()
            .filter(|(_, e)| !e.is_empty())
            .collect(),
        config,
        device: model.options.device,
        kind: model.options.kind,
        weight_bytes: checkpoint.loaded_bytes(),
    };
    Ok((experts, info))
}

fn run(
    experts: &LocalExperts,
    options: LoadOptions,
    layer: usize,
    hidden: &Tensor,
    work: &[WorkItem],
) -> Result<Tensor, ForwardError> {
    let wire_kind = hidden.kind();
    let xs = hidden.to_device(options.device).to_kind(options.kind);
    let out = experts.forward_rows(layer, &xs, work)?;
    Ok(out.f_to_kind(wire_kind)?.f_to_device(Device::Cpu)?)
}
