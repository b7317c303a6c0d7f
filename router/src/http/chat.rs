//! `POST /v1/chat/completions`: messages through the chat template, one
//! choice, whole or streamed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;
use serde_json::Value;
use tramontane_model::Tokenizer;

use super::chat_tools::ToolUse;
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
use crate::tool_calls::CallSplitter;

pub async fn create(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    state.check_model(&request.common.model)?;
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
    let tokenizer = state.generator.tokenizer().clone();
    let tool_use =
        ToolUse::from_request(&request, state.chat_template.tool_call_format(), &tokenizer)?
            .map(Arc::new);
    let forced_calls = tool_use.as_ref().and_then(|t| t.constraint());
    let requested = match (request.common.structured.constraint()?, forced_calls) {
        (Some(format), Some(_)) => {
            return Err(ApiError::invalid(
                format.param,
                format!(
                    "{}: cannot be combined with tool_choice required or a named function",
                    format.param
                ),
            ));
        }
        (format, calls) => format.or(calls),
    };
    if let Some(requested) = requested {
        generation.guide = Some(state.generator.compile(requested).await?);
    }
    let n = request
        .common
        .choices_per_prompt(state.generator.max_running())?;
    let messages = messages(&request.messages)?;
    let tools = tool_use
        .as_ref()
        .map(|t| t.template_tools())
        .unwrap_or_default();
    // Places in the queue before the template renders and the prompt is tokenized.
    let mut slots = state.generator.reserve(n)?;
    let rendered = state.chat_template.render(&messages, &tools)?;
    let prompt = tokenizer
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
    let want_logprobs = logprobs.is_some();
    if !request.common.stream {
        let completed = try_join_all(streams.into_iter().map(|s| s.collect())).await?;
        let mut usage = empty_usage();
        let choices = completed
            .into_iter()
            .enumerate()
            .map(|(index, completed)| {
                usage.add(completed.prompt_tokens, completed.tokens.len());
                let logprobs = want_logprobs.then(|| chat_logprobs(&tokenizer, &completed.tokens));
                let (content, tool_calls) = match &tool_use {
                    Some(tool_use) => {
                        tool_use.answer(&tokenizer, completed.text, &completed.tokens)
                    }
                    None => (Some(completed.text), None),
                };
                let finish_reason = match tool_calls {
                    Some(_) => "tool_calls",
                    None => completed.finish.as_str(),
                };
                ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content,
                        tool_calls,
                    },
                    logprobs,
                    finish_reason,
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
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect(),
        None,
    );
    let usage_chunk = chunk.clone();
    // With tools, each choice's text goes through a splitter that keeps
    // the calls back until they are whole.
    let mut splitters: Vec<Option<CallSplitter>> = (0..n)
        .map(|_| tool_use.as_ref().map(|t| t.splitter()))
        .collect();
    Ok(sse_response(
        streams,
        Some(first),
        want_logprobs || tool_use.is_some(),
        request.common.include_usage(),
        move |index, c| {
            let logprobs = want_logprobs.then(|| chat_logprobs(&tokenizer, c.token.as_slice()));
            let (text, tool_calls, finish_reason) = match (&tool_use, splitters[index].as_mut()) {
                (Some(tool_use), Some(splitter)) => {
                    let mut text = splitter.push(&c.text, tool_use.is_marker(c.token.as_ref()));
                    let mut calls = None;
                    if c.finish.is_some()
                        && let Some(splitter) = splitters[index].take()
                    {
                        let (held, deltas) = tool_use.finish_stream(splitter);
                        text.push_str(&held);
                        calls = deltas;
                    }
                    let finish = match (&calls, c.finish) {
                        (Some(_), _) => Some("tool_calls"),
                        (None, finish) => finish.map(|f| f.as_str()),
                    };
                    if text.is_empty() && calls.is_none() && finish.is_none() && logprobs.is_none()
                    {
                        return None;
                    }
                    (text, calls, finish)
                }
                _ => (c.text, None, c.finish.map(|f| f.as_str())),
            };
            Some(chunk(
                vec![ChatChunkChoice {
                    index,
                    logprobs,
                    delta: Delta {
                        role: None,
                        content: (!text.is_empty() || finish_reason.is_none()).then_some(text),
                        tool_calls,
                    },
                    finish_reason,
                }],
                None,
            ))
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
            let tool_calls = m
                .tool_calls
                .as_ref()
                .map(|calls| template_calls(i, calls))
                .transpose()?;
            Ok(Message {
                role: m.role.clone(),
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// An assistant message's `tool_calls` as chat templates take them:
/// `{"id", "type": "function", "function": {"name", "arguments"}}` with the
/// arguments' JSON text read into a value (transformers' templates write
/// them with `tojson`).
fn template_calls(message: usize, calls: &[Value]) -> Result<Value, ApiError> {
    let param = || format!("messages[{message}].tool_calls");
    let invalid = |why: &str| ApiError::invalid(param(), format!("{}: {why}", param()));
    calls
        .iter()
        .map(|call| {
            let function = call
                .get("function")
                .ok_or_else(|| invalid("each call needs a function"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("each function needs a name"))?;
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                Some(value) => value.clone(),
                None => Value::Object(Default::default()),
            };
            let mut out = serde_json::json!({
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            if let Some(id) = call.get("id").and_then(Value::as_str) {
                out["id"] = Value::String(id.into());
            }
            Ok(out)
        })
        .collect::<Result<Vec<Value>, ApiError>>()
        .map(Value::Array)
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
