//! Tokens/s of the forward for the prefill and decode shapes that
//! benches/forward_vs_hf.py also runs through transformers, in process or,
//! sharded, over running workers (`tramontane bench-forward`).

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tramontane_dispatch::phases::{DispatchPhases, LayerBreakdown, PhaseTotals};
use tramontane_dispatch::{MicroBatches, RemoteExperts};
use tramontane_model::experts::Experts;
use tramontane_model::kv_cache::{KvCache, KvPool};
use tramontane_model::weights::Checkpoint;
use tramontane_model::{BatchItem, CausalLm, LoadOptions, Logits, ModelSpec};
use tramontane_policy::placement::Placement;

use crate::error::MeasureError;
use crate::median;
use crate::tokens::{bench_token, prompts};

/// A shape to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `batch` prompts of `len` tokens, from empty caches.
    Prefill { batch: usize, len: usize },
    /// Decode steps of `batch` sequences after their prompts.
    Decode { batch: usize },
}

impl Shape {
    /// The shapes of the benchmark table, by name.
    pub const NAMES: [(&'static str, Shape); 5] = [
        ("prefill-1x512", Shape::Prefill { batch: 1, len: 512 }),
        ("prefill-8x128", Shape::Prefill { batch: 8, len: 128 }),
        ("decode-1", Shape::Decode { batch: 1 }),
        ("decode-8", Shape::Decode { batch: 8 }),
        ("decode-32", Shape::Decode { batch: 32 }),
    ];
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, shape)| shape)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown row {name:?} (one of {})", known.join(", "))
            })
    }
}

/// How long each shape is timed.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Timed repetitions of each row; the median is reported.
    pub repeats: usize,
    /// Decode steps timed per decode row.
    pub decode_steps: usize,
    /// Prompt length before the decode rows.
    pub decode_prompt: usize,
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Sharded: where a layer's time went, over all timed repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
}

/// A sharded row's time per layer: the step's wall time per layer, and the
/// dispatch's phases (the rest of `step_us` is the router's dense part).
#[derive(Debug, Serialize)]
pub struct Dispatch {
    pub step_us: f64,
    pub dense_us: f64,
    #[serde(flatten)]
    pub phases: LayerBreakdown,
}

/// Times spans of a row and the dispatch phases recorded in them.
struct Stopwatch<'a> {
    phases: Option<&'a DispatchPhases>,
    seconds: Vec<f64>,
    recorded: PhaseTotals,
}

impl<'a> Stopwatch<'a> {
    fn new(phases: Option<&'a DispatchPhases>) -> Self {
        Self {
            phases,
            seconds: Vec::new(),
            recorded: PhaseTotals::default(),
        }
    }

    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let before = self.phases.map(DispatchPhases::snapshot);
        let start = Instant::now();
        let out = f();
        self.seconds.push(start.elapsed().as_secs_f64());
        if let (Some(phases), Some(before)) = (self.phases, before) {
            self.recorded = self.recorded.plus(&phases.snapshot().since(&before));
        }
        out
    }

    fn row(self, name: String, tokens: usize) -> Row {
        let wall: f64 = self.seconds.iter().sum();
        let dispatch = self.recorded.per_layer().map(|phases| {
            let step_us = wall * 1e6 / phases.layers as f64;
            Dispatch {
                step_us,
                dense_us: step_us - phases.layer_us,
                phases,
            }
        });
        let seconds = median(self.seconds);
        Row {
            name,
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds,
            dispatch,
        }
    }
}

fn prefill<E: Experts<Error: Into<MeasureError>>>(
    model: &CausalLm<E>,
    kv: &KvPool,
    prompts: &[Vec<u32>],
) -> Result<Vec<KvCache>, MeasureError> {
    Ok(model.prefill(kv, prompts, Logits::LastPosition)?.1)
}

fn time_prefill<E: Experts<Error: Into<MeasureError>>>(
    model: &CausalLm<E>,
    phases: Option<&DispatchPhases>,
    batch: usize,
    len: usize,
    repeats: usize,
) -> Result<Row, MeasureError> {
    let prompts = prompts(batch, len, model.config().vocab_size);
    let kv = model.kv_pool_for(batch, len);
    prefill(model, &kv, &prompts)?; // warm-up
    let mut watch = Stopwatch::new(phases);
    for _ in 0..repeats {
        watch.time(|| prefill(model, &kv, &prompts))?;
    }
    Ok(watch.row(format!("prefill {batch}x{len}"), batch * len))
}

fn decode_steps<E: Experts<Error: Into<MeasureError>>>(
    model: &CausalLm<E>,
    kv: &KvPool,
    caches: &mut [KvCache],
    mut next: Vec<u32>,
    steps: usize,
) -> Result<(), MeasureError> {
    for _ in 0..steps {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut items: Vec<BatchItem<'_>> = tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| BatchItem { tokens, cache })
            .collect();
        let logits = model.forward(kv, &mut items, Logits::LastPosition)?;
        let ids: Vec<i64> = Vec::try_from(logits.argmax(-1, false))?;
        next = ids.into_iter().map(|t| t as u32).collect();
    }
    Ok(())
}

fn time_decode<E: Experts<Error: Into<MeasureError>>>(
    model: &CausalLm<E>,
    phases: Option<&DispatchPhases>,
    batch: usize,
    timing: &Timing,
) -> Result<Row, MeasureError> {
    let vocab = model.config().vocab_size;
    let prompts = prompts(batch, timing.decode_prompt, vocab);
    let kv = model.kv_pool_for(batch, timing.decode_prompt + timing.decode_steps);
    let first: Vec<u32> = (0..batch)
        .map(|s| bench_token(s, timing.decode_prompt, vocab))
        .collect();
    let mut warm_up = prefill(model, &kv, &prompts)?;
    decode_steps(model, &kv, &mut warm_up, first.clone(), timing.decode_steps)?;
    drop(warm_up);
    let mut watch = Stopwatch::new(phases);
    for _ in 0..timing.repeats {
        let mut caches = prefill(model, &kv, &prompts)?;
        watch.time(|| decode_steps(model, &kv, &mut caches, first.clone(), timing.decode_steps))?;
    }
    Ok(watch.row(format!("decode batch {batch}"), batch * timing.decode_steps))
}

/// Times each of `shapes`, in order; with `phases` (a sharded model's), each
/// row also says where a layer's time went.
pub fn run<E: Experts<Error: Into<MeasureError>>>(
    model: &CausalLm<E>,
    phases: Option<&DispatchPhases>,
    shapes: &[Shape],
    timing: &Timing,
) -> Result<Vec<Row>, MeasureError> {
    if timing.repeats == 0 || timing.decode_steps == 0 {
        return Err(MeasureError::Invalid(
            "--repeats and --decode-steps must be at least 1".into(),
        ));
    }
    let _guard = tch::no_grad_guard();
    shapes
        .iter()
        .map(|&shape| match shape {
            Shape::Prefill { batch, len } => {
                time_prefill(model, phases, batch, len, timing.repeats)
            }
            Shape::Decode { batch } => time_decode(model, phases, batch, timing),
        })
        .collect()
}

/// Times each of `shapes` on the model in `dir`: with its experts in
/// process (no `workers`), or on the running `workers` (default placement)
/// through the router's dispatch, which blocks on `runtime`; then each row
/// also says where a layer's time went.
pub fn measure(
    dir: &Path,
    workers: &[String],
    options: LoadOptions,
    micro_batches: MicroBatches,
    runtime: &tokio::runtime::Runtime,
    shapes: &[Shape],
    timing: &Timing,
) -> Result<Vec<Row>, MeasureError> {
    if workers.is_empty() {
        let model = CausalLm::load_in_process(dir, options)?;
        return run(&model, None, shapes, timing);
    }
    let spec = ModelSpec::from_file(&dir.join("config.json"))?;
    let placement = Placement::round_robin(
        &spec.placed_experts_per_layer(options.shared_experts),
        workers.len(),
    )?;
    let experts = runtime
        .block_on(RemoteExperts::connect(
            dir,
            workers,
            placement,
            Duration::from_secs(60),
            options.dtype,
        ))?
        .with_micro_batches(micro_batches);
    let phases = experts.phases();
    let checkpoint = Checkpoint::open(dir)?;
    let model = CausalLm::load_dense(&checkpoint, spec, options, experts)?;
    run(&model, Some(&phases), shapes, timing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_named_as_the_benchmarks_name_them() {
        assert_eq!(
            "prefill-8x128".parse::<Shape>(),
            Ok(Shape::Prefill { batch: 8, len: 128 })
        );
        assert_eq!(
            "decode-32".parse::<Shape>(),
            Ok(Shape::Decode { batch: 32 })
        );
        let err = "decode-7".parse::<Shape>().unwrap_err();
        assert!(
            err.contains("decode-7") && err.contains("decode-32"),
            "{err}"
        );
    }
}
