//! `POST /v1/completions`: one choice per prompt, whole or streamed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;
use tramontane_model::Tokenizer;

use super::error::ApiError;
use super::json::OpenAiJson;
use super::openai::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt, Usage,
    empty_usage,
};
use super::{HttpState, new_id, sse_response, unix_now};
use crate::completion::{GeneratedToken, GenerationRequest, MAX_PROMPTS_PER_REQUEST};

/// OpenAI's default for /v1/completions.
const DEFAULT_MAX_TOKENS: i64 = 16;
/// OpenAI's limit of `logprobs` for /v1/completions.
const MAX_LOGPROBS: usize = 5;

pub async fn create(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    state.check_model(&request.common.model)?;
    if request.echo {
        return Err(ApiError::invalid("echo", "echo: not supported"));
    }
    // What is shared by every prompt is checked, and the queue places
    // reserved, before any prompt is tokenized.
    let count = request.prompt.count();
    if count > MAX_PROMPTS_PER_REQUEST {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt: at most {MAX_PROMPTS_PER_REQUEST} prompts per request (got {count})"),
        ));
    }
    let generation = request.common.generation(
        Some(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        request.logprobs,
        "logprobs",
        MAX_LOGPROBS,
        "text_completion",
    )?;
    let mut slots = state.generator.reserve(count)?;
    let prompts = token_prompts(state.generator.tokenizer(), &request.prompt)?;
    // Every choice is checked before any starts; dropping the started ones cancels them.
    let streams = prompts
        .into_iter()
        .map(|prompt| {
            let choice = GenerationRequest {
                prompt,
                ..generation.clone()
            };
            state.generator.start(choice, &mut slots)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let id = new_id("cmpl");
    let created = unix_now();
    let tokenizer = state.generator.tokenizer().clone();
    let want_logprobs = request.logprobs.is_some();
    if !request.common.stream {
        let completed = try_join_all(streams.into_iter().map(|s| s.collect())).await?;
        let mut usage = empty_usage();
        let choices = completed
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                usage.add(c.prompt_tokens, c.tokens.len());
                CompletionChoice {
                    index,
                    logprobs: want_logprobs.then(|| logprobs(&tokenizer, &c.tokens, &mut 0)),
                    text: c.text,
                    finish_reason: Some(c.finish.as_str()),
                }
            })
            .collect();
        return Ok(Json(CompletionResponse {
            id,
            object: "text_completion",
            created,
            model: state.model_name.clone(),
            choices,
            usage: Some(usage),
        })
        .into_response());
    }
    let model = state.model_name.clone();
    let mut offsets = vec![0usize; streams.len()];
    let response = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    let usage_response = response.clone();
    Ok(sse_response(
        streams,
        None,
        want_logprobs,
        request.common.include_usage(),
        move |index, c| {
            let logprobs = want_logprobs
                .then(|| logprobs(&tokenizer, c.token.as_slice(), &mut offsets[index]));
            response(
                vec![CompletionChoice {
                    index,
                    text: c.text,
                    logprobs,
                    finish_reason: c.finish.map(|f| f.as_str()),
                }],
                None,
            )
        },
        move |usage| usage_response(Vec::new(), Some(usage)),
    ))
}

/// The prompts as token ids: text is tokenized (with BOS), ids are checked.
fn token_prompts(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let empty = || ApiError::invalid("prompt", "prompt: empty");
    let encode = |text: &String| -> Result<Vec<u32>, ApiError> {
        if text.is_empty() {
            return Err(empty());
        }
        tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid("prompt", format!("prompt: {e}")))
    };
    let ids = |list: &Vec<i64>| -> Result<Vec<u32>, ApiError> {
        if list.is_empty() {
            return Err(empty());
        }
        list.iter()
            .map(|&id| {
                u32::try_from(id).map_err(|_| {
                    ApiError::invalid("prompt", format!("prompt: {id} is not a token id"))
                })
            })
            .collect()
    };
    let prompts = match prompt {
        Prompt::Text(text) => vec![encode(text)?],
        Prompt::Texts(texts) => texts.iter().map(encode).collect::<Result<_, _>>()?,
        Prompt::Tokens(list) => vec![ids(list)?],
        Prompt::TokenLists(lists) => lists.iter().map(ids).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(empty());
    }
    Ok(prompts)
}

/// The legacy logprobs object for `tokens`; `offset` is the text length before them.
fn logprobs(
    tokenizer: &Tokenizer,
    tokens: &[GeneratedToken],
    offset: &mut usize,
) -> CompletionLogprobs {
    let text = |id: u32| String::from_utf8_lossy(&tokenizer.token_bytes(id)).into_owned();
    let mut out = CompletionLogprobs::default();
    for token in tokens {
        let Some(lp) = &token.logprob else { continue };
        let piece = text(token.id);
        out.text_offset.push(*offset);
        *offset += piece.chars().count();
        out.tokens.push(piece);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, logprob)| (text(id), serde_json::Value::from(logprob)))
                .collect(),
        );
    }
    out
}
