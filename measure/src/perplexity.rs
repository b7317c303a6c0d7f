//! The perplexity of a model on a text: the text tokenized once, cut into
//! windows of `window` tokens that do not overlap, each window scored from
//! a fresh cache (every position but its first predicts the next token),
//! `exp` of the mean negative log-likelihood over every scored position.
//! The same text, windows and positions for every model and quantization,
//! so that their figures compare.

use std::path::Path;

use tch::{Kind, Tensor};
use tramontane_model::{CausalLm, LoadOptions, Logits, Tokenizer};

use crate::error::MeasureError;

/// How the text is scored.
#[derive(Debug, Clone, Copy)]
pub struct Scoring {
    /// Tokens per window.
    pub window: usize,
    /// Tokens of the text scored at most (whole windows).
    pub max_tokens: usize,
    /// Windows prefilled in one step.
    pub batch: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Mean negative log-likelihood, in nats per token.
    pub nll: f64,
    /// Positions scored.
    pub tokens: usize,
    pub windows: usize,
}

/// The perplexity of the model in `dir`, loaded with `options`, on `text`.
pub fn measure(
    dir: &Path,
    options: LoadOptions,
    text: &str,
    scoring: Scoring,
) -> Result<Perplexity, MeasureError> {
    let Scoring {
        window,
        max_tokens,
        batch,
    } = scoring;
    if window < 2 || batch == 0 {
        return Err(MeasureError::Invalid(
            "--window must be at least 2 and --batch at least 1".into(),
        ));
    }
    let _guard = tch::no_grad_guard();
    let tokenizer = Tokenizer::from_dir(dir)?;
    let ids = tokenizer.encode(text)?;
    let windows: Vec<Vec<u32>> = ids
        .chunks_exact(window)
        .take(max_tokens / window)
        .map(<[u32]>::to_vec)
        .collect();
    if windows.is_empty() {
        return Err(MeasureError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {window} (or --max-tokens is below it)",
            ids.len()
        )));
    }
    let model = CausalLm::load_in_process(dir, options)?;
    let kv = model.kv_pool_for(batch, window);
    let mut nll = 0.0;
    for group in windows.chunks(batch) {
        let (logits, _) = model.prefill(&kv, group, Logits::AllPositions)?;
        // Every position but each window's last predicts the next token.
        let logits = logits.view([group.len() as i64, window as i64, -1]);
        let predicted = logits.narrow(1, 0, window as i64 - 1);
        let next: Vec<i64> = group
            .iter()
            .flat_map(|w| w[1..].iter().map(|&t| i64::from(t)))
            .collect();
        let next = Tensor::from_slice(&next).view([group.len() as i64, window as i64 - 1, 1]);
        let log_probs = predicted
            .to_kind(Kind::Double)
            .log_softmax(-1, Kind::Double)
            .gather(2, &next, false);
        nll -= log_probs.sum(Kind::Double).double_value(&[]);
    }
    let tokens = windows.len() * (window - 1);
    let nll = nll / tokens as f64;
    Ok(Perplexity {
        perplexity: nll.exp(),
        nll,
        tokens,
        windows: windows.len(),
    })
}
