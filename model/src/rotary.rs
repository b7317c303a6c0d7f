//! Rotary position embeddings (the "rotate half" layout of HF Llama/Mixtral),
//! computed in fp32 for the positions of each call.

use tch::{Device, Kind, Tensor};

pub struct RotaryEmbedding {
    /// `[head_dim / 2]`, fp32.
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = Tensor::pow_scalar(theta, &exponents).reciprocal();
        Self { inv_freq }
    }

    /// Rotates `xs` of shape `[heads, len, head_dim]` for positions
    /// `start .. start + len`.
    pub fn apply(&self, xs: &Tensor, start: usize) -> Tensor {
        let len = xs.size()[1];
        let positions = Tensor::arange_start(
            start as i64,
            start as i64 + len,
            (Kind::Float, self.inv_freq.device()),
        );
        let freqs = positions.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let kind = xs.kind();
        let cos = emb.cos().to_kind(kind);
        let sin = emb.sin().to_kind(kind);
        xs * cos + rotate_half(xs) * sin
    }
}

fn rotate_half(xs: &Tensor) -> Tensor {
    let half = xs.size()[2] / 2;
    let x1 = xs.narrow(2, 0, half);
    let x2 = xs.narrow(2, half, half);
    Tensor::cat(&[&x2.neg(), &x1], 2)
}
