//! The sparse MoE block and its seam to the experts. The block owns the gate
//! and decides the routing; an [`Experts`] implementation computes the routed
//! tokens, wherever the experts live (in this process, or on workers).

use tch::{Device, Kind, Tensor};

use crate::error::{ForwardError, WeightsError};
use crate::expert::Expert;
use crate::gating::{Gate, Routing};
use crate::weights::Checkpoint;
use tramontane_config::MixtralConfig;

/// Computes one layer's routed tokens: returns `[tokens, hidden]` holding, per
/// token, Σ over its k experts of weight · expert(token).
pub trait Experts {
    fn forward(&self, layer: usize, xs: &Tensor, routing: &Routing)
    -> Result<Tensor, ForwardError>;
}

/// Which experts a process holds: `held(layer, expert)`.
pub type ExpertSelection<'a> = &'a dyn Fn(usize, usize) -> bool;

/// Experts held in this process, on one device.
pub struct LocalExperts {
    /// `[layer][expert]`, None where not held.
    layers: Vec<Vec<Option<Expert>>>,
}

impl LocalExperts {
    /// Loads the experts `held` selects, and only those tensors.
    pub fn load(
        checkpoint: &Checkpoint,
        config: &MixtralConfig,
        held: ExpertSelection<'_>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, WeightsError> {
        let layers = (0..config.num_hidden_layers)
            .map(|layer| {
                (0..config.num_local_experts)
                    .map(|expert| {
                        held(layer, expert)
                            .then(|| Expert::load(checkpoint, config, layer, expert, kind, device))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { layers })
    }

    /// Experts already built: `layers[layer][expert]`, None where not held.
    pub fn from_experts(layers: Vec<Vec<Option<Expert>>>) -> Self {
        Self { layers }
    }

    /// Number of (layer, expert) pairs held.
    pub fn held_count(&self) -> usize {
        self.layers.iter().flatten().filter(|e| e.is_some()).count()
    }

    /// Whether `(layer, expert)` is held here.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .get(layer)
            .and_then(|experts| experts.get(expert))
            .is_some_and(Option::is_some)
    }

    /// Per layer, the experts held.
    pub fn held(&self) -> Vec<(usize, Vec<usize>)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(layer, experts)| {
                let held = (0..experts.len())
                    .filter(|&e| experts[e].is_some())
                    .collect();
                (layer, held)
            })
            .collect()
    }

    /// Runs each expert of `work` on its rows of `xs`, scales each output row by
    /// its weight, and sums per row: `[rows, hidden]`.
    pub fn forward_rows(
        &self,
        layer: usize,
        xs: &Tensor,
        work: &[ExpertRows],
    ) -> Result<Tensor, ForwardError> {
        let mut out = xs.zeros_like();
        for item in work {
            let expert = self
                .layers
                .get(layer)
                .and_then(|experts| experts.get(item.expert))
                .and_then(Option::as_ref)
                .ok_or(ForwardError::ExpertNotHeld {
                    layer,
                    expert: item.expert,
                })?;
            let rows = xs.f_index_select(0, &item.rows)?;
            let y = expert.forward(&rows) * item.weights.unsqueeze(1);
            let _ = out.f_index_add_(0, &item.rows, &y.to_kind(out.kind()))?;
        }
        Ok(out)
    }
}

/// The rows of a hidden-state matrix one expert must compute.
pub struct ExpertRows {
    pub expert: usize,
    /// i64 row indexes, `[n]`.
    pub rows: Tensor,
    /// Routing weight of each row, `[n]`, in the hidden states' dtype.
    pub weights: Tensor,
}

/// Splits a routing by expert, in expert order: the rows each expert gets and
/// their weights. Experts no token chose are left out.
pub fn rows_by_expert(
    routing: &Routing,
    num_experts: usize,
) -> Result<Vec<ExpertRows>, ForwardError> {
    let counts: Vec<i64> = Vec::try_from(
        routing
            .experts
            .flatten(0, -1)
            .bincount(None::<Tensor>, num_experts as i64),
    )?;
    let mut work = Vec::new();
    for (expert, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let matches = routing.experts.eq(expert as i64).nonzero();
        let rows = matches.select(1, 0);
        let slots = matches.select(1, 1);
        let weights = routing.weights.index(&[Some(&rows), Some(&slots)]);
        work.push(ExpertRows {
            expert,
            rows,
            weights,
        });
    }
    Ok(work)
}

impl Experts for LocalExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        let num_experts = self.layers.get(layer).map_or(0, Vec::len);
        self.forward_rows(layer, xs, &rows_by_expert(routing, num_experts)?)
    }
}

/// Gate plus experts: `[tokens, hidden]` -> `[tokens, hidden]`.
pub struct SparseMoe {
    gate: Gate,
}

/// The checkpoint key of layer `layer`'s gate.
pub fn gate_key(layer: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.gate.weight")
}

impl SparseMoe {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }

    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        experts: &dyn Experts,
    ) -> Result<Tensor, ForwardError> {
        let routing = self.gate.route(xs);
        experts.forward(layer, xs, &routing)
    }
}

#[cfg(test)]
mod tests {
    //! A process loads only the experts it holds: the key filter reads
    //! exactly those tensors, and asking for an expert it does not hold is an
    //! error.

    use tch::{Device, Kind, Tensor};
    use tramontane_config::MixtralConfig;

    use super::*;
    use crate::expert::expert_prefix;

    #[test]
    fn only_selected_experts_are_loaded_and_unheld_ones_are_an_error() -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        let dir = tempfile::tempdir()?;
        let spec = tramontane_synthetic::Spec {
            shards: 2,
            ..Default::default()
        };
        tramontane_synthetic::write(dir.path(), &spec)?;
        let config = MixtralConfig::from_file(&dir.path().join("config.json"))?;
        let checkpoint = Checkpoint::open(dir.path())?;

        // Experts 1 and 5 of layer 1 only, as a worker would.
        let held = |layer: usize, expert: usize| layer == 1 && (expert == 1 || expert == 5);
        let experts = LocalExperts::load(&checkpoint, &config, &held, Kind::Float, Device::Cpu)?;
        assert_eq!(experts.held_count(), 2);
        let prefixes = [expert_prefix(1, 1), expert_prefix(1, 5)];
        let expected = checkpoint
            .stored_bytes(|key| prefixes.iter().any(|p| key.starts_with(&format!("{p}."))));
        assert_eq!(checkpoint.loaded_bytes(), expected);
        let total = checkpoint.stored_bytes(|_| true);
        assert!(
            expected * 10 < total,
            "two experts are a small part of the model"
        );

        let xs = Tensor::randn([3, config.hidden_size as i64], (Kind::Float, Device::Cpu));
        let weights = Tensor::from_slice(&[0.75f32, 0.25, 0.5, 0.5, 0.6, 0.4]).view([3, 2]);
        let held_routing = Routing {
            experts: Tensor::from_slice(&[1i64, 5, 5, 1, 1, 5]).view([3, 2]),
            weights: weights.shallow_clone(),
        };
        let out = experts.forward(1, &xs, &held_routing)?;
        assert_eq!(out.size(), xs.size());

        let unheld = Routing {
            experts: Tensor::from_slice(&[1i64, 2, 5, 1, 1, 5]).view([3, 2]),
            weights,
        };
        let err = experts.forward(1, &xs, &unheld).unwrap_err();
        assert!(
            matches!(
                err,
                ForwardError::ExpertNotHeld {
                    layer: 1,
                    expert: 2
                }
            ),
            "{err}"
        );
        Ok(())
    }
}
