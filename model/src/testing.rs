//! The one test double of the [`Experts`] seam, for the tests of every
//! crate (feature `test-support`): the in-process experts, seen through a
//! hook that observes each layer's input and routing and may fail the
//! layer with an error of its own, with steps split into a chosen number of
//! micro-batches.

use std::convert::Infallible;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{ForwardError, LoadError};
use crate::experts::{Experts, ExpertsError};
use crate::gating::Routing;
use crate::model::{CausalLm, LoadOptions};
use crate::moe::LocalExperts;
use crate::weights::Checkpoint;
use tramontane_config::ModelSpec;

/// What the hook sees of a layer: its index, its input `[tokens, hidden]`
/// and its routing; an error fails the layer.
type Hook<X> = Box<dyn Fn(usize, &Tensor, &Routing) -> Result<(), X>>;

/// In-process experts with a hook; `X` is what the hook fails with.
pub struct TestExperts<X = Infallible> {
    local: LocalExperts,
    groups: usize,
    hook: Hook<X>,
}

/// A [`TestExperts`] failure: the hook's, or the local experts' own.
#[derive(Debug, thiserror::Error)]
pub enum TestError<X> {
    #[error(transparent)]
    Hook(X),
    #[error(transparent)]
    Local(#[from] ForwardError),
}

impl<X: ExpertsError> ExpertsError for TestError<X> {
    fn failed_rows(&self) -> Option<&[usize]> {
        match self {
            TestError::Hook(error) => error.failed_rows(),
            TestError::Local(_) => None,
        }
    }
}

impl TestExperts {
    /// `local` as they are: one micro-batch, nothing observed.
    pub fn new(local: LocalExperts) -> Self {
        Self {
            local,
            groups: 1,
            hook: Box::new(|_, _, _| Ok(())),
        }
    }
}

impl<X> TestExperts<X> {
    /// Steps split into `groups` micro-batches.
    pub fn micro_batches(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Every layer is shown to `hook` before it is computed.
    pub fn hook<Y>(
        self,
        hook: impl Fn(usize, &Tensor, &Routing) -> Result<(), Y> + 'static,
    ) -> TestExperts<Y> {
        TestExperts {
            local: self.local,
            groups: self.groups,
            hook: Box::new(hook),
        }
    }
}

impl<X: ExpertsError> Experts for TestExperts<X> {
    type Pending = Tensor;
    type Error = TestError<X>;

    fn start(&self, layer: usize, xs: &Tensor, routing: &Routing) -> Result<Tensor, Self::Error> {
        (self.hook)(layer, xs, routing).map_err(TestError::Hook)?;
        Ok(self.local.forward(layer, xs, routing)?)
    }

    fn finish(&self, output: Tensor) -> Result<Tensor, Self::Error> {
        Ok(output)
    }

    fn micro_batches(&self, _sequences: usize, _tokens: usize) -> usize {
        self.groups
    }
}

/// The dense part of the checkpoint in `dir` (f32, on the CPU) over all its
/// experts, loaded in `kind`, seen through `wrap`.
pub fn dense_over<E: Experts>(
    dir: &Path,
    kind: Kind,
    wrap: impl FnOnce(LocalExperts) -> E,
) -> Result<CausalLm<E>, LoadError> {
    let config = ModelSpec::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    let local = LocalExperts::load(
        &checkpoint,
        &config,
        &|_, _| true,
        (kind, None),
        Device::Cpu,
    )?;
    Ok(CausalLm::load_dense(
        &checkpoint,
        config,
        LoadOptions::default(),
        wrap(local),
    )?)
}
