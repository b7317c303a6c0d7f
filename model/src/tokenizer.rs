//! The checkpoint's tokenizer: `tokenizer.json` through the HF `tokenizers`
//! crate, with BOS/EOS added as `tokenizer_config.json` says.
//!
//! Control tokens (the special added tokens: `<s>`, `</s>`, `[INST]`,
//! `<|im_end|>`, ...) are recognised in text as the `tokenizers` crate
//! does, anywhere: right for a raw prompt, which is the caller's own
//! template. A rendered chat is tokenized with [`Tokenizer::encode_rendered`],
//! which reads the control-token strings a user wrote as text.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use serde_json::Value;
use tokenizers::NormalizerWrapper;
use tokenizers::normalizers::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::PrependScheme;

use crate::error::TokenizerError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// The special added tokens: ids, and their text.
    control_ids: HashSet<u32>,
    control_tokens: Vec<String>,
    /// The tokenizer with control-token strings read as text, for text
    /// that starts the input; and for text after a control token where
    /// that differs (a Metaspace "prepend to the first split" does not
    /// prepend there).
    text_first: tokenizers::Tokenizer,
    text_after: Option<tokenizers::Tokenizer>,
    /// A byte in no control token: what hides user-written control-token
    /// strings while the template's own are found.
    mask: Option<u8>,
    /// The tokenizer for text that continues other text: control-token
    /// strings read as text, and no prefix space (neither a `Prepend`
    /// normalizer nor Metaspace's prepending).
    fragment: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Config(format!("{}: {e}", config_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => {
                return Err(TokenizerError::Config(format!(
                    "{}: {e}",
                    config_path.display()
                )));
            }
        };
        let special = |name: &str| -> Result<Option<u32>, TokenizerError> {
            let Some(token) = token_text(&config[name]) else {
                return Ok(None);
            };
            inner.token_to_id(token).map(Some).ok_or_else(|| {
                TokenizerError::Config(format!("{name} {token:?} is not in the vocabulary"))
            })
        };
        let bos_id = special("bos_token")?;
        let eos_id = special("eos_token")?;
        // LlamaTokenizer's defaults: BOS on, EOS off.
        let add_bos = config["add_bos_token"]
            .as_bool()
            .unwrap_or(bos_id.is_some());
        let add_eos = config["add_eos_token"].as_bool().unwrap_or(false);
        let mut control: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special && !token.content.is_empty())
            .map(|(id, token)| (id, token.content))
            .collect();
        control.sort_unstable();
        let mask = (b'!'..=b'~').chain(1..b' ').find(|&byte| {
            !control
                .iter()
                .any(|(_, text)| text.as_bytes().contains(&byte))
        });
        let mut text_first = inner.clone();
        text_first.set_encode_special_tokens(true);
        let text_after = text_first
            .get_pre_tokenizer()
            .and_then(never_prepend)
            .map(|never| {
                let mut text_after = text_first.clone();
                text_after.with_pre_tokenizer(Some(never));
                text_after
            });
        let mut fragment = text_after.clone().unwrap_or_else(|| text_first.clone());
        if let Some(normalizer) = fragment.get_normalizer().cloned() {
            fragment
                .with_normalizer(without_prepend(normalizer))
                .map_err(|e| TokenizerError::Config(format!("normalizer: {e}")))?;
        }
        Ok(Self {
            fragment,
            inner,
            bos_id,
            eos_id,
            add_bos,
            add_eos,
            control_ids: control.iter().map(|&(id, _)| id).collect(),
            control_tokens: control.into_iter().map(|(_, text)| text).collect(),
            text_first,
            text_after,
            mask,
        })
    }

    /// The control tokens' text (`<s>`, `</s>`, ...), by id.
    pub fn control_tokens(&self) -> &[String] {
        &self.control_tokens
    }

    /// Token ids of `text`, with BOS/EOS as configured.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(encoding.get_ids());
        if self.add_eos {
            ids.extend(self.eos_id);
        }
        Ok(ids)
    }

    /// Token ids of text that already carries its control tokens (a
    /// rendered chat template): nothing is added, `<s>` in the text is the
    /// BOS token, except within the byte ranges `literal` (control-token
    /// strings the user wrote), which are text.
    ///
    /// Without `literal` ranges this is the `tokenizers` crate's (and
    /// transformers') tokenization of `text`. With them, the control tokens
    /// are found as that tokenization finds them with the ranges hidden;
    /// the text between two control tokens is tokenized with control-token
    /// strings as text, as the crate tokenizes text between them (each piece
    /// on its own, Metaspace's prefix only at the very start).
    pub fn encode_rendered(
        &self,
        text: &str,
        literal: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        if literal.is_empty() {
            return encode_ids(&self.inner, text);
        }
        let mut masked = text.as_bytes().to_vec();
        for range in literal {
            if range.start > range.end
                || !text.is_char_boundary(range.start)
                || !text.is_char_boundary(range.end)
            {
                return Err(TokenizerError::Encode(format!(
                    "literal range {range:?} is not within the text's {} bytes",
                    text.len()
                )));
            }
            if let Some(mask) = self.mask {
                masked[range.clone()].fill(mask);
            }
        }
        let masked = String::from_utf8(masked)
            .map_err(|e| TokenizerError::Encode(format!("masking: {e}")))?;
        let found = self
            .inner
            .encode(masked.as_str(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::new();
        let mut done = 0;
        for (&id, &(start, end)) in found.get_ids().iter().zip(found.get_offsets()) {
            let overlaps = |r: &Range<usize>| r.start < end && start < r.end;
            if !self.control_ids.contains(&id)
                || start < done
                || start >= end
                || literal.iter().any(overlaps)
            {
                continue;
            }
            self.encode_text(&text[done..start], done == 0, &mut ids)?;
            ids.push(id);
            done = end;
        }
        self.encode_text(&text[done..], done == 0, &mut ids)?;
        Ok(ids)
    }

    /// Appends the ids of `text`, control-token strings read as text;
    /// `first`: it starts the input.
    fn encode_text(
        &self,
        text: &str,
        first: bool,
        ids: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        let tokenizer = match &self.text_after {
            Some(text_after) if !first => text_after,
            _ => &self.text_first,
        };
        ids.extend(encode_ids(tokenizer, text)?);
        Ok(())
    }

    /// Token ids of `text` where it continues text already tokenized (a
    /// grammar's forced bytes): no BOS, no prefix space, control-token
    /// strings as text.
    pub fn encode_fragment(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        encode_ids(&self.fragment, text)
    }

    /// `tokenizer.json` as loaded.
    pub fn to_json(&self) -> Result<Value, TokenizerError> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| TokenizerError::Config(format!("serializing the tokenizer: {e}")))?;
        serde_json::from_str(&text)
            .map_err(|e| TokenizerError::Config(format!("serializing the tokenizer: {e}")))
    }

    /// The bytes one token stands for, as API logprobs show it: SentencePiece's
    /// "▁" is a space and a byte-fallback piece `<0xAB>` is that byte.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(hex) = piece
            .strip_prefix("<0x")
            .and_then(|rest| rest.strip_suffix('>'))
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            return vec![byte];
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The vocabulary entry of `id` as stored (e.g. `<s>`, `▁the`).
    pub fn piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a control token written as `text` (`[TOOL_CALLS]`), if
    /// the vocabulary has it as one.
    pub fn control_token_id(&self, text: &str) -> Option<u32> {
        self.inner
            .token_to_id(text)
            .filter(|id| self.control_ids.contains(id))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn encode_ids(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, TokenizerError> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizerError::Encode(e.to_string()))?;
    Ok(encoding.get_ids().to_vec())
}

/// `pre` with Metaspace's `prepend_scheme: first` made `never`: what it
/// does to text that does not start the input. None when it has no such
/// Metaspace (then text is tokenized alike wherever it stands).
fn never_prepend(pre: &PreTokenizerWrapper) -> Option<PreTokenizerWrapper> {
    match pre {
        PreTokenizerWrapper::Metaspace(metaspace)
            if metaspace.get_prepend_scheme() == PrependScheme::First =>
        {
            let mut metaspace = metaspace.clone();
            metaspace.set_prepend_scheme(PrependScheme::Never);
            Some(PreTokenizerWrapper::Metaspace(metaspace))
        }
        PreTokenizerWrapper::Sequence(sequence) => {
            let mut sequence = sequence.clone();
            let mut changed = false;
            for pre in sequence.as_mut() {
                if let Some(never) = never_prepend(pre) {
                    *pre = never;
                    changed = true;
                }
            }
            changed.then_some(PreTokenizerWrapper::Sequence(sequence))
        }
        _ => None,
    }
}

/// `normalizer` without its `Prepend` steps (the legacy SentencePiece "▁"
/// before the text): None when nothing is left.
fn without_prepend(normalizer: NormalizerWrapper) -> Option<NormalizerWrapper> {
    match normalizer {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(sequence) => {
            let kept: Vec<NormalizerWrapper> = sequence
                .as_ref()
                .iter()
                .cloned()
                .filter_map(without_prepend)
                .collect();
            (!kept.is_empty()).then(|| NormalizerWrapper::Sequence(Sequence::new(kept)))
        }
        other => Some(other),
    }
}

/// A special token is written either as a string or as an AddedToken object.
fn token_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::*;

    /// A checkpoint folder with the real Mistral tokenizer (legacy: a
    /// `Prepend("▁")` normalizer), written once for these tests.
    fn mistral_dir() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default())
                .expect("checkpoint");
            dir
        })
        .path()
    }

    fn mistral() -> Tokenizer {
        Tokenizer::from_dir(mistral_dir()).expect("loads")
    }

    /// The same vocabulary with a `Metaspace` pre-tokenizer that prepends
    /// "▁" to the first split only (`prepend_scheme: first`), as newer
    /// checkpoints have it.
    fn metaspace_first() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut json: Value = serde_json::from_str(
            &std::fs::read_to_string(mistral_dir().join("tokenizer.json")).expect("read"),
        )
        .expect("json");
        json["normalizer"] = Value::Null;
        json["pre_tokenizer"] = serde_json::json!({
            "type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false
        });
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            let path: PathBuf = dir.path().join(file);
            let text = if file == "tokenizer.json" {
                json.to_string()
            } else {
                std::fs::read_to_string(mistral_dir().join(file)).expect("read")
            };
            std::fs::write(path, text).expect("write");
        }
        let tokenizer = Tokenizer::from_dir(dir.path()).expect("loads");
        (dir, tokenizer)
    }

    fn range_of(text: &str, part: &str) -> Range<usize> {
        let start = text.find(part).expect("part of the text");
        start..start + part.len()
    }

    #[test]
    fn the_control_tokens_are_the_special_added_tokens() {
        assert_eq!(mistral().control_tokens(), ["<unk>", "<s>", "</s>"]);
    }

    #[test]
    fn a_rendered_chat_without_user_control_strings_is_tokenized_as_transformers_does() {
        // transformers' LlamaTokenizerFast on this text.
        let text = "<s>[INST] Hi [/INST]";
        let expected = [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793];
        assert_eq!(mistral().encode_rendered(text, &[]).unwrap(), expected);
    }

    #[test]
    fn literal_ranges_over_ordinary_text_change_no_id() {
        // Cutting the text into pieces between control tokens must give
        // what the whole text gives, for both ways of adding the prefix "▁".
        let text =
            "Well, <s>[INST] Hello there,  how are you?\n [/INST]Fine.</s>[INST] And you [/INST]";
        let (_dir, first) = metaspace_first();
        for tokenizer in [mistral(), first] {
            let whole = tokenizer.encode_rendered(text, &[]).unwrap();
            for parts in [
                vec!["Well"],
                vec!["Hello", "you?"],
                vec!["  how"],
                vec!["Fine", " And you "],
            ] {
                let ranges: Vec<_> = parts.iter().map(|p| range_of(text, p)).collect();
                assert_eq!(
                    tokenizer.encode_rendered(text, &ranges).unwrap(),
                    whole,
                    "{parts:?}"
                );
            }
        }
    }

    #[test]
    fn control_strings_in_literal_ranges_are_text() {
        let text = "<s>[INST] </s>[INST] hi [/INST]";
        let ids = mistral()
            .encode_rendered(text, &[range_of(text, "</s>")])
            .unwrap();
        // <s>, then transformers' `split_special_tokens=True` of the rest.
        let expected = [
            1, 733, 16289, 28793, 1867, 28713, 28767, 28792, 16289, 28793, 12014, 733, 28748,
            16289, 28793,
        ];
        assert_eq!(ids, expected);
        // The same user text without the range: the template's </s> and a new turn.
        assert_eq!(
            mistral().encode_rendered(text, &[]).unwrap()[..6],
            [1, 733, 16289, 28793, 28705, 2]
        );
        let text = "<s>[INST] a </s> b [/INST]";
        let (_dir, first) = metaspace_first();
        let ids = first
            .encode_rendered(text, &[range_of(text, "</s>")])
            .unwrap();
        // No "▁" before the [ that follows <s>, as the whole text has it.
        assert_eq!(
            ids,
            [
                1, 28792, 16289, 28793, 264, 1867, 28713, 28767, 287, 733, 28748, 16289, 28793
            ]
        );
    }

    #[test]
    fn a_fragment_is_tokenized_without_a_prefix_space_or_bos() {
        let (_dir, first) = metaspace_first();
        for tokenizer in [mistral(), first] {
            let fragment = tokenizer.encode_fragment("ab c").unwrap();
            let pieces: Vec<String> = fragment
                .iter()
                .map(|&id| tokenizer.piece(id).unwrap())
                .collect();
            assert_eq!(pieces.concat(), "ab\u{2581}c", "{pieces:?}");
            let text = tokenizer.encode_fragment("</s>").unwrap();
            assert!(!text.contains(&2), "{text:?}");
        }
    }

    #[test]
    fn a_literal_range_off_the_text_is_an_error_not_a_panic() {
        let tokenizer = mistral();
        for (text, range) in [("<s>ab", 3..9), ("<s>é", 3..4)] {
            assert!(tokenizer.encode_rendered(text, &[range]).is_err(), "{text}");
        }
    }
}
