//! One expert: the SwiGLU feed-forward `w2(silu(w1·x) ⊙ w3·x)` of HF
//! `MixtralBlockSparseTop2MLP`.

use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;
use crate::weights::Checkpoint;
use tramontane_config::MixtralConfig;

pub struct Expert {
    /// `[intermediate, hidden]`
    w1: Tensor,
    /// `[hidden, intermediate]`
    w2: Tensor,
    /// `[intermediate, hidden]`
    w3: Tensor,
}

/// The checkpoint key prefix of expert `expert` of layer `layer`.
pub fn expert_prefix(layer: usize, expert: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}")
}

impl Expert {
    /// An expert from its weights: w1, w3 `[intermediate, hidden]`, w2 `[hidden, intermediate]`.
    pub fn new(w1: Tensor, w2: Tensor, w3: Tensor) -> Self {
        Self { w1, w2, w3 }
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
        Ok(Self {
            w1: load("w1", [i, h])?,
            w2: load("w2", [h, i])?,
            w3: load("w3", [i, h])?,
        })
    }

    /// `xs`: `[rows, hidden]` -> `[rows, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let gate = xs.matmul(&self.w1.tr()).silu();
        let up = xs.matmul(&self.w3.tr());
        (gate * up).matmul(&self.w2.tr())
    }
}
