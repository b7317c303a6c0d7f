//! One generation request, whichever API it came through (HTTP or gRPC):
//! validation against the model's limits, submission to the engine, and the
//! stream of text chunks with stop strings applied.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tramontane_model::Tokenizer;

use crate::engine::{EngineHandle, Event, FinishReason, GenerateJob, QueueSlots};
use crate::failure::GenerationError;
use crate::readiness::Readiness;
use crate::sampling::{InvalidParam, SamplingParams, TokenLogprob};
use crate::structured_output::{Grammars, Guide, GuideError, RequestedConstraint};
use crate::text::{IncrementalDecoder, StopList, StopStrings};

/// A request in model terms: token ids and limits.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Score the prompt's own tokens, with this many top alternatives
    /// each ([`Completed::prompt_logprobs`]); `max_tokens` may then be 0.
    pub prompt_logprobs: Option<usize>,
    /// Stop strings, matched on the generated text: one checked copy for
    /// all the request's prompts.
    pub stop: StopList,
    pub ignore_eos: bool,
    /// What the client asked for (`text_completion`, `chat`, `generate`):
    /// the trace's `gen_ai.operation.name`.
    pub operation: &'static str,
    /// A structured output's compiled constraint (each choice gets its
    /// own copy).
    pub guide: Option<Guide>,
}

impl GenerationRequest {
    /// This request for choice `choice` of `n` of one prompt: the same but
    /// for its seed (`seed + choice`), so that seeded choices differ and
    /// stay reproducible.
    pub fn for_choice(&self, prompt: Vec<u32>, choice: usize) -> Self {
        let mut request = Self {
            prompt,
            ..self.clone()
        };
        request.sampling.seed = self.sampling.seed.map(|s| s.wrapping_add(choice as u64));
        request
    }
}

/// Prompts (choices) one request may carry.
pub const MAX_PROMPTS_PER_REQUEST: usize = 64;

/// Seconds a refused client is told to wait.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Starts generations: what both APIs share.
#[derive(Clone)]
pub struct Generator {
    engine: EngineHandle,
    /// Refuses new requests while draining.
    readiness: Arc<Readiness>,
    /// Requests accepted and not yet delivered to the end.
    in_flight: Arc<AtomicUsize>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    max_positions: usize,
    /// The served model name (for traces).
    model_name: Arc<str>,
    /// Structured outputs' compiler, built at the first request for one
    /// (or why this tokenizer has none).
    grammars: Arc<OnceLock<Result<Grammars, String>>>,
}

impl Generator {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        max_positions: usize,
        model_name: &str,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            engine,
            readiness,
            in_flight: Arc::new(AtomicUsize::new(0)),
            tokenizer,
            vocab_size,
            max_positions,
            model_name: model_name.into(),
            grammars: Arc::new(OnceLock::new()),
        }
    }

    /// Compiles a structured output's constraint, off the async runtime
    /// (a large schema takes milliseconds): a 400 naming the request's
    /// field when it does not compile.
    pub async fn compile(&self, requested: RequestedConstraint) -> Result<Guide, GenerationError> {
        let generator = self.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let grammars = generator.grammars.get_or_init(|| {
                Grammars::new(
                    generator.tokenizer.clone(),
                    generator.vocab_size,
                    generator.engine.eos_ids(),
                )
            });
            match grammars {
                Ok(grammars) => grammars.compile(&requested),
                Err(why) => Err(InvalidParam::new(
                    requested.param,
                    format!(
                        "structured outputs are not available for this model's tokenizer: {why}"
                    ),
                )),
            }
        })
        .await
        .map_err(|_| GuideError::new("compiling the constraint panicked"))?;
        Ok(compiled?)
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Sequences the engine runs at once, at most (`--max-running`).
    pub fn max_running(&self) -> usize {
        self.engine.config().max_running
    }

    /// The context length: prompt plus generated tokens, at most.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Reserves places in the queue for a request's `prompts`, before any
    /// of them is tokenized: a full queue refuses at once.
    pub fn reserve(&self, prompts: usize) -> Result<QueueSlots, GenerationError> {
        if self.readiness.is_draining() {
            return Err(GenerationError::Draining);
        }
        if !self.engine.is_running() {
            return Err(GenerationError::EngineStopped);
        }
        self.engine.reserve(prompts)
    }

    /// Requests accepted and not yet delivered to the end (their streams
    /// not yet dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Completes when the engine thread has ended.
    pub async fn engine_stopped(&self) {
        self.engine.stopped().await
    }

    /// Validates `request` and queues it in one of `slots`.
    pub fn start(
        &self,
        request: GenerationRequest,
        slots: &mut QueueSlots,
    ) -> Result<CompletionStream, GenerationError> {
        let prompt = request.prompt;
        if prompt.is_empty() {
            return Err(InvalidParam::new("prompt", "the prompt is empty").into());
        }
        if let Some(id) = prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(InvalidParam::new(
                "prompt",
                format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            )
            .into());
        }
        if prompt.len() >= self.max_positions {
            return Err(InvalidParam::new(
                "prompt",
                format!(
                    "the prompt has {} tokens; this model's context is {} tokens, prompt and completion together",
                    prompt.len(),
                    self.max_positions
                ),
            )
            .into());
        }
        let max_tokens = request
            .max_tokens
            .unwrap_or(self.max_positions - prompt.len());
        if max_tokens == 0 && request.prompt_logprobs.is_none() {
            return Err(InvalidParam::new("max_tokens", "must be at least 1").into());
        }
        if prompt.len() + max_tokens > self.max_positions {
            return Err(InvalidParam::new(
                "max_tokens",
                format!(
                    "this model's context is {} tokens; the prompt has {} and max_tokens asks for {max_tokens}",
                    self.max_positions,
                    prompt.len()
                ),
            )
            .into());
        }
        let kv_limit = self.engine.kv_tokens();
        if prompt.len() + max_tokens > kv_limit {
            return Err(InvalidParam::new(
                "max_tokens",
                format!(
                    "the prompt ({}) plus max_tokens ({max_tokens}) is more than the {kv_limit} KV cache tokens this server has",
                    prompt.len()
                ),
            )
            .into());
        }
        request.sampling.validate()?;
        request
            .sampling
            .logit_bias
            .check_vocabulary(self.vocab_size)?;
        let span = request_span(
            request.operation,
            &request.sampling,
            &self.model_name,
            prompt.len(),
            max_tokens,
        );
        let (events, receiver) = mpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        let decoder = IncrementalDecoder::new(self.tokenizer.clone(), &prompt);
        self.engine.submit(
            slots,
            GenerateJob {
                prompt,
                max_tokens,
                prompt_logprobs: request.prompt_logprobs,
                sampling: request.sampling,
                ignore_eos: request.ignore_eos,
                events,
                submitted: std::time::Instant::now(),
                span: span.clone(),
                guide: request.guide,
            },
        )?;
        Ok(CompletionStream {
            _in_flight: InFlight::new(&self.in_flight),
            engine: self.engine.clone(),
            events: receiver,
            decoder,
            stops: StopStrings::new(request.stop),
            prompt_tokens,
            scores_prompt: request.prompt_logprobs.is_some(),
            bills_prompt: true,
            generated: 0,
            done: false,
            span,
        })
    }
}

/// The request's span, with the OpenTelemetry GenAI attributes; its trace
/// id goes into the log lines written inside it.
fn request_span(
    operation: &'static str,
    sampling: &SamplingParams,
    model: &str,
    prompt_tokens: usize,
    max_tokens: usize,
) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{operation} {model}"),
        otel.kind = "server",
        "gen_ai.operation.name" = operation,
        "gen_ai.request.model" = model,
        "gen_ai.request.max_tokens" = max_tokens,
        "gen_ai.request.temperature" = f64::from(sampling.temperature),
        "gen_ai.request.top_p" = f64::from(sampling.top_p),
        "gen_ai.request.seed" = sampling.seed,
        "gen_ai.usage.input_tokens" = prompt_tokens,
        "gen_ai.usage.output_tokens" = tracing::field::Empty,
        "gen_ai.response.finish_reasons" = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    tramontane_infra::trace_context::record_trace_id(&span);
    span
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    pub logprob: Option<TokenLogprob>,
}

/// What one engine event gave: text (maybe empty), the token, the end, or
/// the prompt's logprobs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    pub text: String,
    pub token: Option<GeneratedToken>,
    pub finish: Option<FinishReason>,
    /// Prompt tokens 1..'s logprobs (see [`Event::PromptLogprobs`]), in
    /// the chunk before any token.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

/// A failure after the request was accepted, shared by every request of
/// the step it happened in.
pub type GenerationFailed = Arc<GenerationError>;

/// The request's events as text. Dropping it cancels the sequence (the
/// engine frees its KV cache at the next step).
pub struct CompletionStream {
    /// Counted in the generator's in-flight requests until dropped.
    _in_flight: InFlight,
    /// To tell a stopped engine from a dropped request.
    engine: EngineHandle,
    events: mpsc::UnboundedReceiver<Event>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    prompt_tokens: usize,
    /// The prompt is scored (`prompt_logprobs`).
    scores_prompt: bool,
    /// Its prompt counts in the usage (not for a prompt's 2nd to nth choice).
    bills_prompt: bool,
    generated: usize,
    done: bool,
    span: tracing::Span,
}

/// One request counted in flight while this lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A whole completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    pub text: String,
    pub tokens: Vec<GeneratedToken>,
    pub finish: FinishReason,
    /// The prompt's tokens as the usage counts them (0 for a prompt's 2nd
    /// to nth choice).
    pub prompt_tokens: usize,
    /// With `prompt_logprobs`: prompt tokens 1..'s (empty for a prompt of
    /// one token).
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

impl CompletionStream {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Another choice of a prompt already counted: its prompt tokens are
    /// not counted again in the usage (as OpenAI counts `n`).
    pub fn sharing_prompt_usage(mut self) -> Self {
        self.bills_prompt = false;
        self
    }

    /// The prompt tokens this choice adds to the usage.
    pub fn usage_prompt_tokens(&self) -> usize {
        if self.bills_prompt {
            self.prompt_tokens
        } else {
            0
        }
    }

    /// Tokens generated so far (counted up to the stop string when one matched).
    pub fn completion_tokens(&self) -> usize {
        self.generated
    }

    /// The next chunk; None after the one that carries the finish reason.
    pub async fn next(&mut self) -> Option<Result<Chunk, GenerationFailed>> {
        if self.done {
            return None;
        }
        let Some(event) = self.events.recv().await else {
            self.done = true;
            let failure = if self.engine.is_running() {
                GenerationError::Dropped
            } else {
                GenerationError::EngineStopped
            };
            return Some(Err(Arc::new(failure)));
        };
        Some(Ok(match event {
            Event::Token { id, logprob } => {
                self.generated += 1;
                let piece = self.decoder.push(id);
                let matched = self.stops.push(&piece);
                let finish = matched.stopped.then_some(FinishReason::Stop);
                if matched.stopped {
                    self.finish();
                    self.finished(FinishReason::Stop);
                }
                Chunk {
                    text: matched.text,
                    token: Some(GeneratedToken { id, logprob }),
                    finish,
                    prompt_logprobs: None,
                }
            }
            Event::PromptLogprobs(scored) => Chunk {
                prompt_logprobs: Some(scored),
                ..Chunk::default()
            },
            Event::Finished(reason) => {
                let tail = self.decoder.finish();
                let matched = self.stops.push(&tail);
                let mut text = matched.text;
                let finish = if matched.stopped {
                    FinishReason::Stop
                } else {
                    text.push_str(&self.stops.flush());
                    reason
                };
                self.finish();
                self.finished(finish);
                Chunk {
                    text,
                    token: None,
                    finish: Some(finish),
                    prompt_logprobs: None,
                }
            }
            Event::Failed(failure) => {
                self.finish();
                tracing::warn!(
                    parent: &self.span,
                    error = %tramontane_infra::error::chain(&*failure),
                    "request failed"
                );
                return Some(Err(failure));
            }
        }))
    }

    /// No more chunks; the engine sees the closed channel and frees the sequence.
    fn finish(&mut self) {
        self.done = true;
        self.events.close();
        self.span
            .record("gen_ai.usage.output_tokens", self.generated);
    }

    fn finished(&self, reason: FinishReason) {
        self.span
            .record("gen_ai.response.finish_reasons", reason.as_str());
        tracing::info!(
            parent: &self.span,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.generated,
            finish_reason = reason.as_str(),
            "request finished"
        );
    }

    /// Runs to the end.
    pub async fn collect(mut self) -> Result<Completed, GenerationFailed> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut prompt_logprobs = self.scores_prompt.then(Vec::new);
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            text.push_str(&chunk.text);
            tokens.extend(chunk.token);
            if let Some(scored) = chunk.prompt_logprobs {
                prompt_logprobs = Some(scored);
            }
            if let Some(finish) = chunk.finish {
                return Ok(Completed {
                    text,
                    tokens,
                    finish,
                    prompt_tokens: self.usage_prompt_tokens(),
                    prompt_logprobs,
                });
            }
        }
        Err(Arc::new(GenerationError::Dropped))
    }
}
