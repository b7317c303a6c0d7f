//! Which experts a worker holds: the same set in every layer it serves
//! (`--experts` specs: `all`, or a comma-separated list of ids and inclusive
//! ranges, `0,2,5-7`), or a set per layer (from a placement file).

use std::path::Path;

use crate::placement::{Placement, PlacementError};

/// The (layer, expert) pairs a worker loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldExperts {
    /// `experts` in each of `layers` (None: every layer).
    Uniform {
        experts: Vec<usize>,
        layers: Option<Vec<usize>>,
    },
    /// Per layer, the experts held; layers not listed hold none.
    PerLayer(Vec<(usize, Vec<usize>)>),
}

impl HeldExperts {
    /// What the placement file at `path` (for a model whose layer l places
    /// `experts_per_layer[l]` experts) gives worker `index`, per layer.
    pub fn from_placement_file(
        path: &Path,
        index: usize,
        experts_per_layer: &[usize],
    ) -> Result<Self, SpecError> {
        let placement = Placement::from_file(path, experts_per_layer)?;
        if index >= placement.workers {
            return Err(SpecError::WorkerIndex {
                index,
                path: path.display().to_string(),
                workers: placement.workers,
            });
        }
        let held = placement.held_by(index);
        if held.is_empty() {
            return Err(SpecError::NoShare {
                index,
                path: path.display().to_string(),
            });
        }
        Ok(HeldExperts::PerLayer(held))
    }

    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        match self {
            HeldExperts::Uniform { experts, layers } => {
                layers.as_ref().is_none_or(|l| l.contains(&layer)) && experts.contains(&expert)
            }
            HeldExperts::PerLayer(pairs) => pairs
                .iter()
                .any(|(l, experts)| *l == layer && experts.contains(&expert)),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--experts is empty")]
    Empty,
    #[error("--experts: {0:?} is not an expert id or a range a-b")]
    Syntax(String),
    #[error(
        "--experts: expert {expert} does not exist (the model has {num_experts} experts per layer)"
    )]
    OutOfRange { expert: usize, num_experts: usize },
    #[error("--placement")]
    Placement(#[from] PlacementError),
    #[error(
        "--worker-index {index} is out of range: the placement {path} has {workers} workers (0 to {})",
        workers - 1
    )]
    WorkerIndex {
        index: usize,
        path: String,
        workers: usize,
    },
    #[error("the placement {path} gives worker {index} (--worker-index) no expert to hold")]
    NoShare { index: usize, path: String },
}

/// Sorted, distinct expert ids.
pub fn parse_experts(spec: &str, num_experts: usize) -> Result<Vec<usize>, SpecError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(SpecError::Empty);
    }
    if spec == "all" {
        return Ok((0..num_experts).collect());
    }
    let mut ids = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| SpecError::Syntax(part.into()))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(part)?, parse(part)?),
        };
        if first > last {
            return Err(SpecError::Syntax(part.into()));
        }
        ids.extend(first..=last);
    }
    if let Some(&expert) = ids.iter().find(|&&e| e >= num_experts) {
        return Err(SpecError::OutOfRange {
            expert,
            num_experts,
        });
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The inverse of [`parse_experts`]: a compact spec for a set of ids.
pub fn format_experts(ids: &[usize]) -> String {
    ids.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A per-layer holding in words: `layer 0: 0,2; layer 1: 1,3`.
pub fn format_per_layer(held: &[(usize, Vec<usize>)]) -> String {
    held.iter()
        .map(|(layer, experts)| format!("layer {layer}: {}", format_experts(experts)))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_all() {
        assert_eq!(parse_experts("all", 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_experts("5-7, 0,2,2", 8).unwrap(), vec![0, 2, 5, 6, 7]);
        assert_eq!(
            parse_experts(&format_experts(&[1, 3]), 8).unwrap(),
            vec![1, 3]
        );
        assert_eq!(
            format_per_layer(&[(0, vec![0, 2]), (1, vec![1, 3])]),
            "layer 0: 0,2; layer 1: 1,3"
        );
    }

    #[test]
    fn held_experts_per_layer_or_uniform() {
        let uniform = HeldExperts::Uniform {
            experts: vec![1, 3],
            layers: Some(vec![0]),
        };
        assert!(uniform.holds(0, 3) && !uniform.holds(0, 2) && !uniform.holds(1, 3));
        let per_layer = HeldExperts::PerLayer(vec![(0, vec![0, 2]), (1, vec![1])]);
        assert!(per_layer.holds(0, 2) && per_layer.holds(1, 1));
        assert!(!per_layer.holds(0, 1) && !per_layer.holds(1, 2) && !per_layer.holds(2, 0));
    }

    #[test]
    fn bad_specs_are_named() {
        assert_eq!(parse_experts("", 8), Err(SpecError::Empty));
        assert_eq!(parse_experts("1,x", 8), Err(SpecError::Syntax("x".into())));
        assert_eq!(
            parse_experts("3-1", 8),
            Err(SpecError::Syntax("3-1".into()))
        );
        assert_eq!(
            parse_experts("8", 8),
            Err(SpecError::OutOfRange {
                expert: 8,
                num_experts: 8
            })
        );
    }
}
