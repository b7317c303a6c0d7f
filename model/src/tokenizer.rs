//! The checkpoint's tokenizer: `tokenizer.json` through the HF `tokenizers`
//! crate, with BOS/EOS added as `tokenizer_config.json` says.

use std::path::Path;

use serde_json::Value;

use crate::error::TokenizerError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
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
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            add_eos,
        })
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

    /// Token ids of text that already carries its special tokens (a rendered
    /// chat template): nothing is added; `<s>` in the text is the BOS token.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
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

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
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
