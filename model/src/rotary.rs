//! Rotary position embeddings (the "rotate half" layout of HF Llama/Mixtral),
//! computed in fp32 once per forward step for the positions of every row.

use tch::{Device, Kind, Tensor};
use tramontane_kernels::{Bf16, F32};

use crate::projection::{elements, elements_mut, small_rows};

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
    /// Rotates, in place, heads `0..heads` of every row of `x` (`[tokens,
    /// width]`, contiguous, `head_dim`-wide heads) for a decode step's few
    /// rows on the CPU; false where that path does not apply and the caller
    /// rotates with [`RotaryTables::apply`].
    pub fn rotate_leading_heads(&self, x: &mut Tensor, heads: i64) -> bool {
        let size = x.size();
        let &[rows, width] = size.as_slice() else {
            return false;
        };
        let kind = x.kind();
        let fits = small_rows(kind, x.device(), rows)
            && x.is_contiguous()
            && [&self.cos, &self.sin]
                .iter()
                .all(|t| t.kind() == kind && t.is_contiguous() && t.size()[0] == rows);
        if !fits {
            return false;
        }
        // SAFETY: on the CPU, contiguous, of the element's kind (checked);
        // `x` is borrowed mutably and is not the tables' storage.
        let done = unsafe {
            match kind {
                Kind::BFloat16 => tramontane_kernels::rotate_heads::<Bf16>(
                    elements_mut(x),
                    width as usize,
                    heads as usize,
                    elements(&self.cos),
                    elements(&self.sin),
                ),
                _ => tramontane_kernels::rotate_heads::<F32>(
                    elements_mut(x),
                    width as usize,
                    heads as usize,
                    elements(&self.cos),
                    elements(&self.sin),
                ),
            }
        };
        done.is_ok()
    }

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
