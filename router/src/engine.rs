//! The engine: one thread owns the model (dense weights, KV caches) and runs
//! forward steps over every running sequence at once. New requests join the
//! batch at the next step (their prompts prefill in the same ragged step as
//! the others' decode tokens); a finished sequence, or one whose client went
//! away, leaves at once.

use tch::Kind;
use tokio::sync::mpsc;
use tramontane_model::kv_cache::KvCache;
use tramontane_model::{BatchItem, Logits, Mixtral};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
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
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Finished(FinishReason),
    /// The step failed; the reason starts with the gRPC code name when one fits
    /// (e.g. `UNAVAILABLE: ...`).
    Failed(String),
}

/// A validated request.
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub events: mpsc::UnboundedSender<Event>,
}

struct Sequence {
    cache: KvCache,
    feed: Vec<u32>,
    generated: usize,
    max_tokens: usize,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<GenerateJob>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine could not start: {0}")]
    Start(String),
}

impl EngineHandle {
    /// Starts the engine thread; `build` runs on it and creates the model.
    pub fn spawn<F>(build: F, eos_ids: Vec<u32>, queue: usize) -> Result<Self, EngineError>
    where
        F: FnOnce() -> Result<Mixtral, String> + Send + 'static,
    {
        let (jobs, mut receiver) = mpsc::channel::<GenerateJob>(queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("router-engine".into())
            .spawn(move || {
                let _guard = tch::no_grad_guard();
                let model = match build() {
                    Ok(model) => {
                        let _ = ready_tx.send(Ok(()));
                        model
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&model, &mut receiver, &eos_ids);
            })
            .map_err(|e| EngineError::Start(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| EngineError::Start("engine thread exited".into()))?
            .map_err(EngineError::Start)?;
        Ok(Self { jobs })
    }

    pub async fn submit(&self, job: GenerateJob) -> Result<(), EngineError> {
        self.jobs.send(job).await.map_err(|_| EngineError::Stopped)
    }
}

fn admit(model: &Mixtral, job: GenerateJob, running: &mut Vec<Sequence>) {
    running.push(Sequence {
        cache: model.new_cache(),
        feed: job.prompt,
        generated: 0,
        max_tokens: job.max_tokens,
        events: job.events,
    });
}

fn run(model: &Mixtral, receiver: &mut mpsc::Receiver<GenerateJob>, eos_ids: &[u32]) {
    let mut running: Vec<Sequence> = Vec::new();
    loop {
        if running.is_empty() {
            match receiver.blocking_recv() {
                Some(job) => admit(model, job, &mut running),
                None => return,
            }
        }
        while let Ok(job) = receiver.try_recv() {
            admit(model, job, &mut running);
        }
        running.retain(|s| !s.events.is_closed());
        if running.is_empty() {
            continue;
        }
        let logits = {
            let mut batch: Vec<BatchItem<'_>> = running
                .iter_mut()
                .map(|s| BatchItem {
                    tokens: &s.feed,
                    cache: &mut s.cache,
                })
                .collect();
            model.forward(&mut batch, Logits::LastPosition)
        };
        let next: Result<Vec<i64>, String> = logits.map_err(|e| e.to_string()).and_then(|l| {
            Vec::<i64>::try_from(l.argmax(-1, false).to_kind(Kind::Int64))
                .map_err(|e| e.to_string())
        });
        let next = match next {
            Ok(next) => next,
            Err(reason) => {
                for s in running.drain(..) {
                    let _ = s.events.send(Event::Failed(reason.clone()));
                }
                continue;
            }
        };
        let mut still_running = Vec::with_capacity(running.len());
        for (mut s, token) in running.drain(..).zip(next) {
            let token = token as u32;
            s.generated += 1;
            if s.events.send(Event::Token(token)).is_err() {
                continue; // the client went away: free its cache now
            }
            let finish = if eos_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated >= s.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => {
                    let _ = s.events.send(Event::Finished(reason));
                }
                None => {
                    s.feed = vec![token];
                    still_running.push(s);
                }
            }
        }
        running = still_running;
    }
}
