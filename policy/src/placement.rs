//! Which worker holds which expert. The default puts expert e of every layer
//! on worker e mod W; a placement file may give an expert several replicas.
//! Layers are the model's decoder layers: a dense layer (no routed experts)
//! has an empty row.
//!
//! File format (JSON): `{"workers": W, "experts": [[[w, ...], ...], ...]}` where
//! `experts[layer][expert]` lists the workers holding that expert, e.g. for 2
//! layers of 4 experts on 3 workers with expert 0 replicated:
//! `{"workers": 3, "experts": [[[0, 2], [1], [2], [0]], [[0], [1], [2], [0, 1]]]}`.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("cannot read placement file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("placement needs at least one worker")]
    NoWorkers,
    #[error("placement has {found} layers, the model has {expected}")]
    Layers { expected: usize, found: usize },
    #[error("placement layer {layer} has {found} experts, the model's layer has {expected}")]
    Experts {
        layer: usize,
        expected: usize,
        found: usize,
    },
    #[error("layer {layer} expert {expert} is placed on no worker")]
    Unplaced { layer: usize, expert: usize },
    #[error(
        "layer {layer} expert {expert} is placed on worker {worker}, but there are only {workers} workers"
    )]
    UnknownWorker {
        layer: usize,
        expert: usize,
        worker: usize,
        workers: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub workers: usize,
    /// `experts[layer][expert]`: the workers holding it, at least one.
    pub experts: Vec<Vec<Vec<usize>>>,
}

impl Placement {
    /// Expert e of every layer on worker e mod `workers`; layer l has
    /// `experts_per_layer[l]` routed experts.
    pub fn round_robin(
        experts_per_layer: &[usize],
        workers: usize,
    ) -> Result<Self, PlacementError> {
        if workers == 0 {
            return Err(PlacementError::NoWorkers);
        }
        Ok(Self {
            workers,
            experts: experts_per_layer
                .iter()
                .map(|&experts| (0..experts).map(|e| vec![e % workers]).collect())
                .collect(),
        })
    }

    pub fn from_file(path: &Path, experts_per_layer: &[usize]) -> Result<Self, PlacementError> {
        let read_err = |reason: String| PlacementError::Read {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
        let placement: Placement =
            serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
        placement.validate(experts_per_layer)?;
        Ok(placement)
    }

    /// Every (layer, expert) of the model is on at least one known worker;
    /// layer l has `experts_per_layer[l]` routed experts.
    pub fn validate(&self, experts_per_layer: &[usize]) -> Result<(), PlacementError> {
        if self.workers == 0 {
            return Err(PlacementError::NoWorkers);
        }
        if self.experts.len() != experts_per_layer.len() {
            return Err(PlacementError::Layers {
                expected: experts_per_layer.len(),
                found: self.experts.len(),
            });
        }
        for ((layer, row), &experts) in self.experts.iter().enumerate().zip(experts_per_layer) {
            if row.len() != experts {
                return Err(PlacementError::Experts {
                    layer,
                    expected: experts,
                    found: row.len(),
                });
            }
            for (expert, replicas) in row.iter().enumerate() {
                if replicas.is_empty() {
                    return Err(PlacementError::Unplaced { layer, expert });
                }
                if let Some(&worker) = replicas.iter().find(|&&w| w >= self.workers) {
                    return Err(PlacementError::UnknownWorker {
                        layer,
                        expert,
                        worker,
                        workers: self.workers,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn replicas(&self, layer: usize, expert: usize) -> &[usize] {
        &self.experts[layer][expert]
    }

    /// The first (layer, expert) none of whose workers `serves`, if any.
    pub fn uncovered(&self, serves: impl Fn(usize) -> bool) -> Option<(usize, usize)> {
        self.experts.iter().enumerate().find_map(|(layer, row)| {
            row.iter()
                .position(|replicas| !replicas.iter().any(|&w| serves(w)))
                .map(|expert| (layer, expert))
        })
    }

    /// The placement file at `path`, or expert e on worker e mod `workers`.
    pub fn from_file_or_round_robin(
        path: Option<&Path>,
        experts_per_layer: &[usize],
        workers: usize,
    ) -> Result<Self, PlacementError> {
        match path {
            Some(path) => Self::from_file(path, experts_per_layer),
            None => Self::round_robin(experts_per_layer, workers),
        }
    }

    /// The expert ids worker `worker` holds in any layer, sorted: what it
    /// loads when one `--experts` list serves every layer.
    pub fn experts_of(&self, worker: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = self
            .experts
            .iter()
            .flat_map(|row| (0..row.len()).filter(move |&e| row[e].contains(&worker)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The (layer, experts) pairs worker `worker` holds: per layer, its expert
    /// ids sorted, layers where it holds none left out. What it loads when it
    /// is started from the placement file (`worker --placement`).
    pub fn held_by(&self, worker: usize) -> Vec<(usize, Vec<usize>)> {
        self.experts
            .iter()
            .enumerate()
            .map(|(layer, row)| {
                let ids = (0..row.len())
                    .filter(|&e| row[e].contains(&worker))
                    .collect::<Vec<_>>();
                (layer, ids)
            })
            .filter(|(_, ids)| !ids.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_places_every_expert_once() {
        let p = Placement::round_robin(&[8; 2], 3).unwrap();
        p.validate(&[8; 2]).unwrap();
        assert_eq!(p.replicas(1, 7), &[1]);
        assert_eq!(p.experts_of(2), vec![2, 5]);
    }

    #[test]
    fn uncovered_names_the_first_expert_without_a_serving_worker() {
        // Layer 0 dense; layer 1 expert 0 on workers 0 and 1, the rest round robin.
        let mut p = Placement::round_robin(&[0, 4, 4], 2).unwrap();
        p.experts[1][0] = vec![0, 1];
        assert_eq!(p.uncovered(|_| true), None);
        assert_eq!(p.uncovered(|w| w == 1), Some((1, 2)));
        assert_eq!(p.uncovered(|w| w == 0), Some((1, 1)));
        assert_eq!(p.uncovered(|_| false), Some((1, 0)));
    }

    #[test]
    fn held_by_lists_each_layers_own_experts() {
        let p = Placement {
            workers: 3,
            experts: vec![
                vec![vec![0, 1], vec![1], vec![0], vec![1]],
                vec![vec![1], vec![0], vec![1], vec![0]],
            ],
        };
        p.validate(&[4; 2]).unwrap();
        assert_eq!(p.held_by(0), vec![(0, vec![0, 2]), (1, vec![1, 3])]);
        assert_eq!(p.held_by(1), vec![(0, vec![0, 1, 3]), (1, vec![0, 2])]);
        assert_eq!(p.held_by(2), vec![]);
        // The union over layers is what one --experts list would load.
        assert_eq!(p.experts_of(0), vec![0, 1, 2, 3]);
        let rr = Placement::round_robin(&[8; 2], 3).unwrap();
        assert_eq!(rr.held_by(2), vec![(0, vec![2, 5]), (1, vec![2, 5])]);
    }

    #[test]
    fn incomplete_placements_are_refused_by_name() {
        let mut p = Placement::round_robin(&[4; 2], 2).unwrap();
        p.experts[1][3].clear();
        assert_eq!(
            p.validate(&[4; 2]),
            Err(PlacementError::Unplaced {
                layer: 1,
                expert: 3
            })
        );
        let mut p = Placement::round_robin(&[4; 2], 2).unwrap();
        p.experts[0][2] = vec![0, 5];
        assert!(matches!(
            p.validate(&[4; 2]),
            Err(PlacementError::UnknownWorker { worker: 5, .. })
        ));
        let p = Placement::round_robin(&[4; 1], 2).unwrap();
        assert!(matches!(
            p.validate(&[4; 2]),
            Err(PlacementError::Layers { .. })
        ));
        assert_eq!(
            Placement::round_robin(&[4; 1], 0),
            Err(PlacementError::NoWorkers)
        );
    }
}
