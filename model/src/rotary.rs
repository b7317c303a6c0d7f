//! Rotary position embeddings (the "rotate half" layout of HF Llama/Mixtral),
//! computed in fp32 once per forward step for the positions of every row.

use tch::{Device, Kind, Tensor};

pub struct RotaryEmbedding {
    /// `[head_dim / 2]`, fp32.
    inv_freq: Tensor,
}

/// cos and sin for each row of a step: `[tokens, head_dim]` each.
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = Tensor::pow_scalar(theta, &exponents).reciprocal();
        Self { inv_freq }
    }

    /// Tables for `positions` (`[tokens]`), in `kind`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> RotaryTables {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        RotaryTables {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
        }
    }
}

impl RotaryTables {
    /// Rotates `xs` of shape `[tokens, heads, head_dim]`, row by row.
    pub fn apply(&self, xs: &Tensor) -> Tensor {
        let cos = self.cos.unsqueeze(1);
        let sin = self.sin.unsqueeze(1);
        xs * cos + rotate_half(xs) * sin
    }
}

fn rotate_half(xs: &Tensor) -> Tensor {
    let half = xs.size()[2] / 2;
    let x1 = xs.narrow(2, 0, half);
    let x2 = xs.narrow(2, half, half);
    Tensor::cat(&[&x2.neg(), &x1], 2)
}
