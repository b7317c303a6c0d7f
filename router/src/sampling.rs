//! Choosing the next token of one sequence from its logits: presence and
//! frequency penalties and the logit bias, then greedy, or temperature,
//! top-k and top-p with the sequence's own seeded RNG — so a seed gives the
//! same tokens whatever else shares the batch.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::logit_bias::LogitBias;
use crate::structured_output::Mask;

/// Below this temperature sampling is greedy.
const GREEDY_BELOW: f32 = 1e-5;

/// Most alternatives a request may ask logprobs for.
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 keeps every token.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// None: a random seed.
    pub seed: Option<u64>,
    /// Some(n): report the chosen token's logprob and the n most likely.
    pub logprobs: Option<usize>,
    /// Added to the logits before temperature, top-k and top-p.
    pub logit_bias: LogitBias,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            logit_bias: LogitBias::default(),
        }
    }
}

/// A parameter out of its range: which one, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

impl InvalidParam {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), InvalidParam> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(InvalidParam::new(
                "temperature",
                format!("{} is outside [0, 2]", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidParam::new(
                "top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(InvalidParam::new(
                    param,
                    format!("{value} is outside [-2, 2]"),
                ));
            }
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(InvalidParam::new(
                "top_logprobs",
                format!("{n} is more than {MAX_TOP_LOGPROBS}"),
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// The chosen token's log-probability under the model (before penalties,
/// logit bias and temperature, as vLLM reports them by default), and the
/// most likely alternatives, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// 1 + how many tokens are more likely.
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

/// One sequence's sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        self.sample_within(logits, None)
    }

    /// Picks the next token from one row of logits, among the tokens
    /// `allowed` (a structured output's) when given, after penalties and
    /// bias; the logprobs reported stay the model's own.
    pub fn sample_within(
        &mut self,
        logits: &[f32],
        allowed: Option<&Mask>,
    ) -> (u32, Option<TokenLogprob>) {
        let mut adjusted = logits.to_vec();
        for (&token, &count) in &self.counts {
            if let Some(logit) = adjusted.get_mut(token as usize) {
                *logit -=
                    self.params.frequency_penalty * count as f32 + self.params.presence_penalty;
            }
        }
        self.params.logit_bias.apply(&mut adjusted);
        if let Some(allowed) = allowed {
            allowed.apply(&mut adjusted);
        }
        let token = if self.params.is_greedy() {
            argmax(&adjusted)
        } else {
            self.draw(&mut adjusted)
        };
        *self.counts.entry(token).or_default() += 1;
        let logprob = self.params.logprobs.map(|n| logprobs(logits, token, n));
        (token, logprob)
    }

    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let temperature = self.params.temperature;
        for logit in logits.iter_mut() {
            *logit /= temperature;
        }
        let mut candidates: Vec<u32> = (0..logits.len() as u32).collect();
        let sorted = self.params.top_k > 0 || self.params.top_p < 1.0;
        if sorted {
            let by_logit = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            let k = self.params.top_k;
            if k > 0 && k < candidates.len() {
                candidates.select_nth_unstable_by(k - 1, by_logit);
                candidates.truncate(k);
            }
            candidates.sort_unstable_by(by_logit);
        }
        let max = candidates
            .iter()
            .map(|&t| logits[t as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut weights: Vec<f64> = candidates
            .iter()
            .map(|&t| f64::from(logits[t as usize] - max).exp())
            .collect();
        if self.params.top_p < 1.0 {
            let total: f64 = weights.iter().sum();
            let target = f64::from(self.params.top_p) * total;
            let mut mass = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    mass += w;
                    mass >= target
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
            candidates.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        if !total.is_finite() || total <= 0.0 {
            return argmax(logits);
        }
        let mut point = self.rng.random::<f64>() * total;
        for (&token, &weight) in candidates.iter().zip(&weights) {
            if point < weight {
                return token;
            }
            point -= weight;
        }
        *candidates.last().expect("at least one candidate")
    }
}

/// The index of the largest value; ties (and NaN) go to the lower index.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `token`'s logprob under `logits` (log-softmax in f64), and the `top`
/// most likely tokens' (ties to the lower id).
pub(crate) fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |t: u32| (f64::from(logits[t as usize]) - log_z) as f32;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, by_logit);
    }
    ids.truncate(top);
    ids.sort_unstable_by(by_logit);
    let own = logits[token as usize];
    TokenLogprob {
        logprob: logprob(token),
        rank: 1 + logits.iter().filter(|&&l| l > own).count(),
        top: ids.into_iter().map(|t| (t, logprob(t))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_ties_go_low() {
        let mut sampler = Sampler::new(params(0.0, 1));
        assert_eq!(sampler.sample(&[0.1, 3.0, 3.0, -1.0]).0, 1);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 1.5,
            ..SamplingParams::default()
        });
        let logits = [2.0, 1.0, 0.0];
        assert_eq!(sampler.sample(&logits).0, 0);
        // 2.0 - 1.5 < 1.0: the second pick moves on.
        assert_eq!(sampler.sample(&logits).0, 1);
    }

    #[test]
    fn a_logit_bias_moves_greedy_and_sampled_picks_but_not_the_logprobs() {
        let bias = |entries: &[(&str, f64)]| {
            LogitBias::from_request(
                &entries
                    .iter()
                    .map(|&(k, v)| (k.to_string(), v.into()))
                    .collect(),
            )
            .expect("valid")
        };
        let logits = [5.0, 1.0, 0.0, -3.0];
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(1),
            logit_bias: bias(&[("3", 100.0)]),
            ..SamplingParams::default()
        });
        let (token, logprob) = sampler.sample(&logits);
        assert_eq!(token, 3);
        let logprob = logprob.expect("asked for");
        // The model's own distribution: token 0 is still its most likely.
        assert_eq!(logprob.top[0].0, 0);
        let z = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(logprob.logprob) - (-3.0 - z)).abs() < 1e-5);
        // Banned: never drawn, whatever the seed.
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(5),
            logit_bias: bias(&[("0", -100.0)]),
            ..SamplingParams::default()
        });
        for _ in 0..500 {
            assert_ne!(sampler.sample(&logits).0, 0);
        }
    }

    #[test]
    fn top_k_1_is_greedy_whatever_the_temperature() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 1,
            seed: Some(3),
            ..SamplingParams::default()
        });
        for _ in 0..20 {
            assert_eq!(sampler.sample(&[0.0, 0.5, 0.4]).0, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Softmax of these is about [0.84, 0.11, 0.04, 0.01]: top_p 0.8 keeps only token 0.
        let logits = [4.0, 2.0, 1.0, 0.0];
        let mut sampler = Sampler::new(SamplingParams {
            top_p: 0.8,
            seed: Some(9),
            ..SamplingParams::default()
        });
        for _ in 0..50 {
            assert_eq!(sampler.sample(&logits).0, 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut sampler = Sampler::new(params(1.0, 42));
        let ones = (0..4000).filter(|_| sampler.sample(&logits).0 == 1).count();
        assert!((2800..3200).contains(&ones), "{ones} of 4000");
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            ..SamplingParams::default()
        });
        let (token, lp) = sampler.sample(&[1.0, 3.0, 2.0]);
        let lp = lp.expect("asked for");
        assert_eq!(token, 1);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        let z = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((f64::from(lp.logprob) - (3.0 - z)).abs() < 1e-5);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams {
            temperature: 2.5,
            ..SamplingParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().param, "temperature");
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().param, "top_p");
    }

    proptest! {
        #[test]
        fn a_seed_replays_the_same_tokens(
            seed in any::<u64>(),
            logits in proptest::collection::vec(-5.0f32..5.0, 2..50),
            top_k in 0usize..10,
            top_p in 0.05f32..=1.0,
        ) {
            let p = SamplingParams { top_k, top_p, seed: Some(seed), ..SamplingParams::default() };
            let mut a = Sampler::new(p.clone());
            let mut b = Sampler::new(p);
            for _ in 0..8 {
                let ta = a.sample(&logits).0;
                prop_assert_eq!(ta, b.sample(&logits).0);
                prop_assert!((ta as usize) < logits.len());
                if top_k > 0 {
                    // The chosen token is among the k largest logits.
                    let larger = logits.iter().filter(|&&l| l > logits[ta as usize]).count();
                    prop_assert!(larger < top_k);
                }
            }
        }
    }
}
