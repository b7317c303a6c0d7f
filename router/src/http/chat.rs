//! `POST /v1/chat/completions`: messages through the chat template, one
//! choice, whole or streamed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;
use tramontane_model::Tokenizer;

use super::error::ApiError;
use super::json::OpenAiJson;
use super::openai::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatLogprobs, ChatMessage,
    ChatRequest, ChatResponse, ChatTokenLogprob, Content, Delta, TopLogprob, Usage, empty_usage,
};
use super::{HttpState, new_id, sse_response, unix_now};
use crate::chat_template::Message;
use crate::completion::GeneratedToken;
use crate::excerpt::Excerpt;

pub async fn create(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    state.check_model(&request.common.model)?;
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(
            "tools",
            "tools: function calling is not supported by this server",
        ));
    }
    if request.prompt_logprobs.is_some() {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            "prompt_logprobs: supported on /v1/completions only (send the rendered prompt there)",
        ));
    }
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs: needs logprobs set to true",
            ));
        }
        (false, None) => None,
    };
    let mut generation = request.common.generation(
        request.max_completion_tokens.or(request.max_tokens),
        None,
        logprobs,
        "top_logprobs",
        crate::sampling::MAX_TOP_LOGPROBS,
        "chat",
    )?;
    if let Some(requested) = request.common.structured.constraint()? {
        generation.guide = Some(state.generator.compile(requested).await?);
    }
    let n = request
        .common
        .choices_per_prompt(state.generator.max_running())?;
    let messages = messages(&request.messages)?;
    // Places in the queue before the template renders and the prompt is tokenized.
    let mut slots = state.generator.reserve(n)?;
    let rendered = state.chat_template.render(&messages)?;
    let prompt = state
        .generator
        .tokenizer()
        .encode_rendered(&rendered.text, &rendered.literal)
        .map_err(|e| ApiError::invalid("messages", format!("messages: {e}")))?;
    // The n choices share the prompt's KV blocks through the prefix cache.
    let streams = (0..n)
        .map(|choice| {
            let request = generation.for_choice(prompt.clone(), choice);
            let stream = state.generator.start(request, &mut slots)?;
            Ok(if choice == 0 {
                stream
            } else {
                stream.sharing_prompt_usage()
            })
        })
        .collect::<Result<Vec<_>, crate::failure::GenerationError>>()?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    let tokenizer = state.generator.tokenizer().clone();
    let want_logprobs = logprobs.is_some();
    if !request.common.stream {
        let completed = try_join_all(streams.into_iter().map(|s| s.collect())).await?;
        let mut usage = empty_usage();
        let choices = completed
            .into_iter()
            .enumerate()
            .map(|(index, completed)| {
                usage.add(completed.prompt_tokens, completed.tokens.len());
                ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: completed.text,
                    },
                    logprobs: want_logprobs.then(|| chat_logprobs(&tokenizer, &completed.tokens)),
                    finish_reason: completed.finish.as_str(),
                }
            })
            .collect();
        return Ok(Json(ChatResponse {
            id,
            object: "chat.completion",
            created,
            model: state.model_name.clone(),
            choices,
            usage,
        })
        .into_response());
    }
    let model = state.model_name.clone();
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    // Every choice's role first, in one chunk.
    let first = chunk(
        (0..n)
            .map(|index| ChatChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect(),
        None,
    );
    let usage_chunk = chunk.clone();
    Ok(sse_response(
        streams,
        Some(first),
        want_logprobs,
        request.common.include_usage(),
        move |index, c| {
            chunk(
                vec![ChatChunkChoice {
                    index,
                    logprobs: want_logprobs.then(|| chat_logprobs(&tokenizer, c.token.as_slice())),
                    delta: Delta {
                        role: None,
                        content: (!c.text.is_empty() || c.finish.is_none()).then_some(c.text),
                    },
                    finish_reason: c.finish.map(|f| f.as_str()),
                }],
                None,
            )
        },
        move |usage| usage_chunk(Vec::new(), Some(usage)),
    ))
}

/// The request's messages as the chat template takes them.
pub(super) fn messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages: empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content"),
                                    format!("messages[{i}].content: only text parts are supported, not {}", Excerpt(kind)),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[GeneratedToken]) -> ChatLogprobs {
    let entry = |id: u32| {
        let bytes = tokenizer.token_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    ChatLogprobs {
        content: tokens
            .iter()
            .filter_map(|t| {
                let lp = t.logprob.as_ref()?;
                let (token, bytes) = entry(t.id);
                Some(ChatTokenLogprob {
                    token,
                    logprob: lp.logprob,
                    bytes,
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = entry(id);
                            TopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                })
            })
            .collect(),
    }
}
