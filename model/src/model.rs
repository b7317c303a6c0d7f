//! The causal LM, any family its `ModelSpec` describes, over a ragged
//! batch: every sequence contributes its new tokens (a prefill chunk or one
//! decode token) to one flattened
//! `[tokens, hidden]` matrix; each sequence holds blocks of one KV pool.

use std::path::Path;

use tch::{Device, Kind, TchError, Tensor};

use crate::attention::{SequenceSpan, StepLayout};
use crate::error::{Failed, ForwardError, LoadError, StepError, WeightsError};
use crate::experts::{Experts, ExpertsError, StepScope};
use crate::kv_cache::{BLOCK_SIZE, KvCache, KvPool, blocks_for};
use crate::layer::{DecoderLayer, LayerError, LayerInFlight};
use crate::load::load_layer;
use crate::moe::LocalExperts;
use crate::norm::RmsNorm;
use crate::projection;
use crate::rotary::{RotaryEmbedding, RotaryTables};
use crate::weight_matrix::WeightMatrix;
use crate::weights::Checkpoint;
use tramontane_config::{Dtype, ModelSpec, Quantization, SharedExperts};

/// The dtype and device weights are loaded into and computed in, and
/// where shared experts run.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub dtype: Dtype,
    pub device: Device,
    pub shared_experts: SharedExperts,
    /// The routed experts held quantized (`--quantize`), and, with
    /// `quantize_dense`, the dense part's projections too (attention, dense
    /// and shared MLPs, lm_head; never the embeddings, gates or norms).
    pub quantize: Option<Quantization>,
    pub quantize_dense: bool,
}

impl LoadOptions {
    /// libtorch's kind of the dtype.
    pub fn kind(&self) -> Kind {
        crate::dtype::kind(self.dtype)
    }

    /// The experts' compute kind and quantization.
    pub fn expert_precision(&self) -> (Kind, Option<Quantization>) {
        (self.kind(), self.quantize)
    }

    /// The quantization of the dense part's projections.
    pub fn dense_quantization(&self) -> Option<Quantization> {
        self.quantize.filter(|_| self.quantize_dense)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::F32,
            device: Device::Cpu,
            shared_experts: SharedExperts::Router,
            quantize: None,
            quantize_dense: false,
        }
    }
}

/// One sequence's part of a forward step.
pub struct BatchItem<'a> {
    /// The new tokens: the prompt (or a chunk of it), or one decode token.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which positions the forward returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every new token: `[tokens, vocab]`, in batch order.
    AllPositions,
    /// The last new token of each sequence: `[sequences, vocab]`.
    LastPosition,
}

/// The causal LM: its dense part, and its experts reached through `E`.
pub struct CausalLm<E = LocalExperts> {
    config: ModelSpec,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: WeightMatrix,
    rotary: RotaryEmbedding,
    experts: E,
    options: LoadOptions,
}

impl CausalLm {
    /// Loads everything from a checkpoint folder, with every expert local.
    pub fn load_in_process(dir: &Path, options: LoadOptions) -> Result<Self, LoadError> {
        let spec = ModelSpec::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Ok(Self::from_checkpoint_in_process(
            &checkpoint,
            spec,
            options,
        )?)
    }

    /// Loads every tensor of `checkpoint`: the dense part and all experts, local.
    pub fn from_checkpoint_in_process(
        checkpoint: &Checkpoint,
        spec: ModelSpec,
        options: LoadOptions,
    ) -> Result<Self, WeightsError> {
        // Every expert this process runs through its experts: the routed
        // ones, and the shared ones where they run as experts.
        let placed = spec.placed_experts_per_layer(options.shared_experts);
        let experts = LocalExperts::load(
            checkpoint,
            &spec,
            &|layer, expert| expert < placed[layer],
            options.expert_precision(),
            options.device,
        )?;
        Self::load_dense(checkpoint, spec, options, experts)
    }
}

impl<E: Experts> CausalLm<E> {
    /// Loads the dense part (embeddings, attention, norms, dense MLPs,
    /// gates, shared experts, lm_head) and reaches the routed experts
    /// through `experts`.
    pub fn load_dense(
        checkpoint: &Checkpoint,
        spec: ModelSpec,
        options: LoadOptions,
        experts: E,
    ) -> Result<Self, WeightsError> {
        checkpoint.check_quantization(options.quantize)?;
        let (kind, device) = (options.kind(), options.device);
        let load = |key: &str, shape: &[usize]| {
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            checkpoint.load(key, &shape, kind, device)
        };
        let (h, v) = (spec.hidden_size, spec.vocab_size);
        let embed_tokens = load("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..spec.layers.len())
            .map(|i| {
                let dense = (options.shared_experts, options.dense_quantization());
                load_layer(&spec, i, dense, &load)
            })
            .collect::<Result<Vec<_>, WeightsError>>()?;
        let norm = RmsNorm::new(load("model.norm.weight", &[h])?, spec.rms_norm_eps);
        let lm_head = if spec.tie_word_embeddings && !checkpoint.contains("lm_head.weight") {
            embed_tokens.shallow_clone()
        } else {
            load("lm_head.weight", &[v, h])?
        };
        let lm_head =
            WeightMatrix::new(lm_head, options.dense_quantization()).map_err(|error| {
                WeightsError::Torch {
                    key: "lm_head.weight".into(),
                    error,
                }
            })?;
        let a = &spec.attention;
        let rotary = RotaryEmbedding::scaled(a.head_dim, a.rope_theta, a.yarn.as_ref(), device);
        crate::heap::release_free_memory();
        Ok(Self {
            config: spec,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            experts,
            options,
        })
    }

    /// The model's description, from its config.json.
    pub fn config(&self) -> &ModelSpec {
        &self.config
    }

    pub fn options(&self) -> LoadOptions {
        self.options
    }

    /// A KV pool for `tokens` positions (in whole blocks) of every layer, in
    /// the model's dtype and device; allocated and zeroed now.
    pub fn kv_pool(&self, tokens: usize) -> KvPool {
        KvPool::new(
            &self.config,
            tokens,
            self.options.kind(),
            self.options.device,
        )
    }

    /// A KV pool with room for `sequences` sequences of up to `positions`
    /// positions each.
    pub fn kv_pool_for(&self, sequences: usize, positions: usize) -> KvPool {
        self.kv_pool(sequences * blocks_for(positions) * BLOCK_SIZE)
    }

    /// Runs every prompt from a fresh cache of `kv` in one ragged step;
    /// returns the logits and the filled caches.
    pub fn prefill(
        &self,
        kv: &KvPool,
        prompts: &[Vec<u32>],
        which: Logits,
    ) -> Result<(Tensor, Vec<KvCache>), StepError<E::Error>> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| kv.new_cache()).collect();
        let mut batch: Vec<BatchItem<'_>> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| BatchItem { tokens, cache })
            .collect();
        let logits = self.forward(kv, &mut batch, which)?;
        Ok((logits, caches))
    }

    /// Runs one step over every sequence in `batch`, writing its new
    /// positions into its cache's blocks of `kv` (taking more blocks where
    /// needed), and returns fp32 logits. On error no cache is changed.
    pub fn forward(
        &self,
        kv: &KvPool,
        batch: &mut [BatchItem<'_>],
        which: Logits,
    ) -> Result<Tensor, StepError<E::Error>> {
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        for (sequence, item) in batch.iter().enumerate() {
            if item.tokens.is_empty() {
                return Err(ForwardError::EmptySequence { sequence }.into());
            }
            if !kv.owns(item.cache) {
                return Err(ForwardError::ForeignCache { sequence }.into());
            }
            let start = item.cache.positions();
            let positions = start + item.tokens.len();
            if positions > self.config.max_position_embeddings {
                return Err(ForwardError::ContextOverflow {
                    sequence,
                    positions,
                    limit: self.config.max_position_embeddings,
                }
                .into());
            }
            if let Some(&id) = item
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(ForwardError::TokenOutOfRange {
                    id: id as i64,
                    vocab_size: self.config.vocab_size,
                }
                .into());
            }
            spans.push(SequenceSpan {
                row: ids.len(),
                len: item.tokens.len(),
                start,
            });
            ids.extend(item.tokens.iter().map(|&t| t as i64));
        }
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|item| &mut *item.cache).collect();
        let reserved =
            caches
                .iter_mut()
                .zip(&spans)
                .enumerate()
                .try_for_each(|(sequence, (cache, span))| {
                    cache
                        .reserve(span.start + span.len)
                        .map_err(|source| ForwardError::KvCacheFull { sequence, source }.into())
                });
        let result = reserved.and_then(|()| self.run_layers(kv, &ids, &spans, &caches, which));
        for (cache, span) in caches.iter_mut().zip(&spans) {
            if result.is_ok() {
                cache.advance_to(span.start + span.len);
            } else {
                cache.truncate(span.start);
            }
        }
        result
    }

    fn run_layers(
        &self,
        kv: &KvPool,
        ids: &[i64],
        spans: &[SequenceSpan],
        caches: &[&mut KvCache],
        which: Logits,
    ) -> Result<Tensor, StepError<E::Error>> {
        if spans.is_empty() {
            return Ok(Tensor::f_zeros(
                [0, self.config.vocab_size as i64],
                (Kind::Float, self.options.device),
            )?);
        }
        let _step = StepScope::begin(&self.experts);
        let lens: Vec<usize> = spans.iter().map(|s| s.len).collect();
        let groups = micro_batches(&lens, self.experts.micro_batches(spans.len(), ids.len()));
        let mut batches = groups
            .iter()
            .map(|sequences| self.micro_batch(ids, spans, caches, sequences.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        // Layer by layer, micro-batch after micro-batch: each one's attention
        // runs while the experts of those before it are out. The experts
        // count rows in their micro-batch; the step's error names sequences.
        let experts = &self.experts;
        for layer in &self.layers {
            for batch in &mut batches {
                let first_row = batch.first_row;
                let in_step = |e| step_error(e, spans, first_row);
                if let Some(in_flight) = batch.in_flight.take() {
                    batch.xs = DecoderLayer::finish(in_flight, experts).map_err(in_step)?;
                }
                batch.in_flight = Some(
                    layer
                        .start(&batch.xs, &batch.rotary, &batch.layout, kv, experts)
                        .map_err(in_step)?,
                );
            }
        }
        let mut outputs = batches
            .into_iter()
            .map(|batch| {
                let mut xs = match batch.in_flight {
                    Some(in_flight) => DecoderLayer::finish(in_flight, experts)
                        .map_err(|e| step_error(e, spans, batch.first_row))?,
                    None => batch.xs,
                };
                if which == Logits::LastPosition {
                    let last: Vec<i64> = batch
                        .spans
                        .iter()
                        .map(|s| (s.row + s.len - 1) as i64)
                        .collect();
                    let last = Tensor::f_from_slice(&last)?.f_to_device(self.options.device)?;
                    xs = xs.f_index_select(0, &last)?;
                }
                Ok(xs)
            })
            .collect::<Result<Vec<_>, StepError<E::Error>>>()?;
        // One micro-batch needs no copy.
        let xs = match outputs.len() {
            1 => outputs.swap_remove(0),
            _ => Tensor::f_cat(&outputs, 0)?,
        };
        let xs = self.norm.forward(&xs)?;
        Ok(projection::linear(&xs, &self.lm_head)?.f_to_kind(Kind::Float)?)
    }

    /// The embeddings, rotary tables and attention layout of the sequences
    /// `sequences` of a step, their rows counted from 0.
    fn micro_batch(
        &self,
        ids: &[i64],
        spans: &[SequenceSpan],
        caches: &[&mut KvCache],
        sequences: std::ops::Range<usize>,
    ) -> Result<MicroBatch<E::Pending>, TchError> {
        let device = self.options.device;
        let first = spans[sequences.start].row;
        let group: Vec<SequenceSpan> = spans[sequences.clone()]
            .iter()
            .map(|s| SequenceSpan {
                row: s.row - first,
                ..*s
            })
            .collect();
        let rows = group.iter().map(|s| s.len).sum::<usize>();
        let ids = Tensor::f_from_slice(&ids[first..first + rows])?.f_to_device(device)?;
        let positions: Vec<i64> = group
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(|p| p as i64))
            .collect();
        let rotary = self.rotary.tables(
            &Tensor::f_from_slice(&positions)?.f_to_device(device)?,
            self.options.kind(),
        )?;
        let layout = StepLayout::new(
            &group,
            &caches[sequences],
            &self.config.attention,
            (self.options.kind(), device),
        )?;
        Ok(MicroBatch {
            xs: self.embed_tokens.f_index_select(0, &ids)?,
            first_row: first,
            spans: group,
            rotary,
            layout,
            in_flight: None,
        })
    }
}

/// Some consecutive sequences of a step, carried through the layers; `P`
/// is its experts' work in flight.
struct MicroBatch<P> {
    /// Their hidden states: the input of the layer `in_flight` is not yet
    /// finished for.
    xs: Tensor,
    /// The step's row where its rows start.
    first_row: usize,
    spans: Vec<SequenceSpan>,
    rotary: RotaryTables,
    layout: StepLayout,
    in_flight: Option<LayerInFlight<P>>,
}

/// A layer's error as the step's: an experts failure names the sequences
/// of the step (`spans`, in batch order) that hold the rows it names, which
/// count from `first_row`, the step's row where the layer's input started.
fn step_error<X: ExpertsError>(
    error: LayerError<X>,
    spans: &[SequenceSpan],
    first_row: usize,
) -> StepError<X> {
    match error {
        LayerError::Forward(error) => StepError::Forward(error),
        LayerError::Experts { layer, source } => StepError::Experts {
            layer,
            failed: failed_sequences(spans, first_row, source.failed_rows()),
            source,
        },
    }
}

/// The sequences (indexes into `spans`, the step's sequences in batch
/// order) holding the rows `first_row + r` for `r` in `rows`; every
/// sequence where `rows` is None or names none of them (a step retried as
/// it is would fail the same way).
pub(crate) fn failed_sequences(
    spans: &[SequenceSpan],
    first_row: usize,
    rows: Option<&[usize]>,
) -> Failed {
    let Some(rows) = rows else {
        return Failed::All;
    };
    let mut sequences: Vec<usize> = rows
        .iter()
        .filter_map(|&r| {
            let row = first_row + r;
            let sequence = spans.partition_point(|s| s.row + s.len <= row);
            spans
                .get(sequence)
                .is_some_and(|s| s.row <= row)
                .then_some(sequence)
        })
        .collect();
    sequences.sort_unstable();
    sequences.dedup();
    if sequences.is_empty() {
        Failed::All
    } else {
        Failed::Only(sequences)
    }
}

/// The sequences of a step (their new tokens' counts in `lens`) split into
/// `groups` runs of consecutive sequences with about as many tokens each: a
/// run ends once it reaches its share of the tokens. At most one run per
/// sequence, at least one run.
pub fn micro_batches(lens: &[usize], groups: usize) -> Vec<std::ops::Range<usize>> {
    let groups = groups.clamp(1, lens.len().max(1));
    let total: usize = lens.iter().sum();
    let mut runs = Vec::with_capacity(groups);
    let (mut start, mut seen) = (0, 0);
    for (i, &len) in lens.iter().enumerate() {
        seen += len;
        let left = lens.len() - i - 1;
        let runs_left = groups - runs.len() - 1;
        // Cut at this run's share, or where each later run still needs a sequence.
        if runs_left > 0 && (seen * groups >= total * (runs.len() + 1) || left == runs_left) {
            runs.push(start..i + 1);
            start = i + 1;
        }
    }
    runs.push(start..lens.len());
    runs
}

#[cfg(test)]
mod tests {
    //! The paged KV cache under the model: decoding writes in place and
    //! gives what a full prefill gives; a failed step gives back the blocks
    //! it took and leaves every cache as it was, a libtorch error included.

    use super::*;
    use crate::testing::{TestError, TestExperts};

    fn tiny() -> (tempfile::TempDir, CausalLm) {
        let dir = tempfile::tempdir().unwrap();
        tramontane_synthetic::write(dir.path(), &tramontane_synthetic::Spec::default()).unwrap();
        let model = CausalLm::load_in_process(dir.path(), LoadOptions::default()).unwrap();
        (dir, model)
    }

    /// The dense part of the checkpoint in `dir` over its experts (loaded in
    /// `kind`), seen through `wrap`.
    fn dense_over<E: Experts>(
        dir: &std::path::Path,
        kind: Kind,
        wrap: impl FnOnce(LocalExperts) -> E,
    ) -> CausalLm<E> {
        crate::testing::dense_over(dir, kind, wrap).unwrap()
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).map(|p| 3 + (p * 37) % 250).collect()
    }

    fn step<E: Experts>(
        model: &CausalLm<E>,
        kv: &KvPool,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Tensor {
        model
            .forward(kv, &mut [BatchItem { tokens, cache }], Logits::LastPosition)
            .unwrap()
    }

    #[test]
    fn decoding_writes_in_place_and_matches_a_full_prefill() {
        let _guard = tch::no_grad_guard();
        let (_dir, model) = tiny();
        let all = tokens(30);
        let kv = model.kv_pool_for(2, 30);
        let storage = kv.keys(0).data_ptr();
        let mut decoded = kv.new_cache();
        // The prompt's last position, then one row per decode step.
        let mut ours = vec![step(&model, &kv, &mut decoded, &all[..20])];
        for &token in &all[20..29] {
            ours.push(step(&model, &kv, &mut decoded, &[token]));
        }
        let mut full = kv.new_cache();
        let reference = model
            .forward(
                &kv,
                &mut [BatchItem {
                    tokens: &all,
                    cache: &mut full,
                }],
                Logits::AllPositions,
            )
            .unwrap();
        for (i, row) in ours.iter().enumerate() {
            let expected = reference.narrow(0, 19 + i as i64, 1);
            let diff = (row - expected).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "position {}: {diff}", 19 + i);
        }
        assert_eq!(
            kv.keys(0).data_ptr(),
            storage,
            "the pool was not reallocated"
        );
        assert_eq!((decoded.positions(), decoded.blocks().len()), (29, 2));
        assert_eq!(kv.free_blocks(), kv.total_blocks() - 4);
    }

    /// Experts lost for the rows `.0` of their input (all of it: None).
    #[derive(Debug, thiserror::Error)]
    #[error("worker lost")]
    struct Lost(Option<Vec<usize>>);

    impl ExpertsError for Lost {
        fn failed_rows(&self) -> Option<&[usize]> {
            self.0.as_deref()
        }
    }

    #[test]
    fn a_failed_step_gives_back_its_blocks_and_changes_no_cache() {
        let _guard = tch::no_grad_guard();
        let (dir, model) = tiny();
        // Experts that fail from layer 1 on.
        let failing = dense_over(dir.path(), Kind::Float, |local| {
            TestExperts::new(local).hook(|layer, _, _| match layer {
                0 => Ok(()),
                _ => Err(Lost(None)),
            })
        });
        let all = tokens(21);
        let kv = model.kv_pool(64);
        let mut cache = kv.new_cache();
        let _ = step(&model, &kv, &mut cache, &all[..10]);
        let free = kv.free_blocks();
        let mut other = kv.new_cache();
        let err = failing
            .forward(
                &kv,
                &mut [
                    BatchItem {
                        tokens: &all[10..20],
                        cache: &mut cache,
                    },
                    BatchItem {
                        tokens: &all[..5],
                        cache: &mut other,
                    },
                ],
                Logits::LastPosition,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StepError::Experts {
                    layer: 1,
                    failed: Failed::All,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!((cache.positions(), cache.blocks().len()), (10, 1));
        assert!(other.blocks().is_empty());
        assert_eq!(kv.free_blocks(), free);

        // The cache goes on as if the failed step never ran (its half-written
        // slots are overwritten).
        let _ = step(&model, &kv, &mut cache, &all[10..20]);
        let resumed = step(&model, &kv, &mut cache, &all[20..]);
        let mut fresh = kv.new_cache();
        let expected = step(&model, &kv, &mut fresh, &all);
        let diff = (resumed - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn micro_batches_interleave_to_the_same_logits_in_batch_order() {
        let _guard = tch::no_grad_guard();
        let (dir, model) = tiny();
        let all = tokens(40);
        // A decoding sequence (its prompt cached), then two prompts.
        fn run<E: Experts>(m: &CausalLm<E>, all: &[u32], which: Logits) -> Tensor {
            let kv = m.kv_pool(256);
            let mut decoding = kv.new_cache();
            let _ = step(m, &kv, &mut decoding, &all[..17]);
            let (mut a, mut b) = (kv.new_cache(), kv.new_cache());
            m.forward(
                &kv,
                &mut [
                    BatchItem {
                        tokens: &all[17..18],
                        cache: &mut decoding,
                    },
                    BatchItem {
                        tokens: &all[..9],
                        cache: &mut a,
                    },
                    BatchItem {
                        tokens: &all[20..40],
                        cache: &mut b,
                    },
                ],
                which,
            )
            .unwrap()
        }
        for which in [Logits::LastPosition, Logits::AllPositions] {
            let reference = run(&model, &all, which);
            for groups in [2, 3, 5] {
                let split = dense_over(dir.path(), Kind::Float, |local| {
                    TestExperts::new(local).micro_batches(groups)
                });
                let logits = run(&split, &all, which);
                assert_eq!(logits.size(), reference.size(), "{groups} groups");
                let diff = (&logits - &reference).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{groups} groups, {which:?}: {diff}");
            }
        }
        // Runs of about the same tokens, in order, none empty.
        assert_eq!(micro_batches(&[1; 5], 2), vec![0..3, 3..5]);
        assert_eq!(micro_batches(&[1, 1], 5), vec![0..1, 1..2]);
        assert_eq!(micro_batches(&[1, 1, 1, 30], 2), vec![0..3, 3..4]);
        assert_eq!(micro_batches(&[30, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(micro_batches(&[30, 1, 1, 1], 3), vec![0..1, 1..2, 2..4]);
        assert_eq!(micro_batches(&[1, 30], 2), vec![0..1, 1..2]);
        assert_eq!(micro_batches(&[4; 8], 4), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(micro_batches(&[], 2), vec![0..0]);
    }

    #[test]
    fn an_experts_error_counts_its_rows_from_its_micro_batchs_first_row() {
        let _guard = tch::no_grad_guard();
        let (dir, _model) = tiny();
        let all = tokens(30);
        // Sequences of 1, 9 and 20 tokens: micro-batches of rows 0..10 and 10..30.
        assert_eq!(micro_batches(&[1, 9, 20], 2), vec![0..2, 2..3]);
        // Layer 1 of the `rows`-row micro-batch loses its first and last
        // rows: the sequences holding them (counted from the micro-batch's
        // first row in the step) fail.
        for (rows, first_row, sequences) in [(10usize, 0, vec![0, 1]), (20, 10, vec![2])] {
            let failing = dense_over(dir.path(), Kind::Float, |local| {
                TestExperts::new(local)
                    .micro_batches(2)
                    .hook(move |layer, xs, _| {
                        if layer == 1 && xs.size()[0] == rows as i64 {
                            return Err(Lost(Some(vec![0, rows - 1])));
                        }
                        Ok(())
                    })
            });
            let kv = failing.kv_pool(128);
            let (mut a, mut b, mut c) = (kv.new_cache(), kv.new_cache(), kv.new_cache());
            let err = failing
                .forward(
                    &kv,
                    &mut [
                        BatchItem {
                            tokens: &all[..1],
                            cache: &mut a,
                        },
                        BatchItem {
                            tokens: &all[1..10],
                            cache: &mut b,
                        },
                        BatchItem {
                            tokens: &all[10..30],
                            cache: &mut c,
                        },
                    ],
                    Logits::LastPosition,
                )
                .unwrap_err();
            match err {
                StepError::Experts {
                    layer: 1,
                    failed: Failed::Only(got),
                    source: TestError::Hook(Lost(_)),
                } => assert_eq!(
                    got, sequences,
                    "the {rows}-row micro-batch, from row {first_row}"
                ),
                other => panic!("{other}"),
            }
            assert_eq!(kv.free_blocks(), kv.total_blocks());
        }
    }

    #[test]
    fn a_failed_row_belongs_to_the_sequence_whose_tokens_hold_it() {
        // Three sequences of 1, 3 and 1 new tokens: rows 0, 1..4 and 4.
        let spans: Vec<SequenceSpan> = [(0, 1), (1, 3), (4, 1)]
            .into_iter()
            .map(|(row, len)| SequenceSpan { row, len, start: 0 })
            .collect();
        let failed = |first_row, rows: &[usize]| failed_sequences(&spans, first_row, Some(rows));
        assert_eq!(failed(0, &[0]), Failed::Only(vec![0]));
        assert_eq!(failed(0, &[1, 3]), Failed::Only(vec![1]));
        assert_eq!(failed(0, &[0, 2, 4]), Failed::Only(vec![0, 1, 2]));
        // Rows past the step name nobody: the whole step fails.
        assert_eq!(failed(0, &[5, 9]), Failed::All);
        assert_eq!(failed(0, &[]), Failed::All);
        assert_eq!(failed_sequences(&spans, 0, None), Failed::All);
        // Rows of a micro-batch count from its first row in the step.
        assert_eq!(failed(1, &[0, 3]), Failed::Only(vec![1, 2]));
    }

    #[test]
    fn a_step_the_pool_cannot_hold_takes_nothing() {
        let _guard = tch::no_grad_guard();
        let (_dir, model) = tiny();
        let kv = model.kv_pool(32);
        let all = tokens(20);
        let (mut a, mut b) = (kv.new_cache(), kv.new_cache());
        let err = model
            .forward(
                &kv,
                &mut [
                    BatchItem {
                        tokens: &all,
                        cache: &mut a,
                    },
                    BatchItem {
                        tokens: &all,
                        cache: &mut b,
                    },
                ],
                Logits::LastPosition,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StepError::Forward(ForwardError::KvCacheFull { sequence: 1, .. })
            ),
            "{err}"
        );
        assert!(a.blocks().is_empty() && b.blocks().is_empty());
        assert_eq!(kv.free_blocks(), kv.total_blocks());
        let other_pool = model.kv_pool(16);
        let mut foreign = other_pool.new_cache();
        let err = model
            .forward(
                &kv,
                &mut [BatchItem {
                    tokens: &all[..2],
                    cache: &mut foreign,
                }],
                Logits::LastPosition,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StepError::Forward(ForwardError::ForeignCache { sequence: 0 })
            ),
            "{err}"
        );
    }

    #[test]
    fn a_libtorch_error_in_a_step_is_an_err_not_a_panic() {
        let _guard = tch::no_grad_guard();
        let (dir, model) = tiny();
        let config = model.config().clone();
        // f64 experts under an f32 model pass every Rust-side check (the
        // kernels turn them down on their kind); libtorch's matmul refuses
        // the mixed dtypes. So does its index_copy_ for a KV pool in f64.
        let f64_experts = dense_over(dir.path(), Kind::Double, |local| local);
        let f64_pool = KvPool::new(&config, 64, Kind::Double, Device::Cpu);
        let all = tokens(10);
        for (name, model, kv) in [
            ("f64 experts", &f64_experts, model.kv_pool(64)),
            ("f64 KV pool", &model, f64_pool),
        ] {
            // A prefill chunk, and a decode step.
            for tokens in [&all[..], &all[..1]] {
                let mut cache = kv.new_cache();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.forward(
                        &kv,
                        &mut [BatchItem {
                            tokens,
                            cache: &mut cache,
                        }],
                        Logits::LastPosition,
                    )
                }));
                let Ok(result) = result else {
                    panic!("{name}, {} tokens: the step panicked", tokens.len());
                };
                // The experts' own error, or the model's.
                let err = result.unwrap_err();
                assert!(
                    matches!(
                        err,
                        StepError::Forward(ForwardError::Torch(_))
                            | StepError::Experts {
                                source: ForwardError::Torch(_),
                                ..
                            }
                    ),
                    "{name}: {err}"
                );
                assert_eq!((cache.positions(), cache.blocks().len()), (0, 0), "{name}");
                assert_eq!(kv.free_blocks(), kv.total_blocks(), "{name}");
            }
        }
    }
}
