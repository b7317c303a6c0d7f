//! DeepSeek's multi-head latent attention (MLA) over the paged pool, which
//! holds per position and layer only the normed latent vector `c` and the
//! rotated key `k_pe` every head shares (`kv_lora_rank + rope_dim` values).
//!
//! - Prefill expands: the chunk's cached latent vectors through `kv_b_proj`
//!   into every head's key (`k_nope`, then `k_pe`) and value, then causal
//!   attention as transformers computes it.
//! - Decode absorbs `kv_b_proj`: a head's score against position t is
//!   `q_nope · (W_UK c_t) + q_pe · k_pe_t = (W_UKᵀ q_nope) · c_t + q_pe · k_pe_t`,
//!   so the query becomes `[W_UKᵀ q_nope, q_pe]` against the cached
//!   `[c_t, k_pe_t]` (one key head for all query heads), the output `Σ p_t
//!   c_t` goes through `W_UV`, and nothing but the latent cache is read.
//!
//! DeepSeek's rotary part turns adjacent pairs; its rows of the query and
//! key projections are permuted at load into the halves layout the rotary
//! tables turn (the scores are the same: q and k permute alike).

use tch::{TchError, Tensor};

use crate::attention::{DecodeReads, PrefillChunk, StepLayout};
use crate::error::ForwardError;
use crate::kv_cache::KvPool;
use crate::norm::RmsNorm;
use crate::projection;
use crate::rotary::RotaryTables;
use crate::weight_matrix::WeightMatrix;
use tramontane_config::{LatentAttention as LatentSpec, Quantization};

/// transformers' `q_a_layernorm` and `kv_a_layernorm` keep their class's
/// default epsilon, whatever `rms_norm_eps` says.
const LATENT_NORM_EPS: f64 = 1e-6;

pub struct LatentAttention {
    query: Query,
    /// `kv_a_proj_with_mqa`: `[kv_lora_rank + rope_dim, hidden]`.
    kv_a: WeightMatrix,
    kv_a_bias: Option<Tensor>,
    kv_a_norm: RmsNorm,
    /// `kv_b_proj`: `[heads * (nope_dim + v_dim), kv_lora_rank]`, for prefill.
    kv_b: WeightMatrix,
    /// Its key part per head, `[heads, nope_dim, kv_lora_rank]`, and its
    /// value part transposed, `[heads, kv_lora_rank, v_dim]`: decode's.
    w_uk: Tensor,
    w_uv: Tensor,
    o_proj: WeightMatrix,
    o_bias: Option<Tensor>,
    heads: i64,
    rank: i64,
    nope: i64,
    rope: i64,
    v: i64,
    scale: f64,
}

/// How the queries are projected.
enum Query {
    Full(WeightMatrix),
    LowRank {
        a: WeightMatrix,
        a_bias: Option<Tensor>,
        norm: RmsNorm,
        b: WeightMatrix,
    },
}

/// Latent attention's tensors, as the checkpoint names them.
pub struct LatentWeights {
    /// `q_proj`, or `q_a_proj` (with its bias), `q_a_layernorm` and `q_b_proj`.
    pub q_proj: Option<Tensor>,
    pub q_a: Option<(Tensor, Option<Tensor>, Tensor, Tensor)>,
    pub kv_a: Tensor,
    pub kv_a_bias: Option<Tensor>,
    pub kv_a_norm: Tensor,
    pub kv_b: Tensor,
    pub o_proj: Tensor,
    pub o_bias: Option<Tensor>,
}

impl LatentAttention {
    /// The attention `spec` describes for `heads` query heads over
    /// `weights`; the projections held quantized where `quantization` says
    /// (`kv_b_proj` never: decode absorbs it).
    pub fn new(
        spec: &LatentSpec,
        heads: usize,
        weights: LatentWeights,
        quantization: Option<Quantization>,
    ) -> Result<Self, TchError> {
        let (h, rank) = (heads as i64, spec.kv_lora_rank as i64);
        let (nope, rope, v) = (
            spec.nope_dim as i64,
            spec.rope_dim as i64,
            spec.v_dim as i64,
        );
        let halves = |w: Tensor, groups: i64, width: i64, at: i64| -> Result<Tensor, TchError> {
            match spec.interleaved_rope {
                true => rotary_rows_in_halves(&w, groups, width, at, rope),
                false => Ok(w),
            }
        };
        let qk = nope + rope;
        let query = match (weights.q_proj, weights.q_a) {
            (Some(q), _) => Query::Full(WeightMatrix::new(halves(q, h, qk, nope)?, quantization)?),
            (None, Some((a, a_bias, norm, b))) => Query::LowRank {
                a: WeightMatrix::new(a, quantization)?,
                a_bias,
                norm: RmsNorm::new(norm, LATENT_NORM_EPS),
                b: WeightMatrix::new(halves(b, h, qk, nope)?, quantization)?,
            },
            (None, None) => {
                return Err(TchError::Kind(
                    "latent attention needs q_proj or q_a_proj".into(),
                ));
            }
        };
        let kv_a_bias = weights
            .kv_a_bias
            .map(|b| halves(b.f_view([-1, 1])?, 1, rank + rope, rank)?.f_view([-1]))
            .transpose()?;
        let kv_b = weights.kv_b;
        let per_head = kv_b.f_view([h, nope + v, rank])?;
        Ok(Self {
            query,
            kv_a: WeightMatrix::new(halves(weights.kv_a, 1, rank + rope, rank)?, quantization)?,
            kv_a_bias,
            kv_a_norm: RmsNorm::new(weights.kv_a_norm, LATENT_NORM_EPS),
            w_uk: per_head.f_narrow(1, 0, nope)?.f_contiguous()?,
            w_uv: per_head
                .f_narrow(1, nope, v)?
                .f_transpose(1, 2)?
                .f_contiguous()?,
            kv_b: WeightMatrix::new(kv_b, None)?,
            o_proj: WeightMatrix::new(weights.o_proj, quantization)?,
            o_bias: weights.o_bias,
            heads: h,
            rank,
            nope,
            rope,
            v,
            scale: spec.softmax_scale,
        })
    }

    /// `xs`: `[tokens, hidden]`, the new tokens of every sequence of
    /// `layout`, in its order; `rotary` holds each row's position. Writes
    /// this layer's new latent vectors into `pool`.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
    ) -> Result<Tensor, ForwardError> {
        let tokens = xs.size()[0];
        let q = self
            .query(xs)?
            .f_view([tokens, self.heads, self.nope + self.rope])?;
        let q_nope = q.f_narrow(2, 0, self.nope)?;
        let q_pe = rotary.apply(&q.f_narrow(2, self.nope, self.rope)?)?;
        let kv = match &self.kv_a_bias {
            Some(bias) => projection::linear_with_bias(xs, &self.kv_a, bias)?,
            None => projection::linear(xs, &self.kv_a)?,
        };
        let c = self
            .kv_a_norm
            .forward(&kv.f_narrow(1, 0, self.rank)?.f_contiguous()?)?;
        let k_pe = rotary.apply(
            &kv.f_narrow(1, self.rank, self.rope)?
                .f_contiguous()?
                .f_view([tokens, 1, self.rope])?,
        )?;
        let latent = Tensor::f_cat(&[c.f_view([tokens, 1, self.rank])?, k_pe], 2)?;
        pool.write_latent(layer, &layout.slots, &latent)?;

        let width = self.heads * self.v;
        let decoded = layout
            .decode
            .as_ref()
            .map(|group| -> Result<Tensor, ForwardError> {
                let rows = |t: &Tensor| match &group.rows {
                    Some(rows) => t.f_index_select(0, rows),
                    None => Ok(t.shallow_clone()),
                };
                self.decode(layer, &rows(&q_nope)?, &rows(&q_pe)?, &group.reads, pool)
            })
            .transpose()?;
        let out = match (&decoded, layout.prefills.is_empty()) {
            (Some(out), true) => out.shallow_clone(),
            _ => {
                let out = Tensor::f_zeros([tokens, width], (xs.kind(), xs.device()))?;
                if let (Some(group), Some(decoded)) = (&layout.decode, &decoded) {
                    let rows = group.rows.as_ref().expect("mixed steps carry decode rows");
                    let _ = out.shallow_clone().f_index_copy_(0, rows, decoded)?;
                }
                let queries = Tensor::f_cat(&[&q_nope, &q_pe], 2)?;
                for chunk in &layout.prefills {
                    let attended = self.prefill(layer, &queries, &latent, chunk, pool)?;
                    out.f_narrow(0, chunk.span.row as i64, chunk.span.len as i64)?
                        .f_copy_(&attended)?;
                }
                out
            }
        };
        Ok(match &self.o_bias {
            Some(bias) => projection::linear_with_bias(&out, &self.o_proj, bias)?,
            None => projection::linear(&out, &self.o_proj)?,
        })
    }

    /// The queries, `[tokens, heads * (nope + rope)]`.
    fn query(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        match &self.query {
            Query::Full(w) => projection::linear(xs, w),
            Query::LowRank { a, a_bias, norm, b } => {
                let low = match a_bias {
                    Some(bias) => projection::linear_with_bias(xs, a, bias)?,
                    None => projection::linear(xs, a)?,
                };
                projection::linear(&norm.forward(&low)?, b)
            }
        }
    }

    /// One token per decoding sequence, `kv_b_proj` absorbed: `[sequences,
    /// heads * v_dim]`.
    fn decode(
        &self,
        layer: usize,
        q_nope: &Tensor,
        q_pe: &Tensor,
        reads: &DecodeReads,
        pool: &KvPool,
    ) -> Result<Tensor, ForwardError> {
        let DecodeReads::Gathered { table, mask } = reads else {
            return Err(TchError::Kind("latent attention reads gathered blocks".into()).into());
        };
        let sequences = q_nope.size()[0];
        // [S, H, nope] -> [H, S, nope] · [H, nope, rank] -> [S, H, rank]
        let absorbed = q_nope
            .f_transpose(0, 1)?
            .f_bmm(&self.w_uk)?
            .f_transpose(0, 1)?;
        let q = Tensor::f_cat(&[&absorbed, q_pe], 2)?.f_view([
            sequences,
            1,
            self.heads,
            self.rank + self.rope,
        ])?;
        // [S, W, 1, rank + rope] -> [S, 1, W, rank + rope]: one key head.
        let keys = pool.gather_latent(layer, table)?.f_transpose(1, 2)?;
        let values = keys.f_narrow(3, 0, self.rank)?;
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &keys,
            &values,
            Some(mask),
            0.0,
            false,
            Some(self.scale),
            false,
        )?;
        // [S, 1, H, rank] -> [H, S, rank] · [H, rank, v] -> [S, H * v]
        let out = out
            .f_view([sequences, self.heads, self.rank])?
            .f_transpose(0, 1)?
            .f_bmm(&self.w_uv)?
            .f_transpose(0, 1)?
            .f_reshape([sequences, self.heads * self.v])?;
        Ok(out)
    }

    /// One sequence's chunk of new tokens, keys and values expanded from
    /// the latent vectors: `[len, heads * v_dim]`.
    fn prefill(
        &self,
        layer: usize,
        queries: &Tensor,
        latent: &Tensor,
        chunk: &PrefillChunk,
        pool: &KvPool,
    ) -> Result<Tensor, TchError> {
        let span = chunk.span;
        let len = span.len as i64;
        let cached = match &chunk.table {
            None => latent.f_narrow(0, span.row as i64, len)?,
            Some(table) => pool
                .gather_latent(layer, table)?
                .f_narrow(1, 0, span.end() as i64)?
                .f_squeeze_dim(0)?,
        };
        let positions = cached.size()[0];
        let cached = cached.f_view([positions, self.rank + self.rope])?;
        let expanded = projection::linear(&cached.f_narrow(1, 0, self.rank)?, &self.kv_b)?
            .f_view([positions, self.heads, self.nope + self.v])?;
        let k_pe = cached
            .f_narrow(1, self.rank, self.rope)?
            .f_unsqueeze(1)?
            .f_expand([positions, self.heads, self.rope], false)?;
        let keys = Tensor::f_cat(&[&expanded.f_narrow(2, 0, self.nope)?, &k_pe], 2)?;
        let values = expanded.f_narrow(2, self.nope, self.v)?;
        // [positions, H, d] -> [1, H, positions, d]
        let heads_first = |t: &Tensor| t.f_transpose(0, 1)?.f_unsqueeze(0);
        let q = queries.f_narrow(0, span.row as i64, len)?;
        let out = Tensor::f_scaled_dot_product_attention(
            &heads_first(&q)?,
            &heads_first(&keys)?,
            &heads_first(&values)?,
            chunk.mask.explicit(),
            0.0,
            matches!(chunk.mask, crate::attention::AttentionMask::Causal),
            Some(self.scale),
            false,
        )?;
        // [1, H, len, v] -> [len, H * v]
        out.f_squeeze_dim(0)?
            .f_transpose(0, 1)?
            .f_contiguous()?
            .f_view([len, self.heads * self.v])
    }
}

/// `w` (`[groups * width, ...]`) with each group's `rope` rows from `at`
/// reordered from adjacent pairs (0, 1), (2, 3), ... into halves (0, 2,
/// ..., then 1, 3, ...): what transformers' interleaved rotary embedding
/// computes, in the layout the rotary tables turn.
fn rotary_rows_in_halves(
    w: &Tensor,
    groups: i64,
    width: i64,
    at: i64,
    rope: i64,
) -> Result<Tensor, TchError> {
    let size = w.size();
    let rest: Vec<i64> = size[1..].to_vec();
    let mut shape = vec![groups, width];
    shape.extend(&rest);
    let grouped = w.f_reshape(shape.as_slice())?;
    let order: Vec<i64> = (0..rope / 2)
        .map(|i| at + 2 * i)
        .chain((0..rope / 2).map(|i| at + 2 * i + 1))
        .collect();
    let order = Tensor::f_from_slice(&order)?.f_to_device(w.device())?;
    let rotary = grouped.f_index_select(1, &order)?;
    let out = grouped.copy();
    out.f_narrow(1, at, rope)?.f_copy_(&rotary)?;
    out.f_reshape(size.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn rotary_rows_go_from_pairs_to_halves_within_each_head() {
        // 2 heads of width 6: 2 plain rows, then 4 rotary rows.
        let w = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([12, 1]);
        let out = rotary_rows_in_halves(&w, 2, 6, 2, 4).unwrap();
        let rows: Vec<f32> = Vec::try_from(out.view([-1])).unwrap();
        assert_eq!(rows, vec![0., 1., 2., 4., 3., 5., 6., 7., 8., 10., 9., 11.]);
    }
}
