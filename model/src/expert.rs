//! One expert: the SwiGLU feed-forward `w2(silu(w1·x) ⊙ w3·x)` of HF
//! `MixtralBlockSparseTop2MLP`. The gate and up projections are laid out at
//! load for the kernel that reads them: stacked (w1 above w3, one matmul)
//! for the reduced-precision dtypes, where oneDNN's kernels gain from the
//! larger matrix, and apart in f32, where MKL repacks the weight matrix on
//! every small-batch call and two halves pack faster than one whole
//! (measured on the `bench` model's shapes, batch rows 4 to 32).

use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;
use crate::projection;
use crate::weights::Checkpoint;
use tramontane_config::MixtralConfig;

pub struct Expert {
    gate_up: GateUp,
    /// `[hidden, intermediate]`
    w2: Tensor,
}

enum GateUp {
    /// w1 above w3: `[2 * intermediate, hidden]`.
    Stacked { w13: Tensor, intermediate: i64 },
    /// w1 and w3, `[intermediate, hidden]` each.
    Apart { w1: Tensor, w3: Tensor },
}

/// The checkpoint key prefix of expert `expert` of layer `layer`.
pub fn expert_prefix(layer: usize, expert: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}")
}

impl Expert {
    /// An expert from its weights: w1, w3 `[intermediate, hidden]`, w2 `[hidden, intermediate]`.
    pub fn new(w1: Tensor, w2: Tensor, w3: Tensor) -> Self {
        let gate_up = if w1.kind() == Kind::Float {
            GateUp::Apart { w1, w3 }
        } else {
            GateUp::Stacked {
                intermediate: w1.size()[0],
                w13: Tensor::cat(&[w1, w3], 0),
            }
        };
        Self { gate_up, w2 }
    }

    pub fn load(
        checkpoint: &Checkpoint,
        config: &MixtralConfig,
        layer: usize,
        expert: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self, WeightsError> {
        let prefix = expert_prefix(layer, expert);
        let (h, i) = (config.hidden_size as i64, config.intermediate_size as i64);
        let load = |name: &str, shape: [i64; 2]| {
            checkpoint.load(&format!("{prefix}.{name}.weight"), &shape, kind, device)
        };
        Ok(Self::new(
            load("w1", [i, h])?,
            load("w2", [h, i])?,
            load("w3", [i, h])?,
        ))
    }

    /// `xs`: `[rows, hidden]` -> `[rows, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let on_kernels = match &self.gate_up {
            GateUp::Stacked { w13, intermediate } => projection::swiglu(
                xs,
                &w13.narrow(0, 0, *intermediate),
                &w13.narrow(0, *intermediate, *intermediate),
            ),
            GateUp::Apart { w1, w3 } => projection::swiglu(xs, w1, w3),
        };
        let hidden = match (on_kernels, &self.gate_up) {
            (Some(hidden), _) => hidden,
            (None, GateUp::Stacked { w13, intermediate }) => {
                let projected = xs.linear(w13, None::<Tensor>);
                projected.narrow(1, 0, *intermediate).silu()
                    * projected.narrow(1, *intermediate, *intermediate)
            }
            (None, GateUp::Apart { w1, w3 }) => {
                xs.linear(w1, None::<Tensor>).silu() * xs.linear(w3, None::<Tensor>)
            }
        };
        projection::linear(&hidden, &self.w2)
    }
}
