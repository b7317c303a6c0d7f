//! Greedy generation for a batch of prompts, in process: one ragged prefill
//! step, then ragged decode steps; a sequence leaves the batch when it
//! finishes.

use crate::error::StepError;
use crate::experts::Experts;
use crate::kv_cache::KvCache;
use crate::model::{BatchItem, CausalLm, Logits};

/// When a sequence stops.
#[derive(Debug, Clone)]
pub struct StopRule {
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (kept in its output).
    pub eos_ids: Vec<u32>,
}

/// Greedy continuations of `prompts`, run as one batch.
pub fn generate_greedy<E: Experts>(
    model: &CausalLm<E>,
    prompts: &[Vec<u32>],
    stop: &StopRule,
) -> Result<Vec<Vec<u32>>, StepError<E::Error>> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let kv = model.kv_pool_for(prompts.len(), longest + stop.max_new_tokens);
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| kv.new_cache()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    // What each sequence feeds to the next step; None once it has finished.
    let mut pending: Vec<Option<Vec<u32>>> = if stop.max_new_tokens == 0 {
        vec![None; prompts.len()]
    } else {
        prompts.iter().cloned().map(Some).collect()
    };
    while pending.iter().any(Option::is_some) {
        let mut batch: Vec<BatchItem<'_>> = caches
            .iter_mut()
            .zip(&pending)
            .filter_map(|(cache, tokens)| {
                tokens.as_deref().map(|tokens| BatchItem { tokens, cache })
            })
            .collect();
        let logits = model.forward(&kv, &mut batch, Logits::LastPosition)?;
        let mut next = Vec::<i64>::try_from(logits.f_argmax(-1, false)?)?.into_iter();
        for (output, feed) in outputs.iter_mut().zip(pending.iter_mut()) {
            if feed.is_none() {
                continue;
            }
            let token = next.next().map(|t| t as u32).unwrap_or_default();
            output.push(token);
            let done = output.len() >= stop.max_new_tokens || stop.eos_ids.contains(&token);
            *feed = (!done).then(|| vec![token]);
        }
    }
    Ok(outputs)
}
