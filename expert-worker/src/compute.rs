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

/// (layer, expert) pairs to load and to drop while serving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldChange {
    pub load: Vec<(usize, usize)>,
    pub drop: Vec<(usize, usize)>,
    /// The most bytes of expert weights the worker may hold
    /// (`--max-expert-bytes`): a load past it is undone and refused.
    pub max_bytes: Option<u64>,
}

/// What a worker holds after a [`HoldChange`], and what it did.
#[derive(Debug, Clone)]
pub struct Holding {
    /// Per layer, the experts held (layers with none left out).
    pub held: Vec<(usize, Vec<usize>)>,
    pub weight_dtypes: Vec<(&'static str, u64)>,
    /// Each pair loaded (not held before), with the time its load took.
    pub loaded: Vec<((usize, usize), Duration)>,
    /// Each pair dropped (held before).
    pub dropped: Vec<(usize, usize)>,
    /// The bytes of weights the loads added.
    pub loaded_bytes: u64,
    /// The load that failed would have held more than `max_bytes`.
    pub exhausted: bool,
    /// The load that failed, if one did (the pairs before it are loaded,
    /// those after it and the drops are not done).
    pub failed: Option<String>,
}

/// What the compute thread is sent: a Forward's work, or a change of what
/// it holds, served in the order they come.
enum Work {
    Forward(Job),
    Hold {
        change: HoldChange,
        reply: oneshot::Sender<Holding>,
    },
}

/// The next thing the compute thread does.
enum Next {
    Forwards(Vec<Job>),
    Hold(HoldChange, oneshot::Sender<Holding>),
}

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
    jobs: mpsc::Sender<Work>,
}

impl ComputeHandle {
    /// Starts the compute thread, loads the experts on it, and returns once
    /// they are loaded. `queue` bounds the jobs waiting for the thread.
    pub fn spawn(model: WorkerModel, queue: usize) -> Result<(Self, WorkerInfo), StartError> {
        let (jobs_tx, mut jobs_rx) = mpsc::channel::<Work>(queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("expert-compute".into())
            .spawn(move || {
                let _guard = tch::no_grad_guard();
                let (mut experts, info, checkpoint) = match load(&model) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let options = model.options;
                let config = info.config.clone();
                let _ = ready_tx.send(Ok(info));
                let mut waiting = VecDeque::new();
                // A panic ends the thread (the handle sees its jobs channel
                // close, and the worker stops); it is logged here.
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    while let Some(next) = next_batch(&mut jobs_rx, &mut waiting) {
                        match next {
                            Next::Forwards(batch) => serve_batch(&experts, options, batch),
                            Next::Hold(change, reply) => {
                                let holding =
                                    hold(&mut experts, &checkpoint, &config, options, change);
                                let _ = reply.send(holding);
                            }
                        }
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
            .send(Work::Forward(Job {
                layer,
                hidden,
                work,
                queued: Instant::now(),
                reply,
            }))
            .await
            .map_err(|_| ComputeError::Stopped)?;
        result
            .await
            .map_err(|_| ComputeError::Stopped)?
            .map_err(ComputeError::Failed)
    }

    /// Loads and drops pairs on the compute thread, after the work sent
    /// before it and before the work sent after it. The change's pairs are
    /// checked by the caller (pairs of the model's MoE layers).
    pub async fn hold(&self, change: HoldChange) -> Result<Holding, ComputeError> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Work::Hold { change, reply })
            .await
            .map_err(|_| ComputeError::Stopped)?;
        result.await.map_err(|_| ComputeError::Stopped)
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

fn load(model: &WorkerModel) -> Result<(LocalExperts, WorkerInfo, Checkpoint), LoadError> {
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
        held: held_now(&experts),
        config,
        device: model.options.device,
        dtype: model.options.dtype,
        weight_dtypes: experts.bytes_by_dtype(),
    };
    Ok((experts, info, checkpoint))
}

/// Per layer, the experts held, layers with none left out.
fn held_now(experts: &LocalExperts) -> Vec<(usize, Vec<usize>)> {
    experts
        .held()
        .into_iter()
        .filter(|(_, e)| !e.is_empty())
        .collect()
}

/// Loads, then drops, the pairs of `change` (the memory-mapped checkpoint
/// is read for the loads), timing each load.
fn hold(
    experts: &mut LocalExperts,
    checkpoint: &Checkpoint,
    config: &ModelSpec,
    options: LoadOptions,
    change: HoldChange,
) -> Holding {
    let bytes = |experts: &LocalExperts| -> u64 {
        experts
            .bytes_by_dtype()
            .iter()
            .map(|(_, bytes)| bytes)
            .sum()
    };
    let before = bytes(experts);
    let mut loaded = Vec::new();
    let mut failed = None;
    let mut exhausted = false;
    for &(layer, expert) in &change.load {
        if experts.holds(layer, expert) {
            continue;
        }
        let started = Instant::now();
        match experts.load_pair(
            checkpoint,
            config,
            (layer, expert),
            options.expert_precision(),
            options.device,
        ) {
            Ok(true) => {
                let held = bytes(experts);
                if let Some(max) = change.max_bytes.filter(|&max| held > max) {
                    experts.drop_pair(layer, expert);
                    failed = Some(format!(
                        "loading layer {layer} expert {expert} would hold {held} bytes of expert weights, over this worker's --max-expert-bytes {max}"
                    ));
                    exhausted = true;
                    break;
                }
                loaded.push(((layer, expert), started.elapsed()));
            }
            Ok(false) => {
                failed = Some(format!("layer {layer} has no expert {expert}"));
                break;
            }
            Err(error) => {
                failed = Some(format!("loading layer {layer} expert {expert}: {error}"));
                break;
            }
        }
    }
    let loaded_bytes = bytes(experts).saturating_sub(before);
    let dropped = if failed.is_none() {
        change
            .drop
            .iter()
            .copied()
            .filter(|&(layer, expert)| experts.drop_pair(layer, expert))
            .collect()
    } else {
        Vec::new()
    };
    Holding {
        held: held_now(experts),
        weight_dtypes: experts.bytes_by_dtype(),
        loaded,
        dropped,
        loaded_bytes,
        exhausted,
        failed,
    }
}

/// The next thing to do: a change of what is held, in its turn, or the
/// oldest waiting job with every other waiting job of the same layer and
/// wire dtype that came before the next change (a Forward from another
/// router, or another micro-batch, that came while the thread was busy), in
/// arrival order. `waiting` keeps the rest, in order. None once the channel
/// is closed and nothing waits.
fn next_batch(jobs: &mut mpsc::Receiver<Work>, waiting: &mut VecDeque<Work>) -> Option<Next> {
    let first = loop {
        if waiting.is_empty() {
            waiting.push_back(jobs.blocking_recv()?);
        }
        while let Ok(work) = jobs.try_recv() {
            waiting.push_back(work);
        }
        // Work whose caller gave up (its deadline passed, it went away) is
        // dropped unrun.
        let before = waiting.len();
        waiting.retain(|work| match work {
            Work::Forward(job) => !job.reply.is_closed(),
            Work::Hold { .. } => true,
        });
        let abandoned = before - waiting.len();
        if abandoned > 0 {
            metrics::counter!(crate::metrics::ABANDONED_FORWARDS).increment(abandoned as u64);
        }
        match waiting.pop_front() {
            Some(Work::Hold { change, reply }) => return Some(Next::Hold(change, reply)),
            Some(Work::Forward(first)) => break first,
            None => {}
        }
    };
    let (layer, kind) = (first.layer, first.hidden.kind());
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(waiting.len());
    let mut held_back = false;
    for work in waiting.drain(..) {
        match work {
            Work::Forward(job) if !held_back && job.layer == layer && job.hidden.kind() == kind => {
                batch.push(job)
            }
            Work::Hold { .. } => {
                held_back = true;
                rest.push_back(work);
            }
            other => rest.push_back(other),
        }
    }
    *waiting = rest;
    Some(Next::Forwards(batch))
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

    /// The forwards of `next`, which must be forwards.
    fn forwards(next: Option<Next>) -> Vec<Job> {
        match next {
            Some(Next::Forwards(batch)) => batch,
            Some(Next::Hold(..)) => panic!("a hold, not forwards"),
            None => panic!("nothing next"),
        }
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
            tx.try_send(Work::Forward(job)).ok().unwrap();
            answers.push(answer);
        }
        drop(tx);
        let mut waiting = VecDeque::new();
        let first = forwards(next_batch(&mut rx, &mut waiting));
        let layers_of = |b: &[Job]| b.iter().map(|j| j.layer).collect::<Vec<_>>();
        assert_eq!(layers_of(&first), vec![1, 1, 1], "layer 1's jobs, in order");
        assert_eq!(waiting.len(), 1);
        serve_batch(&experts, options, first);
        let second = forwards(next_batch(&mut rx, &mut waiting));
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
            tx.try_send(Work::Forward(job)).ok().unwrap();
        }
        drop(gone_answer);
        let mut waiting = VecDeque::new();
        let batch = forwards(next_batch(&mut rx, &mut waiting));
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

    #[test]
    fn a_hold_waits_its_turn_and_forwards_after_it_wait_for_it() {
        let x = || Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let (tx, mut rx) = mpsc::channel(8);
        let (before, _a) = job(1, x(), vec![item(1, &[0], &[1.0])]);
        let (after, _b) = job(1, x(), vec![item(2, &[0], &[1.0])]);
        let (reply, _held) = oneshot::channel();
        tx.try_send(Work::Forward(before)).ok().unwrap();
        let change = HoldChange {
            load: vec![(1, 3)],
            drop: vec![],
            max_bytes: None,
        };
        tx.try_send(Work::Hold { change, reply }).ok().unwrap();
        tx.try_send(Work::Forward(after)).ok().unwrap();
        drop(tx);
        let mut waiting = VecDeque::new();
        let first = forwards(next_batch(&mut rx, &mut waiting));
        assert_eq!(first.len(), 1, "the later forward of the layer waits");
        assert!(matches!(
            next_batch(&mut rx, &mut waiting),
            Some(Next::Hold(change, _)) if change.load == [(1, 3)]
        ));
        assert_eq!(
            forwards(next_batch(&mut rx, &mut waiting))[0].work[0].expert,
            2
        );
    }

    #[test]
    fn pairs_loaded_while_serving_compute_as_loaded_at_start_and_dropped_ones_are_gone() {
        let _guard = tch::no_grad_guard();
        let dir = tempfile::tempdir().unwrap();
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default()).unwrap();
        let config = ModelSpec::from_file(&dir.path().join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let options = LoadOptions::default();
        let load = |held: tramontane_model::moe::ExpertSelection<'_>| {
            LocalExperts::load(&checkpoint, &config, held, (Kind::Float, None), Device::Cpu)
                .unwrap()
        };
        let all = load(&|_, _| true);
        let mut experts = load(&|layer, expert| (layer, expert) == (0, 0));
        let bytes_before = experts.bytes_by_dtype();
        let change = HoldChange {
            load: vec![(0, 3), (1, 2), (0, 0)],
            drop: vec![(0, 0), (1, 5)],
            max_bytes: None,
        };
        let holding = hold(&mut experts, &checkpoint, &config, options, change);
        assert_eq!(holding.failed, None);
        assert_eq!(holding.held, vec![(0, vec![3]), (1, vec![2])]);
        let loaded: Vec<(usize, usize)> = holding.loaded.iter().map(|(pair, _)| *pair).collect();
        assert_eq!(loaded, [(0, 3), (1, 2)], "(0, 0) was held already");
        assert_eq!(holding.dropped, [(0, 0)], "(1, 5) was not held");
        assert_eq!(holding.weight_dtypes[0].1, 2 * bytes_before[0].1);
        let h = config.hidden_size as i64;
        let xs = Tensor::randn([3, h], (Kind::Float, Device::Cpu));
        for (layer, expert) in [(0, 3), (1, 2)] {
            let work = [item(expert, &[0, 2], &[0.6, 0.3])];
            let ours = run(&experts, options, layer, &xs, &work).unwrap();
            let reference = run(&all, options, layer, &xs, &work).unwrap();
            assert_eq!(
                ours.max().double_value(&[]),
                reference.max().double_value(&[])
            );
            assert!(ours.equal(&reference), "layer {layer} expert {expert}");
        }
        let dropped = run(&experts, options, 0, &xs, &[item(0, &[0], &[1.0])]);
        assert!(matches!(
            dropped,
            Err(ForwardError::ExpertNotHeld {
                layer: 0,
                expert: 0
            })
        ));
        // A pair the model does not have stops the change where it stands.
        let change = HoldChange {
            load: vec![(1, 4), (0, 99), (1, 6)],
            drop: vec![(0, 3)],
            max_bytes: None,
        };
        let holding = hold(&mut experts, &checkpoint, &config, options, change);
        assert!(holding.failed.as_deref().unwrap().contains("no expert 99"));
        assert!(!holding.exhausted);
        assert_eq!(holding.held, vec![(0, vec![3]), (1, vec![2, 4])]);
        // Room for one more expert: the second load is undone and refused.
        let expert_bytes = bytes_before[0].1;
        let change = HoldChange {
            load: vec![(1, 6), (1, 7)],
            drop: vec![],
            max_bytes: Some(4 * expert_bytes),
        };
        let holding = hold(&mut experts, &checkpoint, &config, options, change);
        assert!(holding.exhausted, "{:?}", holding.failed);
        assert!(
            holding
                .failed
                .as_deref()
                .unwrap()
                .contains("--max-expert-bytes")
        );
        assert_eq!(holding.held, vec![(0, vec![3]), (1, vec![2, 4, 6])]);
        assert_eq!(holding.weight_dtypes[0].1, 4 * expert_bytes);
    }
}
