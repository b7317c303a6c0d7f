//! The sparse MoE block, and the experts held in this process. The block
//! owns the gate and decides the routing; an [`Experts`] implementation
//! computes the routed tokens, wherever the experts live.

use tch::{Device, Kind, TchError, Tensor};

use crate::error::{ForwardError, WeightsError};
use crate::expert::Expert;
use crate::experts::Experts;
use crate::gating::{Gate, Routing};
use crate::layer::LayerError;
use crate::projection::{self, RoutedExpert};
use crate::weights::Checkpoint;
use tramontane_config::{ModelSpec, MoeSpec, Quantization, SharedExperts};

/// Which experts a process holds: `held(layer, expert)`.
pub type ExpertSelection<'a> = &'a dyn Fn(usize, usize) -> bool;

/// Experts held in this process, on one device.
pub struct LocalExperts {
    /// `[layer][expert]`, None where not held.
    layers: Vec<Vec<Option<Expert>>>,
}

impl LocalExperts {
    /// Loads the experts `held` selects, and only those tensors: routed
    /// ones, and a layer's shared expert as its expert `experts` (after the
    /// routed ones) where the layer has one. A dense layer has none.
    pub fn load(
        checkpoint: &Checkpoint,
        spec: &ModelSpec,
        held: ExpertSelection<'_>,
        precision: (Kind, Option<Quantization>),
        device: Device,
    ) -> Result<Self, WeightsError> {
        checkpoint.check_quantization(precision.1)?;
        let layers = (0..spec.layers.len())
            .map(|layer| {
                let Some(moe) = spec.moe(layer) else {
                    return Ok(Vec::new());
                };
                (0..moe.placed_experts(SharedExperts::Workers))
                    .map(|expert| {
                        held(layer, expert)
                            .then(|| {
                                load_expert(checkpoint, spec, moe, layer, expert, precision, device)
                            })
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        crate::heap::release_free_memory();
        Ok(Self { layers })
    }

    /// Loads `(layer, expert)` (a layer's shared expert is its expert
    /// `experts`) from `checkpoint` while serving, unless it is held
    /// already; false for a pair the model does not have.
    pub fn load_pair(
        &mut self,
        checkpoint: &Checkpoint,
        spec: &ModelSpec,
        (layer, expert): (usize, usize),
        precision: (Kind, Option<Quantization>),
        device: Device,
    ) -> Result<bool, WeightsError> {
        let (Some(moe), Some(slot)) = (
            spec.moe(layer),
            self.layers
                .get_mut(layer)
                .and_then(|experts| experts.get_mut(expert)),
        ) else {
            return Ok(false);
        };
        if slot.is_none() {
            *slot = Some(load_expert(
                checkpoint, spec, moe, layer, expert, precision, device,
            )?);
        }
        Ok(true)
    }

    /// Drops `(layer, expert)`, its memory given back; whether it was held.
    pub fn drop_pair(&mut self, layer: usize, expert: usize) -> bool {
        let dropped = self
            .layers
            .get_mut(layer)
            .and_then(|experts| experts.get_mut(expert))
            .and_then(Option::take)
            .is_some();
        if dropped {
            crate::heap::release_free_memory();
        }
        dropped
    }

    /// Experts already built: `layers[layer][expert]`, None where not held.
    pub fn from_experts(layers: Vec<Vec<Option<Expert>>>) -> Self {
        Self { layers }
    }

    /// Bytes of the experts' matrices held, per dtype name (`int8`,
    /// `bf16`, ...), in name order.
    pub fn bytes_by_dtype(&self) -> Vec<(&'static str, u64)> {
        let mut bytes = std::collections::BTreeMap::new();
        for expert in self.layers.iter().flatten().flatten() {
            let (held, dtype) = expert.bytes();
            *bytes.entry(dtype).or_insert(0) += held;
        }
        bytes.into_iter().collect()
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

    /// Layer `layer`'s routed tokens of `xs`: `[tokens, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        self.forward_rows(layer, xs, &rows_by_expert(routing))
    }

    /// Runs each expert of `work` on its rows of `xs`, scales each output row by
    /// its weight, and sums per row: `[rows, hidden]`. A few rows per expert
    /// on the CPU run on the kernels, every expert of the layer in one call.
    pub fn forward_rows(
        &self,
        layer: usize,
        xs: &Tensor,
        work: &[ExpertRows],
    ) -> Result<Tensor, ForwardError> {
        let xs = xs.f_contiguous()?;
        let mut out = xs.f_zeros_like()?;
        let experts = work
            .iter()
            .map(|item| {
                self.layers
                    .get(layer)
                    .and_then(|experts| experts.get(item.expert))
                    .and_then(Option::as_ref)
                    .ok_or(ForwardError::ExpertNotHeld {
                        layer,
                        expert: item.expert,
                    })
            })
            .collect::<Result<Vec<&Expert>, _>>()?;
        let weights = experts
            .iter()
            .map(|expert| expert.matrices())
            .collect::<Result<Vec<_>, _>>()?;
        let routed: Vec<RoutedExpert<'_>> = weights
            .iter()
            .zip(work)
            .zip(&experts)
            .map(|(([w1, w3, w2], item), expert)| RoutedExpert {
                weights: [w1.into(), w3.into(), w2.into()],
                biases: expert.biases(),
                activation: expert.activation(),
                rows: &item.rows,
                routing: &item.weights,
            })
            .collect();
        if !projection::add_experts(&xs, &routed, &mut out)? {
            for (expert, item) in experts.iter().zip(work) {
                expert.add_rows(&xs, &item.rows, &item.weights, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// The rows of a hidden-state matrix one expert must compute.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRows {
    pub expert: usize,
    /// Row indexes into the hidden states.
    pub rows: Vec<usize>,
    /// Routing weight of each row.
    pub weights: Vec<f32>,
}

/// Loads one expert of MoE layer `layer` (`moe`): a routed one, or the
/// layer's shared expert as its expert `experts`.
fn load_expert(
    checkpoint: &Checkpoint,
    spec: &ModelSpec,
    moe: &MoeSpec,
    layer: usize,
    expert: usize,
    precision: (Kind, Option<Quantization>),
    device: Device,
) -> Result<Expert, WeightsError> {
    let (names, width) = match moe.shared {
        Some(shared) if expert == moe.experts => {
            (spec.family.shared_expert_tensors(layer), shared.width)
        }
        _ if spec.family.fuses_experts() => {
            return Expert::load_fused(
                checkpoint,
                &spec.family.fused_expert_tensors(layer),
                (expert, moe.experts),
                (spec.hidden_size, moe.width),
                precision,
                moe.activation,
                device,
            );
        }
        _ => (spec.family.expert_tensors(layer, expert), moe.width),
    };
    Expert::load(
        checkpoint,
        &names,
        (spec.hidden_size, width),
        precision,
        device,
    )
}

/// Splits a routing by expert, in expert order: the rows each expert gets and
/// their weights. Experts no token chose are left out.
pub fn rows_by_expert(routing: &Routing) -> Vec<ExpertRows> {
    let mut by_expert: std::collections::BTreeMap<usize, ExpertRows> = Default::default();
    for (slot, (&expert, &weight)) in routing.experts.iter().zip(&routing.weights).enumerate() {
        let item = by_expert.entry(expert).or_insert_with(|| ExpertRows {
            expert,
            rows: Vec::new(),
            weights: Vec::new(),
        });
        item.rows.push(slot / routing.k.max(1));
        item.weights.push(weight);
    }
    by_expert.into_values().collect()
}

/// In process, a layer's experts are computed in `start`.
impl Experts for LocalExperts {
    type Pending = Tensor;
    type Error = ForwardError;

    fn start(&self, layer: usize, xs: &Tensor, routing: &Routing) -> Result<Tensor, ForwardError> {
        self.forward(layer, xs, routing)
    }

    fn finish(&self, output: Tensor) -> Result<Tensor, ForwardError> {
        Ok(output)
    }
}

/// An expert every token takes beside the routed ones, its output scaled
/// by `sigmoid(gate · x)` where the model has that gate (Qwen2-MoE).
pub struct SharedExpert {
    pub mlp: Expert,
    /// `[1, hidden]`
    pub gate: Option<Tensor>,
}

impl SharedExpert {
    /// `xs`: `[tokens, hidden]` -> `[tokens, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let out = self.mlp.forward(xs)?;
        match &self.gate {
            Some(gate) => projection::linear(xs, gate)?.f_sigmoid()?.f_mul(&out),
            None => Ok(out),
        }
    }
}

/// The gate, the routed experts it sends tokens to, and a shared expert
/// where the model has one: `[tokens, hidden]` -> `[tokens, hidden]`.
pub struct SparseMoe {
    gate: Gate,
    shared: Option<Shared>,
}

/// Where a MoE block's shared expert runs.
pub enum Shared {
    /// Here, while the routed experts are out.
    Here(SharedExpert),
    /// Among the experts, as expert `id` of the layer, which every token
    /// takes with its sigmoid gate (`[1, hidden]`; 1 without one) as weight.
    Experts { id: usize, gate: Option<Tensor> },
}

/// A MoE block between its start and its routed experts' answer.
pub struct MoeInFlight<P> {
    routed: P,
    /// The shared expert's output, computed while the routed experts ran.
    shared: Option<Tensor>,
}

impl SparseMoe {
    pub fn new(gate: Gate, shared: Option<Shared>) -> Self {
        Self { gate, shared }
    }

    /// Routes `xs` and starts its experts; a shared expert run here runs
    /// while they are out.
    pub fn start<E: Experts>(
        &self,
        layer: usize,
        xs: &Tensor,
        experts: &E,
    ) -> Result<MoeInFlight<E::Pending>, LayerError<E::Error>> {
        let mut routing = self.gate.route(xs)?;
        if let Some(Shared::Experts { id, gate }) = &self.shared {
            routing = with_shared_expert(&routing, *id, gate.as_ref(), xs)?;
        }
        let routed = experts
            .start(layer, xs, &routing)
            .map_err(|source| LayerError::Experts { layer, source })?;
        let shared = match &self.shared {
            Some(Shared::Here(shared)) => Some(shared.forward(xs)?),
            _ => None,
        };
        Ok(MoeInFlight { routed, shared })
    }

    /// The block's output once layer `layer`'s routed experts have answered:
    /// their weighted sum, plus the shared expert's output.
    pub fn finish<E: Experts>(
        layer: usize,
        in_flight: MoeInFlight<E::Pending>,
        experts: &E,
    ) -> Result<Tensor, LayerError<E::Error>> {
        let routed = experts
            .finish(in_flight.routed)
            .map_err(|source| LayerError::Experts { layer, source })?;
        Ok(match in_flight.shared {
            Some(shared) => routed.f_add(&shared)?,
            None => routed,
        })
    }
}

/// `routing` with one more expert per token, last: `id`, weighted by
/// `sigmoid(gate · x)` in `xs`' dtype (1 without a gate).
fn with_shared_expert(
    routing: &Routing,
    id: usize,
    gate: Option<&Tensor>,
    xs: &Tensor,
) -> Result<Routing, TchError> {
    let tokens = routing.tokens();
    let weights: Vec<f32> = match gate {
        Some(gate) => Vec::try_from(
            projection::linear(xs, gate)?
                .f_sigmoid()?
                .f_to_kind(Kind::Float)?
                .f_flatten(0, -1)?,
        )?,
        None => vec![1.0; tokens],
    };
    let k = routing.k;
    let mut out = Routing {
        k: k + 1,
        experts: Vec::with_capacity(tokens * (k + 1)),
        weights: Vec::with_capacity(tokens * (k + 1)),
    };
    for (token, &weight) in weights.iter().enumerate().take(tokens) {
        out.experts
            .extend_from_slice(&routing.experts[token * k..(token + 1) * k]);
        out.experts.push(id);
        out.weights
            .extend_from_slice(&routing.weights[token * k..(token + 1) * k]);
        out.weights.push(weight);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! A process loads only the experts it holds: the key filter reads
    //! exactly those tensors, and asking for an expert it does not hold is an
    //! error.

    use tch::{Device, Kind, Tensor};
    use tramontane_config::ModelSpec;

    use super::*;

    #[test]
    fn only_selected_experts_are_loaded_and_unheld_ones_are_an_error() -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        let dir = tempfile::tempdir()?;
        let spec = tramontane_synthetic::Spec {
            shards: 2,
            ..Default::default()
        };
        tramontane_synthetic::write(dir.path(), &spec)?;
        let config = ModelSpec::from_file(&dir.path().join("config.json"))?;
        let checkpoint = Checkpoint::open(dir.path())?;

        // Experts 1 and 5 of layer 1 only, as a worker would.
        let held = |layer: usize, expert: usize| layer == 1 && (expert == 1 || expert == 5);
        let experts = LocalExperts::load(
            &checkpoint,
            &config,
            &held,
            (Kind::Float, None),
            Device::Cpu,
        )?;
        assert_eq!(experts.held_count(), 2);
        let names = [(1, 1), (1, 5)].map(|(l, e)| {
            let t = tramontane_config::Family::Mixtral.expert_tensors(l, e);
            [t.gate, t.up, t.down]
        });
        let expected = checkpoint.stored_bytes(|key| names.iter().flatten().any(|n| n == key));
        assert_eq!(checkpoint.loaded_bytes(), expected);
        let total = checkpoint.stored_bytes(|_| true);
        assert!(
            expected * 10 < total,
            "two experts are a small part of the model"
        );

        let xs = Tensor::randn([3, config.hidden_size as i64], (Kind::Float, Device::Cpu));
        let weights = vec![0.75f32, 0.25, 0.5, 0.5, 0.6, 0.4];
        let held_routing = Routing {
            k: 2,
            experts: vec![1, 5, 5, 1, 1, 5],
            weights: weights.clone(),
        };
        let out = experts.forward(1, &xs, &held_routing)?;
        assert_eq!(out.size(), xs.size());

        let unheld = Routing {
            k: 2,
            experts: vec![1, 2, 5, 1, 1, 5],
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
