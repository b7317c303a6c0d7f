//! Grouped-query self-attention over a ragged batch: the projections run on
//! all tokens at once, attention runs per sequence against its KV cache, with
//! a causal mask and, when configured, a sliding window.

use tch::{Device, Kind, Tensor};

use crate::kv_cache::KvCache;
use crate::rotary::RotaryTables;
use tramontane_config::MixtralConfig;

/// Where one sequence's new tokens sit in the flattened batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSpan {
    /// First row in the `[tokens, hidden]` batch matrix.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (tokens already in the cache).
    pub start: usize,
}

pub struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<usize>,
}

pub struct AttentionWeights {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
}

impl Attention {
    pub fn new(config: &MixtralConfig, weights: AttentionWeights) -> Self {
        Self {
            q_proj: weights.q_proj,
            k_proj: weights.k_proj,
            v_proj: weights.v_proj,
            o_proj: weights.o_proj,
            num_heads: config.num_attention_heads as i64,
            num_kv_heads: config.num_key_value_heads() as i64,
            head_dim: config.head_dim() as i64,
            sliding_window: config.sliding_window,
        }
    }

    /// `xs`: `[tokens, hidden]`, the new tokens of every sequence in `spans`
    /// order; `caches[i]` belongs to `spans[i]`; `rotary` holds each row's
    /// position.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rotary: &RotaryTables,
        spans: &[SequenceSpan],
        caches: &mut [&mut KvCache],
    ) -> Tensor {
        let tokens = xs.size()[0];
        let q = rotary.apply(&xs.matmul(&self.q_proj.tr()).view([
            tokens,
            self.num_heads,
            self.head_dim,
        ]));
        let k = rotary.apply(&xs.matmul(&self.k_proj.tr()).view([
            tokens,
            self.num_kv_heads,
            self.head_dim,
        ]));
        let v = xs
            .matmul(&self.v_proj.tr())
            .view([tokens, self.num_kv_heads, self.head_dim]);
        let outputs: Vec<Tensor> = spans
            .iter()
            .zip(caches.iter_mut())
            .map(|(span, cache)| self.attend(layer, &q, &k, &v, span, cache))
            .collect();
        Tensor::cat(&outputs, 0).matmul(&self.o_proj.tr())
    }

    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        span: &SequenceSpan,
        cache: &mut KvCache,
    ) -> Tensor {
        let len = span.len as i64;
        // [tokens, heads, head_dim] -> this sequence's [heads, len, head_dim]
        let rows = |t: &Tensor| t.narrow(0, span.row as i64, len).transpose(0, 1);
        let q = rows(q);
        let (keys, values) = cache.append(layer, &rows(k), &rows(v));
        let total = keys.size()[1];
        let groups = self.num_heads / self.num_kv_heads;
        let keys = repeat_kv(&keys, groups);
        let values = repeat_kv(&values, groups);
        let mask = self.mask(span, total, q.device());
        let out = Tensor::scaled_dot_product_attention(
            &q.unsqueeze(0),
            &keys.unsqueeze(0),
            &values.unsqueeze(0),
            mask.as_ref().and_then(AttentionMask::explicit),
            0.0,
            matches!(mask, Some(AttentionMask::Causal)),
            None,
            false,
        );
        // [1, heads, len, head_dim] -> [len, heads * head_dim]
        out.squeeze_dim(0)
            .transpose(0, 1)
            .contiguous()
            .view([len, self.num_heads * self.head_dim])
    }

    /// What limits which cached positions each new token may see: nothing (a
    /// one-token step inside the window), plain causality from position 0 (the
    /// fused causal kernel), or an explicit mask.
    fn mask(&self, span: &SequenceSpan, total: i64, device: Device) -> Option<AttentionMask> {
        let window_covers_all = self.sliding_window.is_none_or(|w| total as usize <= w);
        if window_covers_all && span.len == 1 {
            return None;
        }
        if window_covers_all && span.start == 0 {
            return Some(AttentionMask::Causal);
        }
        let query_pos = Tensor::arange_start(
            span.start as i64,
            (span.start + span.len) as i64,
            (Kind::Int64, device),
        )
        .unsqueeze(1);
        let key_pos = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        let mut allowed = key_pos.le_tensor(&query_pos);
        if let Some(window) = self.sliding_window {
            allowed = allowed.logical_and(&key_pos.gt_tensor(&(&query_pos - window as i64)));
        }
        Some(AttentionMask::Explicit(allowed))
    }
}

enum AttentionMask {
    /// Token i sees positions 0..=i: SDPA's `is_causal`.
    Causal,
    /// `[len, total]` booleans, true where a token may attend.
    Explicit(Tensor),
}

impl AttentionMask {
    fn explicit(&self) -> Option<&Tensor> {
        match self {
            AttentionMask::Explicit(mask) => Some(mask),
            AttentionMask::Causal => None,
        }
    }
}

/// `[kv_heads, len, d]` -> `[kv_heads * groups, len, d]`, each kv head
/// repeated for the query heads of its group.
fn repeat_kv(xs: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return xs.shallow_clone();
    }
    let size = xs.size();
    let (kv_heads, len, d) = (size[0], size[1], size[2]);
    xs.unsqueeze(1)
        .expand([kv_heads, groups, len, d], false)
        .reshape([kv_heads * groups, len, d])
}
