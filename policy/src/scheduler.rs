//! The scheduler's limits, and what runs in the next forward step apart from
//! the model: every decoding sequence gives one token; what is left of the
//! per-step token budget goes to prompt chunks, first come first served, so a
//! long prompt is prefilled over several steps without stalling the decodes.
//! Which requests join the batch is [`crate::admission`]'s.

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens (decode tokens plus prompt chunks) in one forward step.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// KV cache tokens reserved by running sequences, at most.
    pub max_kv_tokens: usize,
    /// Requests waiting for admission, at most; beyond it requests are refused.
    pub max_waiting: usize,
    /// New sequences start from the KV blocks of the longest cached prefix
    /// of their tokens (`--no-prefix-caching` turns it off).
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_running: 64,
            max_kv_tokens: 65_536,
            max_waiting: 256,
            prefix_caching: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "max_batch_tokens ({budget}) must be at least max_running ({running}): every running sequence decodes each step"
    )]
    BudgetBelowRunning { budget: usize, running: usize },
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), SchedulerConfigError> {
        for (name, value) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
            ("max_kv_tokens", self.max_kv_tokens),
            ("max_waiting", self.max_waiting),
        ] {
            if value == 0 {
                return Err(SchedulerConfigError::Zero(name));
            }
        }
        if self.max_batch_tokens < self.max_running {
            return Err(SchedulerConfigError::BudgetBelowRunning {
                budget: self.max_batch_tokens,
                running: self.max_running,
            });
        }
        Ok(())
    }
}

/// One sequence's share of a step: `tokens` new tokens of sequence `sequence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub sequence: usize,
    pub tokens: usize,
}

/// Plans a step. `pending[i]` is how many prompt tokens sequence i still has
/// to prefill (0: it is decoding). Decodes come first, then prompt chunks in
/// order until `budget` is spent. The result is in sequence order.
pub fn plan_step(pending: &[usize], budget: usize) -> Vec<Slice> {
    let decodes = pending.iter().filter(|&&p| p == 0).count();
    let mut left = budget.saturating_sub(decodes);
    let mut plan = Vec::with_capacity(pending.len());
    for (sequence, &prompt_left) in pending.iter().enumerate() {
        let tokens = if prompt_left == 0 {
            1
        } else {
            let chunk = prompt_left.min(left);
            left -= chunk;
            chunk
        };
        if tokens > 0 {
            plan.push(Slice { sequence, tokens });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_first_then_prompt_chunks_in_order() {
        // Two prompts of 300 and 200 tokens around a decoding sequence, budget 256.
        let plan = plan_step(&[300, 0, 200], 256);
        assert_eq!(
            plan,
            [
                Slice {
                    sequence: 0,
                    tokens: 255
                },
                Slice {
                    sequence: 1,
                    tokens: 1
                }
            ]
        );
    }

    #[test]
    fn config_needs_a_budget_for_every_decode() {
        let config = SchedulerConfig {
            max_batch_tokens: 8,
            max_running: 16,
            ..SchedulerConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(SchedulerConfigError::BudgetBelowRunning { .. })
        ));
    }

    proptest! {
        #[test]
        fn plans_respect_the_budget_and_never_starve_decodes(
            pending in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..600], 0..40),
            extra in 0usize..1000,
        ) {
            let decodes = pending.iter().filter(|&&p| p == 0).count();
            let budget = decodes + extra;
            let plan = plan_step(&pending, budget);
            let total: usize = plan.iter().map(|s| s.tokens).sum();
            prop_assert!(total <= budget);
            for (i, &p) in pending.iter().enumerate() {
                let given = plan.iter().find(|s| s.sequence == i).map_or(0, |s| s.tokens);
                if p == 0 {
                    prop_assert_eq!(given, 1);
                } else {
                    prop_assert!(given <= p);
                }
            }
            // First come first served: a prompt gets tokens only when every
            // earlier prompt got all it needs.
            let mut starved = false;
            for (i, &p) in pending.iter().enumerate().filter(|(_, p)| **p > 0) {
                let given = plan.iter().find(|s| s.sequence == i).map_or(0, |s| s.tokens);
                if starved {
                    prop_assert_eq!(given, 0);
                }
                if given < p {
                    starved = true;
                }
            }
            // Nothing left unused while prompts wait.
            let waiting: usize = pending.iter().sum();
            prop_assert_eq!(total, (decodes + waiting).min(budget.max(decodes)));
        }
    }
}
