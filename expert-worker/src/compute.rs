//! The compute thread: it loads the worker's experts and owns their tensors
//! (tch tensors are Send, not Sync), with no_grad held, and serves jobs from a
//! bounded channel. tokio tasks only decode, validate and reply.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};
use tokio::sync::{mpsc, oneshot};
use tramontane_model::error::{ForwardError, LoadError};
use tramontane_model::moe::{ExpertRows, LocalExperts};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{LoadOptions, ModelSpec};

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
    pub config: ModelSpec,
    /// Per layer, the experts held (layers with none are left out).
    pub held: Vec<(usize, Vec<usize>)>,
    pub device: Device,
    /// The dtype the experts compute in.
    pub dtype: tramontane_config::Dtype,
    /// Bytes of the experts' matrices held, per dtype they are held in
    /// (`int8`, `bf16`, ...).
    pub weight_dtypes: Vec<(&'static str, u64)>,
}

impl WorkerInfo {
    /// Bytes of the experts' matrices held, all dtypes together.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_dtypes.iter().map(|(_, bytes)| bytes).sum()
    }
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
                let mut waiting = VecDeque::new();
                // A panic ends the thread (the handle sees its jobs channel
                // close, and the worker stops); it is logged here.
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    while let Some(batch) = next_batch(&mut jobs_rx, &mut waiting) {
                        serve_batch(&experts, options, batch);
                    }
                }));
                if let Err(panic) = served {
                    tracing::error!(
                        panic = tramontane_infra::error::panic_message(&*panic),
                        "the compute thread failed"
                    );
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

    /// The compute thread still runs.
    pub fn is_running(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Completes when the compute thread has ended.
    pub async fn stopped(&self) {
        self.jobs.closed().await
    }

    /// Jobs waiting for the compute thread.
    pub fn queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

fn load(model: &WorkerModel) -> Result<(LocalExperts, WorkerInfo), LoadError> {
    let config = ModelSpec::from_file(&model.dir.join("config.json"))?;
    let model_id = tramontane_config::model_id(&model.dir)?;
    let checkpoint = Checkpoint::open(&model.dir)?;
    let held = |layer: usize, expert: usize| model.held.holds(layer, expert);
    let experts = LocalExperts::load(
        &checkpoint,
        &config,
        &held,
        model.options.expert_precision(),
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
        dtype: model.options.dtype,
        weight_dtypes: experts.bytes_by_dtype(),
    };
    Ok((experts, info))
}

/// The next jobs to run together: the oldest waiting job and every other
/// waiting job of the same layer and wire dtype (a Forward from another
/// router, or another micro-batch, that came while the thread was busy), in
/// arrival order. `waiting` keeps the rest, in order. None once the channel
/// is closed and nothing waits.
fn next_batch(jobs: &mut mpsc::Receiver<Job>, waiting: &mut VecDeque<Job>) -> Option<Vec<Job>> {
    let first = loop {
        if waiting.is_empty() {
            waiting.push_back(jobs.blocking_recv()?);
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        // Work whose caller gave up (its deadline passed, it went away) is
        // dropped unrun.
        let before = waiting.len();
        waiting.retain(|job| !job.reply.is_closed());
        let abandoned = before - waiting.len();
        if abandoned > 0 {
            metrics::counter!(crate::metrics::ABANDONED_FORWARDS).increment(abandoned as u64);
        }
        if let Some(first) = waiting.pop_front() {
            break first;
        }
    };
    let (layer, kind) = (first.layer, first.hidden.kind());
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        if job.layer == layer && job.hidden.kind() == kind {
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *waiting = rest;
    Some(batch)
}

/// Runs a batch as one expert computation (each expert once, on the rows of
/// every job that routed to it: one pass over its weights) and answers each
/// job with its rows. Should the joint run fail, each job runs alone and
/// gets its own answer or error.
fn serve_batch(experts: &LocalExperts, options: LoadOptions, batch: Vec<Job>) {
    let started = Instant::now();
    metrics::histogram!(crate::metrics::BATCHED_FORWARDS).record(batch.len() as f64);
    let joint = (batch.len() > 1)
        .then(|| run_joint(experts, options, &batch).ok())
        .flatten();
    let outputs: Vec<Result<Tensor, ForwardError>> = match joint {
        Some(outputs) => outputs.into_iter().map(Ok).collect(),
        None => batch
            .iter()
            .map(|job| run(experts, options, job.layer, &job.hidden, &job.work))
            .collect(),
    };
    let compute = started.elapsed();
    metrics::histogram!(crate::metrics::COMPUTE_DURATION).record(compute);
    for (job, output) in batch.into_iter().zip(outputs) {
        let queued = started.saturating_duration_since(job.queued);
        metrics::histogram!(crate::metrics::QUEUE_WAIT).record(queued);
        let _ = job.reply.send(output.map(|output| Computed {
            output,
            queued,
            compute,
        }));
    }
}

/// The jobs' rows stacked, each expert's rows of all jobs in one item;
/// the output split back per job.
fn run_joint(
    experts: &LocalExperts,
    options: LoadOptions,
    batch: &[Job],
) -> Result<Vec<Tensor>, ForwardError> {
    let mut by_expert: BTreeMap<usize, WorkItem> = BTreeMap::new();
    let mut sizes = Vec::with_capacity(batch.len());
    let mut offset = 0;
    for job in batch {
        for item in &job.work {
            let joint = by_expert.entry(item.expert).or_insert_with(|| WorkItem {
                expert: item.expert,
                rows: Vec::new(),
                weights: Vec::new(),
            });
            joint.rows.extend(item.rows.iter().map(|r| r + offset));
            joint.weights.extend_from_slice(&item.weights);
        }
        let rows = job.hidden.size()[0];
        sizes.push(rows);
        offset += rows as usize;
    }
    let hidden = Tensor::f_cat(&batch.iter().map(|j| &j.hidden).collect::<Vec<_>>(), 0)?;
    let work: Vec<WorkItem> = by_expert.into_values().collect();
    let out = run(experts, options, batch[0].layer, &hidden, &work)?;
    Ok(out
        .f_split_with_sizes(&sizes, 0)?
        .into_iter()
        .map(|part| part.f_contiguous())
        .collect::<Result<_, _>>()?)
}

fn run(
    experts: &LocalExperts,
    options: LoadOptions,
    layer: usize,
    hidden: &Tensor,
    work: &[WorkItem],
) -> Result<Tensor, ForwardError> {
    let wire_kind = hidden.kind();
    let xs = hidden
        .f_to_device(options.device)?
        .f_to_kind(options.kind())?;
    let out = experts.forward_rows(layer, &xs, work)?;
    Ok(out.f_to_kind(wire_kind)?.f_to_device(Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    //! Forwards that wait together run together: one computation, each
    //! answered with what it would get alone.

    use super::*;
    use tch::Kind;

    fn job(
        layer: usize,
        hidden: Tensor,
        work: Vec<WorkItem>,
    ) -> (Job, oneshot::Receiver<Result<Computed, ForwardError>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            layer,
            hidden,
            work,
            queued: Instant::now(),
            reply,
        };
        (job, answer)
    }

    /// The experts `held` selects of the tiny test checkpoint, in f32, and its hidden size.
    fn tiny_experts(held: tramontane_model::moe::ExpertSelection<'_>) -> (LocalExperts, i64) {
        let dir = tempfile::tempdir().unwrap();
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default()).unwrap();
        let config = ModelSpec::from_file(&dir.path().join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let experts =
            LocalExperts::load(&checkpoint, &config, held, (Kind::Float, None), Device::Cpu)
                .unwrap();
        (experts, config.hidden_size as i64)
    }

    fn item(expert: usize, rows: &[usize], weights: &[f32]) -> WorkItem {
        WorkItem {
            expert,
            rows: rows.to_vec(),
            weights: weights.to_vec(),
        }
    }

    #[test]
    fn waiting_jobs_of_a_layer_run_as_one_and_answer_as_alone() {
        let _guard = tch::no_grad_guard();
        let (experts, h) = tiny_experts(&|_, _| true);
        let options = LoadOptions::default();
        let x = |rows: i64| Tensor::randn([rows, h], (Kind::Float, Device::Cpu));
        let works = [
            vec![item(1, &[0, 2], &[0.7, 0.4]), item(3, &[0, 1], &[0.3, 0.6])],
            vec![item(1, &[1], &[1.0]), item(5, &[0], &[0.5])],
            vec![item(3, &[0], &[0.9])],
            vec![item(2, &[0, 1], &[0.2, 0.8])],
        ];
        let hiddens = [x(3), x(2), x(1), x(2)];
        let layers = [1, 1, 0, 1];
        let alone: Vec<Tensor> = (0..4)
            .map(|i| run(&experts, options, layers[i], &hiddens[i], &works[i]).unwrap())
            .collect();

        let (tx, mut rx) = mpsc::channel(8);
        let mut answers = Vec::new();
        for i in 0..4 {
            let (job, answer) = job(layers[i], hiddens[i].shallow_clone(), works[i].clone());
            tx.try_send(job).ok().unwrap();
            answers.push(answer);
        }
        drop(tx);
        let mut waiting = VecDeque::new();
        let first = next_batch(&mut rx, &mut waiting).unwrap();
        let layers_of = |b: &[Job]| b.iter().map(|j| j.layer).collect::<Vec<_>>();
        assert_eq!(layers_of(&first), vec![1, 1, 1], "layer 1's jobs, in order");
        assert_eq!(layers_of(waiting.make_contiguous()), vec![0]);
        serve_batch(&experts, options, first);
        let second = next_batch(&mut rx, &mut waiting).unwrap();
        assert_eq!(layers_of(&second), vec![0]);
        serve_batch(&experts, options, second);
        assert!(next_batch(&mut rx, &mut waiting).is_none());
        for (i, answer) in answers.into_iter().enumerate() {
            let got = answer.blocking_recv().unwrap().unwrap().output;
            assert_eq!(got.size(), alone[i].size());
            let diff = (&got - &alone[i]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "job {i}: {diff}");
        }
    }

    #[test]
    fn work_whose_caller_gave_up_is_dropped_unrun() {
        let x = || Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let (tx, mut rx) = mpsc::channel(8);
        let (gone, gone_answer) = job(0, x(), vec![item(1, &[0], &[1.0])]);
        let (kept, _kept_answer) = job(0, x(), vec![item(2, &[0], &[1.0])]);
        let (later, later_answer) = job(1, x(), vec![item(3, &[0], &[1.0])]);
        for job in [gone, kept, later] {
            tx.try_send(job).ok().unwrap();
        }
        drop(gone_answer);
        let mut waiting = VecDeque::new();
        let batch = next_batch(&mut rx, &mut waiting).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].work[0].expert, 2, "the job still awaited");
        // Given up while it waited behind the batch: dropped too.
        drop(later_answer);
        drop(tx);
        assert!(next_batch(&mut rx, &mut waiting).is_none());
    }

    #[test]
    fn a_batch_that_fails_together_answers_each_job_alone() {
        let _guard = tch::no_grad_guard();
        let (experts, h) = tiny_experts(&|layer, expert| layer == 0 && expert < 2);
        let x = || Tensor::randn([1, h], (Kind::Float, Device::Cpu));
        let (good, good_answer) = job(0, x(), vec![item(1, &[0], &[1.0])]);
        let (bad, bad_answer) = job(0, x(), vec![item(6, &[0], &[1.0])]);
        serve_batch(&experts, LoadOptions::default(), vec![good, bad]);
        assert!(good_answer.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            bad_answer.blocking_recv().unwrap(),
            Err(ForwardError::ExpertNotHeld {
                layer: 0,
                expert: 6
            })
        ));
    }
}
