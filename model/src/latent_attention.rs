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
//! The query and key projections' rows are reordered at load: every
//! head's rotary part first (so a decode step's few rows are rotated in
//! place, as grouped-query attention's leading heads are), and DeepSeek's
//! adjacent pairs turned into the halves the rotary tables turn (the
//! scores are the same: q and k permute alike). The cache holds `[k_pe,
//! c]` per position.

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
    /// Its key part per head transposed, `[heads, kv_lora_rank, nope_dim]`,
    /// and its value part, `[heads, v_dim, kv_lora_rank]`: decode's, as
    /// each head's `[out, in]` projection.
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
        let interleaved = spec.interleaved_rope;
        let first = |w: &Tensor, groups: i64, plain: i64| {
            rotary_rows_first(w, groups, (plain, rope), interleaved)
        };
        let query = match (weights.q_proj, weights.q_a) {
            (Some(q), _) => Query::Full(WeightMatrix::new(first(&q, h, nope)?, quantization)?),
            (None, Some((a, a_bias, norm, b))) => Query::LowRank {
                a: WeightMatrix::new(a, quantization)?,
                a_bias,
                norm: RmsNorm::new(norm, LATENT_NORM_EPS),
                b: WeightMatrix::new(first(&b, h, nope)?, quantization)?,
            },
            (None, None) => {
                return Err(TchError::Kind(
                    "latent attention needs q_proj or q_a_proj".into(),
                ));
            }
        };
        let kv_a_bias = weights
            .kv_a_bias
            .map(|b| first(&b.f_view([-1, 1])?, 1, rank)?.f_view([-1]))
            .transpose()?;
        let kv_b = weights.kv_b;
        let per_head = kv_b.f_view([h, nope + v, rank])?;
        Ok(Self {
            query,
            kv_a: WeightMatrix::new(first(&weights.kv_a, 1, rank)?, quantization)?,
            kv_a_bias,
            kv_a_norm: RmsNorm::new(weights.kv_a_norm, LATENT_NORM_EPS),
            w_uk: per_head
                .f_narrow(1, 0, nope)?
                .f_transpose(1, 2)?
                .f_contiguous()?,
            w_uv: per_head.f_narrow(1, nope, v)?.f_contiguous()?,
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
        // Rows: every head's rotary part, then every head's other part;
        // a few rows are rotated in place.
        let mut q = self.query(xs)?;
        let q_rope = self.heads * self.rope;
        let rotated = rotary.rotate_leading_heads(&mut q, self.heads)?;
        let q_pe = q
            .f_narrow(1, 0, q_rope)?
            .f_view([tokens, self.heads, self.rope])?;
        let q_pe = if rotated { q_pe } else { rotary.apply(&q_pe)? };
        let q_nope = q
            .f_narrow(1, q_rope, self.heads * self.nope)?
            .f_view([tokens, self.heads, self.nope])?;
        // Rows: the rotary key, then the latent vector.
        let mut kv = projection::linear_biased(xs, &self.kv_a, self.kv_a_bias.as_ref())?;
        let rotated = rotary.rotate_leading_heads(&mut kv, 1)?;
        let k_pe = kv
            .f_narrow(1, 0, self.rope)?
            .f_view([tokens, 1, self.rope])?;
        let k_pe = if rotated { k_pe } else { rotary.apply(&k_pe)? };
        let c = self
            .kv_a_norm
            .forward(&kv.f_narrow(1, self.rope, self.rank)?.f_contiguous()?)?;
        let latent = Tensor::f_cat(&[k_pe, c.f_view([tokens, 1, self.rank])?], 2)?;
        pool.write_latent(layer, &layout.slots, &latent)?;

        let width = self.heads * self.v;
        let decoded = layout
            .decode
            .as_ref()
            .map(|group| -> Result<Tensor, ForwardError> {
                let (q_nope, q_pe) = (group.rows_of(&q_nope)?, group.rows_of(&q_pe)?);
                self.decode(layer, &q_nope, &q_pe, &group.reads, pool)
            })
            .transpose()?;
        let out = layout.attended([tokens, width], xs, decoded, |chunk| {
            Ok(self.prefill(layer, [&q_nope, &q_pe], &latent, chunk, pool)?)
        })?;
        Ok(projection::linear_biased(
            &out,
            &self.o_proj,
            self.o_bias.as_ref(),
        )?)
    }

    /// The queries, `[tokens, heads * (nope + rope)]`.
    fn query(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        match &self.query {
            Query::Full(w) => projection::linear(xs, w),
            Query::LowRank { a, a_bias, norm, b } => {
                let low = projection::linear_biased(xs, a, a_bias.as_ref())?;
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
        let sequences = q_nope.size()[0];
        // [S, H, nope] -> [H, S, nope] · [H, rank, nope]ᵀ -> [S, H, rank]
        let absorbed = projection::per_head_linear(&q_nope.f_transpose(0, 1)?, &self.w_uk)?
            .f_transpose(0, 1)?;
        let q = Tensor::f_cat(&[q_pe, &absorbed], 2)?;
        let width = self.rank + self.rope;
        let out = match reads {
            // On the kernels over the pool in place: one key head, its
            // values the same rows; they scale by 1/√width, so q is
            // scaled to make that the softmax scale.
            DecodeReads::Paged { slots, offsets } => {
                let q = q.f_mul_scalar(self.scale * (width as f64).sqrt())?;
                let keys = pool.keys(layer);
                projection::decode_attention(&q, [keys, keys], slots, offsets, None)?
                    .f_narrow(2, self.rope, self.rank)?
            }
            DecodeReads::Gathered { table, mask } => {
                // [S, W, 1, rope + rank] -> [S, 1, W, rope + rank]: one key
                // head, its values the same rows (libtorch's attention is
                // quicker with values as wide as keys); the rotary part's
                // share is dropped.
                let keys = pool.gather_latent(layer, table)?.f_transpose(1, 2)?;
                Tensor::f_scaled_dot_product_attention(
                    &q.f_view([sequences, 1, self.heads, width])?,
                    &keys,
                    &keys,
                    Some(mask),
                    0.0,
                    false,
                    Some(self.scale),
                    false,
                )?
                .f_narrow(3, self.rope, self.rank)?
            }
        };
        // [S, 1, H, rank] -> [H, S, rank] · [H, v, rank]ᵀ -> [S, H * v]
        let out = out
            .f_reshape([sequences, self.heads, self.rank])?
            .f_transpose(0, 1)?;
        let out = projection::per_head_linear(&out, &self.w_uv)?
            .f_transpose(0, 1)?
            .f_reshape([sequences, self.heads * self.v])?;
        Ok(out)
    }

    /// One sequence's chunk of new tokens, keys and values expanded from
    /// the latent vectors: `[len, heads * v_dim]`.
    fn prefill(
        &self,
        layer: usize,
        [q_nope, q_pe]: [&Tensor; 2],
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
        let cached = cached.f_view([positions, self.rope + self.rank])?;
        let expanded = projection::linear(&cached.f_narrow(1, self.rope, self.rank)?, &self.kv_b)?
            .f_view([positions, self.heads, self.nope + self.v])?;
        let k_pe = cached
            .f_narrow(1, 0, self.rope)?
            .f_unsqueeze(1)?
            .f_expand([positions, self.heads, self.rope], false)?;
        let keys = Tensor::f_cat(&[&expanded.f_narrow(2, 0, self.nope)?, &k_pe], 2)?;
        let values = expanded.f_narrow(2, self.nope, self.v)?;
        // [positions, H, d] -> [1, H, positions, d]
        let heads_first = |t: &Tensor| t.f_transpose(0, 1)?.f_unsqueeze(0);
        let rows = |t: &Tensor| t.f_narrow(0, span.row as i64, len);
        let q = Tensor::f_cat(&[rows(q_nope)?, rows(q_pe)?], 2)?;
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

/// `w`'s rows (`[groups * (plain + rope), ...]`: each group's `plain`
/// rows, then its `rope` rotary rows) reordered to every group's rotary
/// rows first, then every group's plain rows; the rotary rows of a group
/// turned from adjacent pairs (0, 1), (2, 3), ... into halves (0, 2, ...,
/// then 1, 3, ...) where `interleaved` (what transformers' interleaved
/// rotary embedding computes, in the layout the rotary tables turn).
fn rotary_rows_first(
    w: &Tensor,
    groups: i64,
    (plain, rope): (i64, i64),
    interleaved: bool,
) -> Result<Tensor, TchError> {
    let width = plain + rope;
    let turned: Vec<i64> = match interleaved {
        true => (0..rope / 2)
            .map(|i| 2 * i)
            .chain((0..rope / 2).map(|i| 2 * i + 1))
            .collect(),
        false => (0..rope).collect(),
    };
    let order: Vec<i64> = (0..groups)
        .flat_map(|g| turned.iter().map(move |&j| g * width + plain + j))
        .chain((0..groups).flat_map(|g| (0..plain).map(move |j| g * width + j)))
        .collect();
    w.f_index_select(0, &Tensor::f_from_slice(&order)?.f_to_device(w.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn rotary_rows_lead_in_halves() {
        // 2 heads of width 6: 2 plain rows, then 4 rotary rows.
        let w = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([12, 1]);
        let rows = |interleaved| -> Vec<f32> {
            let out = rotary_rows_first(&w, 2, (2, 4), interleaved).unwrap();
            Vec::try_from(out.view([-1])).unwrap()
        };
        assert_eq!(
            rows(true),
            vec![2., 4., 3., 5., 8., 10., 9., 11., 0., 1., 6., 7.]
        );
        assert_eq!(
            rows(false),
            vec![2., 3., 4., 5., 8., 9., 10., 11., 0., 1., 6., 7.]
        );
    }
}
