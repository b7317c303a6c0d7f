//! The seam between the MoE block and its experts: the block routes each
//! token, an [`Experts`] implementation computes the routed tokens wherever
//! the experts live (in this process, [`crate::moe::LocalExperts`], or on
//! workers, the router's `RemoteExperts`).
//!
//! What a started layer is and what can fail are the implementation's own
//! types ([`Experts::Pending`], [`Experts::Error`]): the model is generic
//! over its experts, so work started by one implementation can only be
//! finished by it, and its error reaches the caller of
//! [`crate::CausalLm::forward`] as itself, inside
//! [`crate::error::StepError::Experts`], with the sequences it concerns.

use tch::Tensor;

use crate::gating::Routing;

/// Computes one layer's routed tokens: for each token of `xs`
/// (`[tokens, hidden]`), Σ over its k experts of weight · expert(token).
///
/// The work is split in two: [`Experts::start`] sends a layer's tokens and
/// may return at once, [`Experts::finish`] waits for them. The model then
/// runs the attention of one micro-batch while the experts of another are
/// out ([`Experts::micro_batches`] says into how many groups a step's
/// sequences split).
pub trait Experts {
    /// A layer's work between `start` and `finish`: its output already (in
    /// process), or requests in flight.
    type Pending;
    /// Why a layer's experts could not be computed.
    type Error: ExpertsError;

    /// Starts layer `layer` on `xs` routed by `routing`.
    fn start(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
    ) -> Result<Self::Pending, Self::Error>;

    /// The output of a started layer, `[tokens, hidden]` in `xs`'s kind and
    /// device.
    fn finish(&self, pending: Self::Pending) -> Result<Tensor, Self::Error>;

    /// Into how many groups a step of `sequences` sequences and `tokens`
    /// new tokens splits, whose layers interleave; 1 (the default) runs the
    /// step as one.
    fn micro_batches(&self, _sequences: usize, _tokens: usize) -> usize {
        1
    }

    /// A step begins: every layer started until [`Experts::end_step`]
    /// belongs to it (a sharded dispatch switches placements only between
    /// steps).
    fn begin_step(&self) {}

    /// The step [`Experts::begin_step`] began has ended, whether it
    /// succeeded or not.
    fn end_step(&self) {}
}

/// A step of `experts`, from its creation to its drop: `begin_step`, then
/// `end_step` on every path out of the step.
pub struct StepScope<'a, E: Experts>(&'a E);

impl<'a, E: Experts> StepScope<'a, E> {
    pub fn begin(experts: &'a E) -> Self {
        experts.begin_step();
        Self(experts)
    }
}

impl<E: Experts> Drop for StepScope<'_, E> {
    fn drop(&mut self) {
        self.0.end_step();
    }
}

/// An [`Experts`] failure, and how much of the step it takes down.
pub trait ExpertsError: std::error::Error + Send + Sync + 'static {
    /// The rows of the layer's input (`xs` of [`Experts::start`], counted
    /// from 0) whose tokens could not be computed, when only those fail: the
    /// model fails the sequences holding them, and the others may run the
    /// step again. None (the default): the whole step failed.
    fn failed_rows(&self) -> Option<&[usize]> {
        None
    }
}

/// Experts that cannot fail.
impl ExpertsError for std::convert::Infallible {}
