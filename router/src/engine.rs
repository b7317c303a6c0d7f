//! The engine: one thread owns the model (dense weights, the KV pool) and
//! runs continuous batching. Requests wait in a bounded queue, are admitted
//! while their first step's KV blocks fit ([`Admission`]), prefill in chunks
//! under the step's token budget beside the decodes of the others, grow
//! their cache block by block (the newest sequence is preempted and requeued
//! when the pool runs out, to be recomputed later), and leave the batch the
//! step they finish — or the step after their client went away. A step that
//! fails fails its sequences, except when an expert has no live worker:
//! then only those with a token routed to it fail, and the others run the
//! step again.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use opentelemetry::trace::TraceContextExt;
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tramontane_model::experts::Experts;
use tramontane_model::kv_cache::{BLOCK_SIZE, KvCache, KvPool};
use tramontane_model::{BatchItem, CausalLm, Failed, ForwardError, LoadError, Logits, StepError};
use tramontane_policy::admission::{Admission, Reservation};
use tramontane_policy::scheduler::{SchedulerConfig, SchedulerConfigError, Slice};

use crate::failure::GenerationError;
use crate::metrics;
use crate::sampling::{InvalidParam, Sampler, SamplingParams, TokenLogprob, logprobs};
use crate::structured_output::{Guide, GuideError, Mask};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine tells a request.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    /// The prompt's own logprobs (requested by `prompt_logprobs`), once
    /// the whole prompt is through the forward, before any token: entry `i`
    /// is prompt token `i + 1`'s (the first has none), with its top
    /// alternatives.
    PromptLogprobs(Vec<TokenLogprob>),
    Finished(FinishReason),
    /// The request failed: one failure, shared by every sequence of the
    /// step it failed (all of them, or those routed to a lost expert).
    Failed(Arc<GenerationError>),
}

/// A validated request.
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    /// 0 only with `prompt_logprobs`: the prompt is scored, nothing generated.
    pub max_tokens: usize,
    /// Score the prompt's own tokens, with this many top alternatives each.
    pub prompt_logprobs: Option<usize>,
    pub sampling: SamplingParams,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<Event>,
    /// When the request was accepted (latency metrics count from here).
    pub submitted: Instant,
    /// The request's span: forward steps are its children (or linked to it).
    pub span: tracing::Span,
    /// A structured output's constraint: only the tokens it allows are
    /// sampled, and the sequence ends when it is complete.
    pub guide: Option<Guide>,
}

/// A request from its submission on: waiting, running, or preempted and
/// waiting again.
struct Sequence {
    job: GenerateJob,
    /// Its blocks of the pool: none while it waits.
    cache: KvCache,
    sampler: Sampler,
    /// The prompt, then every token generated: what the cache must hold
    /// before the next sample (a preempted sequence recomputes all of it).
    context: Vec<u32>,
    generated: usize,
    /// KV blocks admission reserved for it.
    reserved_blocks: usize,
    /// When the last token was sent.
    last_token_at: Option<Instant>,
    /// With `prompt_logprobs`: those of prompt tokens 1.. scored so far
    /// (kept over a preemption: the recomputed prompt is not scored again).
    prompt_logprobs: Vec<TokenLogprob>,
    /// The prompt's logprobs went to the client.
    prompt_logprobs_sent: bool,
}

impl Sequence {
    fn new(job: GenerateJob, cache: KvCache) -> Self {
        Self {
            sampler: Sampler::new(job.sampling.clone()),
            context: job.prompt.clone(),
            job,
            cache,
            generated: 0,
            reserved_blocks: 0,
            last_token_at: None,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_sent: false,
        }
    }

    /// Whether this sequence is still to write whole blocks that `other`
    /// begins with (all but `other`'s last token's): `other` would find
    /// them cached by waiting.
    fn prefills_blocks_of(&self, other: &Sequence) -> bool {
        // Its next block, whole, must be one `other` shares: only the tokens
        // up to that block's end are compared (none for a decoding sequence).
        let needed = (self.cache.positions() + BLOCK_SIZE).next_multiple_of(BLOCK_SIZE);
        needed <= (other.context.len() - 1).min(self.context.len())
            && self.context[..needed] == other.context[..needed]
    }

    /// Whether this step's slice of `tokens` positions has prompt tokens
    /// still to score: then it needs the logits of all its positions.
    fn scores(&self, tokens: usize) -> bool {
        let prompt = self.job.prompt.len();
        self.job.prompt_logprobs.is_some()
            && self.prompt_logprobs.len() + 1 < prompt
            && self.cache.positions() + tokens > self.prompt_logprobs.len()
    }

    /// Scores the prompt tokens this slice's logits predict: `rows` holds
    /// one row of `vocab` logits per position from `from` on (the row at
    /// position `p` predicts token `p + 1`).
    fn score(&mut self, from: usize, rows: &[f32], vocab: usize) {
        let Some(top) = self.job.prompt_logprobs else {
            return;
        };
        let prompt = &self.job.prompt;
        for (offset, row) in rows.chunks_exact(vocab).enumerate() {
            let next = from + offset + 1;
            if next == self.prompt_logprobs.len() + 1 && next < prompt.len() {
                self.prompt_logprobs.push(logprobs(row, prompt[next], top));
            }
        }
    }

    /// Once the whole prompt is scored, its logprobs go to the client,
    /// once.
    fn send_prompt_logprobs(&mut self) {
        if self.job.prompt_logprobs.is_some()
            && !self.prompt_logprobs_sent
            && self.prompt_logprobs.len() + 1 >= self.job.prompt.len()
        {
            self.prompt_logprobs_sent = true;
            let scored = self.prompt_logprobs.clone();
            let _ = self.job.events.send(Event::PromptLogprobs(scored));
        }
    }

    /// Whether a step over `tokens` more positions ends with a sample.
    fn samples_after(&self, tokens: usize) -> bool {
        self.job.max_tokens > 0 && self.cache.positions() + tokens >= self.context.len()
    }

    /// The tokens of this step: from the first one not cached on.
    fn feed(&self, tokens: usize) -> &[u32] {
        let from = self.cache.positions();
        &self.context[from..from + tokens]
    }
}

impl Reservation for Sequence {
    fn kv_tokens(&self) -> usize {
        self.context.len()
    }

    fn cached(&self) -> usize {
        self.cache.positions()
    }

    fn generated(&self) -> usize {
        self.generated
    }

    fn reserved_blocks(&mut self) -> &mut usize {
        &mut self.reserved_blocks
    }

    fn preempt(&mut self) {
        self.cache.truncate(0);
    }
}

#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::UnboundedSender<GenerateJob>,
    /// Requests submitted and not yet admitted (or dropped).
    waiting: Arc<AtomicUsize>,
    /// Sequences preempted since the start.
    preempted: Arc<AtomicUsize>,
    /// Prompt tokens found in the prefix cache since the start.
    prefix_hits: Arc<AtomicUsize>,
    /// The most sequences that ran at once since the start.
    peak_running: Arc<AtomicUsize>,
    config: SchedulerConfig,
    /// Positions the engine's KV pool holds in all.
    kv_tokens: usize,
    /// The tokens that end a sequence.
    eos_ids: Arc<[u32]>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("scheduler limits")]
    Config(#[from] SchedulerConfigError),
    #[error("cannot start the engine thread")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the engine thread exited while loading the model")]
    Exited,
}

impl EngineHandle {
    /// Starts the engine thread; `build` runs on it and creates the model,
    /// whose experts' failures become [`GenerationError`]s.
    pub fn spawn<E, F>(
        build: F,
        eos_ids: Vec<u32>,
        config: SchedulerConfig,
    ) -> Result<Self, EngineError>
    where
        E: Experts,
        E::Error: Into<GenerationError>,
        F: FnOnce() -> Result<CausalLm<E>, LoadError> + Send + 'static,
    {
        config.validate()?;
        let (jobs, receiver) = mpsc::unbounded_channel::<GenerateJob>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let engine_waiting = waiting.clone();
        let preempted = Arc::new(AtomicUsize::new(0));
        let engine_preempted = preempted.clone();
        let prefix_hits = Arc::new(AtomicUsize::new(0));
        let engine_prefix_hits = prefix_hits.clone();
        let peak_running = Arc::new(AtomicUsize::new(0));
        let engine_peak_running = peak_running.clone();
        let handle_eos_ids: Arc<[u32]> = eos_ids.clone().into();
        std::thread::Builder::new()
            .name("router-engine".into())
            .spawn(move || {
                let _guard = tch::no_grad_guard();
                let model = match build() {
                    Ok(model) => model,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let kv = model.kv_pool(config.max_kv_tokens);
                kv.set_prefix_caching(config.prefix_caching);
                ::metrics::gauge!(metrics::KV_CACHE_BYTES).set(kv.bytes() as f64);
                ::metrics::gauge!(metrics::KV_CACHE_TOTAL_TOKENS).set(kv.capacity_tokens() as f64);
                let _ = ready_tx.send(Ok(kv.capacity_tokens()));
                let engine = Engine {
                    model: &model,
                    kv,
                    receiver,
                    waiting_count: engine_waiting,
                    preempted: engine_preempted,
                    prefix_hits: engine_prefix_hits,
                    peak_running: engine_peak_running,
                    eos_ids,
                    admission: Admission::new(config),
                    running: Vec::new(),
                    retrying: false,
                };
                // A panic ends the engine (its requests see their events
                // close, the handle sees the jobs channel close); it is
                // logged here, where its message is known.
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run())) {
                    tracing::error!(
                        panic = tramontane_infra::error::panic_message(&*panic),
                        "the engine thread failed"
                    );
                }
            })
            .map_err(EngineError::Spawn)?;
        let kv_tokens = ready_rx.recv().map_err(|_| EngineError::Exited)??;
        Ok(Self {
            jobs,
            waiting,
            preempted,
            prefix_hits,
            peak_running,
            config,
            kv_tokens,
            eos_ids: handle_eos_ids,
        })
    }

    /// The tokens that end a sequence.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The engine thread still runs.
    pub fn is_running(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Completes when the engine thread has ended.
    pub async fn stopped(&self) {
        self.jobs.closed().await
    }

    /// Reserves `count` places in the waiting queue, or refuses at once
    /// when they are not free: a request's prompts are counted before any of
    /// them is tokenized. More than the whole queue is an invalid request,
    /// not a busy server. Places not used by [`EngineHandle::submit`] are
    /// given back when the [`QueueSlots`] are dropped. The engine's
    /// [`Admission`] holds the same bound.
    pub fn reserve(&self, count: usize) -> Result<QueueSlots, GenerationError> {
        let limit = self.config.max_waiting;
        if count > limit {
            return Err(InvalidParam::new(
                "prompt",
                format!("{count} prompts are more than this server queues at once ({limit})"),
            )
            .into());
        }
        let before = self.waiting.fetch_add(count, Ordering::SeqCst);
        if before + count > limit {
            self.waiting.fetch_sub(count, Ordering::SeqCst);
            return Err(GenerationError::QueueFull { waiting: before });
        }
        Ok(QueueSlots {
            waiting: self.waiting.clone(),
            left: count,
        })
    }

    /// Queues a job in a place reserved by [`EngineHandle::reserve`].
    pub fn submit(&self, slots: &mut QueueSlots, job: GenerateJob) -> Result<(), GenerationError> {
        if slots.left == 0 || !Arc::ptr_eq(&slots.waiting, &self.waiting) {
            return Err(GenerationError::Dropped);
        }
        self.jobs
            .send(job)
            .map_err(|_| GenerationError::EngineStopped)?;
        slots.left -= 1;
        Ok(())
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Positions the engine's KV pool holds in all (`--max-kv-tokens` in
    /// whole blocks): the most one sequence can ever have.
    pub fn kv_tokens(&self) -> usize {
        self.kv_tokens
    }

    /// Tokens admitted sequences found in the prefix cache since the
    /// engine started.
    pub fn prefix_cache_hits(&self) -> usize {
        self.prefix_hits.load(Ordering::SeqCst)
    }

    /// Sequences preempted (KV cache full) since the engine started.
    /// The most sequences that ran at once since the start.
    pub fn peak_running(&self) -> usize {
        self.peak_running.load(Ordering::SeqCst)
    }

    pub fn preemptions(&self) -> usize {
        self.preempted.load(Ordering::SeqCst)
    }
}

/// Places reserved in the engine's waiting queue; those not used are
/// given back on drop.
#[derive(Debug)]
pub struct QueueSlots {
    waiting: Arc<AtomicUsize>,
    left: usize,
}

impl Drop for QueueSlots {
    fn drop(&mut self) {
        self.waiting.fetch_sub(self.left, Ordering::SeqCst);
    }
}

struct Engine<'m, E> {
    model: &'m CausalLm<E>,
    kv: KvPool,
    receiver: mpsc::UnboundedReceiver<GenerateJob>,
    waiting_count: Arc<AtomicUsize>,
    preempted: Arc<AtomicUsize>,
    prefix_hits: Arc<AtomicUsize>,
    peak_running: Arc<AtomicUsize>,
    eos_ids: Vec<u32>,
    admission: Admission<Sequence>,
    running: Vec<Sequence>,
    /// The last step failed for some sequences and the others run it
    /// again: nothing new is admitted until they have, so that a new
    /// request bound for the same lost expert cannot fail their step again
    /// and again.
    retrying: bool,
}

impl<E> Engine<'_, E>
where
    E: Experts,
    E::Error: Into<GenerationError>,
{
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.admission.waiting() == 0 {
                self.report();
                match self.receiver.blocking_recv() {
                    Some(job) => self.enqueue(job),
                    None => return,
                }
            }
            while let Ok(job) = self.receiver.try_recv() {
                self.enqueue(job);
            }
            self.drop_abandoned();
            if !self.retrying || self.running.is_empty() {
                self.admit();
            }
            self.report();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// A submitted job joins the waiting queue. [`EngineHandle::submit`]
    /// bounds the jobs in the channel and the queue together, so the queue
    /// has room; were it full, the job is refused as the handle would.
    fn enqueue(&mut self, job: GenerateJob) {
        let sequence = Sequence::new(job, self.kv.new_cache());
        if let Err(sequence) = self.admission.enqueue(sequence) {
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            let waiting = self.admission.waiting();
            let refused = GenerationError::QueueFull { waiting };
            let _ = sequence.job.events.send(Event::Failed(Arc::new(refused)));
        }
    }

    /// Requests whose client went away leave the queue and the batch.
    fn drop_abandoned(&mut self) {
        let dropped = self.admission.retain_waiting(|s| !s.job.events.is_closed());
        self.waiting_count.fetch_sub(dropped, Ordering::SeqCst);
        let admission = &mut self.admission;
        self.running.retain_mut(|s| {
            let gone = s.job.events.is_closed();
            if gone {
                admission.release(s);
                ::metrics::histogram!(metrics::E2E_REQUEST_LATENCY)
                    .record(s.job.submitted.elapsed());
            }
            !gone
        });
    }

    /// First come first served, while the KV blocks and the batch fit.
    /// A sequence starts from the longest prefix of its tokens the prefix
    /// cache holds, unless its prompt is to be scored (every position's
    /// logits are needed then).
    fn admit(&mut self) {
        let caching = self.admission.config().prefix_caching;
        self.admission
            .set_shared_blocks(shared_blocks(&self.kv, &self.running));
        // A sequence whose prefix another one is still prefilling waits for
        // it, to share it (the n choices of a prompt, a burst of requests
        // with one system prompt) rather than compute it again.
        let running = &self.running;
        let kv = &self.kv;
        // Blocks of its prefix that running sequences hold already are not
        // charged again.
        let shared = |s: &Sequence| {
            if caching && s.job.prompt_logprobs.is_none() {
                kv.held_prefix_blocks(&s.context)
            } else {
                0
            }
        };
        let ready = |s: &Sequence, admitted: &[Sequence]| {
            !caching
                || s.job.prompt_logprobs.is_some()
                || !running
                    .iter()
                    .chain(admitted)
                    .any(|other| other.prefills_blocks_of(s))
        };
        let admitted = self.admission.admit_while(running.len(), ready, shared);
        for mut s in admitted {
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            if s.generated == 0 {
                ::metrics::histogram!(metrics::QUEUE_TIME).record(s.job.submitted.elapsed());
            }
            if caching && s.job.prompt_logprobs.is_none() {
                let hit = s.cache.share_prefix(&s.context);
                ::metrics::counter!(metrics::PREFIX_CACHE_QUERIES)
                    .increment(s.context.len() as u64);
                ::metrics::counter!(metrics::PREFIX_CACHE_HITS).increment(hit as u64);
                self.prefix_hits.fetch_add(hit, Ordering::SeqCst);
            }
            self.running.push(s);
        }
        self.peak_running
            .fetch_max(self.running.len(), Ordering::SeqCst);
    }

    fn report(&mut self) {
        self.admission
            .set_shared_blocks(shared_blocks(&self.kv, &self.running));
        ::metrics::gauge!(metrics::RUNNING_REQUESTS).set(self.running.len() as f64);
        ::metrics::gauge!(metrics::WAITING_REQUESTS).set(self.admission.waiting() as f64);
        ::metrics::gauge!(metrics::KV_CACHE_USED_TOKENS).set(self.admission.kv_used() as f64);
        ::metrics::gauge!(metrics::PREFIX_CACHE_BLOCKS).set(self.kv.cached_blocks() as f64);
        ::metrics::counter!(metrics::PREFIX_CACHE_EVICTIONS).absolute(self.kv.evictions());
        let held = self.kv.total_blocks() - self.kv.free_blocks();
        debug_assert!(
            held <= self.admission.kv_used_blocks(),
            "the pool holds {held} blocks, admission reserved {}",
            self.admission.kv_used_blocks()
        );
    }

    /// One forward over the planned slices, then sampling and events.
    fn step(&mut self) {
        let kv = &self.kv;
        let (plan, preempted) = self
            .admission
            .plan_with_room(&mut self.running, |running| shared_blocks(kv, running));
        if preempted > 0 {
            // Requeued: they wait again, counted with the others.
            self.waiting_count.fetch_add(preempted, Ordering::SeqCst);
            self.preempted.fetch_add(preempted, Ordering::SeqCst);
            ::metrics::counter!(metrics::PREEMPTIONS_TOTAL).increment(preempted as u64);
            tracing::debug!(preempted, "KV cache full: newest sequences preempted");
        }
        if plan.is_empty() {
            return;
        }
        let feeds: Vec<Vec<u32>> = plan
            .iter()
            .map(|slice| self.running[slice.sequence].feed(slice.tokens).to_vec())
            .collect();
        let batch_tokens: usize = feeds.iter().map(Vec::len).sum();
        ::metrics::histogram!(metrics::BATCH_SIZE).record(plan.len() as f64);
        ::metrics::histogram!(metrics::BATCH_TOKENS).record(batch_tokens as f64);
        // A step serves many requests: it is a child of the oldest one's
        // span and linked to the others.
        let step_span = tracing::info_span!(
            parent: self.running.first().and_then(|s| s.job.span.id()),
            "forward_step",
            batch.sequences = plan.len(),
            batch.tokens = batch_tokens,
        );
        for s in self.running.iter().skip(1) {
            step_span.add_link(s.job.span.context().span().span_context().clone());
        }
        let _in_step = step_span.enter();
        let started = Instant::now();
        // Prompt tokens to score need every position's logits; the others
        // only their last.
        let all_positions = plan
            .iter()
            .any(|slice| self.running[slice.sequence].scores(slice.tokens));
        // The guides of the structured outputs that sample this step: their
        // masks are computed on another thread while the forward runs.
        let mut guides: Vec<(usize, Guide)> = plan
            .iter()
            .enumerate()
            .filter_map(|(k, slice)| {
                let s = &mut self.running[slice.sequence];
                let guide = s.samples_after(slice.tokens).then(|| s.job.guide.take());
                Some((k, guide.flatten()?))
            })
            .collect();
        let (logits, mut masks) = std::thread::scope(|scope| {
            let masks = (!guides.is_empty()).then(|| {
                std::thread::Builder::new()
                    .name("router-masks".into())
                    .spawn_scoped(scope, || {
                        let mut masks: Vec<Option<Result<Mask, GuideError>>> =
                            (0..plan.len()).map(|_| None).collect();
                        for (k, guide) in &mut guides {
                            masks[*k] = Some(guide.allowed());
                        }
                        masks
                    })
            });
            let logits = self.forward(&plan, &feeds, all_positions);
            let failed = |why: String| -> Vec<Option<Result<Mask, GuideError>>> {
                (0..plan.len())
                    .map(|_| Some(Err(GuideError::new(why.clone()))))
                    .collect()
            };
            let masks = match masks {
                None => Vec::new(),
                Some(Ok(thread)) => thread.join().unwrap_or_else(|panic| {
                    let message = tramontane_infra::error::panic_message(&*panic);
                    failed(format!("the mask computation panicked: {message}"))
                }),
                Some(Err(spawn)) => failed(format!("no thread for the masks: {spawn}")),
            };
            (logits, masks)
        });
        for (k, guide) in guides {
            self.running[plan[k].sequence].job.guide = Some(guide);
        }
        masks.resize_with(plan.len(), || None);
        let (logits, vocab) = match logits {
            Ok(rows) => rows,
            Err(error) => {
                let (failure, failed) = GenerationError::of_step(error);
                self.fail_step(&plan, failure, failed);
                return;
            }
        };
        self.retrying = false;
        ::metrics::histogram!(metrics::STEP_DURATION).record(started.elapsed());
        // The blocks this step filled are offered to the prefix cache.
        for slice in &plan {
            let s = &mut self.running[slice.sequence];
            s.cache.register_full_blocks(&s.context);
        }
        let now = Instant::now();
        // Sequences that end this step: finished (with a reason, or none
        // when their client left), or failed by their guide.
        let mut finished: Vec<(usize, Result<Option<FinishReason>, GuideError>)> = Vec::new();
        let mut first_row = 0;
        for (k, slice) in plan.iter().enumerate() {
            let s = &mut self.running[slice.sequence];
            if s.generated == 0 {
                ::metrics::counter!(metrics::PROMPT_TOKENS_TOTAL).increment(slice.tokens as u64);
            }
            // This slice's rows: all its positions', or its last one's.
            let rows = if all_positions { slice.tokens } else { 1 };
            let slice_logits = &logits[first_row * vocab..(first_row + rows) * vocab];
            first_row += rows;
            if all_positions {
                // The forward advanced the cache past this slice.
                let from = s.cache.positions() - slice.tokens;
                s.score(from, slice_logits, vocab);
            }
            s.send_prompt_logprobs();
            if s.cache.positions() < s.context.len() {
                continue; // more prompt next step: these logits are not needed
            }
            if s.job.max_tokens == 0 {
                // The prompt is scored; nothing is to be generated.
                ::metrics::histogram!(metrics::E2E_REQUEST_LATENCY).record(now - s.job.submitted);
                finished.push((slice.sequence, Ok(Some(FinishReason::Length))));
                continue;
            }
            let last = &slice_logits[(rows - 1) * vocab..];
            let sampled = match masks[k].take() {
                None => Ok(s.sampler.sample(last)),
                Some(allowed) => {
                    allowed.map(|allowed| s.sampler.sample_within(last, Some(&allowed)))
                }
            };
            let guided = sampled.and_then(|(token, logprob)| {
                if let Some(guide) = &mut s.job.guide {
                    guide.advance(token)?;
                }
                Ok((token, logprob))
            });
            let (token, logprob) = match guided {
                Ok(sampled) => sampled,
                Err(error) => {
                    ::metrics::histogram!(metrics::E2E_REQUEST_LATENCY)
                        .record(now - s.job.submitted);
                    finished.push((slice.sequence, Err(error)));
                    continue;
                }
            };
            s.generated += 1;
            s.context.push(token);
            ::metrics::counter!(metrics::GENERATION_TOKENS_TOTAL).increment(1);
            match s.last_token_at.replace(now) {
                None => ::metrics::histogram!(metrics::TIME_TO_FIRST_TOKEN)
                    .record(now - s.job.submitted),
                Some(previous) => {
                    ::metrics::histogram!(metrics::INTER_TOKEN_LATENCY).record(now - previous)
                }
            }
            let delivered = s
                .job
                .events
                .send(Event::Token { id: token, logprob })
                .is_ok();
            let finish = if !s.job.ignore_eos && self.eos_ids.contains(&token)
                || s.job.guide.as_ref().is_some_and(Guide::is_complete)
            {
                Some(FinishReason::Stop)
            } else if s.generated >= s.job.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() || !delivered {
                // Recorded before the client can learn that it is done, so
                // that its next look at the metrics counts this request.
                ::metrics::histogram!(metrics::E2E_REQUEST_LATENCY).record(now - s.job.submitted);
                finished.push((slice.sequence, Ok(finish)));
            }
        }
        // The finished sequences give their KV blocks back, and the gauges
        // say so, before their clients hear that they are done.
        let mut done = Vec::with_capacity(finished.len());
        for (index, finish) in finished.into_iter().rev() {
            let mut s = self.running.remove(index);
            self.admission.release(&mut s);
            done.push((s.job.events.clone(), finish));
        }
        self.report();
        for (events, end) in done.into_iter().rev() {
            match end {
                Ok(Some(reason)) => {
                    let _ = events.send(Event::Finished(reason));
                }
                Ok(None) => {}
                Err(error) => {
                    let failure = Arc::new(GenerationError::from(error));
                    let _ = events.send(Event::Failed(failure));
                }
            }
        }
    }

    /// The model's forward over the planned slices: logits as rows of
    /// f32, and the vocabulary size.
    fn forward(
        &mut self,
        plan: &[Slice],
        feeds: &[Vec<u32>],
        all_positions: bool,
    ) -> Result<(Vec<f32>, usize), StepError<E::Error>> {
        let mut in_plan = plan.iter().map(|s| s.sequence).peekable();
        let mut batch: Vec<BatchItem<'_>> = Vec::with_capacity(plan.len());
        for (i, s) in self.running.iter_mut().enumerate() {
            if in_plan.peek() == Some(&i) {
                in_plan.next();
                batch.push(BatchItem {
                    tokens: &feeds[batch.len()],
                    cache: &mut s.cache,
                });
            }
        }
        let which = if all_positions {
            Logits::AllPositions
        } else {
            Logits::LastPosition
        };
        self.model
            .forward(&self.kv, &mut batch, which)
            .and_then(|l| Ok(rows_to_vec(&l)?))
    }

    /// A step failed. When it failed for some of its sequences only (those
    /// with a token routed to an expert without a live worker: `failed`,
    /// indexes into the step's batch, which is `plan`), only those fail;
    /// the others keep their place, their caches as they were before the
    /// step (the model rolls a failed step back), and run it again at the
    /// next iteration, to the same tokens (nothing new is admitted until
    /// they have). Any other failure fails every running sequence.
    fn fail_step(&mut self, plan: &[Slice], failure: GenerationError, failed: Failed) {
        let failure = Arc::new(failure);
        let mut fails = vec![false; self.running.len()];
        if let Failed::Only(batch) = failed {
            for slice in batch.iter().filter_map(|&i| plan.get(i)) {
                if let Some(fail) = fails.get_mut(slice.sequence) {
                    *fail = true;
                }
            }
        }
        if !fails.contains(&true) {
            // Every sequence, or none named in this step: retrying the
            // same step would fail the same way, forever.
            fails.fill(true);
        }
        let mut failed = Vec::new();
        for (mut s, fail) in std::mem::take(&mut self.running).into_iter().zip(fails) {
            if fail {
                self.admission.release(&mut s);
                failed.push(s.job.events);
            } else {
                self.running.push(s);
            }
        }
        self.retrying = !self.running.is_empty();
        tracing::warn!(
            error = %tramontane_infra::error::chain(&*failure),
            failed = failed.len(),
            retried = self.running.len(),
            "forward step failed"
        );
        // Their blocks are back, and the gauges say so, before they hear it.
        self.report();
        for events in failed {
            let _ = events.send(Event::Failed(failure.clone()));
        }
    }
}

/// The blocks the running sequences' reservations count more than once:
/// what their caches hold, summed, less the blocks the pool has held.
fn shared_blocks(kv: &KvPool, running: &[Sequence]) -> usize {
    let held: usize = running.iter().map(|s| s.cache.blocks().len()).sum();
    held.saturating_sub(kv.held_blocks())
}

/// Logits `[rows, vocab]` as f32 on the CPU, flattened, and the vocab size.
fn rows_to_vec(logits: &Tensor) -> Result<(Vec<f32>, usize), ForwardError> {
    let vocab = logits.size().last().copied().unwrap_or(0) as usize;
    let flat = logits
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    let values = Vec::<f32>::try_from(&flat)?;
    Ok((values, vocab))
}

#[cfg(test)]
mod tests {
    //! The engine over a KV pool too small for every request at once:
    //! sequences are preempted, requeued and recomputed, and each still
    //! generates exactly what it generates alone; with an expert lost, only
    //! the sequences routed to it fail, and the others generate what they
    //! generate alone.

    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::convert::Infallible;
    use std::rc::Rc;

    use super::*;
    use tramontane_dispatch::error::DispatchError;
    use tramontane_model::LoadOptions;
    use tramontane_model::generate::{StopRule, generate_greedy};
    use tramontane_model::testing::{TestExperts, dense_over};

    /// A synthetic checkpoint in a temporary folder.
    fn synthetic_model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default()).unwrap();
        dir
    }

    /// An engine over the in-process model of `model_dir`.
    fn engine_on(model_dir: &std::path::Path, config: SchedulerConfig) -> EngineHandle {
        let model_dir = model_dir.to_path_buf();
        EngineHandle::spawn(
            move || CausalLm::load_in_process(&model_dir, LoadOptions::default()),
            vec![],
            config,
        )
        .unwrap()
    }

    fn collect(mut events: mpsc::UnboundedReceiver<Event>) -> Vec<u32> {
        let mut tokens = Vec::new();
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token { id, .. } => tokens.push(id),
                Event::PromptLogprobs(_) => panic!("prompt logprobs nobody asked for"),
                Event::Finished(reason) => {
                    assert_eq!(reason, FinishReason::Length);
                    break;
                }
                Event::Failed(error) => panic!("request failed: {error}"),
            }
        }
        tokens
    }

    #[test]
    fn preempted_sequences_recompute_and_generate_what_they_generate_alone() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let model_dir = dir.path().to_path_buf();
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|s| (0..20).map(|p| 5 + (s * 31 + p * 7) % 200).collect())
            .collect();
        let max_tokens = 30;
        let expected = {
            let model = CausalLm::load_in_process(&model_dir, LoadOptions::default()).unwrap();
            let stop = StopRule {
                max_new_tokens: max_tokens,
                eos_ids: vec![],
            };
            generate_greedy(&model, &prompts, &stop).unwrap()
        };
        // 4 blocks of 16: each request alone needs 50 positions (4 blocks),
        // and two are admitted at once (2 blocks each for their prompt).
        let config = SchedulerConfig {
            max_kv_tokens: 64,
            ..SchedulerConfig::default()
        };
        let engine = engine_on(&model_dir, config);
        let receivers = submit_greedy(&engine, &prompts, max_tokens);
        let got: Vec<Vec<u32>> = receivers.into_iter().map(collect).collect();
        assert_eq!(got, expected);
        assert!(engine.preemptions() > 0, "the pool was never full");
    }

    #[test]
    fn prompt_logprobs_are_the_models_own_over_chunks_and_preemption() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let model_dir = dir.path().to_path_buf();
        // Prompts of 1 and of 30 tokens (2 blocks, growing into a third).
        let mut prompts: Vec<Vec<u32>> = (0..3)
            .map(|s| (0..30).map(|p| 5 + (s * 31 + p * 7) % 200).collect())
            .collect();
        prompts.push(vec![7]);
        let top = 3;
        let expected: Vec<Vec<TokenLogprob>> = {
            let model = CausalLm::load_in_process(&model_dir, LoadOptions::default()).unwrap();
            let kv = model.kv_pool(64);
            prompts
                .iter()
                .map(|prompt| {
                    let mut cache = kv.new_cache();
                    let batch = &mut [BatchItem {
                        tokens: prompt,
                        cache: &mut cache,
                    }];
                    let logits = model.forward(&kv, batch, Logits::AllPositions).unwrap();
                    let (rows, vocab) = rows_to_vec(&logits).unwrap();
                    (1..prompt.len())
                        .map(|i| logprobs(&rows[(i - 1) * vocab..i * vocab], prompt[i], top))
                        .collect()
                })
                .collect()
        };
        // 6 blocks for requests of 3 each, prompts in chunks of at most 8:
        // sequences are preempted after their prompts were scored, and
        // recompute them.
        let config = SchedulerConfig {
            max_kv_tokens: 96,
            max_batch_tokens: 8,
            max_running: 8,
            ..SchedulerConfig::default()
        };
        let engine = engine_on(&model_dir, config);
        let mut slots = engine.reserve(prompts.len() + 1).unwrap();
        let mut submit = |prompt: &[u32], max_tokens| {
            let (events, receiver) = mpsc::unbounded_channel();
            let mut job = greedy_job(prompt, max_tokens, events);
            job.prompt_logprobs = Some(top);
            engine.submit(&mut slots, job).unwrap();
            receiver
        };
        let mut receivers: Vec<_> = prompts.iter().map(|p| submit(p, 14)).collect();
        // Only scored: nothing generated.
        receivers.push(submit(&prompts[0], 0));
        for (i, mut events) in receivers.into_iter().enumerate() {
            let expected = &expected[i % prompts.len()];
            let (mut scored, mut tokens) = (None, 0);
            loop {
                match events.blocking_recv().expect("events until the end") {
                    Event::PromptLogprobs(got) => {
                        assert!(scored.is_none() && tokens == 0, "request {i}: once, first");
                        scored = Some(got);
                    }
                    Event::Token { .. } => tokens += 1,
                    Event::Finished(reason) => {
                        assert_eq!(reason, FinishReason::Length);
                        break;
                    }
                    Event::Failed(error) => panic!("request {i} failed: {error}"),
                }
            }
            assert_eq!(tokens, if i < prompts.len() { 14 } else { 0 });
            let scored = scored.expect("prompt logprobs");
            assert_eq!(scored.len(), expected.len(), "request {i}");
            for (p, (got, want)) in scored.iter().zip(expected).enumerate() {
                assert!(
                    (got.logprob - want.logprob).abs() < 1e-4,
                    "request {i} token {}: {} against {}",
                    p + 1,
                    got.logprob,
                    want.logprob
                );
                assert_eq!(got.rank, want.rank, "request {i} token {}", p + 1);
                let ids = |lp: &TokenLogprob| lp.top.iter().map(|&(id, _)| id).collect::<Vec<_>>();
                assert_eq!(ids(got), ids(want), "request {i} token {}", p + 1);
            }
        }
        assert!(engine.preemptions() > 0, "the pool was never full");
    }

    /// Greedy tokens and their top-5 logprobs of each prompt, the prompts
    /// submitted one after the other in `waves` (each wave concurrently,
    /// after the previous one finished), on an engine with `config`; and
    /// the prompt tokens found in the prefix cache.
    fn tokens_and_logprobs(
        model_dir: &std::path::Path,
        config: SchedulerConfig,
        waves: &[Vec<Vec<u32>>],
    ) -> (Vec<Vec<(u32, TokenLogprob)>>, usize, usize) {
        let model_dir = model_dir.to_path_buf();
        let engine = engine_on(&model_dir, config);
        let mut out = Vec::new();
        for wave in waves {
            let mut slots = engine.reserve(wave.len()).unwrap();
            let receivers: Vec<_> = wave
                .iter()
                .map(|prompt| {
                    let (events, receiver) = mpsc::unbounded_channel();
                    let mut job = greedy_job(prompt, 10, events);
                    job.sampling.logprobs = Some(5);
                    engine.submit(&mut slots, job).unwrap();
                    receiver
                })
                .collect();
            for mut events in receivers {
                let mut tokens = Vec::new();
                loop {
                    match events.blocking_recv().expect("events until the end") {
                        Event::Token { id, logprob } => tokens.push((id, logprob.unwrap())),
                        Event::Finished(_) => break,
                        Event::Failed(error) => panic!("request failed: {error}"),
                        Event::PromptLogprobs(_) => panic!("prompt logprobs nobody asked for"),
                    }
                }
                out.push(tokens);
            }
        }
        (out, engine.prefix_cache_hits(), engine.preemptions())
    }

    #[test]
    fn prefix_cached_sequences_compute_what_they_compute_from_scratch() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let base: Vec<u32> = (0..45).map(|p| 5 + (p * 37) % 200).collect();
        let with_tail = |shared: usize, tail: u32| {
            let mut prompt = base[..shared].to_vec();
            prompt.extend((0..9).map(|p| 210 + (p * 11 + tail) % 40));
            prompt
        };
        // First the whole base; then prompts sharing 32 of its tokens (two
        // whole blocks), 37 (two blocks and 5 more), all 45, the first 32
        // exactly (all but its last token's block), and none.
        let waves = vec![
            vec![base.clone()],
            vec![
                with_tail(32, 1),
                with_tail(37, 2),
                base.clone(),
                base[..32].to_vec(),
                with_tail(0, 3),
            ],
        ];
        let run = |prefix_caching, max_kv_tokens| {
            let config = SchedulerConfig {
                prefix_caching,
                max_kv_tokens,
                max_batch_tokens: 24,
                max_running: 8,
                ..SchedulerConfig::default()
            };
            tokens_and_logprobs(dir.path(), config, &waves)
        };
        let (scratch, no_hits, _) = run(false, 4096);
        assert_eq!(no_hits, 0);
        // Room for everything, then a pool so small that sequences are preempted.
        for max_kv_tokens in [4096, 160] {
            let (cached, hits, preempted) = run(true, max_kv_tokens);
            assert!(
                hits >= 32 + 32 + 32 + 16,
                "{hits} prompt tokens from the cache"
            );
            if max_kv_tokens < 4096 {
                assert!(preempted > 0, "the pool was never full");
            }
            assert_eq!(cached.len(), scratch.len());
            for (i, (ours, theirs)) in cached.iter().zip(&scratch).enumerate() {
                let ids =
                    |t: &[(u32, TokenLogprob)]| t.iter().map(|(id, _)| *id).collect::<Vec<_>>();
                assert_eq!(ids(ours), ids(theirs), "prompt {i}, pool {max_kv_tokens}");
                for ((_, a), (_, b)) in ours.iter().zip(theirs) {
                    // f32: the same values up to the order of the sums in
                    // attention over a cached prefix against one chunk.
                    assert!(
                        (a.logprob - b.logprob).abs() < 1e-5,
                        "prompt {i}: {a:?} vs {b:?}"
                    );
                    for ((x, p), (y, q)) in a.top.iter().zip(&b.top) {
                        assert_eq!(x, y, "prompt {i}");
                        assert!((p - q).abs() < 1e-5, "prompt {i}: {a:?} vs {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn alone_a_cached_prefix_gives_bit_for_bit_the_logits_of_the_same_chunks_from_scratch() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let base: Vec<u32> = (0..45).map(|p| 7 + (p * 31) % 200).collect();
        let with_tail = |shared: usize, tail: u32| {
            let mut prompt = base[..shared].to_vec();
            prompt.extend((0..9).map(|p| 211 + (p * 13 + tail) % 40));
            prompt
        };
        // One request at a time, chunks of 32 (two blocks): a cached prefix
        // of two blocks leaves the rest to the chunk a cold prefill computes
        // after its first, over the same steps. Shares at a block boundary
        // (32), off it (37), all of it (45, the cache giving 32) and none.
        let waves: Vec<Vec<Vec<u32>>> = [
            base.clone(),
            with_tail(32, 1),
            with_tail(37, 2),
            base.clone(),
            with_tail(0, 3),
        ]
        .into_iter()
        .map(|prompt| vec![prompt])
        .collect();
        let run = |prefix_caching| {
            let config = SchedulerConfig {
                prefix_caching,
                max_batch_tokens: 32,
                max_running: 8,
                ..SchedulerConfig::default()
            };
            tokens_and_logprobs(dir.path(), config, &waves)
        };
        let (scratch, _, _) = run(false);
        let (cached, hits, _) = run(true);
        assert_eq!(hits, 32 + 32 + 32, "prompt tokens from the cache");
        assert_eq!(cached, scratch);
    }

    #[test]
    fn sequences_submitted_together_wait_to_share_a_prefix_in_flight() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        // Three copies of one prompt (as n = 3 sends them) and one that
        // shares its first 40 tokens, all at once into a cold cache.
        let prompt: Vec<u32> = (0..50).map(|p| 9 + (p * 13) % 190).collect();
        let mut other = prompt[..40].to_vec();
        other.extend([201, 202, 203]);
        let wave = vec![vec![prompt.clone(), prompt.clone(), prompt, other]];
        let config = |prefix_caching| SchedulerConfig {
            prefix_caching,
            max_batch_tokens: 32,
            max_running: 8,
            ..SchedulerConfig::default()
        };
        let (scratch, _, _) = tokens_and_logprobs(dir.path(), config(false), &wave);
        let (shared, hits, _) = tokens_and_logprobs(dir.path(), config(true), &wave);
        // The copies find the 3 whole blocks of 49 tokens, the other the 2
        // of its 40 shared tokens.
        assert_eq!(hits, 48 + 48 + 32);
        let ids = |t: &[(u32, TokenLogprob)]| t.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        for (ours, theirs) in shared.iter().zip(&scratch) {
            assert_eq!(ids(ours), ids(theirs));
        }
    }

    #[test]
    fn sequences_sharing_a_prefix_are_charged_its_blocks_once() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        // Six prompts of a 64-token prefix (4 blocks) and 3 tokens of their
        // own, 10 tokens generated: 5 blocks each alone, 4 + 6 x 1 shared.
        // The pool has 14.
        let prefix: Vec<u32> = (0..64).map(|p| 11 + (p * 29) % 230).collect();
        let prompts: Vec<Vec<u32>> = (0..6u32)
            .map(|i| {
                let mut prompt = prefix.clone();
                prompt.extend([240 + i, 100 + i, 7 + i]);
                prompt
            })
            .collect();
        let config = |prefix_caching| SchedulerConfig {
            prefix_caching,
            max_kv_tokens: 14 * BLOCK_SIZE,
            max_running: 8,
            ..SchedulerConfig::default()
        };
        let run = |prefix_caching| {
            let engine = engine_on(dir.path(), config(prefix_caching));
            let tokens: Vec<Vec<u32>> = submit_greedy(&engine, &prompts, 10)
                .into_iter()
                .map(collect)
                .collect();
            (tokens, engine.peak_running(), engine.preemptions())
        };
        let (scratch, scratch_peak, _) = run(false);
        let (shared, shared_peak, preempted) = run(true);
        assert_eq!(shared, scratch);
        // Alone, two fit at once; charged the prefix once, all six do.
        assert_eq!(scratch_peak, 2);
        assert_eq!((shared_peak, preempted), (6, 0));
    }

    #[test]
    fn a_logit_bias_forces_or_bans_tokens_of_its_own_sequence_only() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let model_dir = dir.path().to_path_buf();
        let engine = engine_on(&model_dir, SchedulerConfig::default());
        let prompt: Vec<u32> = (0..12).map(|p| 300 + p * 17).collect();
        let max_tokens = 12;
        let plain =
            collect(submit_greedy(&engine, std::slice::from_ref(&prompt), max_tokens).remove(0));
        let bias = |entries: Vec<(String, f64)>| {
            let entries = entries.into_iter().map(|(k, v)| (k, v.into())).collect();
            crate::logit_bias::LogitBias::from_request(&entries).unwrap()
        };
        let forced = 15359;
        assert!(!plain.contains(&forced), "{plain:?}");
        let jobs = [
            bias(vec![(forced.to_string(), 100.0)]),
            bias(plain.iter().map(|id| (id.to_string(), -100.0)).collect()),
            crate::logit_bias::LogitBias::default(),
        ];
        // The three in one batch: a bias moves its own sequence only.
        let mut slots = engine.reserve(jobs.len()).unwrap();
        let receivers: Vec<_> = jobs
            .into_iter()
            .map(|logit_bias| {
                let (events, receiver) = mpsc::unbounded_channel();
                let mut job = greedy_job(&prompt, max_tokens, events);
                job.sampling.logit_bias = logit_bias;
                engine.submit(&mut slots, job).unwrap();
                receiver
            })
            .collect();
        let got: Vec<Vec<u32>> = receivers.into_iter().map(collect).collect();
        assert_eq!(got[0], vec![forced; max_tokens]);
        assert!(
            got[1].iter().all(|id| !plain.contains(id)),
            "banned {plain:?}, got {:?}",
            got[1]
        );
        assert_eq!(got[2], plain);
    }

    #[test]
    fn a_guided_sequence_samples_within_its_constraint_and_ends_with_it() {
        use crate::structured_output::{Grammars, OutputConstraint, RequestedConstraint};
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let engine = engine_on(dir.path(), SchedulerConfig::default());
        let tokenizer = Arc::new(tramontane_model::Tokenizer::from_dir(dir.path()).unwrap());
        let vocab = tramontane_config::ModelSpec::from_file(&dir.path().join("config.json"))
            .unwrap()
            .vocab_size;
        let eos = tokenizer.eos_token_id().unwrap();
        let grammars = Grammars::new(tokenizer.clone(), vocab, &[eos]).unwrap();
        let prompt: Vec<u32> = (0..12).map(|p| 300 + p * 17).collect();
        let max_tokens = 40;
        let plain =
            collect(submit_greedy(&engine, std::slice::from_ref(&prompt), max_tokens).remove(0));
        let guide = |constraint| {
            let requested = RequestedConstraint {
                param: "test",
                constraint,
            };
            Some(grammars.compile(&requested).unwrap())
        };
        let choices = vec!["north".to_string(), "south-south-west".into()];
        let guides = [
            guide(OutputConstraint::Regex("[0-9]{3}-[a-c]{2}".into())),
            guide(OutputConstraint::Choice(choices.clone())),
            None,
        ];
        // The three in one batch, sampled (temperature 1): a constraint
        // binds its own sequence only.
        let mut slots = engine.reserve(guides.len()).unwrap();
        let receivers: Vec<_> = guides
            .into_iter()
            .enumerate()
            .map(|(i, guide)| {
                let (events, receiver) = mpsc::unbounded_channel();
                let mut job = greedy_job(&prompt, max_tokens, events);
                if guide.is_some() {
                    job.sampling.temperature = 1.0;
                    job.sampling.seed = Some(i as u64);
                }
                job.guide = guide;
                engine.submit(&mut slots, job).unwrap();
                receiver
            })
            .collect();
        let mut ends = Vec::new();
        for mut events in receivers {
            let mut tokens = Vec::new();
            let end = loop {
                match events.blocking_recv().expect("an end") {
                    Event::Token { id, .. } => tokens.push(id),
                    Event::Finished(reason) => break reason,
                    other => panic!("{other:?}"),
                }
            };
            ends.push((tokens, end));
        }
        let text = |tokens: &[u32]| tokenizer.decode(tokens).unwrap();
        let (regex, end) = &ends[0];
        let regex = text(regex);
        assert_eq!(*end, FinishReason::Stop);
        assert!(
            regex.len() == 6 && regex[..3].bytes().all(|b| b.is_ascii_digit()),
            "{regex:?}"
        );
        let (choice, end) = &ends[1];
        assert_eq!(*end, FinishReason::Stop);
        assert!(choices.contains(&text(choice)), "{:?}", text(choice));
        assert_eq!(ends[2], (plain, FinishReason::Length));
    }

    /// The in-process experts, with expert `expert` of layer `layer` lost:
    /// a step with tokens routed there fails as the dispatch does when no
    /// live worker holds an expert, naming those tokens. Steps split into
    /// `groups` micro-batches.
    fn lost_expert(
        dir: &std::path::Path,
        lost: (usize, usize),
        groups: usize,
    ) -> CausalLm<TestExperts<DispatchError>> {
        dense_over(dir, Kind::Float, |local| {
            TestExperts::new(local)
                .micro_batches(groups)
                .hook(move |layer, _, routing| {
                    let mut tokens: Vec<usize> =
                        tramontane_dispatch::combine::routed_pairs(routing)
                            .iter()
                            .filter(|pair| (layer, pair.expert) == lost)
                            .map(|pair| pair.token)
                            .collect();
                    tokens.dedup();
                    if tokens.is_empty() {
                        return Ok(());
                    }
                    Err(DispatchError::NoLiveReplica {
                        layer,
                        expert: lost.1,
                        placed_on: vec![],
                        tokens,
                        failures: vec![],
                    })
                })
        })
        .unwrap()
    }

    /// The (layer, expert) pairs a generation's tokens were routed to.
    type Routed = BTreeSet<(usize, usize)>;

    /// How a request ended: its tokens, and its failure if it failed.
    fn outcome(
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> (Vec<u32>, Option<Arc<GenerationError>>) {
        let mut tokens = Vec::new();
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token { id, .. } => tokens.push(id),
                Event::PromptLogprobs(_) => panic!("prompt logprobs nobody asked for"),
                Event::Finished(_) => return (tokens, None),
                Event::Failed(error) => return (tokens, Some(error)),
            }
        }
        panic!("the events ended without an end");
    }

    fn greedy_job(
        prompt: &[u32],
        max_tokens: usize,
        events: mpsc::UnboundedSender<Event>,
    ) -> GenerateJob {
        GenerateJob {
            prompt: prompt.to_vec(),
            max_tokens,
            prompt_logprobs: None,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            guide: None,
            ignore_eos: true,
            events,
            submitted: Instant::now(),
            span: tracing::Span::none(),
        }
    }

    /// Queues a greedy job per prompt; their events, in order.
    fn submit_greedy(
        engine: &EngineHandle,
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Vec<mpsc::UnboundedReceiver<Event>> {
        let mut slots = engine.reserve(prompts.len()).unwrap();
        prompts
            .iter()
            .map(|prompt| {
                let (events, receiver) = mpsc::unbounded_channel();
                engine
                    .submit(&mut slots, greedy_job(prompt, max_tokens, events))
                    .unwrap();
                receiver
            })
            .collect()
    }

    #[test]
    fn a_lost_expert_fails_only_the_sequences_routed_to_it() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let model_dir = dir.path().to_path_buf();
        let prompts: Vec<Vec<u32>> = (0..10)
            .map(|s| {
                (0..3 + s % 4)
                    .map(|p| 5 + (s * 37 + p * 11) % 240)
                    .collect()
            })
            .collect();
        let max_tokens = 4;
        let stop = StopRule {
            max_new_tokens: max_tokens,
            eos_ids: vec![],
        };
        // What each prompt generates alone, and where its tokens are routed.
        let seen = Rc::new(RefCell::new(Routed::new()));
        let recording = {
            let seen = seen.clone();
            dense_over(&model_dir, Kind::Float, |local| {
                TestExperts::new(local).hook(move |layer, _, routing| {
                    let mut seen = seen.borrow_mut();
                    seen.extend(routing.experts.iter().map(|&expert| (layer, expert)));
                    Ok::<_, Infallible>(())
                })
            })
            .unwrap()
        };
        let (expected, routed): (Vec<Vec<u32>>, Vec<Routed>) = prompts
            .iter()
            .map(|prompt| {
                seen.borrow_mut().clear();
                let tokens = generate_greedy(&recording, std::slice::from_ref(prompt), &stop)
                    .unwrap()
                    .remove(0);
                (tokens, seen.borrow().clone())
            })
            .unzip();
        // The lost expert: the one that splits the prompts most evenly.
        let experts = recording.config().experts_per_layer();
        let (layer, expert) = (0..experts.len())
            .flat_map(|layer| (0..experts[layer]).map(move |expert| (layer, expert)))
            .max_by_key(|pair| {
                let hit = routed.iter().filter(|r| r.contains(pair)).count();
                hit.min(prompts.len() - hit)
            })
            .unwrap();
        let lost: Vec<bool> = routed
            .iter()
            .map(|r| r.contains(&(layer, expert)))
            .collect();
        let hit = lost.iter().filter(|&&l| l).count();
        assert!(
            hit >= 2 && prompts.len() - hit >= 2,
            "layer {layer} expert {expert}: {hit} of {} prompts routed there",
            prompts.len()
        );
        // One micro-batch, and several (rows named in each are counted in the step).
        for groups in [1, 3] {
            let dir = model_dir.clone();
            let engine = EngineHandle::spawn(
                move || Ok(lost_expert(&dir, (layer, expert), groups)),
                vec![],
                SchedulerConfig::default(),
            )
            .unwrap();
            let receivers = submit_greedy(&engine, &prompts, max_tokens);
            for (i, receiver) in receivers.into_iter().enumerate() {
                let (tokens, failure) = outcome(receiver);
                if lost[i] {
                    let failure = failure
                        .unwrap_or_else(|| panic!("{groups} groups: prompt {i} did not fail"));
                    assert!(
                        matches!(
                            &*failure,
                            GenerationError::Dispatch(DispatchError::NoLiveReplica { layer: l, expert: e, .. })
                                if (*l, *e) == (layer, expert)
                        ),
                        "{groups} groups: prompt {i}: {failure}"
                    );
                    // What it sent before is what it generates alone.
                    assert!(
                        tokens.len() < expected[i].len() && expected[i].starts_with(&tokens),
                        "{groups} groups: prompt {i}: {tokens:?} vs {:?}",
                        expected[i]
                    );
                } else {
                    assert!(
                        failure.is_none(),
                        "{groups} groups: prompt {i} failed: {}",
                        failure.unwrap()
                    );
                    assert_eq!(tokens, expected[i], "{groups} groups: prompt {i}");
                }
            }
        }
    }

    #[test]
    fn queue_places_are_reserved_before_work_and_given_back_when_unused() {
        let _guard = tch::no_grad_guard();
        let dir = synthetic_model();
        let model_dir = dir.path().to_path_buf();
        let config = SchedulerConfig {
            max_waiting: 4,
            ..SchedulerConfig::default()
        };
        let engine = engine_on(&model_dir, config);
        // More than the whole queue is the request's fault, not the load's.
        assert!(matches!(
            engine.reserve(5),
            Err(GenerationError::Invalid(InvalidParam {
                param: "prompt",
                ..
            }))
        ));
        let three = engine.reserve(3).unwrap();
        assert!(matches!(
            engine.reserve(2),
            Err(GenerationError::QueueFull { waiting: 3 })
        ));
        let one = engine.reserve(1).unwrap();
        drop(three);
        // Unused places came back; the one still held counts.
        let mut again = engine.reserve(3).unwrap();
        assert!(engine.reserve(1).is_err());
        drop(one);
        let (events, _receiver) = mpsc::unbounded_channel();
        let job = |events| greedy_job(&[1, 2], 1, events);
        engine.submit(&mut again, job(events.clone())).unwrap();
        // A reservation with no place left queues nothing.
        let mut empty = engine.reserve(0).unwrap();
        assert!(matches!(
            engine.submit(&mut empty, job(events)),
            Err(GenerationError::Dropped)
        ));
    }
}
