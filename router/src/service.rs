//! The public gRPC `moe.v1.Generation` service.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tramontane_model::Tokenizer;
use tramontane_proto::v1::generation_server::Generation;
use tramontane_proto::v1::{GenerateRequest, GenerateResponse, GenerateStreamResponse};

use crate::engine::{EngineHandle, Event, GenerateJob};

pub struct GenerationServer {
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    max_positions: usize,
}

impl GenerationServer {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        max_positions: usize,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            vocab_size,
            max_positions,
        }
    }

    /// Validates a request and hands it to the engine; returns the prompt ids
    /// and the stream of events.
    async fn start(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Vec<u32>, mpsc::UnboundedReceiver<Event>), Status> {
        if request.max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens: must be at least 1"));
        }
        let prompt = match (
            request.prompt.is_empty(),
            request.prompt_token_ids.is_empty(),
        ) {
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give prompt or prompt_token_ids, not both",
                ));
            }
            (true, true) => return Err(Status::invalid_argument("prompt: empty")),
            (false, true) => self
                .tokenizer
                .encode(&request.prompt)
                .map_err(|e| Status::invalid_argument(format!("prompt: {e}")))?,
            (true, false) => request.prompt_token_ids.clone(),
        };
        if let Some(id) = prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "prompt_token_ids: {id} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        let needed = prompt.len() + request.max_tokens as usize;
        if needed > self.max_positions {
            return Err(Status::invalid_argument(format!(
                "prompt of {} tokens plus max_tokens {} exceeds the context of {} positions",
                prompt.len(),
                request.max_tokens,
                self.max_positions
            )));
        }
        let (events, receiver) = mpsc::unbounded_channel();
        self.engine
            .submit(GenerateJob {
                prompt: prompt.clone(),
                max_tokens: request.max_tokens as usize,
                events,
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok((prompt, receiver))
    }
}

/// Maps an engine failure to a status: `UNAVAILABLE: ...` reasons keep their code.
pub fn failure_status(reason: &str) -> Status {
    if reason.contains("UNAVAILABLE") {
        Status::unavailable(reason.to_string())
    } else {
        Status::internal(reason.to_string())
    }
}

/// Turns token ids into text pieces without ever splitting a UTF-8 character.
struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    prompt: Vec<u32>,
    ids: Vec<u32>,
    emitted: String,
}

impl Detokenizer {
    fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32]) -> Self {
        let emitted = tokenizer.decode(prompt).unwrap_or_default();
        Self {
            tokenizer,
            prompt: prompt.to_vec(),
            ids: Vec::new(),
            emitted,
        }
    }

    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let all: Vec<u32> = self.prompt.iter().chain(&self.ids).copied().collect();
        let Ok(text) = self.tokenizer.decode(&all) else {
            return String::new();
        };
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return String::new();
        }
        let piece = text[self.emitted.len()..].to_string();
        self.emitted = text;
        piece
    }
}

#[tonic::async_trait]
impl Generation for GenerationServer {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let request = request.into_inner();
        let (prompt, mut events) = self.start(&request).await?;
        let mut detok = Detokenizer::new(self.tokenizer.clone(), &prompt);
        let mut token_ids = Vec::new();
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Token(id) => {
                    token_ids.push(id);
                    text.push_str(&detok.push(id));
                }
                Event::Finished(reason) => {
                    return Ok(Response::new(GenerateResponse {
                        text,
                        prompt_token_ids: prompt,
                        token_ids,
                        finish_reason: reason.as_str().into(),
                    }));
                }
                Event::Failed(reason) => return Err(failure_status(&reason)),
            }
        }
        Err(Status::internal("the engine dropped the request"))
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let request = request.into_inner();
        let (prompt, mut events) = self.start(&request).await?;
        let mut detok = Detokenizer::new(self.tokenizer.clone(), &prompt);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<u32> = None;
            while let Some(event) = events.recv().await {
                let message = match event {
                    Event::Token(id) => {
                        if let Some(previous) = last.replace(id) {
                            let text = detok.push(previous);
                            Ok(GenerateStreamResponse {
                                token_id: previous,
                                text,
                                finish_reason: String::new(),
                            })
                        } else {
                            continue;
                        }
                    }
                    Event::Finished(reason) => {
                        let id = last.take().unwrap_or_default();
                        Ok(GenerateStreamResponse {
                            token_id: id,
                            text: detok.push(id),
                            finish_reason: reason.as_str().into(),
                        })
                    }
                    Event::Failed(reason) => Err(failure_status(&reason)),
                };
                let done = !matches!(message, Ok(ref m) if m.finish_reason.is_empty());
                if tx.send(message).await.is_err() || done {
                    return; // client gone (drops `events`, which frees the sequence) or stream over
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
