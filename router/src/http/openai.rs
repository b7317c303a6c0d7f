//! The OpenAI request and response bodies, and the translation of the
//! fields both endpoints share into a [`GenerationRequest`].

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::response_format::StructuredFields;
use crate::completion::GenerationRequest;
use crate::excerpt::Excerpt;
use crate::logit_bias::LogitBias;
use crate::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use crate::text::StopList;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// OpenAI request fields accepted without effect and without a warning:
/// bookkeeping for OpenAI's own platform that clients commonly send.
pub const IGNORED_OPENAI_FIELDS: [&str; 4] = ["metadata", "service_tier", "store", "user"];

/// Unknown fields named in one warning, at most.
const UNKNOWN_FIELDS_NAMED: usize = 8;

/// Fields of both endpoints. Unknown fields are ignored, as vLLM does, and
/// named in a warning in the log (except [`IGNORED_OPENAI_FIELDS`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    pub model: String,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM, TGI): -1 or 0 keeps every token.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Token id (a decimal string) to a bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, serde_json::Value>>,
    /// Extension (vLLM): generate past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Structured outputs: `response_format` and vLLM's fields.
    #[serde(flatten)]
    pub structured: StructuredFields,
    /// Every field neither endpoint knows: ignored.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, IgnoredAny>,
}

impl CommonFields {
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The generation request, with `max_tokens` and `logprobs` already
    /// read from the endpoint's own fields, and no prompt yet: it is checked
    /// before any prompt is tokenized, and its stop strings are one copy
    /// that every prompt's request shares.
    /// `prompt_logprobs`: the prompt is scored with this many top
    /// alternatives a token (then `max_tokens` may be 0).
    pub fn generation(
        &self,
        max_tokens: Option<i64>,
        prompt_logprobs: Option<usize>,
        logprobs: Option<i64>,
        logprobs_param: &'static str,
        max_logprobs: usize,
        operation: &'static str,
    ) -> Result<GenerationRequest, ApiError> {
        let least = if prompt_logprobs.is_some() { 0 } else { 1 };
        let max_tokens = match max_tokens {
            Some(m) if m < least => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens: must be at least {least} (got {m})"),
                ));
            }
            m => m.map(|m| m as usize),
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k: must be -1 (off) or at least 1 (got {k})"),
                ));
            }
            Some(k) => k as usize,
        };
        let logprobs = match logprobs {
            None => None,
            Some(n) if n < 0 || n as usize > max_logprobs.min(MAX_TOP_LOGPROBS) => {
                return Err(ApiError::invalid(
                    logprobs_param,
                    format!("{logprobs_param}: must be in [0, {max_logprobs}] (got {n})"),
                ));
            }
            Some(n) => Some(n as usize),
        };
        let logit_bias = match &self.logit_bias {
            None => LogitBias::default(),
            Some(entries) => LogitBias::from_request(entries)?,
        };
        let defaults = SamplingParams::default();
        let float = |v: Option<f64>, default: f32| v.map_or(default, |v| v as f32);
        let sampling = SamplingParams {
            temperature: float(self.temperature, defaults.temperature),
            top_p: float(self.top_p, defaults.top_p),
            top_k,
            presence_penalty: float(self.presence_penalty, 0.0),
            frequency_penalty: float(self.frequency_penalty, 0.0),
            seed: self.seed.map(|s| s as u64),
            logprobs,
            logit_bias,
        };
        sampling.validate()?;
        let stop: &[String] = match &self.stop {
            None => &[],
            Some(Stop::One(s)) => std::slice::from_ref(s),
            Some(Stop::Many(list)) => list,
        };
        let stop = StopList::new(stop)?;
        self.warn_unknown(operation);
        Ok(GenerationRequest {
            prompt: Vec::new(),
            max_tokens,
            prompt_logprobs,
            sampling,
            stop,
            ignore_eos: self.ignore_eos,
            operation,
            guide: None,
        })
    }
}

impl CommonFields {
    /// Choices per prompt (`n`, 1 by default): each a sequence of its own,
    /// at most `max_running` (the batch could never hold more at once).
    pub fn choices_per_prompt(&self, max_running: usize) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if n >= 1 && n as usize <= max_running => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                "n",
                format!("n: must be in [1, {max_running}] (--max-running) (got {n})"),
            )),
        }
    }

    /// The unknown fields, named (cut short) in a warning: a misspelt
    /// parameter shows in the log instead of passing unseen.
    fn warn_unknown(&self, operation: &'static str) {
        let unknown: Vec<&str> = self
            .unknown
            .keys()
            .map(String::as_str)
            .filter(|name| !IGNORED_OPENAI_FIELDS.contains(name))
            .collect();
        if unknown.is_empty() {
            return;
        }
        let mut fields = unknown
            .iter()
            .take(UNKNOWN_FIELDS_NAMED)
            .map(|name| Excerpt(name).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if unknown.len() > UNKNOWN_FIELDS_NAMED {
            fields.push_str(&format!(
                " and {} more",
                unknown.len() - UNKNOWN_FIELDS_NAMED
            ));
        }
        tracing::warn!(operation, fields, "ignoring unknown request fields");
    }
}

/// `prompt` of /v1/completions.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

impl Prompt {
    /// How many prompts (choices) the request asks for.
    pub fn count(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(texts) => texts.len(),
            Prompt::TokenLists(lists) => lists.len(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    /// Alternatives per token to report logprobs for.
    pub logprobs: Option<i64>,
    /// The prompt before the completion, in `text` and (with `logprobs`)
    /// in `logprobs`, its first token's logprob null.
    #[serde(default)]
    pub echo: bool,
    /// Extension (vLLM): the prompt's own logprobs, with this many top
    /// alternatives a token, as `choices[i].prompt_logprobs`.
    pub prompt_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// Message content: text, or a list of parts of which only text is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant's calls: `[{"id", "type": "function", "function":
    /// {"name", "arguments"}}]`, the arguments as JSON text.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool's result: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Functions the model may call.
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto`, `required` or a function.
    pub tool_choice: Option<serde_json::Value>,
    /// More than one call in an answer (true by default).
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's prompt logprobs: on /v1/completions only, refused here.
    pub prompt_logprobs: Option<serde_json::Value>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn add(&mut self, prompt: usize, completion: usize) {
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
        self.total_tokens += prompt + completion;
    }
}

pub fn empty_usage() -> Usage {
    Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
    }
}

/// `logprobs` of a completion choice (the legacy format).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null for an echoed prompt's first token.
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<usize>,
}

/// One prompt token's entry of vLLM's `prompt_logprobs`: by token id (a
/// string, as JSON keys are), the token's and its top alternatives'.
pub type PromptLogprobEntry = BTreeMap<String, PromptLogprob>;

#[derive(Debug, Clone, Serialize)]
pub struct PromptLogprob {
    pub logprob: f32,
    /// 1 for the most likely token.
    pub rank: usize,
    pub decoded_token: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// Extension (vLLM): with `prompt_logprobs`, null for the first token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprobEntry>>>,
}

/// A completion, or one chunk of a streamed one (`object` tells which).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the answer is tool calls alone.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// A call in an answer.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// A call in a streamed answer: whole, in one delta.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

impl From<crate::tool_calls::ToolCall> for ToolCallOut {
    fn from(call: crate::tool_calls::ToolCall) -> Self {
        Self {
            id: call.id,
            kind: "function",
            function: FunctionCall {
                name: call.name,
                arguments: call.arguments,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_of_either_endpoint_are_collected_not_refused() {
        let chat: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 3,
            "logit_bias": {"5": 1.5},
            "user": "u-1",
            "temprature": 0.5,
            "response_format": {"type": "json_object"},
            "guided_regex": "a+",
        }))
        .expect("parses");
        assert!(chat.common.structured.response_format.is_some());
        assert!(chat.common.structured.guided_regex.is_some());
        assert_eq!(
            chat.common.unknown.keys().collect::<Vec<_>>(),
            ["temprature", "user"]
        );
        assert_eq!(chat.max_completion_tokens, Some(3));
        let completion: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "prompt": "Hi",
            "echo": false,
            "max_completion_tokens": 3,
        }))
        .expect("parses");
        assert_eq!(
            completion.common.unknown.keys().collect::<Vec<_>>(),
            ["max_completion_tokens"]
        );
    }

    #[test]
    fn logit_bias_reaches_the_sampling_parameters_or_is_refused_by_name() {
        let fields = |bias: serde_json::Value| -> CommonFields {
            serde_json::from_value(serde_json::json!({"model": "m", "logit_bias": bias}))
                .expect("parses")
        };
        let generation = |fields: &CommonFields| {
            fields.generation(None, None, None, "logprobs", 5, "text_completion")
        };
        let request = generation(&fields(serde_json::json!({"9": -100, "4": 100}))).expect("valid");
        let mut logits = [0.0f32; 10];
        request.sampling.logit_bias.apply(&mut logits);
        assert_eq!((logits[4], logits[9], logits[0]), (100.0, -100.0, 0.0));
        let too_many: serde_json::Map<String, serde_json::Value> =
            (0..301).map(|i| (i.to_string(), 1.into())).collect();
        for bad in [
            serde_json::Value::Object(too_many),
            serde_json::json!({"4": 100.5}),
            serde_json::json!({"x": 1}),
            serde_json::json!({"4": "up"}),
        ] {
            let error = generation(&fields(bad)).unwrap_err();
            assert_eq!(
                error.param.as_deref(),
                Some("logit_bias"),
                "{}",
                error.message
            );
        }
    }
}
