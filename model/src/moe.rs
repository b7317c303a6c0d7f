//! The sparse MoE block and its seam to the experts. The block owns the gate
//! and decides the routing; an [`Experts`] implementation computes the routed
//! tokens, wherever the experts live (in this process, or on workers).

use tch::{Device, Kind, Tensor};

use crate::config::MixtralConfig;
use crate::error::{ForwardError, WeightsError};
use crate::expert::Expert;
use crate::gating::{Gate, Routing};
use crate::weights::Checkpoint;

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

    /// Number of (layer, expert) pairs held.
    pub fn held_count(&self) -> usize {
        self.layers.iter().flatten().filter(|e| e.is_some()).count()
    }

    /// Runs the held experts on the rows routed to them, each row scaled by its
    /// routing weight, summed per token.
    pub fn forward_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        let experts = self
            .layers
            .get(layer)
            .ok_or(ForwardError::ExpertNotHeld { layer, expert: 0 })?;
        let mut out = xs.zeros_like();
        let hit: Vec<i64> = Vec::try_from(
            routing
                .experts
                .flatten(0, -1)
                .bincount(None::<Tensor>, experts.len() as i64),
        )?;
        for (expert_id, &count) in hit.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let expert = experts.get(expert_id).and_then(Option::as_ref).ok_or(
                ForwardError::ExpertNotHeld {
                    layer,
                    expert: expert_id,
                },
            )?;
            let matches = routing.experts.eq(expert_id as i64).nonzero();
            let tokens = matches.select(1, 0);
            let slots = matches.select(1, 1);
            let weights = routing
                .weights
                .index(&[Some(&tokens), Some(&slots)])
                .unsqueeze(1);
            let rows = xs.index_select(0, &tokens);
            let y = expert.forward(&rows) * weights;
            let _ = out.index_add_(0, &tokens, &y.to_kind(out.kind()));
        }
        Ok(out)
    }
}

impl Experts for LocalExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        self.forward_routed(layer, xs, routing)
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
