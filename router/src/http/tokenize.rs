//! vLLM's `POST /tokenize` and `POST /detokenize`: the checkpoint's
//! tokenizer as the server uses it, for clients that count or build
//! prompts in token ids.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::HttpState;
use super::chat::messages;
use super::error::ApiError;
use super::json::OpenAiJson;
use super::openai::ChatMessage;
use crate::tool_calls::tools_from_request;

/// A text prompt, or chat messages rendered with the chat template.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenizeRequest {
    Completion {
        model: Option<String>,
        prompt: String,
        /// BOS (and EOS, where the tokenizer adds it), as a completion's
        /// text prompt gets them.
        #[serde(default = "yes")]
        add_special_tokens: bool,
        #[serde(default)]
        return_token_strs: bool,
    },
    Chat {
        model: Option<String>,
        messages: Vec<ChatMessage>,
        /// The tools the template shows the model, as a chat request gives them.
        tools: Option<Vec<serde_json::Value>>,
        #[serde(default)]
        return_token_strs: bool,
    },
}

fn yes() -> bool {
    true
}

impl TokenizeRequest {
    fn model(&self) -> Option<&str> {
        match self {
            TokenizeRequest::Completion { model, .. } | TokenizeRequest::Chat { model, .. } => {
                model.as_deref()
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

pub async fn tokenize(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    if let Some(model) = request.model() {
        state.check_model(model)?;
    }
    let tokenizer = state.generator.tokenizer();
    let (tokens, strs) = match request {
        TokenizeRequest::Completion {
            prompt,
            add_special_tokens,
            return_token_strs,
            ..
        } => {
            let tokens = if add_special_tokens {
                tokenizer.encode(&prompt)
            } else {
                tokenizer.encode_rendered(&prompt, &[])
            }
            .map_err(|e| ApiError::invalid("prompt", format!("prompt: {e}")))?;
            (tokens, return_token_strs)
        }
        TokenizeRequest::Chat {
            messages: list,
            tools,
            return_token_strs,
            ..
        } => {
            let tools = tools_from_request(tools.as_deref().unwrap_or_default())?;
            let entries: Vec<serde_json::Value> = tools.into_iter().map(|t| t.entry).collect();
            let rendered = state.chat_template.render(&messages(&list)?, &entries)?;
            let tokens = tokenizer
                .encode_rendered(&rendered.text, &rendered.literal)
                .map_err(|e| ApiError::invalid("messages", format!("messages: {e}")))?;
            (tokens, return_token_strs)
        }
    };
    let token_strs = strs.then(|| {
        tokens
            .iter()
            .map(|&id| tokenizer.piece(id).unwrap_or_default())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.generator.max_positions(),
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    if let Some(model) = &request.model {
        state.check_model(model)?;
    }
    let tokenizer = state.generator.tokenizer();
    let vocab = tokenizer.vocab_size();
    let ids = request
        .tokens
        .iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!("tokens: {id} is not a token id of this vocabulary of {vocab}"),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = tokenizer
        .decode(&ids)
        .map_err(|e| ApiError::invalid("tokens", format!("tokens: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
