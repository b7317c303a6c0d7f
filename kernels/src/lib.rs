//! Small-batch linear layers for the CPU decode path: `y = x · Wᵀ` with the
//! weight in the checkpoint's own layout (`[out, in]`, row-major, as
//! `nn.Linear` stores it) and only a few rows of `x`. At decode a step's
//! expert sees 1 to a few dozen rows, so the weight is read once per call and
//! its bytes decide the time: these kernels stream each weight row once,
//! keep several output rows × input rows of accumulators in registers, and
//! never pack or copy the weight (libtorch's GEMMs pack it on every
//! small-M call). Work is split by output rows, in chunks the threads of a
//! [`Parallel`] take from a shared counter.
//!
//! # Layout
//! - [`parallel`]: the thread team a kernel runs on ([`Parallel`], [`Serial`]),
//!   and the shared counter its threads take work from.
//! - [`linear()`]: `linear` and the fused SwiGLU gate/up projection
//!   `gate_up`, each for a [`Kernel`] ([`Bf16`] or [`F32`]), and [`project`]:
//!   several of them in one parallel region; [`supported`] says whether this
//!   CPU has the instructions they need (AVX-512F, and AVX-512 BW, VL and
//!   BF16 for bf16).
//! - `blocks`: a chunk of one projection's output columns, block by block.
//! - `mxfp4`: the same for MXFP4 weights (gpt-oss's experts as released).
//! - [`expert`]: the routed experts' share of an MoE layer in one call
//!   ([`add_experts`]): their rows gathered, `gate_up` and `linear` by w2,
//!   each row scaled by its routing weight and added into the layer's output.
//! - [`attention`]: decode attention of a step's sequences straight over
//!   the paged KV pool ([`decode_attention`]).
//! - [`norm`] and [`rotary`]: RMSNorm ([`rms_norm`]) and the rotary
//!   embedding in place ([`rotate_heads`]) for a decode step's few rows,
//!   rounded as libtorch's ops round them; plain Rust, any CPU.
//! - `avx512`: the register-blocked inner loops (x86-64 only; elsewhere
//!   [`supported`] is false and the crate builds without them).

pub mod attention;
mod avx512;
#[macro_use]
mod blocks;
pub mod expert;
pub mod linear;
mod mxfp4;
pub mod norm;
pub mod parallel;
pub mod rotary;

pub use attention::{Attended, KvLayer, decode_attention};
pub use avx512::{Bf16, F32, Kernel};
pub use expert::{ExpertWeights, Routed, add_experts};
pub use linear::{Job, Matrix, Projection, Shape, ShapeError, gate_up, linear, project, supported};
pub use mxfp4::{BLOCK as MXFP4_BLOCK, E2M1};
pub use norm::rms_norm;
pub use parallel::{Parallel, Scoped, Serial};
pub use rotary::rotate_heads;

/// The element types the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// bfloat16, as its raw bits (`u16`).
    Bf16,
    F32,
}
