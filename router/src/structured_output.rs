//! Structured outputs: a request's JSON schema, regular expression, choice
//! list or grammar, compiled by llguidance over the checkpoint's tokenizer
//! into a [`Guide`] that tells each step which tokens may come next.
//!
//! [`Grammars`] is built once per model (the token trie, llguidance's
//! parser factory); compiling a constraint is per request and may take
//! milliseconds, so the API compiles off the async runtime. A guide's mask
//! is computed while the step's forward runs (see the engine), and applied
//! to the logits before sampling: disallowed tokens get no probability.

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, token_bytes_from_tokenizer_json};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use tramontane_model::Tokenizer;

use crate::sampling::InvalidParam;

/// Bytes a schema, regex, choice list or grammar may have, serialized:
/// compiling is the request handler's work, and it grows with the size.
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid for this schema.
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Grammar(String),
}

/// A constraint and the request field it came from, which errors name.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedConstraint {
    pub param: &'static str,
    pub constraint: OutputConstraint,
}

impl OutputConstraint {
    /// llguidance's grammar for it. JSON is written compactly, with
    /// Python's separators (`", "`, `": "`), unless the schema says
    /// otherwise in llguidance's `x-guidance`: free whitespace lets a
    /// model pad its output without end.
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            OutputConstraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            OutputConstraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            OutputConstraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            OutputConstraint::Choice(choices) => {
                // Lark's string literals are JSON strings.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| Value::String(c.clone()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            OutputConstraint::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }

    /// Its size as the cap counts it.
    fn size(&self) -> usize {
        match self {
            OutputConstraint::JsonObject => 0,
            OutputConstraint::JsonSchema(schema) => schema.to_string().len(),
            OutputConstraint::Regex(text) | OutputConstraint::Grammar(text) => text.len(),
            OutputConstraint::Choice(choices) => choices.iter().map(|c| c.len() + 1).sum(),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            OutputConstraint::JsonObject => "the JSON object constraint",
            OutputConstraint::JsonSchema(_) => "the JSON schema",
            OutputConstraint::Regex(_) => "the regular expression",
            OutputConstraint::Choice(_) => "the choice list",
            OutputConstraint::Grammar(_) => "the grammar",
        }
    }
}

/// `schema` with compact separators, unless it sets its own.
pub fn compact(mut schema: Value) -> Value {
    if let Value::Object(fields) = &mut schema
        && !fields.contains_key("x-guidance")
    {
        fields.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// Compiles constraints over one tokenizer and vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Over `tokenizer`, for logits of `vocab_size` entries (the model's,
    /// which may pad the tokenizer's), ending at any of `eos_ids`.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, String> {
        let json = tokenizer.to_json().map_err(|e| e.to_string())?;
        let mut words = token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
        if words.len() > vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, the model's logits {vocab_size}",
                words.len()
            ));
        }
        // Ids the tokenizer does not have (padding of the embedding) are
        // special tokens no grammar allows.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let (&first_eos, _) = eos_ids
            .split_first()
            .ok_or("the model has no end-of-sequence token")?;
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_ids);
        let env: TokEnv = Arc::new(TokenizerOf { tokenizer, trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A guide for one sequence, or a 400 naming the request's field.
    pub fn compile(&self, requested: &RequestedConstraint) -> Result<Guide, InvalidParam> {
        let RequestedConstraint { param, constraint } = requested;
        let size = constraint.size();
        if size > MAX_CONSTRAINT_BYTES {
            return Err(InvalidParam::new(
                param,
                format!(
                    "{} has {size} bytes, more than the {MAX_CONSTRAINT_BYTES} allowed",
                    constraint.what()
                ),
            ));
        }
        let matcher = Matcher::new(self.factory.create_parser(constraint.grammar()));
        if let Some(error) = matcher.get_error() {
            return Err(InvalidParam::new(
                param,
                format!(
                    "{} does not compile: {}",
                    constraint.what(),
                    first_line(&error)
                ),
            ));
        }
        Ok(Guide(matcher))
    }
}

/// llguidance's errors can carry the whole grammar: the first line says why.
fn first_line(error: &str) -> &str {
    error.lines().next().unwrap_or(error)
}

/// The tokenizer as llguidance takes it: the trie of every token's bytes,
/// and tokenization of text that continues other text.
struct TokenizerOf {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl TokenizerEnv for TokenizerOf {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(bytes, |text| {
            // Text the tokenizer refuses falls back to the trie's greedy split.
            self.tokenizer
                .encode_fragment(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// One sequence's place in its constraint.
pub struct Guide(Matcher);

impl Guide {
    /// The tokens allowed next: only end-of-sequence once the constraint
    /// is complete.
    pub fn allowed(&mut self) -> Result<Mask, GuideError> {
        self.0
            .compute_mask_or_eos()
            .map(Mask)
            .map_err(|e| GuideError(e.to_string()))
    }

    /// Moves past a token the mask allowed.
    pub fn advance(&mut self, token: u32) -> Result<(), GuideError> {
        self.0
            .consume_token(token)
            .map_err(|e| GuideError(e.to_string()))
    }

    /// Whether the output is complete: nothing but end-of-sequence may
    /// follow.
    pub fn is_complete(&self) -> bool {
        self.0.is_stopped()
    }
}

impl Clone for Guide {
    /// An independent copy (for the n choices of one request).
    fn clone(&self) -> Self {
        Guide(self.0.deep_clone())
    }
}

impl fmt::Debug for Guide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guide")
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// A guide failed to compute or to advance: the constraint's own error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("structured output: {0}")]
pub struct GuideError(String);

impl GuideError {
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

/// The tokens a guide allows at one step.
pub struct Mask(SimpleVob);

impl Mask {
    /// Disallowed tokens' logits become -inf.
    pub fn apply(&self, logits: &mut [f32]) {
        self.0.iter_unset_entries(|id| {
            if let Some(logit) = logits.get_mut(id) {
                *logit = f32::NEG_INFINITY;
            }
        });
    }

    pub fn is_allowed(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::OnceLock;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// The real Mistral tokenizer (a synthetic checkpoint's), its logits
    /// padded by 7 ids past the tokenizer's vocabulary.
    pub(crate) fn tokenizer_and_grammars() -> (&'static Arc<Tokenizer>, &'static Grammars) {
        static BUILT: OnceLock<(tempfile::TempDir, Arc<Tokenizer>, Grammars)> = OnceLock::new();
        let (_, tokenizer, grammars) = BUILT.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default())
                .expect("checkpoint");
            let tokenizer = Arc::new(Tokenizer::from_dir(dir.path()).expect("tokenizer"));
            let vocab = tokenizer.vocab_size() + 7;
            let eos = tokenizer.eos_token_id().expect("eos");
            let grammars = Grammars::new(tokenizer.clone(), vocab, &[eos]).expect("grammars");
            (dir, tokenizer, grammars)
        });
        (tokenizer, grammars)
    }

    fn requested(constraint: OutputConstraint) -> RequestedConstraint {
        RequestedConstraint {
            param: "response_format",
            constraint,
        }
    }

    /// Samples under `constraint` from random logits (as a random-weight
    /// model gives them) until the guide ends it: the text, and whether
    /// it ended by itself within `steps`.
    pub(crate) fn walk(constraint: OutputConstraint, seed: u64, steps: usize) -> (String, bool) {
        let (tokenizer, grammars) = tokenizer_and_grammars();
        let mut guide = grammars.compile(&requested(constraint)).expect("compiles");
        let vocab = tokenizer.vocab_size() + 7;
        let eos = tokenizer.eos_token_id().expect("eos");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tokens = Vec::new();
        for _ in 0..steps {
            let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * 8.0).collect();
            guide.allowed().expect("mask").apply(&mut logits);
            let token = crate::sampling::argmax(&logits);
            assert!(logits[token as usize].is_finite(), "a token is allowed");
            guide.advance(token).expect("an allowed token advances");
            if token != eos {
                tokens.push(token);
            }
            if guide.is_complete() {
                return (tokenizer.decode(&tokens).expect("decodes"), true);
            }
        }
        (tokenizer.decode(&tokens).expect("decodes"), false)
    }

    #[test]
    fn random_logits_under_a_regex_give_matching_text() {
        for seed in 0..8 {
            let (text, ended) = walk(
                OutputConstraint::Regex("[0-9]{3}-[a-c]{2}".into()),
                seed,
                64,
            );
            assert!(ended, "{text:?}");
            let bytes = text.as_bytes();
            assert_eq!(bytes.len(), 6, "{text:?}");
            assert!(bytes[..3].iter().all(u8::is_ascii_digit), "{text:?}");
            assert_eq!(bytes[3], b'-', "{text:?}");
            assert!(
                bytes[4..].iter().all(|b| (b'a'..=b'c').contains(b)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn random_logits_under_a_choice_list_give_one_of_the_choices() {
        let choices = vec![
            "red".to_string(),
            "green \"quoted\"".into(),
            "bleu 🇫🇷".into(),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..16 {
            let (text, ended) = walk(OutputConstraint::Choice(choices.clone()), seed, 64);
            assert!(ended && choices.contains(&text), "{text:?}");
            seen.insert(text);
        }
        assert!(
            seen.len() > 1,
            "random logits pick different choices: {seen:?}"
        );
    }

    #[test]
    fn random_logits_under_a_json_schema_give_valid_compact_json() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green"]},
                "count": {"type": "integer", "minimum": 0, "maximum": 99},
                "tag": {"type": "string", "maxLength": 6},
                "ok": {"type": "boolean"},
            },
            "required": ["colour", "count", "tag", "ok"],
            "additionalProperties": false,
        });
        for seed in 0..6 {
            let (text, ended) = walk(OutputConstraint::JsonSchema(schema.clone()), seed, 200);
            assert!(ended, "{text:?}");
            let value: Value = serde_json::from_str(&text).expect(&text);
            let object = value.as_object().expect("an object");
            assert_eq!(object.len(), 4, "{text}");
            assert!(["red", "green"].contains(&object["colour"].as_str().unwrap()));
            assert!(
                (0..=99).contains(&object["count"].as_i64().unwrap()),
                "{text}"
            );
            assert!(
                object["tag"].as_str().unwrap().chars().count() <= 6,
                "{text}"
            );
            assert!(object["ok"].is_boolean());
            assert!(
                text.starts_with("{\"") && !text.contains("\n"),
                "compact: {text}"
            );
        }
    }

    #[test]
    fn a_json_object_constraint_gives_an_object_or_runs_out_of_tokens_inside_one() {
        let (text, ended) = walk(OutputConstraint::JsonObject, 3, 300);
        assert!(text.starts_with('{'), "{text:?}");
        if ended {
            assert!(serde_json::from_str::<serde_json::Map<String, Value>>(&text).is_ok());
        }
    }

    #[test]
    fn a_grammar_in_lark_syntax_constrains_the_output() {
        let lark = r#"
            start: greeting " " name
            greeting: "hello" | "bye"
            name: /[A-Z][a-z]{1,5}/
        "#;
        for seed in 0..4 {
            let (text, ended) = walk(OutputConstraint::Grammar(lark.into()), seed, 64);
            assert!(ended, "{text:?}");
            let (greeting, name) = text.split_once(' ').expect(&text);
            assert!(["hello", "bye"].contains(&greeting), "{text:?}");
            assert!(
                name.chars().next().unwrap().is_ascii_uppercase(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn constraints_that_do_not_compile_or_are_too_large_name_the_field() {
        let (_, grammars) = tokenizer_and_grammars();
        let huge = OutputConstraint::Regex("a".repeat(MAX_CONSTRAINT_BYTES + 1));
        for (constraint, says) in [
            (
                OutputConstraint::Regex("[0-9".into()),
                "regular expression does not compile",
            ),
            (
                OutputConstraint::Grammar("start: undefined_rule".into()),
                "grammar does not compile",
            ),
            (
                OutputConstraint::JsonSchema(serde_json::json!({"type": "no-such-type"})),
                "JSON schema does not compile",
            ),
            (huge, "more than the 65536 allowed"),
        ] {
            let error = grammars.compile(&requested(constraint)).unwrap_err();
            assert_eq!(error.param, "response_format");
            assert!(error.message.contains(says), "{}", error.message);
        }
    }
}
