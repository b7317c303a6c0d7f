//! Which experts the simulated tokens choose: drawn from the tokens of a
//! recorded routing trace (`router --record-routing`), layer by layer, or
//! uniformly at random without one.

use std::path::Path;

use rand::Rng;
use rand::seq::index;
use tramontane_policy::routing_trace::{self, TraceError};

use crate::profile::ModelShape;

#[derive(Debug, Clone)]
pub struct TokenRouting {
    experts: usize,
    top_k: usize,
    /// `[layer][token]`: the k experts each recorded token chose; empty
    /// for uniform routing.
    recorded: Vec<Vec<Vec<usize>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("routing trace: {0}")]
    Read(#[from] TraceError),
    #[error(
        "routing trace {path}: step {step} layer {layer} names a layer or expert the header does not have"
    )]
    OutOfShape {
        path: String,
        step: u64,
        layer: usize,
    },
    #[error(
        "the routing trace {path} was recorded on another model (model_id {recorded}, this model's config.json hashes to {planned})"
    )]
    OtherModel {
        path: String,
        recorded: String,
        planned: String,
    },
    #[error("the routing trace {path} is for {found}; the model has {expected}")]
    Shape {
        path: String,
        found: String,
        expected: String,
    },
    #[error("the routing trace {path} has no tokens for layer {layer}")]
    Empty { path: String, layer: usize },
}

impl TokenRouting {
    pub fn uniform(model: &ModelShape) -> Self {
        Self {
            experts: model.experts,
            top_k: model.top_k,
            recorded: Vec::new(),
        }
    }

    /// The tokens of a trace, checked against the model: its shape, and its
    /// model id when the config.json hash is known.
    pub fn from_trace(
        path: &Path,
        model: &ModelShape,
        model_id: Option<&str>,
    ) -> Result<Self, RoutingError> {
        let (header, records) = routing_trace::read(path)?;
        let shown = path.display().to_string();
        if let Some(planned) = model_id
            && planned != header.model_id
        {
            return Err(RoutingError::OtherModel {
                path: shown,
                recorded: header.model_id,
                planned: planned.into(),
            });
        }
        let describe =
            |layers, experts, k| format!("{layers} layers of {experts} experts, top-{k}");
        if (header.layers, header.experts, header.top_k)
            != (model.layers, model.experts, model.top_k)
        {
            return Err(RoutingError::Shape {
                path: shown,
                found: describe(header.layers, header.experts, header.top_k),
                expected: describe(model.layers, model.experts, model.top_k),
            });
        }
        let mut recorded = vec![Vec::new(); model.layers];
        for record in records {
            let bad = record.layer >= model.layers
                || record
                    .experts
                    .iter()
                    .any(|t| t.len() != model.top_k || t.iter().any(|&e| e >= model.experts));
            if bad {
                return Err(RoutingError::OutOfShape {
                    path: shown,
                    step: record.step,
                    layer: record.layer,
                });
            }
            recorded[record.layer].extend(record.experts);
        }
        if let Some(layer) = recorded.iter().position(Vec::is_empty) {
            return Err(RoutingError::Empty { path: shown, layer });
        }
        Ok(Self {
            experts: model.experts,
            top_k: model.top_k,
            recorded,
        })
    }

    pub fn is_uniform(&self) -> bool {
        self.recorded.is_empty()
    }

    /// `[layer][expert]`: tokens routed to each expert (uniform: all 1).
    pub fn load(&self, layers: usize) -> Vec<Vec<f64>> {
        if self.is_uniform() {
            return vec![vec![1.0; self.experts]; layers];
        }
        self.recorded
            .iter()
            .map(|tokens| {
                let mut counts = vec![0.0; self.experts];
                for &e in tokens.iter().flatten() {
                    counts[e] += 1.0;
                }
                counts
            })
            .collect()
    }

    /// The k experts of one token in `layer`, appended to `out`.
    pub fn draw(&self, layer: usize, rng: &mut impl Rng, out: &mut Vec<usize>) {
        if self.is_uniform() {
            out.extend(index::sample(rng, self.experts, self.top_k).iter());
        } else {
            let tokens = &self.recorded[layer];
            out.extend_from_slice(&tokens[rng.random_range(0..tokens.len())]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::shape;
    use rand::SeedableRng;

    fn trace(dir: &Path, layers: usize, experts: usize) -> std::path::PathBuf {
        crate::test_fixtures::trace(dir, "abc", layers, experts, &[0, 1, 0, 2, 0, 3])
    }

    #[test]
    fn a_trace_gives_its_load_and_draws_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = trace(dir.path(), 2, 4);
        let r = TokenRouting::from_trace(&path, &shape(2, 4, 2), Some("abc")).unwrap();
        assert_eq!(r.load(2)[1], vec![3.0, 1.0, 1.0, 1.0]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut out = Vec::new();
        for _ in 0..50 {
            r.draw(0, &mut rng, &mut out);
        }
        assert_eq!(out.iter().filter(|&&e| e == 0).count(), 50);
    }

    #[test]
    fn a_trace_of_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = trace(dir.path(), 2, 4);
        let err = TokenRouting::from_trace(&path, &shape(2, 4, 2), Some("def")).unwrap_err();
        assert!(err.to_string().contains("another model"), "{err}");
        let err = TokenRouting::from_trace(&path, &shape(3, 4, 2), None).unwrap_err();
        assert!(err.to_string().contains("2 layers of 4 experts"), "{err}");
    }

    #[test]
    fn uniform_draws_k_distinct_experts() {
        let r = TokenRouting::uniform(&shape(1, 8, 2));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 8];
        for _ in 0..4000 {
            let mut out = Vec::new();
            r.draw(0, &mut rng, &mut out);
            assert_eq!(out.len(), 2);
            assert_ne!(out[0], out[1]);
            for e in out {
                counts[e] += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
