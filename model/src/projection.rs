//! Every linear projection of the model, `x · Wᵀ` with W in the checkpoint's
//! `[out, in]` layout. A few rows on the CPU (a decode step: the batch's
//! tokens, or an expert's share of them) run on [`tramontane_kernels`]'
//! weight-streaming kernels on libtorch's own OpenMP team: libtorch's GEMMs
//! pack the weight on every such call and read it several times (MKL in
//! f32), or run at part of the memory bandwidth (oneDNN in bf16). More rows,
//! other devices and other dtypes go to libtorch's `linear`, which is faster
//! once a GEMM's work outweighs its weight's bytes (prefill).

use tch::{Device, Kind, TchError, Tensor};
use tramontane_config::Activation;
use tramontane_kernels::{
    Attended, Bf16, Element, ExpertWeights, F32, Kernel, KvLayer, Matrix, Parallel, Routed, Shape,
    ShapeError, expert::Activation as KernelActivation,
};

use crate::error::ForwardError;
use crate::openmp::OpenMpTeam;
use crate::weight_matrix::MatrixRef;

/// `$call` with `$kernel` the kernels' type for `$element` ([`Bf16`] or [`F32`]).
macro_rules! with_kernel {
    ($element:expr, $kernel:ident => $call:expr) => {
        match $element {
            Element::Bf16 => {
                type $kernel = Bf16;
                $call
            }
            Element::F32 => {
                type $kernel = F32;
                $call
            }
        }
    };
}

/// Most rows the kernels take: 32 (a decode step of 32 sequences). bf16:
/// since the kernels take 8 rows of x per pass over the weights, they match
/// or beat oneDNN at 32 rows (decode batch 32 on the `bench` model, 3 rounds:
/// 326 tokens/s with 16 here, 341 with 32; with 4 rows per pass 32 here had
/// cost a quarter). f32: MKL repacks the weight on every call up to at least
/// 32 rows, and the kernels stream it once.
pub(crate) const KERNEL_ROWS: i64 = 32;

/// Whether a decode step's elementwise ops (RMSNorm, rotary) take `rows`
/// rows of `kind` on `device` in plain Rust instead of libtorch's ops.
pub(crate) fn small_rows(kind: Kind, device: Device, rows: i64) -> bool {
    device == Device::Cpu
        && matches!(kind, Kind::BFloat16 | Kind::Float)
        && (1..=KERNEL_ROWS).contains(&rows)
        && !kernels_disabled()
}

/// The kernels' element type for `kind`, when this CPU runs them.
fn kernel_element(kind: Kind) -> Option<Element> {
    let element = match kind {
        Kind::BFloat16 => Element::Bf16,
        Kind::Float => Element::F32,
        _ => return None,
    };
    tramontane_kernels::supported(element).then_some(element)
}

/// Where the kernels can take `xs` against `weights`: the team, the shape of
/// `xs` as `[rows, inner]`, and the element type.
fn kernel_call(
    xs: &Tensor,
    weights: &[MatrixRef<'_>],
) -> Option<(&'static OpenMpTeam, i64, Element)> {
    let inner = *xs.size().last()?;
    let rows = if inner == 0 {
        0
    } else {
        xs.numel() as i64 / inner
    };
    let (team, element) = kernel_team(xs.kind(), xs.device(), rows, inner, weights)?;
    Some((team, rows, element))
}

/// The team and element type for `rows` rows of `inner` elements of `kind`
/// on `device` against `weights`, where the kernels take them.
fn kernel_team(
    kind: Kind,
    device: Device,
    rows: i64,
    inner: i64,
    weights: &[MatrixRef<'_>],
) -> Option<(&'static OpenMpTeam, Element)> {
    let fits = device == Device::Cpu
        && (1..=KERNEL_ROWS).contains(&rows)
        && weights.iter().all(|&w| matrix_fits(w, kind, inner));
    if !fits || kernels_disabled() {
        return None;
    }
    Some((OpenMpTeam::get()?, kernel_element(kind)?))
}

/// Whether the kernels can read `w` as a row-major `[_, inner]` weight of `kind`.
fn weight_fits(w: &Tensor, kind: Kind, inner: i64) -> bool {
    w.kind() == kind
        && w.device() == Device::Cpu
        && w.dim() == 2
        && w.size()[1] == inner
        && w.is_contiguous()
}

/// Whether the kernels can read `w` as a `[_, inner]` weight for
/// activations of `kind`: plain of `kind`, or int8 with a contiguous f32
/// scale per row.
fn matrix_fits(w: MatrixRef<'_>, kind: Kind, inner: i64) -> bool {
    match w {
        MatrixRef::Plain(w) => weight_fits(w, kind, inner),
        MatrixRef::Int8 { values, scales } => {
            weight_fits(values, Kind::Int8, inner)
                && scales.kind() == Kind::Float
                && scales.device() == Device::Cpu
                && scales.is_contiguous()
                && scales.size() == [values.size()[0]]
        }
        MatrixRef::Fp8 {
            values,
            scales,
            block: (rows, columns),
        } => {
            let outputs = values.size()[0];
            weight_fits(values, Kind::Float8e4m3fn, inner)
                && rows > 0
                && columns > 0
                && scales.kind() == Kind::Float
                && scales.device() == Device::Cpu
                && scales.is_contiguous()
                && scales.size() == [(outputs + rows - 1) / rows, (inner + columns - 1) / columns]
        }
        MatrixRef::Mxfp4 { blocks, scales } => {
            let outputs = blocks.size()[0];
            let bytes = |t: &Tensor, columns: i64| {
                t.kind() == Kind::Uint8
                    && t.device() == Device::Cpu
                    && t.is_contiguous()
                    && t.size() == [outputs, columns]
            };
            inner % 32 == 0 && bytes(blocks, inner / 2) && bytes(scales, inner / 32)
        }
    }
}

/// `w` as the kernels read it.
///
/// # Safety
/// As [`elements`], for the kernels' `E` ([`matrix_fits`] holds).
unsafe fn matrix<E>(w: MatrixRef<'_>) -> Matrix<'_, E> {
    // SAFETY: the caller's contract.
    unsafe {
        match w {
            MatrixRef::Plain(w) => Matrix::Plain(elements(w)),
            MatrixRef::Int8 { values, scales } => Matrix::Int8 {
                values: elements(values),
                scales: elements(scales),
            },
            MatrixRef::Fp8 {
                values,
                scales,
                block: (rows, columns),
            } => Matrix::Fp8 {
                values: elements(values),
                scales: elements(scales),
                block: (rows as usize, columns as usize),
            },
            MatrixRef::Mxfp4 { blocks, scales } => Matrix::Mxfp4 {
                blocks: elements(blocks),
                scales: elements(scales),
            },
        }
    }
}

/// `TRAMONTANE_NO_KERNELS=1` sends every projection to libtorch (read once):
/// the baseline for benchmarks of the kernels.
pub(crate) fn kernels_disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os("TRAMONTANE_NO_KERNELS").is_some_and(|v| v != "0"))
}

/// Why the kernels refused the tensors a safe function was given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// The output would be written while it is read as an input: `out` and
    /// `input` share memory (a view or a shallow clone of one tensor).
    #[error("the output shares memory with {input}")]
    Overlap { input: &'static str },
}

/// The host memory of a CPU tensor's elements, as an address range (the
/// elements of a contiguous tensor; for others, a range that holds them).
fn host_bytes(tensor: &Tensor) -> std::ops::Range<usize> {
    let start = tensor.data_ptr() as usize;
    let elements = match tensor.is_contiguous() {
        true => tensor.numel(),
        // Up to its farthest element: Σ (size - 1) · stride, plus one.
        false => {
            let size = tensor.size();
            let stride = tensor.stride();
            1 + size
                .iter()
                .zip(&stride)
                .map(|(&n, &s)| (n.max(1) - 1) as usize * s.unsigned_abs() as usize)
                .sum::<usize>()
        }
    };
    start..start + elements * tensor.kind().elt_size_in_bytes()
}

/// Refuses `out` where it shares memory with one of `inputs` (named):
/// the kernels read the inputs as shared slices while they write `out`.
pub(crate) fn check_disjoint(
    out: &Tensor,
    inputs: &[(&'static str, &Tensor)],
) -> Result<(), KernelError> {
    let written = host_bytes(out);
    for &(input, tensor) in inputs {
        let read = host_bytes(tensor);
        if written.start < read.end && read.start < written.end && !written.is_empty() {
            return Err(KernelError::Overlap { input });
        }
    }
    Ok(())
}

/// The elements of a contiguous CPU tensor of the kernels' `T`.
///
/// # Safety
/// `tensor` is contiguous, on the CPU, of `T`'s kind, and outlives the slice
/// and every other view of its storage is left alone meanwhile.
pub(crate) unsafe fn elements<T>(tensor: &Tensor) -> &[T] {
    // SAFETY: the caller's contract: `numel` elements of `T` from
    // `data_ptr`, alive and unwritten while the slice lives.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<T>(), tensor.numel()) }
}

/// # Safety
/// As [`elements`], and nothing else reads or writes `tensor` meanwhile.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn elements_mut<T>(tensor: &Tensor) -> &mut [T] {
    // SAFETY: as above, and nothing else reads or writes them meanwhile.
    unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<T>(), tensor.numel()) }
}

/// The `[..., out]` output for `xs`'s leading dimensions.
fn output_like(xs: &Tensor, outputs: i64) -> Result<Tensor, TchError> {
    let mut size = xs.size();
    if let Some(last) = size.last_mut() {
        *last = outputs;
    }
    Tensor::f_empty(size.as_slice(), (xs.kind(), Device::Cpu))
}

/// `xs · wᵀ`: `[..., in]` against `[out, in]` -> `[..., out]`.
pub fn linear<'w>(xs: &Tensor, w: impl Into<MatrixRef<'w>>) -> Result<Tensor, TchError> {
    let w = w.into();
    match on_kernels(xs, Weights::Linear(w))? {
        Some(out) => Ok(out),
        None => xs.f_linear(&w.dequantize(xs.kind())?, None::<Tensor>),
    }
}

/// `xs · wᵀ`, plus `bias` where there is one.
pub fn linear_biased<'w>(
    xs: &Tensor,
    w: impl Into<MatrixRef<'w>>,
    bias: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    match bias {
        Some(bias) => linear_with_bias(xs, w, bias),
        None => linear(xs, w),
    }
}

/// `xs · wᵀ + bias`: on the kernels, the product rounded then the bias
/// added; through libtorch in one `addmm`, rounded once, as transformers'
/// biased `nn.Linear` computes it.
pub fn linear_with_bias<'w>(
    xs: &Tensor,
    w: impl Into<MatrixRef<'w>>,
    bias: &Tensor,
) -> Result<Tensor, TchError> {
    let w = w.into();
    match on_kernels(xs, Weights::Linear(w))? {
        Some(out) => out.f_add(bias),
        None => xs.f_linear(&w.dequantize(xs.kind())?, Some(bias)),
    }
}

/// `silu(xs · w1ᵀ) ⊙ (xs · w3ᵀ)` on the kernels, in one pass over w1 and w3;
/// None where they do not take these tensors (the caller uses libtorch).
pub fn swiglu(
    xs: &Tensor,
    w1: MatrixRef<'_>,
    w3: MatrixRef<'_>,
) -> Result<Option<Tensor>, TchError> {
    // The kernels run MXFP4 gate and up projections apart (add_experts).
    if w1.size() != w3.size() || matches!(w1, MatrixRef::Mxfp4 { .. }) {
        return Ok(None);
    }
    on_kernels(xs, Weights::SwiGlu(w1, w3))
}

/// Each head's own projection, `xs[h] · w[h]ᵀ`: `xs` `[heads, rows, in]`
/// against `w` `[heads, out, in]` -> `[heads, rows, out]`. On the kernels,
/// one job per head in one parallel region, where they take the tensors;
/// else libtorch's `bmm` (which, for a decode step's few rows in bf16, runs
/// a fraction of the kernels' speed).
pub fn per_head_linear(xs: &Tensor, w: &Tensor) -> Result<Tensor, TchError> {
    let on_libtorch = || xs.f_bmm(&w.f_transpose(1, 2)?);
    let (size, w_size) = (xs.size(), w.size());
    let (&[heads, rows, inner], &[w_heads, outputs, w_inner]) =
        (size.as_slice(), w_size.as_slice())
    else {
        return on_libtorch();
    };
    let fits = heads == w_heads
        && inner == w_inner
        && w.kind() == xs.kind()
        && w.device() == Device::Cpu
        && w.is_contiguous();
    let call = kernel_team(xs.kind(), xs.device(), rows, inner, &[]).filter(|_| fits);
    let Some((team, element)) = call else {
        return on_libtorch();
    };
    let xs = xs.f_contiguous()?;
    let out = Tensor::f_empty([heads, rows, outputs], (xs.kind(), Device::Cpu))?;
    let shape = Shape {
        rows: rows as usize,
        inner: inner as usize,
        outputs: outputs as usize,
    };
    // SAFETY: xs (made contiguous) and w are contiguous CPU tensors of the
    // element's kind; out is fresh; all outlive the call.
    let done = unsafe { with_kernel!(element, K => per_head::<K>(team, &xs, w, shape, &out)) };
    match done {
        Ok(()) => Ok(out),
        Err(_) => on_libtorch(),
    }
}

/// # Safety
/// As [`elements`] for `xs` and `w`, and [`elements_mut`] for `out`.
unsafe fn per_head<K: Kernel>(
    team: &dyn Parallel,
    xs: &Tensor,
    w: &Tensor,
    shape: Shape,
    out: &Tensor,
) -> Result<(), ShapeError> {
    // SAFETY: the caller's contract.
    unsafe {
        let (x, w, out) = (
            elements::<K::Elem>(xs),
            elements::<K::Elem>(w),
            elements_mut::<K::Elem>(out),
        );
        let (x_len, w_len) = (shape.rows * shape.inner, shape.outputs * shape.inner);
        let mut jobs: Vec<_> = x
            .chunks_exact(x_len)
            .zip(w.chunks_exact(w_len))
            .zip(out.chunks_exact_mut(shape.rows * shape.outputs))
            .map(|((x, w), out)| tramontane_kernels::Job {
                x,
                projection: tramontane_kernels::Projection::Linear {
                    w: Matrix::Plain(w),
                },
                shape,
                out,
            })
            .collect();
        tramontane_kernels::project::<K>(team, &mut jobs)
    }
}

/// One routed expert of [`add_experts`]: its w1, w3 `[intermediate,
/// hidden]` and w2 `[hidden, intermediate]`, its biases (the gate's and up
/// projection's `[2 × intermediate]`, the down projection's `[hidden]`)
/// and activation, the rows of `xs` it computes and each row's routing
/// weight.
#[derive(Clone, Copy)]
pub struct RoutedExpert<'a> {
    pub weights: [MatrixRef<'a>; 3],
    pub biases: Option<[&'a Tensor; 2]>,
    pub activation: Activation,
    pub rows: &'a [usize],
    pub routing: &'a [f32],
}

/// `out[r] += weight_r · (w2 · swiglu(xs[r]))` for every expert and each of
/// its routed rows `r`, on the kernels in one call (see
/// [`tramontane_kernels::add_experts`]); `Ok(false)` where they do not take
/// all these tensors, and the caller uses libtorch. `xs` and `out`:
/// `[tokens, hidden]`; `out` may not share memory with `xs` or a weight
/// ([`KernelError::Overlap`]).
pub fn add_experts(
    xs: &Tensor,
    experts: &[RoutedExpert<'_>],
    out: &mut Tensor,
) -> Result<bool, KernelError> {
    let (kind, size) = (xs.kind(), xs.size());
    let &[_, hidden] = size.as_slice() else {
        return Ok(false);
    };
    let outputs_fit = xs.is_contiguous()
        && out.is_contiguous()
        && out.size() == size
        && out.kind() == kind
        && out.device() == xs.device();
    if !outputs_fit {
        return Ok(false);
    }
    let mut inputs = vec![("the hidden states", xs)];
    for expert in experts {
        for (name, w) in ["w1", "w3", "w2"].into_iter().zip(expert.weights) {
            inputs.extend(w.tensors().into_iter().map(|(_, tensor)| (name, tensor)));
        }
        for (name, bias) in ["the gate/up biases", "the down bias"]
            .into_iter()
            .zip(expert.biases.into_iter().flatten())
        {
            inputs.push((name, bias));
        }
    }
    check_disjoint(out, &inputs)?;
    let mut on = None;
    for expert in experts.iter().filter(|e| !e.rows.is_empty()) {
        let [w1, w3, w2] = expert.weights;
        let intermediate = w1.size()[0];
        let alike = std::mem::discriminant(&w1) == std::mem::discriminant(&w3);
        let bias_fits = |bias: &Tensor, len: i64| {
            bias.kind() == kind
                && bias.device() == Device::Cpu
                && bias.is_contiguous()
                && bias.size() == [len]
        };
        let fits = alike
            && w1.size() == w3.size()
            && w2.size() == [hidden, intermediate]
            && matrix_fits(w2, kind, intermediate)
            && expert.biases.is_none_or(|[gate_up, down]| {
                bias_fits(gate_up, 2 * intermediate) && bias_fits(down, hidden)
            });
        let team = kernel_team(
            kind,
            xs.device(),
            expert.rows.len() as i64,
            hidden,
            &[w1, w3],
        );
        match team.filter(|_| fits) {
            Some(team) => on = Some(team),
            None => return Ok(false),
        }
    }
    let Some((team, element)) = on else {
        return Ok(true); // no rows: nothing to add
    };
    // SAFETY: every tensor was checked to be contiguous, on the CPU and of
    // the element's kind; `out` is borrowed mutably and shares no memory
    // with what is read (checked above); all outlive the call.
    unsafe {
        with_kernel!(element, K => add::<K>(team, xs, experts, hidden as usize, out))?;
    }
    Ok(true)
}

/// # Safety
/// As [`elements`] for `xs` and each weight, and [`elements_mut`] for `out`.
unsafe fn add<K: Kernel>(
    team: &dyn Parallel,
    xs: &Tensor,
    experts: &[RoutedExpert<'_>],
    hidden: usize,
    out: &mut Tensor,
) -> Result<(), ShapeError> {
    // SAFETY: the caller's contract, for every tensor made a slice here.
    unsafe {
        let experts: Vec<(ExpertWeights<'_, K::Elem>, Routed<'_>)> = experts
            .iter()
            .filter(|e| !e.rows.is_empty())
            .map(|e| {
                let [w1, w3, w2] = e.weights;
                let weights = ExpertWeights {
                    w1: matrix(w1),
                    w3: matrix(w3),
                    w2: matrix(w2),
                    hidden,
                    intermediate: w1.size()[0] as usize,
                    biases: e
                        .biases
                        .map(|[gate_up, down]| (elements(gate_up), elements(down))),
                    activation: match e.activation {
                        Activation::SwiGlu => KernelActivation::SwiGlu,
                        Activation::ClampedSwiGlu { limit, alpha } => {
                            KernelActivation::ClampedSwiGlu {
                                limit: limit as f32,
                                alpha: alpha as f32,
                            }
                        }
                    },
                };
                let routed = Routed {
                    rows: e.rows,
                    weights: e.routing,
                };
                (weights, routed)
            })
            .collect();
        tramontane_kernels::add_experts::<K>(team, elements(xs), &experts, elements_mut(out))
    }
}

/// Whether decode attention over a pool of `kind` on `device` runs on the
/// kernels ([`decode_attention`]).
pub(crate) fn paged_attention(kind: Kind, device: Device) -> bool {
    device == Device::Cpu
        && !kernels_disabled()
        && kernel_element(kind).is_some()
        && OpenMpTeam::get().is_some()
}

/// Decode attention on the kernels, over one layer's pool `[keys, values]`
/// (`[slots, kv_heads, head_dim]` each) in place: `q` `[sequences, heads,
/// head_dim]` -> the same shape; sequence `s` attends the slots
/// `slots[offsets[s]..offsets[s + 1]]` (see
/// [`tramontane_kernels::decode_attention`]). Only where
/// [`paged_attention`] says the kernels take the pool's kind and device.
pub(crate) fn decode_attention(
    q: &Tensor,
    [keys, values]: [&Tensor; 2],
    slots: &[u32],
    offsets: &[usize],
    sinks: Option<&[f32]>,
) -> Result<Tensor, ForwardError> {
    let q = q.f_contiguous()?;
    let (kind, pool) = (keys.kind(), keys.size());
    let (Some(team), Some(element), &[_, kv_heads, head_dim], &[_, heads, _]) = (
        OpenMpTeam::get(),
        kernel_element(kind),
        pool.as_slice(),
        q.size().as_slice(),
    ) else {
        return Err(ShapeError::Unsupported(Element::F32).into());
    };
    let fits = q.kind() == kind
        && values.kind() == kind
        && values.size() == pool
        && [&q, keys, values]
            .iter()
            .all(|t| t.device() == Device::Cpu && t.is_contiguous());
    if !fits {
        return Err(ShapeError::Unsupported(element).into());
    }
    let out = q.f_empty_like()?;
    let attended = Attended {
        slots,
        offsets,
        sinks,
    };
    let (heads, kv_heads, head_dim) = (heads as usize, kv_heads as usize, head_dim as usize);
    // SAFETY: every tensor was checked to be contiguous, on the CPU and of
    // the element's kind; `out` is fresh; nothing writes the pool meanwhile.
    unsafe {
        let pool = ([keys, values], (kv_heads, head_dim));
        with_kernel!(element, K => attend::<K>(team, &q, heads, pool, attended, &out))?;
    }
    Ok(out)
}

/// # Safety
/// As [`elements`] for `q` and the pool, and [`elements_mut`] for `out`.
unsafe fn attend<K: Kernel>(
    team: &dyn Parallel,
    q: &Tensor,
    heads: usize,
    ([keys, values], (kv_heads, head_dim)): ([&Tensor; 2], (usize, usize)),
    attended: Attended<'_>,
    out: &Tensor,
) -> Result<(), ShapeError> {
    // SAFETY: the caller's contract, for every tensor made a slice here.
    unsafe {
        let kv = KvLayer {
            keys: elements(keys),
            values: elements(values),
            kv_heads,
            head_dim,
        };
        tramontane_kernels::decode_attention::<K>(
            team,
            elements(q),
            heads,
            kv,
            attended,
            elements_mut(out),
        )
    }
}

/// What a kernel call projects against.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// `xs · wᵀ`.
    Linear(MatrixRef<'a>),
    /// `silu(xs · w1ᵀ) ⊙ (xs · w3ᵀ)`.
    SwiGlu(MatrixRef<'a>, MatrixRef<'a>),
}

impl<'a> Weights<'a> {
    fn matrices(self) -> Vec<MatrixRef<'a>> {
        match self {
            Weights::Linear(w) => vec![w],
            Weights::SwiGlu(w1, w3) => vec![w1, w3],
        }
    }
    /// `[outputs, inner]` (the first weight's; checked equal for SwiGLU).
    fn size(self) -> Vec<i64> {
        match self {
            Weights::Linear(w) | Weights::SwiGlu(w, _) => w.size(),
        }
    }
}

/// `weights` applied to `xs` on the kernels; None where they do not take
/// these tensors.
fn on_kernels(xs: &Tensor, weights: Weights<'_>) -> Result<Option<Tensor>, TchError> {
    let Some((team, rows, element)) = kernel_call(xs, &weights.matrices()) else {
        return Ok(None);
    };
    let xs = xs.f_contiguous()?;
    let (outputs, inner) = (weights.size()[0], weights.size()[1]);
    let out = output_like(&xs, outputs)?;
    let shape = Shape {
        rows: rows as usize,
        inner: inner as usize,
        outputs: outputs as usize,
    };
    let done = with_kernel!(element, K => run::<K>(team, &xs, weights, shape, &out));
    Ok(done.ok().map(|()| out))
}

fn run<K: Kernel>(
    team: &dyn Parallel,
    xs: &Tensor,
    weights: Weights<'_>,
    shape: Shape,
    out: &Tensor,
) -> Result<(), ShapeError> {
    // SAFETY: kernel_call checked that every tensor is on the CPU, of K's
    // kind, and that the weights are contiguous; xs was made contiguous and
    // out is fresh; all outlive the call and nothing else touches them.
    unsafe {
        let (x, out) = (elements::<K::Elem>(xs), elements_mut::<K::Elem>(out));
        match weights {
            Weights::Linear(w) => tramontane_kernels::linear::<K>(team, x, matrix(w), shape, out),
            Weights::SwiGlu(w1, w3) => {
                tramontane_kernels::gate_up::<K>(team, x, matrix(w1), matrix(w3), shape, out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The kernels' projections against libtorch's `linear` on the same
    //! tensors, for every row count around the switch-over, in both dtypes.

    use tch::{Device, Kind, Tensor};

    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    }

    /// Largest error of `ours` against `reference` (computed in f32 from the
    /// same inputs) relative to `reference`'s size: `|Δ| / (|ref| + 1)`.
    fn error(ours: &Tensor, reference: &Tensor) -> f64 {
        let reference = reference.to_kind(Kind::Double);
        ((ours.to_kind(Kind::Double) - &reference).abs() / (reference.abs() + 1.0))
            .max()
            .double_value(&[])
    }

    /// Kinds whose kernels this CPU runs (none on CPUs without AVX-512), and
    /// the error allowed: f32 summation order; bf16's one rounding of the
    /// output (2⁻⁸ relative).
    fn kernel_kinds() -> Vec<(Kind, f64)> {
        [(Kind::Float, 1e-5), (Kind::BFloat16, 1.0 / 256.0)]
            .into_iter()
            .filter(|(kind, _)| kernel_element(*kind).is_some())
            .collect()
    }

    #[test]
    fn kernels_match_libtorch_around_the_switch_over() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(7);
        let kinds = kernel_kinds();
        if kinds.is_empty() {
            eprintln!("this CPU has no AVX-512: the kernels are not used, nothing to compare");
            return;
        }
        assert!(
            OpenMpTeam::get().is_some(),
            "libtorch's libgomp is loaded in this process"
        );
        let (inner, outputs) = (200, 72);
        for (kind, tolerance) in kinds {
            let w =
                (Tensor::randn([outputs, inner], (Kind::Float, Device::Cpu)) * 0.1).to_kind(kind);
            let w1 =
                (Tensor::randn([outputs, inner], (Kind::Float, Device::Cpu)) * 0.1).to_kind(kind);
            let w3 =
                (Tensor::randn([outputs, inner], (Kind::Float, Device::Cpu)) * 0.1).to_kind(kind);
            let f32 = |t: &Tensor| t.to_kind(Kind::Float);
            for rows in [1, 2, 3, 5, 8, KERNEL_ROWS, KERNEL_ROWS + 1] {
                let xs = Tensor::randn([rows, inner], (Kind::Float, Device::Cpu)).to_kind(kind);
                let ours = linear(&xs, &w).unwrap();
                assert_eq!(ours.size(), [rows, outputs]);
                assert_eq!(ours.kind(), kind);
                let reference = f32(&xs).linear(&f32(&w), None::<Tensor>);
                let err = error(&ours, &reference);
                assert!(
                    err <= tolerance,
                    "{kind:?} rows {rows}: linear's error {err}"
                );

                let reference = f32(&xs).linear(&f32(&w1), None::<Tensor>).silu()
                    * f32(&xs).linear(&f32(&w3), None::<Tensor>);
                match swiglu(&xs, (&w1).into(), (&w3).into()).unwrap() {
                    Some(ours) => {
                        assert!(rows <= KERNEL_ROWS, "rows {rows} are libtorch's");
                        // Rounded as libtorch rounds: each projection, silu, the product.
                        let err = error(&ours, &reference);
                        assert!(
                            err <= 4.0 * tolerance,
                            "{kind:?} rows {rows}: swiglu's error {err}"
                        );
                    }
                    None => assert!(rows > KERNEL_ROWS, "rows {rows} are the kernels'"),
                }
            }
            // Leading dimensions and a non-contiguous input are handled too.
            let xs = Tensor::randn([2, 3, inner * 2], (Kind::Float, Device::Cpu))
                .to_kind(kind)
                .narrow(2, 0, inner);
            let reference = f32(&xs).linear(&f32(&w), None::<Tensor>);
            let err = error(&linear(&xs, &w).unwrap(), &reference);
            assert!(err <= tolerance, "{kind:?} strided: {err}");
        }
    }

    #[test]
    fn per_head_projections_match_libtorch() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(11);
        let (heads, inner, outputs) = (5, 64, 40);
        for (kind, tolerance) in kernel_kinds() {
            let w = (Tensor::randn([heads, outputs, inner], (Kind::Float, Device::Cpu)) * 0.1)
                .to_kind(kind);
            for rows in [1, 3, KERNEL_ROWS, KERNEL_ROWS + 1] {
                // A transposed view, as decode passes its queries.
                let xs = Tensor::randn([rows, heads, inner], (Kind::Float, Device::Cpu))
                    .to_kind(kind)
                    .transpose(0, 1);
                let ours = per_head_linear(&xs, &w).unwrap();
                assert_eq!(ours.size(), [heads, rows, outputs]);
                let reference = xs
                    .to_kind(Kind::Float)
                    .bmm(&w.to_kind(Kind::Float).transpose(1, 2));
                let err = error(&ours, &reference);
                assert!(err <= tolerance, "{kind:?} rows {rows}: error {err}");
            }
        }
    }

    #[test]
    fn an_output_that_shares_memory_with_an_input_is_refused() {
        let _guard = tch::no_grad_guard();
        let (tokens, hidden, intermediate) = (3, 16, 24);
        let opts = (Kind::Float, Device::Cpu);
        let w1 = Tensor::randn([intermediate, hidden], opts);
        let w3 = Tensor::randn([intermediate, hidden], opts);
        let w2 = Tensor::randn([hidden, intermediate], opts);
        let rows = [0usize, 2];
        let routing = [0.5f32, 0.25];
        let expert = RoutedExpert {
            weights: [(&w1).into(), (&w3).into(), (&w2).into()],
            biases: None,
            activation: Activation::SwiGlu,
            rows: &rows,
            routing: &routing,
        };
        // Two halves of one buffer: disjoint, so taken.
        let buffer = Tensor::randn([2 * tokens, hidden], opts);
        let xs = buffer.narrow(0, 0, tokens);
        let mut out = buffer.narrow(0, tokens, tokens);
        let before = out.copy();
        let taken = add_experts(&xs, &[expert], &mut out).unwrap();
        if taken {
            assert_ne!(max_abs_diff(&out, &before), 0.0, "the rows were added");
        }
        // The output is the input (a shallow clone), or w1's first rows.
        let mut aliased = xs.shallow_clone();
        assert_eq!(
            add_experts(&xs, &[expert], &mut aliased),
            Err(KernelError::Overlap {
                input: "the hidden states"
            })
        );
        let mut in_w1 = w1.narrow(0, 1, tokens);
        assert_eq!(
            add_experts(&xs.copy(), &[expert], &mut in_w1),
            Err(KernelError::Overlap { input: "w1" })
        );
        // Overlapping by one element of a strided view is overlapping.
        let strided = buffer.narrow(0, tokens - 1, tokens + 1);
        assert!(check_disjoint(&strided, &[("x", &xs)]).is_err());
        assert!(check_disjoint(&buffer.narrow(0, tokens, tokens), &[("x", &xs)]).is_ok());
    }

    #[test]
    fn other_dtypes_and_shapes_go_to_libtorch() {
        let _guard = tch::no_grad_guard();
        let w = Tensor::randn([8, 16], (Kind::Half, Device::Cpu));
        let xs = Tensor::randn([2, 16], (Kind::Half, Device::Cpu));
        assert!(
            kernel_call(&xs, &[(&w).into()]).is_none(),
            "f16 has no kernel"
        );
        let w = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let xs = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        assert!(
            kernel_call(&xs, &[(&w).into()]).is_none(),
            "a transposed weight is not row-major"
        );
        let diff = max_abs_diff(&linear(&xs, &w).unwrap(), &xs.linear(&w, None::<Tensor>));
        assert_eq!(diff, 0.0);
    }
}
