//! The planner's device profile (`tramontane profile`): measures on a device
//! what the planner needs for one model — one expert's FFN against its rows,
//! the dense part of a step against its tokens, sequences and context, and a
//! worker's Forward round trip against its payload — as a
//! [`Profile`] for `tramontane plan`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tramontane_dispatch::RemoteExperts;
use tramontane_launcher::WorkerCommand;
use tramontane_model::experts::Experts;
use tramontane_model::gating::Routing;
use tramontane_model::kv_cache::KvCache;
use tramontane_model::weights::Checkpoint;
use tramontane_model::{
    BatchItem, CausalLm, Dtype, ForwardError, LoadOptions, Logits, ModelSpec, Quantization,
};
use tramontane_planner::profile::{FORMAT, ModelShape, Point, Profile, interpolate};
use tramontane_planner::weight_dtype::WeightDtype;
use tramontane_policy::placement::Placement;

use crate::error::MeasureError;
use crate::median;
use crate::tokens::bench_token;

/// What to profile, and how.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Checkpoint folder (HF format).
    pub model: PathBuf,
    /// The router's (the dense part's) dtype and device, the workers' too;
    /// its thread count is libtorch's when this runs.
    pub load: LoadOptions,
    /// The same device as the workers' `--device` takes it.
    pub device: String,
    /// Threads of one worker.
    pub worker_threads: i32,
    /// Memory of one device in bytes.
    pub memory_bytes: u64,
    /// Timed repetitions per point; the median is kept.
    pub repeats: usize,
    /// Largest row / token count measured (powers of two up to it).
    pub max_tokens: usize,
    /// The `tramontane` binary, which runs the workers.
    pub exe: PathBuf,
}

/// How the workers hold their experts' weights.
fn expert_weights(options: LoadOptions) -> WeightDtype {
    match options.quantize {
        Some(Quantization::Int8) => WeightDtype::Int8,
        None => WeightDtype::of(options.dtype),
    }
}

/// Expert computation that does nothing: the dense part timed alone.
struct NoExperts;

impl Experts for NoExperts {
    type Pending = Tensor;
    type Error = ForwardError;

    fn start(
        &self,
        _layer: usize,
        xs: &Tensor,
        _routing: &Routing,
    ) -> Result<Tensor, ForwardError> {
        Ok(xs.f_zeros_like()?)
    }

    fn finish(&self, output: Tensor) -> Result<Tensor, ForwardError> {
        Ok(output)
    }
}

/// Median seconds of `f` over `repeats` runs after one warm-up.
fn time(
    repeats: usize,
    device: Device,
    mut f: impl FnMut() -> Result<(), MeasureError>,
) -> Result<f64, MeasureError> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn token_counts(max: usize) -> Vec<usize> {
    std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|&n| n <= max)
        .collect()
}

/// This machine's memory, from /proc/meminfo.
pub fn host_memory_bytes() -> Result<u64, MeasureError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(MeasureError::io("reading /proc/meminfo"))?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| MeasureError::Invalid("no MemTotal in /proc/meminfo".into()))?;
    Ok(kib * 1024)
}

/// The dense step's costs, as the profile stores them.
struct DenseCosts {
    dense_step: Vec<Point>,
    lm_head: Vec<Point>,
    attention_per_context_token: f64,
    per_sequence: f64,
}

fn measure_dense(
    model: &CausalLm<NoExperts>,
    checkpoint: &Checkpoint,
    args: &ProfileOptions,
    device: Device,
) -> Result<DenseCosts, MeasureError> {
    let config = model.config();
    let options = model.options();
    let vocab = config.vocab_size;
    let token = |s: usize, p: usize| bench_token(s, p, vocab);
    // lm_head: the final projection and the copy of the logits to the host
    // (what the engine samples from), against rows.
    let key = if checkpoint.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    let lm_head = checkpoint.load(
        key,
        &[vocab as i64, config.hidden_size as i64],
        options.kind(),
        options.device,
    )?;
    let mut lm_points = Vec::new();
    for rows in token_counts(args.max_tokens.min(config.max_position_embeddings)) {
        let xs = Tensor::randn(
            [rows as i64, config.hidden_size as i64],
            (options.kind(), options.device),
        );
        let seconds = time(args.repeats, device, || {
            let logits = xs.linear(&lm_head, None::<Tensor>).to_kind(Kind::Float);
            let _: Vec<f32> = Vec::try_from(logits.flatten(0, -1))?;
            Ok(())
        })?;
        lm_points.push(Point {
            x: rows as f64,
            seconds,
        });
    }
    let lm = |rows: usize| interpolate(&lm_points, rows as f64);

    // A step over `batch` sequences of `new` tokens each after `cached` ones.
    let step = |batch: usize, new: usize, cached: usize| -> Result<f64, MeasureError> {
        let kv = model.kv_pool_for(batch, cached + new);
        let mut caches: Vec<KvCache> = (0..batch).map(|_| kv.new_cache()).collect();
        if cached > 0 {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|s| (0..cached).map(|p| token(s, p)).collect())
                .collect();
            caches = model.prefill(&kv, &prompts, Logits::LastPosition)?.1;
        }
        let feeds: Vec<Vec<u32>> = (0..batch)
            .map(|s| (cached..cached + new).map(|p| token(s, p)).collect())
            .collect();
        time(args.repeats, device, || {
            let mut items: Vec<BatchItem<'_>> = feeds
                .iter()
                .zip(caches.iter_mut())
                .map(|(tokens, cache)| BatchItem { tokens, cache })
                .collect();
            // The engine copies the logits to the host to sample.
            let logits = model.forward(&kv, &mut items, Logits::LastPosition)?;
            let _: Vec<f32> = Vec::try_from(logits.flatten(0, -1))?;
            for cache in caches.iter_mut() {
                cache.truncate(cached);
            }
            Ok(())
        })
    };
    // Attention over context, from decodes of 16 sequences at two context
    // lengths: on these kernels a decode's cost grows with the cache it
    // reads, so it is a cost per cached token read, not per token pair.
    let (batch, short, long) = (
        16usize,
        32usize,
        512usize.min(config.max_position_embeddings - 1),
    );
    let context = ((step(batch, 1, long)? - step(batch, 1, short)?)
        / (batch * (long - short)) as f64)
        .max(0.0);
    // Single prompts from an empty cache give the cost against tokens, and
    // decodes of many sequences the cost of each sequence in the ragged batch
    // (per-sequence attention and cache work, dominant for decodes on CPU).
    let counts = token_counts(args.max_tokens.min(config.max_position_embeddings - short));
    let mut single = Vec::new();
    for &tokens in &counts {
        let rest = step(1, tokens, 0)? - lm(1) - context * tokens as f64;
        single.push(Point {
            x: tokens as f64,
            seconds: rest,
        });
    }
    let single_at = |tokens: usize| interpolate(&single, tokens as f64);
    let (mut num, mut den) = (0.0, 0.0);
    for batch in [4usize, 16, 64]
        .into_iter()
        .filter(|&b| b <= args.max_tokens)
    {
        let extra = step(batch, 1, short)?
            - lm(batch)
            - context * (batch * (short + 1)) as f64
            - single_at(batch);
        num += extra * (batch - 1) as f64;
        den += ((batch - 1) * (batch - 1)) as f64;
    }
    let per_sequence = if den > 0.0 { (num / den).max(0.0) } else { 0.0 };
    let dense = non_decreasing(
        single
            .iter()
            .map(|p| Point {
                x: p.x,
                seconds: (p.seconds - per_sequence).max(0.0),
            })
            .collect(),
    );
    Ok(DenseCosts {
        dense_step: dense,
        lm_head: non_decreasing(lm_points),
        attention_per_context_token: context,
        per_sequence,
    })
}

/// Bytes of one Forward's rows there and back (f32 on the wire).
fn payload_bytes(rows: usize, hidden: usize) -> usize {
    2 * rows * hidden * 4
}

/// Working set each profiling worker cycles through: past the CPU's last
/// level cache, as a serving worker's experts are.
const WORKER_WORKING_SET: u64 = 1 << 30;

/// What the workers' side of a layer costs, as the profile stores it.
struct WorkerCosts {
    expert_ffn: Vec<Point>,
    dispatch: Vec<Point>,
    alone_factor: f64,
}

/// One expert's FFN and a layer's dispatch beyond it, measured through the
/// router's own dispatch code on real workers: `lanes` of them (the workers
/// that compute at once on this host), each holding whole layers of experts
/// (at least [`WORKER_WORKING_SET`] of weights) and asked for other experts
/// each time, so weights come from memory as they do when serving. A layer
/// whose rows go to one expert per worker, against one with two experts per
/// worker, gives the FFN (the difference) and the dispatch (the rest:
/// serialization, gRPC, gather and scatter on both sides), all with every
/// worker busy at once, as when serving; one worker alone gives how much
/// faster a worker computes without the others.
fn measure_workers(
    args: &ProfileOptions,
    spec: &ModelSpec,
    dtype: Dtype,
    lanes: usize,
) -> Result<WorkerCosts, MeasureError> {
    let options = args.load;
    let hidden = spec.hidden_size;
    // The leading MoE layers shaped as the first one (dense layers and
    // others are left out), enough for the working set.
    let (_, moe) = spec.moe_layers().next().ok_or_else(|| {
        MeasureError::Invalid(format!(
            "{} has no MoE layer to profile",
            args.model.display()
        ))
    })?;
    let experts = moe.experts;
    let weights = expert_weights(options);
    let (h, w) = (hidden as u64, moe.width as u64);
    let expert_bytes = 2 * weights.matrix_bytes(w, h) + weights.matrix_bytes(h, w);
    let wanted = WORKER_WORKING_SET
        .div_ceil(expert_bytes * experts as u64)
        .max(1) as usize;
    let profiled: Vec<usize> = spec
        .moe_layers()
        .filter(|(_, m)| m.experts == experts && m.width == moe.width)
        .map(|(layer, _)| layer)
        .take(wanted)
        .collect();
    let layers = profiled.len();
    if experts < 2 * lanes {
        return Err(MeasureError::Invalid(format!(
            "profiling {lanes} workers needs at least {} experts per layer",
            2 * lanes
        )));
    }
    let runtime = tokio::runtime::Runtime::new().map_err(MeasureError::io("starting a runtime"))?;
    let command = WorkerCommand {
        exe: args.exe.clone(),
        model: args.model.clone(),
        held: [
            "--experts".to_string(),
            "all".into(),
            "--layers".into(),
            profiled
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ]
        .map(Into::into)
        .to_vec(),
        device: args.device.clone(),
        threads: args.worker_threads,
        extra: ["--dtype", dtype.flag()]
            .into_iter()
            .chain(
                options
                    .quantize
                    .iter()
                    .flat_map(|q| ["--quantize", q.flag()]),
            )
            .map(Into::into)
            .collect(),
    };
    let mut workers = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..lanes {
        let worker = runtime.block_on(tramontane_launcher::spawn_worker(&command))?;
        addrs.push(worker.addr.clone());
        workers.push(worker);
    }
    // Expert e of the profiled layers on worker e mod lanes; none of the others.
    let mut per_layer = vec![0; profiled.last().map_or(0, |&l| l + 1)];
    for &layer in &profiled {
        per_layer[layer] = experts;
    }
    let placement = Placement::round_robin(&per_layer, lanes)?;
    let remote = runtime.block_on(RemoteExperts::connect(
        &args.model,
        &addrs,
        placement,
        Duration::from_secs(600),
        options.dtype,
    ))?;
    let mut ffn = Vec::new();
    let mut dispatch = Vec::new();
    let mut alone_ratios = Vec::new();
    let mut turn = 0usize;
    for rows in token_counts(args.max_tokens) {
        let xs = Tensor::randn(
            [rows as i64, hidden as i64],
            (options.kind(), options.device),
        );
        // Every row to `per_worker` experts on each of the first `engaged`
        // workers (expert e is on worker e mod lanes), other experts each turn.
        let mut layer_time = |per_worker: usize, engaged: usize| -> Result<f64, MeasureError> {
            let first = (turn / layers * lanes) % experts;
            let chosen: Vec<usize> = (0..engaged)
                .flat_map(|w| (0..per_worker).map(move |j| (first + w + j * lanes) % experts))
                .collect();
            let k = chosen.len();
            let routing = Routing {
                k,
                experts: (0..rows).flat_map(|_| chosen.iter().copied()).collect(),
                weights: vec![1.0 / k as f32; rows * k],
            };
            let layer = profiled[turn % layers];
            turn += 1;
            let start = Instant::now();
            let _ = remote.finish(remote.start(layer, &xs, &routing)?)?;
            Ok(start.elapsed().as_secs_f64())
        };
        // One and two experts on every worker at once (the usual case when
        // serving), and one expert on one worker alone.
        let (mut one, mut two, mut alone) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=4 * args.repeats {
            let (a, b) = (layer_time(1, lanes)?, layer_time(2, lanes)?);
            let c = if lanes > 1 { layer_time(1, 1)? } else { a };
            if i > 0 {
                one.push(a);
                two.push(b);
                alone.push(c);
            }
        }
        let (one, two, alone) = (median(one), median(two), median(alone));
        ffn.push(Point {
            x: rows as f64,
            seconds: (two - one).max(0.0),
        });
        dispatch.push(Point {
            x: payload_bytes(rows, hidden) as f64,
            seconds: one - (two - one),
        });
        alone_ratios.push(alone / one);
    }
    drop(remote);
    drop(workers);
    Ok(WorkerCosts {
        expert_ffn: non_decreasing(ffn),
        dispatch: fit_line(&dispatch),
        alone_factor: median(alone_ratios).clamp(0.0, 1.0),
    })
}

/// The closest non-decreasing sequence (pool adjacent violators): a cost
/// that does not fall with size, without the single points' noise.
fn non_decreasing(points: Vec<Point>) -> Vec<Point> {
    // Blocks of (sum, count), merged while a block's mean falls below the last.
    let mut blocks: Vec<(f64, usize)> = Vec::new();
    for p in &points {
        blocks.push((p.seconds, 1));
        while let [.., (s0, n0), (s1, n1)] = blocks[..] {
            if s0 / n0 as f64 <= s1 / n1 as f64 {
                break;
            }
            blocks.truncate(blocks.len() - 2);
            blocks.push((s0 + s1, n0 + n1));
        }
    }
    let means = blocks
        .iter()
        .flat_map(|&(sum, n)| std::iter::repeat_n(sum / n as f64, n));
    points
        .iter()
        .zip(means)
        .map(|(p, seconds)| Point { x: p.x, seconds })
        .collect()
}

/// The least-squares line through round-trip overheads (a fixed cost plus a
/// cost per byte; single points are noisy), as its two end points, never
/// below zero.
fn fit_line(points: &[Point]) -> Vec<Point> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.x).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.seconds).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.x - mean_x).powi(2)).sum();
    let sxy: f64 = points
        .iter()
        .map(|p| (p.x - mean_x) * (p.seconds - mean_y))
        .sum();
    let slope = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    let at = |x: f64| Point {
        x,
        seconds: (mean_y + slope * (x - mean_x)).max(0.0),
    };
    let (first, last) = (points[0].x, points[points.len() - 1].x);
    if last > first {
        vec![at(first), at(last)]
    } else {
        vec![at(first)]
    }
}

/// Measures the profile `args` describe. The dense part runs here, on
/// libtorch's threads; the experts on worker processes (as many as compute at
/// once on this host for a CPU, one for a GPU).
pub fn measure(args: &ProfileOptions) -> Result<Profile, MeasureError> {
    for (flag, value) in [
        ("--repeats", args.repeats as i64),
        ("--max-tokens", args.max_tokens as i64),
        ("--worker-threads", i64::from(args.worker_threads)),
    ] {
        if value < 1 {
            return Err(MeasureError::Invalid(format!("{flag} must be at least 1")));
        }
    }
    let _guard = tch::no_grad_guard();
    let options = args.load;
    let dtype = options.dtype;
    let device = options.device;
    let spec = ModelSpec::from_file(&args.model.join("config.json"))?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let worker_threads = args.worker_threads;
    let router_threads = tch::get_num_threads();

    tracing::info!(threads = router_threads, "profiling the dense part");
    let model = CausalLm::load_dense(&checkpoint, spec.clone(), options, NoExperts)?;
    let dense = measure_dense(&model, &checkpoint, args, device)?;
    drop(model);

    let lanes = (device == Device::Cpu).then(|| (cores / worker_threads).max(1) as usize);
    tracing::info!(
        workers = lanes.unwrap_or(1),
        threads = worker_threads,
        "profiling experts and round trips"
    );
    let workers = measure_workers(args, &spec, dtype, lanes.unwrap_or(1))?;

    let profile = Profile {
        format: FORMAT.into(),
        device: match device {
            Device::Cpu => format!("cpu, {cores} cores"),
            other => format!("{other:?}"),
        },
        estimate: false,
        source: format!(
            "measured by `tramontane profile` on {}: router {router_threads} threads, workers {worker_threads} threads, median of {} runs",
            args.model.display(),
            args.repeats
        ),
        memory_bytes: args.memory_bytes,
        shared_lanes: lanes,
        model: ModelShape::new(&spec, dtype.bytes()).with_expert_weights(expert_weights(options)),
        expert_ffn: workers.expert_ffn,
        dense_step: dense.dense_step,
        lm_head: dense.lm_head,
        attention_per_token_pair: 0.0,
        attention_per_context_token: dense.attention_per_context_token,
        per_sequence: dense.per_sequence,
        dispatch: workers.dispatch,
        alone_factor: workers.alone_factor,
    };
    profile.validate()?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[f64]) -> Vec<Point> {
        values
            .iter()
            .enumerate()
            .map(|(i, &seconds)| Point {
                x: i as f64,
                seconds,
            })
            .collect()
    }

    #[test]
    fn noisy_costs_become_the_closest_non_decreasing_ones() {
        let smooth = non_decreasing(points(&[5.0, 3.0, 8.0, 12.0, 8.0, 10.0, 20.0]));
        let seconds: Vec<f64> = smooth.iter().map(|p| p.seconds).collect();
        assert_eq!(seconds, [4.0, 4.0, 8.0, 10.0, 10.0, 10.0, 20.0]);
        assert_eq!(smooth[6].x, 6.0);
    }

    #[test]
    fn round_trips_fit_a_line_that_never_falls() {
        let line = fit_line(&points(&[1.0, 3.0, 5.0]));
        assert_eq!((line[0].seconds, line[1].seconds), (1.0, 5.0));
        let flat = fit_line(&points(&[4.0, 2.0]));
        assert_eq!((flat[0].seconds, flat[1].seconds), (3.0, 3.0));
    }
}
