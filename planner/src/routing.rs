//! Which experts the simulated tokens choose: drawn from the tokens of a
//! recorded routing trace (`router --record-routing`), layer by layer, or
//! uniformly at random without one.
//!
//! # Dense layers in a trace
//!
//! A trace's header keeps its format (`layers`, `experts`, `top_k`) and
//! counts decoder layers: `layers` is every decoder layer, dense or not,
//! `experts` and `top_k` an MoE layer's; each record names the decoder
//! layer it was routed in, and a dense layer has no records (it routes
//! nothing). So:
//!
//! - a record's layer is the index a placement's rows, a worker's
//!   `--experts` and the router's layers all use: no second numbering of
//!   MoE layers to map back and forth, and nothing to get wrong when one
//!   side forgets it;
//! - the header says the same of a Mixtral as before (every layer is an
//!   MoE layer), so the traces recorded so far still read;
//! - a trace of another model is still told apart by its header and id: a
//!   record in a layer the model has dense is refused like a record beyond
//!   the last layer.
//!
//! Counting MoE layers only in the header (and renumbering records) would
//! have lost which decoder layers they are: two models with as many MoE
//! layers at different places would pass each other's shape check.

use std::path::Path;

use rand::Rng;
use rand::seq::index;
use tramontane_policy::routing_trace::{self, TraceError};

use crate::model::SizedModel;

#[derive(Debug, Clone)]
pub struct TokenRouting {
    /// Per decoder layer: its routed experts and how many a token takes;
    /// (0, 0) for a dense layer.
    layers: Vec<(usize, usize)>,
    /// `[layer][token]`: the k experts each recorded token chose (a dense
    /// layer has none); empty for uniform routing.
    recorded: Vec<Vec<Vec<usize>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("routing trace: {0}")]
    Read(#[from] TraceError),
    #[error(
        "routing trace {path}: step {step} layer {layer} names a layer or expert the model does not route (a dense layer, or one beyond the header's)"
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
    pub fn uniform(model: &SizedModel) -> Self {
        Self {
            layers: layers(model),
            recorded: Vec::new(),
        }
    }

    /// The tokens of a trace, checked against the model: its shape, and its
    /// model id when the config.json hash is known.
    pub fn from_trace(
        path: &Path,
        model: &SizedModel,
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
        let spec = &model.spec;
        let expected = (spec.layers.len(), spec.max_experts(), spec.max_top_k());
        let describe =
            |layers, experts, k| format!("{layers} layers of {experts} experts, top-{k}");
        if (header.layers, header.experts, header.top_k) != expected {
            return Err(RoutingError::Shape {
                path: shown,
                found: describe(header.layers, header.experts, header.top_k),
                expected: describe(expected.0, expected.1, expected.2),
            });
        }
        let layers = layers(model);
        let mut recorded = vec![Vec::new(); layers.len()];
        for record in records {
            let bad = match layers.get(record.layer) {
                None | Some((0, _)) => true,
                Some(&(experts, top_k)) => record
                    .experts
                    .iter()
                    .any(|t| t.len() != top_k || t.iter().any(|&e| e >= experts)),
            };
            if bad {
                return Err(RoutingError::OutOfShape {
                    path: shown,
                    step: record.step,
                    layer: record.layer,
                });
            }
            recorded[record.layer].extend(record.experts);
        }
        let routing = Self { layers, recorded };
        if let Some(layer) = routing
            .moe_layers()
            .find(|&layer| routing.recorded[layer].is_empty())
        {
            return Err(RoutingError::Empty { path: shown, layer });
        }
        Ok(routing)
    }

    pub fn is_uniform(&self) -> bool {
        self.recorded.is_empty()
    }

    /// The decoder layers with routed experts, in order.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, (experts, _))| *experts > 0)
            .map(|(layer, _)| layer)
    }

    /// Experts a token takes in `layer` (0 in a dense layer).
    pub fn top_k(&self, layer: usize) -> usize {
        self.layers[layer].1
    }

    /// The most experts a token takes in any layer.
    pub fn max_top_k(&self) -> usize {
        self.layers.iter().map(|l| l.1).max().unwrap_or(0)
    }

    /// `[layer][expert]`: tokens routed to each expert of each decoder
    /// layer (uniform: all 1); a dense layer's row is empty.
    pub fn load(&self) -> Vec<Vec<f64>> {
        if self.is_uniform() {
            return self
                .layers
                .iter()
                .map(|&(experts, _)| vec![1.0; experts])
                .collect();
        }
        self.recorded
            .iter()
            .zip(&self.layers)
            .map(|(tokens, &(experts, _))| {
                let mut counts = vec![0.0; experts];
                for &e in tokens.iter().flatten() {
                    counts[e] += 1.0;
                }
                counts
            })
            .collect()
    }

    /// The k experts of one token in `layer` (an MoE layer), appended to `out`.
    pub fn draw(&self, layer: usize, rng: &mut impl Rng, out: &mut Vec<usize>) {
        if self.is_uniform() {
            let (experts, top_k) = self.layers[layer];
            out.extend(index::sample(rng, experts, top_k).iter());
        } else {
            let tokens = &self.recorded[layer];
            out.extend_from_slice(&tokens[rng.random_range(0..tokens.len())]);
        }
    }
}

/// Per decoder layer: its routed experts and top-k, (0, 0) for a dense layer.
fn layers(model: &SizedModel) -> Vec<(usize, usize)> {
    model
        .spec
        .layers
        .iter()
        .enumerate()
        .map(|(layer, _)| {
            model
                .spec
                .moe(layer)
                .map_or((0, 0), |moe| (moe.experts, moe.top_k))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{shape, with_dense_layers};
    use rand::SeedableRng;

    fn trace(dir: &Path, layers: usize, experts: usize) -> std::path::PathBuf {
        crate::test_fixtures::trace(dir, "abc", layers, experts, &[0, 1, 0, 2, 0, 3])
    }

    #[test]
    fn a_trace_gives_its_load_and_draws_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = trace(dir.path(), 2, 4);
        let r = TokenRouting::from_trace(&path, &shape(2, 4, 2), Some("abc")).unwrap();
        assert_eq!(r.load()[1], vec![3.0, 1.0, 1.0, 1.0]);
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

    #[test]
    fn a_trace_names_decoder_layers_and_dense_layers_have_no_records() {
        // 4 decoder layers, 0 and 2 dense: the router records layers 1 and 3.
        let model = with_dense_layers(4, 4, 2, &[0, 2], 24);
        let dir = tempfile::tempdir().unwrap();
        let path = crate::test_fixtures::trace_of_layers(
            dir.path(),
            "abc",
            4,
            4,
            &[1, 3],
            &[0, 1, 0, 2, 0, 3],
        );
        let r = TokenRouting::from_trace(&path, &model, Some("abc")).unwrap();
        assert_eq!(r.moe_layers().collect::<Vec<_>>(), vec![1, 3]);
        let load = r.load();
        assert_eq!(load[0], Vec::<f64>::new());
        assert_eq!(load[3], vec![3.0, 1.0, 1.0, 1.0]);
        assert_eq!((r.top_k(1), r.top_k(2), r.max_top_k()), (2, 0, 2));
        // Uniform routing has the same rows.
        let uniform = TokenRouting::uniform(&model).load();
        assert_eq!(
            uniform.iter().map(Vec::len).collect::<Vec<_>>(),
            [0, 4, 0, 4]
        );
        // A record in a dense layer is refused, naming it.
        let path =
            crate::test_fixtures::trace_of_layers(dir.path(), "abc", 4, 4, &[1, 2, 3], &[0, 1]);
        let err = TokenRouting::from_trace(&path, &model, None).unwrap_err();
        assert!(
            matches!(err, RoutingError::OutOfShape { layer: 2, .. }),
            "{err}"
        );
        // As is a trace without the records of an MoE layer.
        let path = crate::test_fixtures::trace_of_layers(dir.path(), "abc", 4, 4, &[1], &[0, 1]);
        let err = TokenRouting::from_trace(&path, &model, None).unwrap_err();
        assert!(matches!(err, RoutingError::Empty { layer: 3, .. }), "{err}");
        // A header counting MoE layers only is another shape.
        let path = crate::test_fixtures::trace(dir.path(), "abc", 2, 4, &[0, 1]);
        let err = TokenRouting::from_trace(&path, &model, None).unwrap_err();
        assert!(err.to_string().contains("the model has 4 layers"), "{err}");
    }
}
