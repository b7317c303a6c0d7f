//! OpenAI's `logit_bias`: per token id, a number in [-100, 100] added to
//! that token's logit before sampling (-100 in effect bans the token, 100
//! in effect forces it). As vLLM applies it: with the penalties, before
//! temperature, top-k and top-p, and greedy decoding sees it too; the
//! logprobs a response reports stay the model's own (before any of these).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::excerpt::Excerpt;
use crate::sampling::InvalidParam;

/// Most entries one request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;

/// Largest bias, either way.
pub const MAX_LOGIT_BIAS: f64 = 100.0;

const PARAM: &str = "logit_bias";

/// A request's biases, checked: at most [`MAX_LOGIT_BIAS_ENTRIES`] distinct
/// token ids, each bias within ±[`MAX_LOGIT_BIAS`]. One copy is shared by
/// every prompt of the request and every step of its sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitBias(Arc<[(u32, f32)]>);

impl Default for LogitBias {
    fn default() -> Self {
        Self(Arc::from(Vec::new()))
    }
}

impl LogitBias {
    /// From the request's object, token ids written as decimal strings
    /// (`{"1734": -100}`), as OpenAI takes it. The biases come as JSON
    /// values so that one that is not a number is refused by this field's
    /// name (serde names no field inside the flattened request fields).
    pub fn from_request(entries: &BTreeMap<String, Value>) -> Result<Self, InvalidParam> {
        if entries.len() > MAX_LOGIT_BIAS_ENTRIES {
            return Err(InvalidParam::new(
                PARAM,
                format!(
                    "at most {MAX_LOGIT_BIAS_ENTRIES} entries (got {})",
                    entries.len()
                ),
            ));
        }
        let mut biases = Vec::with_capacity(entries.len());
        for (key, bias) in entries {
            let id = parse_token_id(key).ok_or_else(|| {
                InvalidParam::new(
                    PARAM,
                    format!("{} is not a token id (a decimal number)", Excerpt(key)),
                )
            })?;
            let bias = bias.as_f64().ok_or_else(|| {
                InvalidParam::new(PARAM, format!("the bias of token {id} is not a number"))
            })?;
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(InvalidParam::new(
                    PARAM,
                    format!(
                        "the bias of token {id} is {bias}, outside [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
                    ),
                ));
            }
            biases.push((id, bias as f32));
        }
        // Keys "7" and "007" are one token: refused rather than one picked.
        biases.sort_unstable_by_key(|&(id, _)| id);
        if let Some(pair) = biases.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(InvalidParam::new(
                PARAM,
                format!("token {} is given twice", pair[0].0),
            ));
        }
        Ok(Self(biases.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses a token id the model has no logit for.
    pub fn check_vocabulary(&self, vocab_size: usize) -> Result<(), InvalidParam> {
        match self.0.last() {
            Some(&(id, _)) if id as usize >= vocab_size => Err(InvalidParam::new(
                PARAM,
                format!("token id {id} is outside the vocabulary of {vocab_size}"),
            )),
            _ => Ok(()),
        }
    }

    /// Adds each bias to its token's logit (a sparse add on one row).
    pub fn apply(&self, logits: &mut [f32]) {
        for &(id, bias) in self.0.iter() {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
    }
}

/// A decimal token id; no sign, no spaces.
fn parse_token_id(key: &str) -> Option<u32> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(entries: &[(&str, f64)]) -> Result<LogitBias, InvalidParam> {
        LogitBias::from_request(
            &entries
                .iter()
                .map(|&(k, v)| (k.to_string(), v.into()))
                .collect(),
        )
    }

    #[test]
    fn biases_are_added_to_their_tokens() {
        let bias = bias(&[("2", 100.0), ("0", -100.0), ("1", 0.5)]).expect("valid");
        let mut logits = [1.0, 2.0, 3.0, 4.0];
        bias.apply(&mut logits);
        assert_eq!(logits, [-99.0, 2.5, 103.0, 4.0]);
    }

    #[test]
    fn the_limits_are_refused_beyond_not_at() {
        let entries: BTreeMap<String, Value> = (0..MAX_LOGIT_BIAS_ENTRIES)
            .map(|i| (i.to_string(), if i % 2 == 0 { 100 } else { -100 }.into()))
            .collect();
        assert!(LogitBias::from_request(&entries).is_ok());
        let mut over = entries;
        over.insert("300".into(), 1.0.into());
        let error = LogitBias::from_request(&over).unwrap_err();
        assert_eq!(error.param, "logit_bias");
        assert!(error.message.contains("at most 300"), "{error}");
        for value in [100.5, -101.0, 1e9] {
            let error = bias(&[("5", value)]).unwrap_err();
            assert_eq!(error.param, "logit_bias");
            assert!(error.message.contains("token 5"), "{error}");
        }
    }

    #[test]
    fn keys_must_be_token_ids_and_biases_numbers() {
        for key in ["", "-1", "+1", " 1", "1.0", "abc", "99999999999"] {
            let error = bias(&[(key, 1.0)]).unwrap_err();
            assert_eq!(error.param, "logit_bias", "{key:?}");
        }
        let error = bias(&[("7", 1.0), ("007", 2.0)]).unwrap_err();
        assert!(error.message.contains("twice"), "{error}");
        let not_a_number = [("5".to_string(), Value::from("up"))].into_iter().collect();
        let error = LogitBias::from_request(&not_a_number).unwrap_err();
        assert!(error.message.contains("not a number"), "{error}");
        let huge = "1".repeat(100_000);
        let error = bias(&[(&huge, 1.0)]).unwrap_err();
        assert!(error.message.len() < 200, "{}", error.message.len());
    }

    #[test]
    fn ids_past_the_vocabulary_are_refused() {
        let bias = bias(&[("3", 1.0), ("31999", 1.0)]).expect("valid");
        assert!(bias.check_vocabulary(32000).is_ok());
        let error = bias.check_vocabulary(31999).unwrap_err();
        assert!(error.message.contains("31999"), "{error}");
    }
}
