//! Tool calls (OpenAI's function calling): the request's `tools` and
//! `tool_choice`, checked; the grammar that makes `required` or a named
//! function answer with calls valid for the tools' schemas; and the calls
//! read back out of the generated text, in the format the checkpoint's
//! chat template teaches: Mistral's `[TOOL_CALLS] [{"name": ..., "arguments":
//! {...}}]` or Hermes' (Qwen's) `<tool_call>\n{"name": ..., "arguments":
//! {...}}\n</tool_call>`.

use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};

use crate::excerpt::Excerpt;
use crate::sampling::InvalidParam;
use crate::structured_output::{OutputConstraint, compact};

/// One function the model may call, as the request gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (an object's).
    pub parameters: Value,
    /// The request's entry, as the chat template gets it.
    pub entry: Value,
}

/// Most tools one request may give.
pub const MAX_TOOLS: usize = 128;

/// The request's `tools`, checked: each `{"type": "function", "function":
/// {"name", "description"?, "parameters"?}}`, names distinct and as OpenAI
/// allows them (`[a-zA-Z0-9_-]{1,64}`).
pub fn tools_from_request(entries: &[Value]) -> Result<Vec<Tool>, InvalidParam> {
    const PARAM: &str = "tools";
    if entries.len() > MAX_TOOLS {
        return Err(InvalidParam::new(
            PARAM,
            format!("at most {MAX_TOOLS} tools (got {})", entries.len()),
        ));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let invalid = |why: String| InvalidParam::new(PARAM, format!("tools[{i}]: {why}"));
        if entry.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid("type must be \"function\"".into()));
        }
        let function = entry
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| invalid("needs a function object".into()))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("function.name: a string is required".into()))?;
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(invalid(format!(
                "function.name {} must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                Excerpt(name)
            )));
        }
        if tools.iter().any(|t| t.name == name) {
            return Err(invalid(format!("function {name} is given twice")));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(schema @ Value::Object(_)) => schema.clone(),
            Some(_) => {
                return Err(invalid(
                    "function.parameters must be a JSON schema object".into(),
                ));
            }
        };
        tools.push(Tool {
            name: name.to_string(),
            parameters,
            entry: entry.clone(),
        });
    }
    Ok(tools)
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text only; the tools are not shown to the model.
    None,
    /// The model decides: its calls are read out of its text.
    Auto,
    /// At least one call, forced by the grammar.
    Required,
    /// A call of this function, forced by the grammar.
    Named(String),
}

impl ToolChoice {
    /// From the request (`"none"`, `"auto"`, `"required"` or `{"type":
    /// "function", "function": {"name"}}`): `auto` by default with tools,
    /// `none` without; a named function must be one of `tools`.
    pub fn from_request(choice: Option<&Value>, tools: &[Tool]) -> Result<Self, InvalidParam> {
        const PARAM: &str = "tool_choice";
        let choice = match choice {
            None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(mode)) => match mode.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(InvalidParam::new(
                        PARAM,
                        format!(
                            "{} is not one of none, auto, required or a function",
                            Excerpt(other)
                        ),
                    ));
                }
            },
            Some(named) => {
                let name = named
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| named.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        InvalidParam::new(
                            PARAM,
                            "an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(InvalidParam::new(
                        PARAM,
                        format!("function {} is not among the tools", Excerpt(name)),
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if tools.is_empty() && choice != ToolChoice::None {
            return Err(InvalidParam::new(PARAM, "needs tools"));
        }
        Ok(choice)
    }
}

/// How the checkpoint writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
    Mistral,
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
    /// block per call.
    Hermes,
}

impl ToolCallFormat {
    /// The format a chat template teaches: Hermes' where it writes
    /// `<tool_call>`, Mistral's otherwise.
    pub fn of_template(template: &str) -> Self {
        if template.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else {
            ToolCallFormat::Mistral
        }
    }

    /// The text that opens the calls.
    pub fn marker(self) -> &'static str {
        match self {
            ToolCallFormat::Mistral => "[TOOL_CALLS]",
            ToolCallFormat::Hermes => "<tool_call>",
        }
    }

    /// The grammar of calls of `tools` (one, unless `parallel`), for
    /// `required` or a named function. `marker_token`: the marker's id
    /// where the tokenizer has it as a control token (the model writes it
    /// as one token, which decoded text does not show).
    pub fn grammar(
        self,
        tools: &[&Tool],
        parallel: bool,
        marker_token: Option<u32>,
    ) -> OutputConstraint {
        let calls: Vec<Value> = tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.name},
                        "arguments": tool.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = match <[Value; 1]>::try_from(calls) {
            Ok([one]) => one,
            Err(many) => json!({"anyOf": many}),
        };
        let call = format!("call: %json {}", compact(schema));
        let marker = match marker_token {
            Some(id) => format!("<[{id}]>"),
            None => Value::String(self.marker().into()).to_string(),
        };
        let grammar = match (self, parallel) {
            (ToolCallFormat::Mistral, true) => {
                format!("start: {marker} \" [\" call (\", \" call)* \"]\"\n{call}\n")
            }
            (ToolCallFormat::Mistral, false) => {
                format!("start: {marker} \" [\" call \"]\"\n{call}\n")
            }
            (ToolCallFormat::Hermes, parallel) => format!(
                "start: block{}\nblock: {marker} \"\\n\" call \"\\n</tool_call>\"\n{call}\n",
                if parallel { " (\"\\n\" block)*" } else { "" }
            ),
        };
        OutputConstraint::Grammar(grammar)
    }

    /// The calls in `text` (what follows the marker, the marker included):
    /// None when it does not hold calls of `tools` as this format writes
    /// them.
    pub fn parse(self, text: &str, tools: &[Tool]) -> Option<Vec<ToolCall>> {
        let text = text.trim_start().strip_prefix(self.marker())?;
        let objects: Vec<Value> = match self {
            ToolCallFormat::Mistral => match first_json(text)? {
                Value::Array(calls) => calls,
                call @ Value::Object(_) => vec![call],
                _ => return None,
            },
            ToolCallFormat::Hermes => {
                let mut objects = Vec::new();
                let mut rest = text;
                loop {
                    objects.push(first_json(rest)?);
                    let Some(end) = rest.find("</tool_call>") else {
                        break;
                    };
                    match rest[end..]
                        .strip_prefix("</tool_call>")
                        .map(str::trim_start)
                        .and_then(|r| r.strip_prefix(self.marker()))
                    {
                        Some(next) => rest = next,
                        None => break,
                    }
                }
                objects
            }
        };
        let calls: Option<Vec<ToolCall>> = objects
            .iter()
            .map(|object| {
                let name = object.get("name")?.as_str()?;
                tools.iter().any(|t| t.name == name).then_some(())?;
                let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
                    Some(Value::String(text)) => text.clone(),
                    Some(value @ Value::Object(_)) => value.to_string(),
                    None => "{}".to_string(),
                    Some(_) => return None,
                };
                Some(ToolCall {
                    id: new_call_id(),
                    name: name.to_string(),
                    arguments,
                })
            })
            .collect();
        calls.filter(|c| !c.is_empty())
    }
}

/// The first JSON value in `text` (after whitespace), whatever follows.
fn first_json(text: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(text.trim_start())
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments' JSON text.
    pub arguments: String,
}

/// A call id: 9 letters and digits, as Mistral's templates require of the
/// ids sent back with the results (and any other template accepts).
pub fn new_call_id() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(9)
        .map(char::from)
        .collect()
}

/// Splits a streamed answer into the content before the calls and the
/// calls' text: content goes out as it comes, except for an end that may
/// be the start of the marker, held until the next text tells.
#[derive(Debug)]
pub struct CallSplitter {
    marker: &'static str,
    held: String,
    calls: Option<String>,
}

impl CallSplitter {
    pub fn new(format: ToolCallFormat) -> Self {
        Self {
            marker: format.marker(),
            held: String::new(),
            calls: None,
        }
    }

    /// Takes the next text (`marker_token`: the marker came as a control
    /// token, which the text does not show); returns the content to send.
    pub fn push(&mut self, text: &str, marker_token: bool) -> String {
        if let Some(calls) = &mut self.calls {
            calls.push_str(text);
            return String::new();
        }
        self.held.push_str(text);
        if marker_token {
            // The text before the token is content; the token opens the calls.
            let content = std::mem::take(&mut self.held);
            self.calls = Some(self.marker.to_string());
            return content;
        }
        if let Some(at) = self.held.find(self.marker) {
            let calls = self.held.split_off(at);
            self.calls = Some(calls);
            return std::mem::take(&mut self.held);
        }
        // Hold the longest end of the text that begins the marker.
        let keep = (1..self.marker.len().min(self.held.len() + 1))
            .rev()
            .find(|&n| {
                self.held.is_char_boundary(self.held.len() - n)
                    && self.marker.starts_with(&self.held[self.held.len() - n..])
            })
            .unwrap_or(0);
        let held = self.held.split_off(self.held.len() - keep);
        std::mem::replace(&mut self.held, held)
    }

    /// At the end: the content still held, and the calls' text (from the
    /// marker on), if the marker came.
    pub fn finish(self) -> (String, Option<String>) {
        (self.held, self.calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        tools_from_request(&[
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"], "additionalProperties": false}}}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ])
        .expect("valid")
    }

    #[test]
    fn tools_and_choices_are_checked_by_field() {
        let tools = tools();
        assert_eq!(
            tools[1].parameters,
            json!({"type": "object", "properties": {}})
        );
        for (entries, says) in [
            (json!([{"type": "retrieval"}]), "type must be"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "must be 1 to 64",
            ),
            (json!([{"type": "function"}]), "needs a function"),
            (
                json!([{"type": "function", "function": {"name": "f"}},
                       {"type": "function", "function": {"name": "f"}}]),
                "given twice",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                "JSON schema object",
            ),
        ] {
            let entries: Vec<Value> = serde_json::from_value(entries).unwrap();
            let error = tools_from_request(&entries).unwrap_err();
            assert_eq!(error.param, "tools");
            assert!(error.message.contains(says), "{}", error.message);
        }
        let choice = |value: Value, tools: &[Tool]| ToolChoice::from_request(Some(&value), tools);
        assert_eq!(ToolChoice::from_request(None, &tools), Ok(ToolChoice::Auto));
        assert_eq!(ToolChoice::from_request(None, &[]), Ok(ToolChoice::None));
        assert_eq!(choice(json!("required"), &tools), Ok(ToolChoice::Required));
        assert_eq!(
            choice(
                json!({"type": "function", "function": {"name": "get_time"}}),
                &tools
            ),
            Ok(ToolChoice::Named("get_time".into()))
        );
        for (value, tools, says) in [
            (
                json!({"type": "function", "function": {"name": "absent"}}),
                &tools[..],
                "not among",
            ),
            (json!("sometimes"), &tools[..], "not one of"),
            (
                json!({"function": {"name": "get_time"}}),
                &tools[..],
                "must be",
            ),
            (json!("required"), &[][..], "needs tools"),
        ] {
            let error = choice(value, tools).unwrap_err();
            assert_eq!(error.param, "tool_choice");
            assert!(error.message.contains(says), "{}", error.message);
        }
    }

    #[test]
    fn calls_are_read_back_in_either_format() {
        let tools = tools();
        let mistral = ToolCallFormat::Mistral
            .parse(
                r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}}, {"name": "get_time", "arguments": {}}]"#,
                &tools,
            )
            .expect("calls");
        assert_eq!(
            mistral
                .iter()
                .map(|c| (&*c.name, &*c.arguments))
                .collect::<Vec<_>>(),
            [("get_weather", r#"{"city":"Nice"}"#), ("get_time", "{}")]
        );
        assert!(mistral.iter().all(|c| c.id.len() == 9));
        let hermes = ToolCallFormat::Hermes
            .parse(
                "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
                &tools,
            )
            .expect("calls");
        assert_eq!(hermes.len(), 2);
        assert_eq!(hermes[1].arguments, r#"{"city":"Oslo"}"#);
        for (format, text) in [
            (
                ToolCallFormat::Mistral,
                "[TOOL_CALLS] [{\"name\": \"unknown\", \"arguments\": {}}]",
            ),
            (
                ToolCallFormat::Mistral,
                "[TOOL_CALLS] [{\"name\": \"get_time\", \"argu",
            ),
            (
                ToolCallFormat::Hermes,
                "<tool_call>\nnot json\n</tool_call>",
            ),
            (ToolCallFormat::Hermes, "no calls"),
        ] {
            assert_eq!(format.parse(text, &tools), None, "{text}");
        }
    }

    #[test]
    fn required_and_named_calls_are_valid_for_their_schemas_whatever_the_logits() {
        let tools = tools();
        let everyone: Vec<&Tool> = tools.iter().collect();
        for format in [ToolCallFormat::Mistral, ToolCallFormat::Hermes] {
            for (allowed, parallel) in [(&everyone[..], true), (&everyone[..1], false)] {
                for seed in 0..4 {
                    let grammar = format.grammar(allowed, parallel, None);
                    let (text, ended) = crate::structured_output::tests::walk(grammar, seed, 400);
                    if !ended {
                        // Parallel calls may go on to the step limit.
                        assert!(parallel, "{text:?}");
                        continue;
                    }
                    let calls = format.parse(&text, &tools).expect(&text);
                    assert!(parallel || calls.len() == 1, "{text:?}");
                    for call in calls {
                        let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
                        assert!(allowed.iter().any(|t| t.name == call.name), "{text:?}");
                        if call.name == "get_weather" {
                            assert!(arguments["city"].is_string(), "{text:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_stream_sends_content_up_to_the_marker_and_holds_what_may_begin_it() {
        let mut splitter = CallSplitter::new(ToolCallFormat::Hermes);
        let mut sent = String::new();
        for piece in ["Let me ", "check <", "tool", "_call>\n{\"name\"", ": 1}"] {
            sent.push_str(&splitter.push(piece, false));
        }
        assert_eq!(sent, "Let me check ");
        let (held, calls) = splitter.finish();
        assert_eq!(held, "");
        assert_eq!(calls.as_deref(), Some("<tool_call>\n{\"name\": 1}"));
        let mut splitter = CallSplitter::new(ToolCallFormat::Mistral);
        assert_eq!(splitter.push("a [TOOL", false), "a ");
        assert_eq!(splitter.push("S] b", false), "[TOOLS] b");
        assert_eq!(splitter.push("é", true), "é");
        assert_eq!(splitter.push(" [{}]", false), "");
        assert_eq!(
            splitter.finish(),
            (String::new(), Some("[TOOL_CALLS] [{}]".into()))
        );
    }
}
