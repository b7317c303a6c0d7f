//! Small-batch linear layers for the CPU decode path: `y = x · Wᵀ` with the
//! weight in the checkpoint's own layout (`[out, in]`, row-major, as
//! `nn.Linear` stores it) and only a few rows of `x`. At decode a step's
//! expert sees 1 to a few dozen rows, so the weight is read once per call and
//! its bytes decide the time: these kernels stream each weight row once,
//! keep several output rows × input rows of accumulators in registers, and
//! never pack or copy the weight (libtorch's GEMMs pack it on every
//! small-M call). Work is split by output rows over the threads a
//! [`Parallel`] gives.
//!
//! # Layout
//! - [`parallel`]: the thread team a kernel runs on ([`Parallel`], [`Serial`]).
//! - [`linear()`]: `linear` and the fused SwiGLU gate/up projection
//!   `gate_up`, each for a [`Kernel`] ([`Bf16`] or [`F32`]); [`supported`]
//!   says whether this CPU has the instructions they need (AVX-512F, and
//!   AVX-512 BF16 for bf16).
//! - `avx512`: the register-blocked inner loops (x86-64 only; elsewhere
//!   [`supported`] is false and the crate builds without them).

mod avx512;
pub mod linear;
pub mod parallel;

pub use avx512::{Bf16, F32, Kernel};
pub use linear::{Shape, ShapeError, gate_up, linear, supported};
pub use parallel::{Parallel, Scoped, Serial};

/// The element types the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// bfloat16, as its raw bits (`u16`).
    Bf16,
    F32,
}
