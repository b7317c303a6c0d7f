//! The structured-output fields of both endpoints, read into one
//! [`RequestedConstraint`]: OpenAI's `response_format` (`text`,
//! `json_object`, `json_schema`), vLLM's `structured_outputs` object
//! (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older
//! `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
//! At most one may constrain a request.

use serde::Deserialize;
use serde_json::Value;

use crate::excerpt::Excerpt;
use crate::sampling::InvalidParam;
use crate::structured_output::{OutputConstraint, RequestedConstraint};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredFields {
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
}

impl StructuredFields {
    /// The request's constraint, if any; a 400 naming the field for one
    /// written wrong, or for two at once.
    pub fn constraint(&self) -> Result<Option<RequestedConstraint>, InvalidParam> {
        let mut found: Option<RequestedConstraint> = None;
        let mut add = |requested: Option<RequestedConstraint>| -> Result<(), InvalidParam> {
            let Some(requested) = requested else {
                return Ok(());
            };
            if let Some(first) = &found {
                return Err(InvalidParam::new(
                    requested.param,
                    format!(
                        "one structured output at a time: {} is given already",
                        first.param
                    ),
                ));
            }
            found = Some(requested);
            Ok(())
        };
        if let Some(format) = &self.response_format {
            add(response_format(format)?)?;
        }
        if let Some(outputs) = &self.structured_outputs {
            add(Some(structured_outputs(outputs)?))?;
        }
        for (param, value, read) in [
            ("guided_json", &self.guided_json, json_schema as Reader),
            ("guided_regex", &self.guided_regex, regex),
            ("guided_choice", &self.guided_choice, choice),
            ("guided_grammar", &self.guided_grammar, grammar),
        ] {
            if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
                add(Some(RequestedConstraint {
                    param,
                    constraint: read(param, value)?,
                }))?;
            }
        }
        Ok(found)
    }
}

type Reader = fn(&'static str, &Value) -> Result<OutputConstraint, InvalidParam>;

const RESPONSE_FORMAT: &str = "response_format";

/// OpenAI's `response_format`: None for `text`.
fn response_format(format: &Value) -> Result<Option<RequestedConstraint>, InvalidParam> {
    let constrained = |constraint| {
        Ok(Some(RequestedConstraint {
            param: RESPONSE_FORMAT,
            constraint,
        }))
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => constrained(OutputConstraint::JsonObject),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    InvalidParam::new(
                        RESPONSE_FORMAT,
                        "type json_schema needs json_schema.schema, the schema",
                    )
                })?;
            constrained(json_schema(RESPONSE_FORMAT, schema)?)
        }
        Some(other) => Err(InvalidParam::new(
            RESPONSE_FORMAT,
            format!(
                "type {} is not supported: text, json_object or json_schema",
                Excerpt(other)
            ),
        )),
        None => Err(InvalidParam::new(
            RESPONSE_FORMAT,
            "an object with a type: text, json_object or json_schema",
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of its constraint keys.
fn structured_outputs(outputs: &Value) -> Result<RequestedConstraint, InvalidParam> {
    const PARAM: &str = "structured_outputs";
    let Some(fields) = outputs.as_object() else {
        return Err(InvalidParam::new(PARAM, "must be an object"));
    };
    let keys: [(&str, &'static str, Reader); 4] = [
        ("json", "structured_outputs.json", json_schema),
        ("regex", "structured_outputs.regex", regex),
        ("choice", "structured_outputs.choice", choice),
        ("grammar", "structured_outputs.grammar", grammar),
    ];
    let mut given = Vec::new();
    for (key, param, read) in keys {
        if let Some(value) = fields.get(key).filter(|v| !v.is_null()) {
            given.push(RequestedConstraint {
                param,
                constraint: read(param, value)?,
            });
        }
    }
    if fields.get("json_object").and_then(Value::as_bool) == Some(true) {
        given.push(RequestedConstraint {
            param: "structured_outputs.json_object",
            constraint: OutputConstraint::JsonObject,
        });
    }
    for unsupported in ["structural_tag"] {
        if fields.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(InvalidParam::new(
                PARAM,
                format!(
                    "{unsupported} is not supported: json, regex, choice, grammar or json_object"
                ),
            ));
        }
    }
    match given.len() {
        1 => Ok(given.remove(0)),
        0 => Err(InvalidParam::new(
            PARAM,
            "needs one of json, regex, choice, grammar or json_object",
        )),
        _ => Err(InvalidParam::new(
            PARAM,
            "one constraint at a time: json, regex, choice, grammar or json_object",
        )),
    }
}

/// A JSON schema: an object, or (vLLM) the schema's JSON text.
fn json_schema(param: &'static str, value: &Value) -> Result<OutputConstraint, InvalidParam> {
    let schema = match value {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| InvalidParam::new(param, format!("the schema is not JSON: {e}")))?,
        other => other.clone(),
    };
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(InvalidParam::new(
            param,
            "the schema must be a JSON object (or true/false)",
        ));
    }
    Ok(OutputConstraint::JsonSchema(schema))
}

fn regex(param: &'static str, value: &Value) -> Result<OutputConstraint, InvalidParam> {
    Ok(OutputConstraint::Regex(text(
        param,
        value,
        "a regular expression",
    )?))
}

fn grammar(param: &'static str, value: &Value) -> Result<OutputConstraint, InvalidParam> {
    Ok(OutputConstraint::Grammar(text(
        param,
        value,
        "a grammar (llguidance's Lark syntax)",
    )?))
}

fn choice(param: &'static str, value: &Value) -> Result<OutputConstraint, InvalidParam> {
    let choices: Vec<String> = Vec::<String>::deserialize(value)
        .map_err(|_| InvalidParam::new(param, "must be a list of strings"))?;
    if choices.is_empty() || choices.iter().any(String::is_empty) {
        return Err(InvalidParam::new(
            param,
            "must be a list of one or more non-empty strings",
        ));
    }
    Ok(OutputConstraint::Choice(choices))
}

fn text(param: &'static str, value: &Value, what: &str) -> Result<String, InvalidParam> {
    match value.as_str() {
        Some(text) if !text.trim().is_empty() => Ok(text.to_string()),
        _ => Err(InvalidParam::new(
            param,
            format!("must be {what}, as a string"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn constraint(fields: Value) -> Result<Option<RequestedConstraint>, InvalidParam> {
        serde_json::from_value::<StructuredFields>(fields)
            .expect("parses")
            .constraint()
    }

    #[test]
    fn each_field_gives_its_constraint_named_by_its_field() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        for (fields, param, expected) in [
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
                OutputConstraint::JsonObject,
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "a", "strict": true, "schema": schema}}}),
                "response_format",
                OutputConstraint::JsonSchema(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"json": schema.to_string()}}),
                "structured_outputs.json",
                OutputConstraint::JsonSchema(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"choice": ["a", "b"]}}),
                "structured_outputs.choice",
                OutputConstraint::Choice(vec!["a".into(), "b".into()]),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                "structured_outputs.json_object",
                OutputConstraint::JsonObject,
            ),
            (
                json!({"guided_regex": "[a-z]+"}),
                "guided_regex",
                OutputConstraint::Regex("[a-z]+".into()),
            ),
            (
                json!({"guided_grammar": "start: \"x\""}),
                "guided_grammar",
                OutputConstraint::Grammar("start: \"x\"".into()),
            ),
            (
                json!({"guided_json": schema}),
                "guided_json",
                OutputConstraint::JsonSchema(schema.clone()),
            ),
        ] {
            let requested = constraint(fields.clone())
                .expect("valid")
                .expect("constrained");
            assert_eq!(requested.param, param, "{fields}");
            assert_eq!(requested.constraint, expected, "{fields}");
        }
        assert_eq!(
            constraint(json!({"response_format": {"type": "text"}})),
            Ok(None)
        );
        assert_eq!(constraint(json!({})), Ok(None));
    }

    #[test]
    fn malformed_or_doubled_constraints_are_refused_by_field() {
        for (fields, param, says) in [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
                "not supported",
            ),
            (
                json!({"response_format": "json"}),
                "response_format",
                "an object with a type",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}),
                "response_format",
                "json_schema.schema",
            ),
            (
                json!({"guided_json": "{not json"}),
                "guided_json",
                "not JSON",
            ),
            (json!({"guided_json": [1]}), "guided_json", "JSON object"),
            (json!({"guided_choice": []}), "guided_choice", "one or more"),
            (
                json!({"guided_choice": ["a", 3]}),
                "guided_choice",
                "list of strings",
            ),
            (
                json!({"guided_regex": 5}),
                "guided_regex",
                "regular expression",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs",
                "one constraint at a time",
            ),
            (
                json!({"structured_outputs": {}}),
                "structured_outputs",
                "needs one of",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
                "response_format is given already",
            ),
        ] {
            let error = constraint(fields.clone()).unwrap_err();
            assert_eq!(error.param, param, "{fields}");
            assert!(error.message.contains(says), "{fields}: {}", error.message);
        }
    }
}
