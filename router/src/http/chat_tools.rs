//! Tool calls on `/v1/chat/completions`: the request's tools for the
//! template, the grammar for `required` and a named function, and the
//! answer split into content and calls, whole or streamed.

use serde_json::Value;
use tramontane_model::Tokenizer;

use super::openai::{ChatRequest, ToolCallDelta, ToolCallOut};
use crate::completion::GeneratedToken;
use crate::sampling::InvalidParam;
use crate::structured_output::RequestedConstraint;
use crate::tool_calls::{
    CallSplitter, Tool, ToolCall, ToolCallFormat, ToolChoice, tools_from_request,
};

/// A request's tools in use (tool_choice other than `none`).
pub struct ToolUse {
    tools: Vec<Tool>,
    choice: ToolChoice,
    parallel: bool,
    format: ToolCallFormat,
    /// The format's marker as a control token, where the tokenizer has it.
    marker_token: Option<u32>,
}

impl ToolUse {
    /// None without tools or with `tool_choice: none`.
    pub fn from_request(
        request: &ChatRequest,
        format: ToolCallFormat,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>, InvalidParam> {
        let tools = tools_from_request(request.tools.as_deref().unwrap_or_default())?;
        let choice = ToolChoice::from_request(request.tool_choice.as_ref(), &tools)?;
        if choice == ToolChoice::None {
            return Ok(None);
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: request.parallel_tool_calls.unwrap_or(true),
            format,
            marker_token: tokenizer.control_token_id(format.marker()),
        }))
    }

    /// The tools as the chat template gets them: the request's entries.
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.entry.clone()).collect()
    }

    /// For `required` and a named function: the grammar of the calls.
    pub fn constraint(&self) -> Option<RequestedConstraint> {
        let allowed: Vec<&Tool> = match &self.choice {
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::None | ToolChoice::Auto => return None,
        };
        // One call of a named function; `required` as parallel_tool_calls says.
        let parallel = self.parallel && self.choice == ToolChoice::Required;
        Some(RequestedConstraint {
            param: "tool_choice",
            constraint: self.format.grammar(&allowed, parallel, self.marker_token),
        })
    }

    /// A whole answer: its content (None when empty) and its calls (None
    /// when it made none, or none that reads as calls of the tools: then
    /// the content is the whole text).
    pub fn answer(
        &self,
        tokenizer: &Tokenizer,
        text: String,
        tokens: &[GeneratedToken],
    ) -> (Option<String>, Option<Vec<ToolCallOut>>) {
        let split = match self.marker_token {
            Some(marker) => tokens.iter().position(|t| t.id == marker).map(|at| {
                let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
                let decode = |ids: &[u32]| tokenizer.decode(ids).unwrap_or_default();
                let calls = format!("{}{}", self.format.marker(), decode(&ids[at + 1..]));
                (decode(&ids[..at]), calls)
            }),
            None => text
                .find(self.format.marker())
                .map(|at| (text[..at].to_string(), text[at..].to_string())),
        };
        let Some((content, calls)) = split else {
            return (Some(text), None);
        };
        match self.format.parse(&calls, &self.tools) {
            Some(calls) => (
                non_empty(content),
                Some(calls.into_iter().map(ToolCallOut::from).collect()),
            ),
            None => (Some(text), None),
        }
    }

    pub fn splitter(&self) -> CallSplitter {
        CallSplitter::new(self.format)
    }

    /// Whether `token` is the marker as a control token.
    pub fn is_marker(&self, token: Option<&GeneratedToken>) -> bool {
        token.is_some_and(|t| Some(t.id) == self.marker_token)
    }

    /// A streamed answer's end: the content still to send, and the calls
    /// as deltas (None when the text does not read as calls: then they go
    /// out as content).
    pub fn finish_stream(&self, splitter: CallSplitter) -> (String, Option<Vec<ToolCallDelta>>) {
        let (mut held, calls) = splitter.finish();
        let Some(calls) = calls else {
            return (held, None);
        };
        match self.format.parse(&calls, &self.tools) {
            Some(parsed) => (held, Some(deltas(parsed))),
            None => {
                held.push_str(&calls);
                (held, None)
            }
        }
    }
}

fn deltas(calls: Vec<ToolCall>) -> Vec<ToolCallDelta> {
    calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            let out = ToolCallOut::from(call);
            ToolCallDelta {
                index,
                id: out.id,
                kind: out.kind,
                function: out.function,
            }
        })
        .collect()
}

fn non_empty(content: String) -> Option<String> {
    let trimmed = content.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}
