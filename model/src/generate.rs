//! Greedy generation for a batch of prompts, in process: one ragged prefill
//! step, then ragged decode steps; a sequence leaves the batch when it
//! finishes.

use crate::error::ForwardError;
use crate::kv_cache::KvCache;
use crate::model::{BatchItem, Logits, Mixtral};

/// When a sequence stops.
#[derive(Debug, Clone)]
pub struct StopRule {
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (kept in its output).
    pub eos_ids: Vec<u32>,
}

/// Greedy continuations of `prompts`, run as one batch.
pub fn generate_greedy(
    model: &Mixtral,
    prompts: &[Vec<u32>],
    stop: &StopRule,
) -> Result<Vec<Vec<u32>>, ForwardError> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    if stop.max_new_tokens == 0 {
        return Ok(outputs);
    }
    // The tokens each live sequence feeds to the next step.
    let mut pending: Vec<(usize, Vec<u32>)> = prompts.iter().cloned().enumerate().collect();
    while !pending.is_empty() {
        let live: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
        let mut batch: Vec<BatchItem<'_>> = Vec::with_capacity(pending.len());
        let mut cache_refs: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
        for (i, tokens) in &pending {
            let cache = cache_refs[*i]
                .take()
                .expect("each sequence is in the batch once");
            batch.push(BatchItem { tokens, cache });
        }
        let logits = model.forward(&mut batch, Logits::LastPosition)?;
        let next: Vec<i64> = Vec::try_from(logits.argmax(-1, false))?;
        pending = live
            .into_iter()
            .zip(next)
            .filter_map(|(i, token)| {
                let token = token as u32;
                outputs[i].push(token);
                let done = outputs[i].len() >= stop.max_new_tokens || stop.eos_ids.contains(&token);
                (!done).then(|| (i, vec![token]))
            })
            .collect();
    }
    Ok(outputs)
}
