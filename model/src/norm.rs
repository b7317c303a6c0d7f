//! RMSNorm, computed in fp32 as in HF `MixtralRMSNorm`.

use tch::{Kind, Tensor};

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let xs32 = xs.to_kind(Kind::Float);
        let variance = xs32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xs32 * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}
