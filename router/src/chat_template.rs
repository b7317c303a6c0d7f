//! Chat messages to prompt text: the checkpoint's `chat_template` (from
//! `tokenizer_config.json` or `chat_template.jinja`) rendered with minijinja
//! as transformers renders it, or the Mistral instruct format when the
//! checkpoint has none.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::excerpt::shorten;
use crate::sampling::InvalidParam;

/// Mistral's instruct format (`<s>[INST] user [/INST] answer</s>[INST] ...`);
/// a system message is put before the first user message.
pub const MISTRAL_INSTRUCT: &str = r#"{{- bos_token }}
{%- if messages and messages[0].role == "system" %}
{%- set system = messages[0].content %}
{%- set chat = messages[1:] %}
{%- else %}
{%- set system = "" %}
{%- set chat = messages %}
{%- endif %}
{%- for message in chat %}
{%- if message.role not in ["system", "user", "assistant"] %}
{{- raise_exception("role must be system, user or assistant, not " + message.role) }}
{%- elif message.role == "system" %}
{{- raise_exception("a system message must come first") }}
{%- elif (message.role == "user") != (loop.index0 % 2 == 0) %}
{{- raise_exception("user and assistant messages must alternate, starting with user") }}
{%- elif message.role == "user" %}
{{- "[INST] " }}{% if loop.first and system %}{{ system + "\n\n" }}{% endif %}{{ message.content + " [/INST]" }}
{%- else %}
{{- message.content + eos_token }}
{%- endif %}
{%- endfor %}"#;

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
#[error("chat template of {path}: {reason}")]
pub struct ChatTemplateError {
    path: String,
    reason: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for messages.
    pub source: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// The checkpoint's template, else the Mistral instruct format.
    pub fn from_dir(
        dir: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let error = |path: &Path, reason: String| ChatTemplateError {
            path: path.display().to_string(),
            reason,
        };
        let jinja = dir.join("chat_template.jinja");
        let config = dir.join("tokenizer_config.json");
        let (template, source) = if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| error(&jinja, e.to_string()))?;
            (text, jinja.display().to_string())
        } else {
            let from_config = match std::fs::read_to_string(&config) {
                Ok(text) => {
                    let value: Value =
                        serde_json::from_str(&text).map_err(|e| error(&config, e.to_string()))?;
                    template_of(&value["chat_template"])
                }
                Err(_) => None,
            };
            match from_config {
                Some(text) => (text, config.display().to_string()),
                None => (
                    MISTRAL_INSTRUCT.to_string(),
                    "Mistral instruct format".into(),
                ),
            }
        };
        Self::new(
            template,
            source.clone(),
            bos_token.unwrap_or_default(),
            eos_token.unwrap_or_default(),
        )
        .map_err(|e| ChatTemplateError {
            path: source,
            reason: e.to_string(),
        })
    }

    pub fn new(
        template: String,
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // As transformers renders chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(NAME, template)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            source,
        })
    }

    /// The prompt text for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, InvalidParam> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| InvalidParam::new("messages", e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                add_generation_prompt => true,
            })
            .map_err(|e| {
                let reason = match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid").to_string(),
                    _ => e.to_string(),
                };
                // The reason may quote a message (a role, a content).
                InvalidParam::new(
                    "messages",
                    format!("the chat template refused them: {}", shorten(&reason)),
                )
            })
    }
}

/// `chat_template` is a string, or a list of named templates ("default" wins).
fn template_of(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mistral() -> ChatTemplate {
        ChatTemplate::new(
            MISTRAL_INSTRUCT.into(),
            "test".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .expect("compiles")
    }

    fn message(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn mistral_format_of_a_conversation() {
        let text = mistral()
            .render(&[
                message("user", "Hi"),
                message("assistant", "Hello!"),
                message("user", "How are you?"),
            ])
            .expect("renders");
        assert_eq!(
            text,
            "<s>[INST] Hi [/INST]Hello!</s>[INST] How are you? [/INST]"
        );
    }

    #[test]
    fn a_system_message_goes_before_the_first_user_message() {
        let text = mistral()
            .render(&[message("system", "Be brief."), message("user", "Hi")])
            .expect("renders");
        assert_eq!(text, "<s>[INST] Be brief.\n\nHi [/INST]");
    }

    #[test]
    fn roles_out_of_order_are_refused_with_the_reason() {
        let error = mistral()
            .render(&[message("user", "a"), message("user", "b")])
            .unwrap_err();
        assert!(error.message.contains("alternate"), "{error}");
        let error = mistral().render(&[message("tool", "x")]).unwrap_err();
        assert!(error.message.contains("role"), "{error}");
    }

    #[test]
    fn a_refusal_quoting_a_huge_role_is_short() {
        let role = "r".repeat(900_000);
        let error = mistral().render(&[message(&role, "x")]).unwrap_err();
        assert!(error.message.contains("role must be"), "{error}");
        assert!(error.message.len() < 1000, "{} bytes", error.message.len());
    }

    #[test]
    fn a_transformers_style_template_with_python_methods_renders() {
        // The shape of Hugging Face templates: string methods, loop state, add_generation_prompt.
        let template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let chat = ChatTemplate::new(template.into(), "t".into(), "<s>".into(), "</s>".into())
            .expect("compiles");
        let text = chat.render(&[message("user", "  hi  ")]).expect("renders");
        assert_eq!(text, "<|user|>hi\n<|assistant|>");
    }

    #[test]
    fn the_checkpoint_template_wins_over_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
            .expect("write");
        let chat = ChatTemplate::from_dir(dir.path(), Some("<s>".into()), None).expect("loads");
        assert!(chat.source.ends_with("tokenizer_config.json"));
        assert_eq!(
            chat.render(&[message("user", "hi")]).expect("renders"),
            "<s><user>hi"
        );
        // chat_template.jinja beside it takes precedence, as in transformers.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "J{{ messages[0].content }}",
        )
        .expect("write");
        let chat = ChatTemplate::from_dir(dir.path(), None, None).expect("loads");
        assert_eq!(chat.render(&[message("user", "x")]).expect("renders"), "Jx");
    }

    #[test]
    fn without_a_template_the_mistral_format_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").expect("write");
        let chat = ChatTemplate::from_dir(dir.path(), Some("<s>".into()), Some("</s>".into()))
            .expect("loads");
        assert_eq!(
            chat.render(&[message("user", "Hi")]).expect("renders"),
            "<s>[INST] Hi [/INST]"
        );
    }

    #[test]
    fn a_broken_template_is_an_error_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "{% for m in messages %}"}"#,
        )
        .expect("write");
        let error = ChatTemplate::from_dir(dir.path(), None, None)
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("tokenizer_config.json"),
            "{error}"
        );
    }
}
