//! The traffic a plan is for: how requests arrive and how long their prompts
//! and outputs are.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::Serialize;

/// A length distribution: `128` (every request the same) or `64-256`
/// (uniform, both ends included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Lengths {
    Fixed(usize),
    Uniform { min: usize, max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a length distribution: give N (every request N tokens) or A-B (uniform from A to B, 1 ≤ A ≤ B)"
)]
pub struct LengthsError(String);

impl FromStr for Lengths {
    type Err = LengthsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || LengthsError(text.into());
        let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|&n| n >= 1);
        match text.split_once('-') {
            None => parse(text).map(Lengths::Fixed).ok_or_else(err),
            Some((a, b)) => match (parse(a), parse(b)) {
                (Some(min), Some(max)) if min <= max => Ok(Lengths::Uniform { min, max }),
                _ => Err(err()),
            },
        }
    }
}

impl fmt::Display for Lengths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lengths::Fixed(n) => write!(f, "{n}"),
            Lengths::Uniform { min, max } => write!(f, "{min}-{max}"),
        }
    }
}

impl Lengths {
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform { min, max } => rng.random_range(min..=max),
        }
    }

    pub fn max(&self) -> usize {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform { max, .. } => max,
        }
    }

    pub fn mean(&self) -> f64 {
        match *self {
            Lengths::Fixed(n) => n as f64,
            Lengths::Uniform { min, max } => (min + max) as f64 / 2.0,
        }
    }
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// Open loop: a Poisson process of this many requests per second.
    Rate(f64),
    /// Closed loop: this many clients, each sending its next request when
    /// the previous one finishes (what the load generator does).
    Concurrency(usize),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub arrivals: Arrivals,
    pub prompt: Lengths,
    pub output: Lengths,
    /// Requests simulated.
    pub requests: usize,
    pub seed: u64,
    /// The fraction of every prompt that is one prefix all requests share
    /// (a system prompt): with prefix caching, found in the cache once a
    /// request has computed it.
    pub prefix_share: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("the request rate must be a positive number of requests per second, got {0}")]
    Rate(String),
    #[error("the concurrency must be at least 1")]
    Concurrency,
    #[error("at least one request must be simulated")]
    Requests,
    #[error("the prefix share must be a fraction in [0, 1], got {0}")]
    PrefixShare(String),
    #[error(
        "a request of up to {prompt} prompt tokens and {output} output tokens does not fit the model's context of {context} tokens"
    )]
    Context {
        prompt: usize,
        output: usize,
        context: usize,
    },
}

impl Workload {
    pub fn validate(&self, context: usize) -> Result<(), WorkloadError> {
        match self.arrivals {
            Arrivals::Rate(r) if !(r.is_finite() && r > 0.0) => {
                return Err(WorkloadError::Rate(r.to_string()));
            }
            Arrivals::Concurrency(0) => return Err(WorkloadError::Concurrency),
            _ => {}
        }
        if self.requests == 0 {
            return Err(WorkloadError::Requests);
        }
        if !(0.0..=1.0).contains(&self.prefix_share) {
            return Err(WorkloadError::PrefixShare(self.prefix_share.to_string()));
        }
        if self.prompt.max() + self.output.max() > context {
            return Err(WorkloadError::Context {
                prompt: self.prompt.max(),
                output: self.output.max(),
                context,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn lengths_parse_or_say_what_is_expected() {
        assert_eq!("128".parse(), Ok(Lengths::Fixed(128)));
        assert_eq!("64-256".parse(), Ok(Lengths::Uniform { min: 64, max: 256 }));
        for bad in ["", "0", "-3", "256-64", "a-b", "1.5"] {
            let err = bad.parse::<Lengths>().unwrap_err().to_string();
            assert!(err.contains("A-B"), "{bad}: {err}");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let u: Lengths = "3-5".parse().unwrap();
        let draws: Vec<usize> = (0..200).map(|_| u.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&n| (3..=5).contains(&n)));
        assert!(draws.contains(&3) && draws.contains(&5));
    }

    #[test]
    fn zero_traffic_and_oversized_requests_are_refused() {
        let mut w = Workload {
            arrivals: Arrivals::Rate(0.0),
            prompt: Lengths::Fixed(100),
            output: Lengths::Fixed(100),
            requests: 10,
            seed: 0,
            prefix_share: 0.0,
        };
        assert!(matches!(w.validate(1000), Err(WorkloadError::Rate(_))));
        w.arrivals = Arrivals::Concurrency(0);
        assert_eq!(w.validate(1000), Err(WorkloadError::Concurrency));
        w.arrivals = Arrivals::Rate(2.0);
        assert!(matches!(
            w.validate(150),
            Err(WorkloadError::Context { .. })
        ));
        w.prefix_share = 1.5;
        assert!(matches!(
            w.validate(1000),
            Err(WorkloadError::PrefixShare(_))
        ));
        w.requests = 0;
        assert_eq!(w.validate(1000), Err(WorkloadError::Requests));
    }
}
