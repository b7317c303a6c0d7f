//! Grouped-query self-attention over a ragged batch against the paged KV
//! pool. The projections run on all tokens at once (q, k and v as one
//! matmul); the new keys and values are written into their slots; then every
//! sequence that decodes one token attends in one batched call per layer
//! (block tables padded to a common length, a mask for lengths and the
//! sliding window), and each prefill chunk attends on its own with a causal
//! mask. Query heads are grouped by their key/value head, so keys and values
//! are never repeated per head. gpt-oss's heads each have a sink, a
//! learned logit inside the softmax whose weight is dropped, and its
//! layers alternate windowed and full attention (a step lays out both).

use tch::{Device, Kind, TchError, Tensor};

use crate::error::ForwardError;
use crate::kv_cache::{BLOCK_SIZE, KvCache, KvPool, blocks_for};
use crate::norm::RmsNorm;
use crate::projection;
use crate::rotary::RotaryTables;
use crate::weight_matrix::WeightMatrix;
use tramontane_config::{AttentionSpec, QkNorm, Quantization};

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

impl SequenceSpan {
    /// Positions held once this span is written.
    pub(crate) fn end(&self) -> usize {
        self.start + self.len
    }
}

pub struct Attention {
    /// q, k and v stacked: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv_proj: WeightMatrix,
    /// Their biases stacked alike.
    qkv_bias: Option<Tensor>,
    o_proj: WeightMatrix,
    o_bias: Option<Tensor>,
    qk_norm: Option<QkNorms>,
    clip_qkv: Option<f64>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    /// Each head's sink logit, `[heads]` in f32 and as numbers (gpt-oss).
    sinks: Option<(Tensor, Vec<f32>)>,
    /// Whether this layer reads the window where only some layers do
    /// ([`StepLayout::for_layer`]).
    windowed: bool,
}

/// RMSNorms of q and k after their projections, before rotary embeddings:
/// over each head, or over the whole projection.
struct QkNorms {
    q: RmsNorm,
    k: RmsNorm,
    per_head: bool,
}

pub struct AttentionWeights {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    /// q's, k's and v's biases, where the model has them.
    pub qkv_bias: Option<[Tensor; 3]>,
    pub o_bias: Option<Tensor>,
    /// q's and k's norm weights, where the model has them.
    pub qk_norm: Option<[Tensor; 2]>,
    /// Each head's sink logit, `[heads]`, where the model has them.
    pub sinks: Option<Tensor>,
}

/// What every layer's attention needs to know about one step, built once
/// per step: where the new keys go, and which cached positions each
/// sequence reads.
pub struct StepLayout {
    /// The pool slot of every new token, `[tokens]`.
    pub(crate) slots: Tensor,
    pub(crate) decode: Option<DecodeGroup>,
    pub(crate) prefills: Vec<PrefillChunk>,
    /// Where only some layers have the window (`sliding_layers`), the
    /// reads of those layers (the reads above are the others').
    windowed: Option<Box<StepLayout>>,
}

/// The sequences that decode one token this step.
pub(crate) struct DecodeGroup {
    /// Their rows in the batch, `[sequences]`; None when every row decodes.
    pub(crate) rows: Option<Tensor>,
    pub(crate) reads: DecodeReads,
}

impl DecodeGroup {
    /// The decoding sequences' rows of `t` (`[tokens, ...]`).
    pub(crate) fn rows_of(&self, t: &Tensor) -> Result<Tensor, TchError> {
        match &self.rows {
            Some(rows) => t.f_index_select(0, rows),
            None => Ok(t.shallow_clone()),
        }
    }
}

/// Where the decoding sequences' cached keys and values are read.
pub(crate) enum DecodeReads {
    /// In place in the pool, by the kernels: sequence `s` attends the slots
    /// `slots[offsets[s]..offsets[s + 1]]`.
    Paged {
        slots: Vec<u32>,
        offsets: Vec<usize>,
    },
    /// Gathered by block for libtorch's attention.
    Gathered {
        /// Block tables padded with the padding block, `[sequences, blocks]`.
        table: Tensor,
        /// `[sequences, 1, 1, blocks * BLOCK_SIZE]`, true where a position
        /// may be attended to.
        mask: Tensor,
    },
}

/// A sequence with several new tokens (a prompt or a chunk of one).
pub(crate) struct PrefillChunk {
    pub(crate) span: SequenceSpan,
    /// Its block table, `[1, blocks]`, when it attends to positions cached
    /// by earlier steps; None when its own new tokens are all it sees.
    pub(crate) table: Option<Tensor>,
    pub(crate) mask: AttentionMask,
}

impl StepLayout {
    /// A layer's attended rows, `[tokens, width]` (`shape`), of `like`'s
    /// kind and device: `decoded` (the decoding sequences' rows, all of
    /// them where no sequence prefills) and each prefill chunk's rows from
    /// `prefill`.
    pub(crate) fn attended(
        &self,
        shape: [i64; 2],
        like: &Tensor,
        decoded: Option<Tensor>,
        mut prefill: impl FnMut(&PrefillChunk) -> Result<Tensor, ForwardError>,
    ) -> Result<Tensor, ForwardError> {
        if let (Some(out), true) = (&decoded, self.prefills.is_empty()) {
            return Ok(out.shallow_clone());
        }
        let out = Tensor::f_zeros(shape, (like.kind(), like.device()))?;
        if let (Some(group), Some(decoded)) = (&self.decode, &decoded) {
            let rows = group.rows.as_ref().expect("mixed steps carry decode rows");
            let _ = out.shallow_clone().f_index_copy_(0, rows, decoded)?;
        }
        for chunk in &self.prefills {
            let attended = prefill(chunk)?;
            out.f_narrow(0, chunk.span.row as i64, chunk.span.len as i64)?
                .f_copy_(&attended)?;
        }
        Ok(out)
    }

    /// The layout a layer reads: the windowed one where `windowed` and
    /// only some layers have the window.
    pub(crate) fn for_layer(&self, windowed: bool) -> &StepLayout {
        match (&self.windowed, windowed) {
            (Some(layout), true) => layout,
            _ => self,
        }
    }

    /// Lays out a step of `attention`: `spans[i]` belongs to `caches[i]`,
    /// whose blocks must already hold `spans[i].end()` positions.
    pub fn new(
        spans: &[SequenceSpan],
        caches: &[&mut KvCache],
        attention: &AttentionSpec,
        (kind, device): (Kind, Device),
    ) -> Result<Self, TchError> {
        let (every_layer, some_layers) = match attention.sliding_layers {
            None => (attention.sliding_window, None),
            Some(_) => (None, attention.sliding_window),
        };
        let mut layout = Self::with_window(spans, caches, every_layer, (kind, device))?;
        if let Some(window) = some_layers {
            let windowed = Self::with_window(spans, caches, Some(window), (kind, device))?;
            layout.windowed = Some(Box::new(windowed));
        }
        Ok(layout)
    }

    /// [`StepLayout::new`] for layers that read `sliding_window`.
    fn with_window(
        spans: &[SequenceSpan],
        caches: &[&mut KvCache],
        sliding_window: Option<usize>,
        (kind, device): (Kind, Device),
    ) -> Result<Self, TchError> {
        let paged = projection::paged_attention(kind, device);
        let slots: Vec<i64> = spans
            .iter()
            .zip(caches)
            .flat_map(|(span, cache)| (span.start..span.end()).map(|p| cache.slot(p)))
            .collect();
        let decoding: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].len == 1).collect();
        let decode = (!decoding.is_empty())
            .then(|| -> Result<DecodeGroup, TchError> {
                let reads = if paged {
                    let mut slots = Vec::new();
                    let mut offsets = vec![0];
                    for &i in &decoding {
                        let end = spans[i].end();
                        // The new token sits at end - 1 and sees the `window` last positions.
                        let from = sliding_window.map_or(0, |window| end.saturating_sub(window));
                        slots.extend((from..end).map(|p| caches[i].slot(p) as u32));
                        offsets.push(slots.len());
                    }
                    DecodeReads::Paged { slots, offsets }
                } else {
                    gathered_reads(&decoding, spans, caches, sliding_window, device)?
                };
                let every_row = decoding.len() == spans.len();
                let rows: Vec<i64> = decoding.iter().map(|&i| spans[i].row as i64).collect();
                Ok(DecodeGroup {
                    rows: (!every_row)
                        .then(|| Tensor::f_from_slice(&rows)?.f_to_device(device))
                        .transpose()?,
                    reads,
                })
            })
            .transpose()?;
        let prefills = spans
            .iter()
            .zip(caches)
            .filter(|(span, _)| span.len > 1)
            .map(|(span, cache)| {
                let table = (span.start > 0)
                    .then(|| block_table([&**cache], blocks_for(span.end()), device))
                    .transpose()?;
                Ok(PrefillChunk {
                    span: *span,
                    table,
                    mask: AttentionMask::for_chunk(span, sliding_window, device)?,
                })
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Self {
            slots: Tensor::f_from_slice(&slots)?.f_to_device(device)?,
            decode,
            prefills,
            windowed: None,
        })
    }
}

/// The decoding sequences' block tables and mask, for libtorch's attention
/// over their gathered blocks.
fn gathered_reads(
    decoding: &[usize],
    spans: &[SequenceSpan],
    caches: &[&mut KvCache],
    sliding_window: Option<usize>,
    device: Device,
) -> Result<DecodeReads, TchError> {
    let blocks = decoding
        .iter()
        .map(|&i| blocks_for(spans[i].end()))
        .max()
        .unwrap_or(1);
    let table = block_table(decoding.iter().map(|&i| &*caches[i]), blocks, device)?;
    let width = (blocks * BLOCK_SIZE) as i64;
    let ends: Vec<i64> = decoding.iter().map(|&i| spans[i].end() as i64).collect();
    let ends = Tensor::f_from_slice(&ends)?
        .f_to_device(device)?
        .f_view([-1, 1])?;
    let key_pos = Tensor::f_arange(width, (Kind::Int64, device))?.f_view([1, -1])?;
    let mut mask = key_pos.f_lt_tensor(&ends)?;
    if let Some(window) = sliding_window {
        // The new token sits at end - 1 and sees the `window` last positions.
        mask = mask.f_logical_and(&key_pos.f_ge_tensor(&ends.f_sub_scalar(window as i64)?)?)?;
    }
    Ok(DecodeReads::Gathered {
        table,
        mask: mask.f_view([decoding.len() as i64, 1, 1, width])?,
    })
}

/// The block tables of `caches`, each padded to `blocks` entries:
/// `[caches, blocks]`, i64.
fn block_table<'c>(
    caches: impl IntoIterator<Item = &'c KvCache>,
    blocks: usize,
    device: Device,
) -> Result<Tensor, TchError> {
    let table: Vec<i64> = caches
        .into_iter()
        .flat_map(|cache| cache.padded_table(blocks))
        .collect();
    Tensor::f_from_slice(&table)?
        .f_to_device(device)?
        .f_view([-1, blocks as i64])
}

impl Attention {
    /// The attention `spec` describes over `weights`; `eps` is the q/k
    /// norms' epsilon; the q/k/v and output projections held quantized
    /// where `quantization` says.
    pub fn new(
        spec: &AttentionSpec,
        layer: usize,
        weights: AttentionWeights,
        eps: f64,
        quantization: Option<Quantization>,
    ) -> Result<Self, TchError> {
        let sinks = weights
            .sinks
            .map(|sinks| -> Result<_, TchError> {
                let sinks = sinks.f_to_kind(Kind::Float)?;
                let values = Vec::<f32>::try_from(&sinks)?;
                Ok((sinks, values))
            })
            .transpose()?;
        let qk_norm = weights.qk_norm.map(|[q, k]| QkNorms {
            q: RmsNorm::new(q, eps),
            k: RmsNorm::new(k, eps),
            per_head: spec.qk_norm == QkNorm::PerHead,
        });
        let qkv_proj = Tensor::f_cat(&[weights.q_proj, weights.k_proj, weights.v_proj], 0)?;
        Ok(Self {
            qkv_proj: WeightMatrix::new(qkv_proj, quantization)?,
            qkv_bias: weights.qkv_bias.map(|biases| Tensor::cat(&biases, 0)),
            o_proj: WeightMatrix::new(weights.o_proj, quantization)?,
            o_bias: weights.o_bias,
            qk_norm,
            clip_qkv: spec.clip_qkv,
            num_heads: spec.heads as i64,
            num_kv_heads: spec.kv_heads as i64,
            head_dim: spec.head_dim as i64,
            sinks,
            windowed: spec.sliding_layers.is_some() && spec.window(layer).is_some(),
        })
    }

    /// q, k and v of `xs` side by side, `[tokens, (heads + 2 kv_heads) *
    /// head_dim]`: projected, biased, q and k normed, all clipped, as the
    /// model has it.
    fn qkv(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let mut qkv = projection::linear_biased(xs, &self.qkv_proj, self.qkv_bias.as_ref())?;
        if let Some(norms) = &self.qk_norm {
            let tokens = qkv.size()[0];
            let (q_dim, kv_dim) = (
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            );
            let normed = |norm: &RmsNorm, start: i64, width: i64| -> Result<Tensor, TchError> {
                let part = qkv.f_narrow(1, start, width)?;
                if norms.per_head {
                    let heads = part.f_contiguous()?.f_view([-1, self.head_dim])?;
                    norm.forward(&heads)?.f_view([tokens, width])
                } else {
                    norm.forward(&part.f_contiguous()?)
                }
            };
            qkv = Tensor::f_cat(
                &[
                    normed(&norms.q, 0, q_dim)?,
                    normed(&norms.k, q_dim, kv_dim)?,
                    qkv.f_narrow(1, q_dim + kv_dim, kv_dim)?,
                ],
                1,
            )?;
        }
        if let Some(clip) = self.clip_qkv {
            qkv = qkv.f_clamp(-clip, clip)?;
        }
        Ok(qkv)
    }

    /// `xs`: `[tokens, hidden]`, the new tokens of every sequence of
    /// `layout`, in its order; `rotary` holds each row's position. Writes
    /// this layer's new keys and values into `pool`.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
    ) -> Result<Tensor, ForwardError> {
        let layout = layout.for_layer(self.windowed);
        let tokens = xs.size()[0];
        let q_dim = self.num_heads * self.head_dim;
        let mut qkv = self.qkv(xs)?;
        // q's and k's heads lead each row: a few rows are rotated in place.
        let rotated = rotary.rotate_leading_heads(&mut qkv, self.num_heads + self.num_kv_heads)?;
        let heads = |start: i64, count: i64| {
            qkv.f_narrow(1, start * self.head_dim, count * self.head_dim)?
                .f_view([tokens, count, self.head_dim])
        };
        let (mut q, mut k) = (
            heads(0, self.num_heads)?,
            heads(self.num_heads, self.num_kv_heads)?,
        );
        if !rotated {
            (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
        }
        let v = heads(self.num_heads + self.num_kv_heads, self.num_kv_heads)?;
        pool.write(layer, &layout.slots, &k, &v)?;

        let decoded = layout
            .decode
            .as_ref()
            .map(|group| self.decode(layer, &q, group, pool))
            .transpose()?;
        let out = layout.attended([tokens, q_dim], &q, decoded, |chunk| {
            Ok(self.prefill(layer, &q, &k, &v, chunk, pool)?)
        })?;
        Ok(projection::linear_biased(
            &out,
            &self.o_proj,
            self.o_bias.as_ref(),
        )?)
    }

    /// One token per sequence, every sequence at once: `[sequences, heads *
    /// head_dim]`; on the kernels straight over the pool where they take
    /// it, else by libtorch over the sequences' gathered blocks.
    fn decode(
        &self,
        layer: usize,
        q: &Tensor,
        group: &DecodeGroup,
        pool: &KvPool,
    ) -> Result<Tensor, ForwardError> {
        let q = group.rows_of(q)?;
        let sequences = q.size()[0];
        let (table, mask) = match &group.reads {
            DecodeReads::Paged { slots, offsets } => {
                let (keys, values) = pool.layer(layer);
                let sinks = self.sinks.as_ref().map(|(_, values)| values.as_slice());
                let out = projection::decode_attention(&q, [keys, values], slots, offsets, sinks)?;
                return Ok(out.f_view([sequences, self.num_heads * self.head_dim])?);
            }
            DecodeReads::Gathered { table, mask } => (table, mask),
        };
        let groups = self.num_heads / self.num_kv_heads;
        // [sequences, heads, d] -> [sequences, kv_heads, groups, d]: the
        // query heads of a kv head are that head's "queries".
        let q = q.f_view([sequences, self.num_kv_heads, groups, self.head_dim])?;
        let (keys, values) = pool.gather(layer, table)?;
        if let Some((sinks, _)) = &self.sinks {
            let out = self.attend_with_sinks(
                &q.f_unsqueeze(3)?,
                &keys.f_transpose(1, 2)?,
                &values.f_transpose(1, 2)?,
                &mask.f_unsqueeze(3)?,
                sinks,
            )?;
            return Ok(out.f_reshape([sequences, self.num_heads * self.head_dim])?);
        }
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &keys.f_transpose(1, 2)?,
            &values.f_transpose(1, 2)?,
            Some(mask),
            0.0,
            false,
            None,
            false,
        )?;
        Ok(out.f_reshape([sequences, self.num_heads * self.head_dim])?)
    }

    /// One sequence's chunk of new tokens: `[len, heads * head_dim]`.
    fn prefill(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunk: &PrefillChunk,
        pool: &KvPool,
    ) -> Result<Tensor, TchError> {
        let span = chunk.span;
        let len = span.len as i64;
        // [tokens, heads, d] -> this sequence's [1, heads, len, d]
        let rows = |t: &Tensor| {
            t.f_narrow(0, span.row as i64, len)?
                .f_transpose(0, 1)?
                .f_unsqueeze(0)
        };
        let (keys, values) = match &chunk.table {
            None => (rows(k)?, rows(v)?),
            Some(table) => {
                let (keys, values) = pool.gather(layer, table)?;
                let cached = |t: Tensor| t.f_narrow(1, 0, span.end() as i64)?.f_transpose(1, 2);
                (cached(keys)?, cached(values)?)
            }
        };
        if let Some((sinks, _)) = &self.sinks {
            let groups = self.num_heads / self.num_kv_heads;
            let q = rows(q)?.f_view([1, self.num_kv_heads, groups, len, self.head_dim])?;
            let allowed = match &chunk.mask {
                AttentionMask::Explicit(allowed) => allowed.shallow_clone(),
                AttentionMask::Causal => {
                    Tensor::f_ones([len, len], (Kind::Bool, q.device()))?.f_tril(0)?
                }
            };
            let out = self.attend_with_sinks(&q, &keys, &values, &allowed, sinks)?;
            return out
                .f_view([self.num_heads, len, self.head_dim])?
                .f_transpose(0, 1)?
                .f_contiguous()?
                .f_view([len, self.num_heads * self.head_dim]);
        }
        let out = Tensor::f_scaled_dot_product_attention(
            &rows(q)?,
            &keys,
            &values,
            chunk.mask.explicit(),
            0.0,
            matches!(chunk.mask, AttentionMask::Causal),
            None,
            true,
        )?;
        // [1, heads, len, d] -> [len, heads * d]
        out.f_squeeze_dim(0)?
            .f_transpose(0, 1)?
            .f_contiguous()?
            .f_view([len, self.num_heads * self.head_dim])
    }
}

impl Attention {
    /// Attention with each head's sink logit inside the softmax, its weight
    /// dropped after (gpt-oss). `q` `[batch, kv_heads, groups, len, d]`,
    /// `keys` and `values` `[batch, kv_heads, total, d]`, `allowed` (true
    /// where a query may see a key) broadcasting to `[batch, kv_heads,
    /// groups, len, total]`, `sinks` `[heads]` -> `q`'s shape.
    ///
    /// On the CPU: libtorch's flash attention, whose log-sum-exp of each
    /// query's scores says how much the sink takes: with it the weights
    /// are the plain softmax's times `σ(lse − sink)`. Its memory stays
    /// linear in the positions. Elsewhere, transformers' eager attention
    /// (the scores and the softmax over them and the sink materialised).
    fn attend_with_sinks(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        allowed: &Tensor,
        sinks: &Tensor,
    ) -> Result<Tensor, TchError> {
        let size = q.size();
        let (batch, kv_heads, groups, len, d) = (size[0], size[1], size[2], size[3], size[4]);
        let heads = kv_heads * groups;
        let total = keys.size()[2];
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let sinks = sinks.f_to_device(q.device())?;
        if q.device() == Device::Cpu {
            // Each kv head repeated for its query heads: [batch, heads, total, d].
            let repeated = |t: &Tensor| -> Result<Tensor, TchError> {
                t.f_unsqueeze(2)?
                    .f_expand([batch, kv_heads, groups, total, d], false)?
                    .f_reshape([batch, heads, total, d])
            };
            // [.., len, total] with -inf where a query may not look.
            let allowed = match allowed.dim() {
                5 => allowed.f_squeeze_dim(2)?,
                _ => allowed.shallow_clone(),
            };
            let mask = Tensor::f_zeros(allowed.size().as_slice(), (q.kind(), q.device()))?
                .f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?;
            let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
                &q.f_reshape([batch, heads, len, d])?,
                &repeated(keys)?,
                &repeated(values)?,
                0.0,
                false,
                Some(mask),
                scale,
            )?;
            let kept = lse
                .f_to_kind(Kind::Float)?
                .f_sub(&sinks.f_view([1, heads, 1])?)?
                .f_sigmoid()?
                .f_unsqueeze(-1)?;
            return out
                .f_to_kind(Kind::Float)?
                .f_mul(&kept)?
                .f_to_kind(q.kind())?
                .f_reshape([batch, kv_heads, groups, len, d]);
        }
        let scores = q
            .f_matmul(&keys.f_unsqueeze(2)?.f_transpose(-1, -2)?)?
            .f_mul_scalar(scale)?
            .f_to_kind(Kind::Float)?
            .f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?;
        let sink = sinks
            .f_view([1, kv_heads, groups, 1, 1])?
            .f_expand([batch, kv_heads, groups, len, 1], false)?;
        Tensor::f_cat(&[scores, sink], -1)?
            .f_softmax(-1, Kind::Float)?
            .f_narrow(-1, 0, total)?
            .f_to_kind(q.kind())?
            .f_matmul(&values.f_unsqueeze(2)?)
    }
}

pub(crate) enum AttentionMask {
    /// Token i sees positions 0..=i: SDPA's `is_causal`.
    Causal,
    /// `[len, total]` booleans, true where a token may attend.
    Explicit(Tensor),
}

impl AttentionMask {
    /// What limits which positions a chunk's tokens may see: plain causality
    /// from position 0 (the fused causal kernel), or an explicit mask when
    /// the chunk follows cached positions or the window cuts in.
    fn for_chunk(
        span: &SequenceSpan,
        window: Option<usize>,
        device: Device,
    ) -> Result<Self, TchError> {
        let total = span.end();
        if span.start == 0 && window.is_none_or(|w| total <= w) {
            return Ok(AttentionMask::Causal);
        }
        let query_pos =
            Tensor::f_arange_start(span.start as i64, total as i64, (Kind::Int64, device))?
                .f_unsqueeze(1)?;
        let key_pos = Tensor::f_arange(total as i64, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let mut allowed = key_pos.f_le_tensor(&query_pos)?;
        if let Some(window) = window {
            allowed = allowed
                .f_logical_and(&key_pos.f_gt_tensor(&query_pos.f_sub_scalar(window as i64)?)?)?;
        }
        Ok(AttentionMask::Explicit(allowed))
    }

    pub(crate) fn explicit(&self) -> Option<&Tensor> {
        match self {
            AttentionMask::Explicit(mask) => Some(mask),
            AttentionMask::Causal => None,
        }
    }
}
