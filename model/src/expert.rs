//! One expert: the SwiGLU feed-forward `w2(silu(w1·x) ⊙ w3·x)` of HF
//! `MixtralBlockSparseTop2MLP`, with w1 and w3 stacked at load so that both
//! projections are one matmul.

use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;
use crate::weights::Checkpoint;
use tramontane_config::MixtralConfig;

pub struct Expert {
    /// w1 above w3: `[2 * intermediate, hidden]`.
    w13: Tensor,
    /// `[hidden, intermediate]`
    w2: Tensor,
    intermediate: i64,
}

/// The checkpoint key prefix of expert `expert` of layer `layer`.
pub fn expert_prefix(layer: usize, expert: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}")
}

impl Expert {
    /// An expert from its weights: w1, w3 `[intermediate, hidden]`, w2 `[hidden, intermediate]`.
    pub fn new(w1: Tensor, w2: Tensor, w3: Tensor) -> Self {
        let intermediate = w1.size()[0];
        Self {
            w13: Tensor::cat(&[w1, w3], 0),
            w2,
            intermediate,
        }
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
        let projected = xs.linear(&self.w13, None::<Tensor>);
        let gate = projected.narrow(1, 0, self.intermediate).silu();
        let up = projected.narrow(1, self.intermediate, self.intermediate);
        (gate * up).linear(&self.w2, None::<Tensor>)
    }
}
