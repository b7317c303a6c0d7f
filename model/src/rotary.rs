//! Rotary position embeddings (the "rotate half" layout of HF Llama/Mixtral),
//! computed in fp32 once per forward step for the positions of every row.

use tch::{Device, Kind, TchError, Tensor};
use tramontane_config::Yarn;
use tramontane_kernels::{Bf16, F32};

use crate::projection::{KernelError, check_disjoint, elements, elements_mut, small_rows};

pub struct RotaryEmbedding {
    /// `[head_dim / 2]`, fp32.
    inv_freq: Tensor,
    /// What cos and sin are multiplied by (YaRN's attention factor; else 1).
    scale: f64,
}

/// cos and sin for each row of a step: `[tokens, head_dim]` each.
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, device: Device) -> Self {
        Self::scaled(head_dim, theta, None, device)
    }

    /// Rotary embeddings with YaRN's scaling where `yarn` is given, as
    /// transformers computes it (`_compute_yarn_parameters`).
    pub fn scaled(head_dim: usize, theta: f64, yarn: Option<&Yarn>, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let pos_freqs = Tensor::pow_scalar(theta, &exponents);
        let Some(yarn) = yarn else {
            return Self {
                inv_freq: pos_freqs.reciprocal(),
                scale: 1.0,
            };
        };
        let dim = head_dim as f64;
        let correction_dim = |rotations: f64| {
            dim * (yarn.original_max_position_embeddings as f64
                / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(yarn.beta_fast),
            correction_dim(yarn.beta_slow),
        );
        if yarn.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        let half = (head_dim / 2) as i64;
        let ramp =
            ((Tensor::arange(half, (Kind::Float, device)) - low) / (high - low)).clamp(0.0, 1.0);
        let extrapolation = 1.0 - ramp;
        let inv_freq = (pos_freqs.reciprocal() / yarn.factor) * (1.0 - &extrapolation)
            + pos_freqs.reciprocal() * extrapolation;
        Self {
            inv_freq,
            scale: yarn.attention_factor,
        }
    }

    /// Tables for `positions` (`[tokens]`), in `kind`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> Result<RotaryTables, TchError> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&self.inv_freq.f_unsqueeze(0)?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let (mut cos, mut sin) = (emb.f_cos()?, emb.f_sin()?);
        if self.scale != 1.0 {
            (cos, sin) = (cos.f_mul_scalar(self.scale)?, sin.f_mul_scalar(self.scale)?);
        }
        Ok(RotaryTables {
            cos: cos.f_to_kind(kind)?,
            sin: sin.f_to_kind(kind)?,
        })
    }
}

impl RotaryTables {
    /// Rotates, in place, heads `0..heads` of every row of `x` (`[tokens,
    /// width]`, contiguous, `head_dim`-wide heads) for a decode step's few
    /// rows on the CPU; false where that path does not apply and the caller
    /// rotates with [`RotaryTables::apply`]. `x` may not share memory with
    /// the tables ([`KernelError::Overlap`]).
    pub fn rotate_leading_heads(&self, x: &mut Tensor, heads: i64) -> Result<bool, KernelError> {
        let size = x.size();
        let &[rows, width] = size.as_slice() else {
            return Ok(false);
        };
        let kind = x.kind();
        let fits = small_rows(kind, x.device(), rows)
            && x.is_contiguous()
            && [&self.cos, &self.sin].iter().all(|t| {
                t.kind() == kind
                    && t.device() == Device::Cpu
                    && t.is_contiguous()
                    && t.size()[0] == rows
            });
        if !fits {
            return Ok(false);
        }
        check_disjoint(
            x,
            &[
                ("the cosine table", &self.cos),
                ("the sine table", &self.sin),
            ],
        )?;
        // SAFETY: on the CPU, contiguous, of the element's kind (checked);
        // `x` is borrowed mutably and shares no memory with the tables
        // (checked).
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
        // The kernel refuses shapes it does not take (before writing):
        // libtorch's path rotates those.
        Ok(done.is_ok())
    }

    /// Rotates `xs` of shape `[tokens, heads, head_dim]`, row by row.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let cos = self.cos.f_unsqueeze(1)?;
        let sin = self.sin.f_unsqueeze(1)?;
        xs.f_mul(&cos)?.f_add(&rotate_half(xs)?.f_mul(&sin)?)
    }
}

fn rotate_half(xs: &Tensor) -> Result<Tensor, TchError> {
    let half = xs.size()[2] / 2;
    let x1 = xs.f_narrow(2, 0, half)?;
    let x2 = xs.f_narrow(2, half, half)?;
    Tensor::f_cat(&[&x2.f_neg()?, &x1], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_share_memory_with_the_tables_are_refused() {
        let _guard = tch::no_grad_guard();
        let head_dim = 8;
        let rotary = RotaryEmbedding::new(head_dim, 1e4, Device::Cpu);
        let positions = Tensor::from_slice(&[3i64, 4]);
        let tables = rotary.tables(&positions, Kind::Float).unwrap();
        // One head per row, rotated in place, as the libtorch path rotates it.
        let x = Tensor::randn([2, head_dim as i64], (Kind::Float, Device::Cpu));
        let mut rotated = x.copy();
        assert!(tables.rotate_leading_heads(&mut rotated, 1).unwrap());
        let reference = tables.apply(&x.view([2, 1, head_dim as i64])).unwrap();
        let diff = (rotated - reference.view([2, head_dim as i64]))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        // The rows are the cosine table itself (a shallow clone): refused,
        // and the table is unchanged.
        let cos = tables.cos.copy();
        let mut aliased = tables.cos.shallow_clone();
        assert_eq!(
            tables.rotate_leading_heads(&mut aliased, 1),
            Err(KernelError::Overlap {
                input: "the cosine table"
            })
        );
        assert!(tables.cos.equal(&cos));
    }
}
