//! The public gRPC `moe.v1.Generation` service: the same requests and
//! semantics as the HTTP API, through [`Generator`].

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tramontane_proto::v1::generation_server::Generation;
use tramontane_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, TokenLogprob, TopLogprob,
};

use tramontane_infra::error::chain;

use crate::completion::{GeneratedToken, GenerationRequest, Generator, RETRY_AFTER_SECONDS};
use crate::engine::QueueSlots;
use tramontane_dispatch::error::DispatchError;

use crate::failure::GenerationError;
use crate::logit_bias::LogitBias;
use crate::sampling::SamplingParams;
use crate::text::StopList;

pub struct GenerationServer {
    generator: Generator,
}

impl GenerationServer {
    pub fn new(generator: Generator) -> Self {
        Self { generator }
    }

    /// The request checked, with a place reserved in the queue before its
    /// prompt is tokenized.
    fn request(
        &self,
        request: &GenerateRequest,
    ) -> Result<(GenerationRequest, QueueSlots), Status> {
        if request.max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens: must be at least 1"));
        }
        let stop =
            StopList::new(&request.stop).map_err(|e| Status::from(&GenerationError::from(e)))?;
        let slots = self.generator.reserve(1).map_err(|e| Status::from(&e))?;
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
                .generator
                .tokenizer()
                .encode(&request.prompt)
                .map_err(|e| Status::invalid_argument(format!("prompt: {e}")))?,
            (true, false) => request.prompt_token_ids.clone(),
        };
        let defaults = SamplingParams::default();
        let request = GenerationRequest {
            prompt,
            max_tokens: Some(request.max_tokens as usize),
            prompt_logprobs: None,
            sampling: SamplingParams {
                temperature: request.temperature.unwrap_or(defaults.temperature),
                top_p: request.top_p.unwrap_or(defaults.top_p),
                top_k: request.top_k.unwrap_or(0) as usize,
                presence_penalty: request.presence_penalty,
                frequency_penalty: request.frequency_penalty,
                seed: request.seed,
                logprobs: request.logprobs.map(|n| n as usize),
                // The gRPC API has no logit bias.
                logit_bias: LogitBias::default(),
            },
            stop,
            ignore_eos: request.ignore_eos,
            operation: "generate",
            // The gRPC API has no structured outputs.
            guide: None,
        };
        Ok((request, slots))
    }
}

/// The one mapping of failures to gRPC codes.
impl From<&GenerationError> for Status {
    fn from(error: &GenerationError) -> Self {
        let message = chain(error);
        match error {
            GenerationError::Invalid(_) => Status::invalid_argument(message),
            GenerationError::QueueFull { .. } => {
                let mut status = Status::resource_exhausted(message);
                status.metadata_mut().insert(
                    "retry-after",
                    RETRY_AFTER_SECONDS
                        .to_string()
                        .parse()
                        .expect("ASCII digits"),
                );
                status
            }
            GenerationError::EngineStopped
            | GenerationError::Draining
            | GenerationError::Dispatch(DispatchError::NoLiveReplica { .. }) => {
                Status::unavailable(message)
            }
            GenerationError::Dropped
            | GenerationError::Dispatch(DispatchError::Encode { .. })
            | GenerationError::Dispatch(DispatchError::Combine { .. })
            | GenerationError::Dispatch(DispatchError::Tensor { .. })
            | GenerationError::Forward(_)
            | GenerationError::Guide(_) => Status::internal(message),
        }
    }
}

fn logprob_message(token: &GeneratedToken) -> Option<TokenLogprob> {
    token.logprob.as_ref().map(|lp| TokenLogprob {
        token_id: token.id,
        logprob: lp.logprob,
        top: lp
            .top
            .iter()
            .map(|&(token_id, logprob)| TopLogprob { token_id, logprob })
            .collect(),
    })
}

#[tonic::async_trait]
impl Generation for GenerationServer {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (request, mut slots) = self.request(request.get_ref())?;
        let prompt = request.prompt.clone();
        let stream = self
            .generator
            .start(request, &mut slots)
            .map_err(|e| Status::from(&e))?;
        let completed = stream.collect().await.map_err(|e| Status::from(&*e))?;
        Ok(Response::new(GenerateResponse {
            text: completed.text,
            prompt_token_ids: prompt,
            token_ids: completed.tokens.iter().map(|t| t.id).collect(),
            finish_reason: completed.finish.as_str().into(),
            logprobs: completed
                .tokens
                .iter()
                .filter_map(logprob_message)
                .collect(),
        }))
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (request, mut slots) = self.request(request.get_ref())?;
        let mut stream = self
            .generator
            .start(request, &mut slots)
            .map_err(|e| Status::from(&e))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                let message = chunk
                    .map(|chunk| GenerateStreamResponse {
                        token_id: chunk.token.as_ref().map_or(0, |t| t.id),
                        logprob: chunk.token.as_ref().and_then(logprob_message),
                        has_token: chunk.token.is_some(),
                        text: chunk.text,
                        finish_reason: chunk.finish.map_or("", |f| f.as_str()).into(),
                    })
                    .map_err(|e| Status::from(&*e));
                if tx.send(message).await.is_err() {
                    return; // client gone: dropping `stream` frees the sequence
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::examples;

    #[test]
    fn every_failure_kind_has_its_code_and_message() {
        for (kind, error, contains) in examples::all() {
            let status = Status::from(&error);
            let expected = match kind {
                "invalid" => tonic::Code::InvalidArgument,
                "queue full" => tonic::Code::ResourceExhausted,
                "engine stopped" | "draining" | "worker status" | "worker deadline"
                | "worker bad answer" => tonic::Code::Unavailable,
                "dropped" | "encode" | "combine" | "tensor" | "forward" => tonic::Code::Internal,
                other => panic!("no expected code for {other}"),
            };
            assert_eq!(status.code(), expected, "{kind}");
            for part in contains {
                assert!(
                    status.message().contains(part),
                    "{kind}: {:?} lacks {part:?}",
                    status.message()
                );
            }
            assert_eq!(
                status.metadata().get("retry-after").is_some(),
                kind == "queue full",
                "{kind}"
            );
        }
    }
}
