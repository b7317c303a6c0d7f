//! One decoder layer: pre-norm attention, then pre-norm sparse MoE, each
//! added to the residual stream.

use tch::{TchError, Tensor};

use crate::attention::{Attention, StepLayout};
use crate::error::ForwardError;
use crate::experts::Experts;
use crate::kv_cache::KvPool;
use crate::moe::SparseMoe;
use crate::norm::RmsNorm;
use crate::rotary::RotaryTables;

pub struct DecoderLayer {
    pub(crate) index: usize,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) attention: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) moe: SparseMoe,
}

/// A layer between its attention and its experts' answer: the residual
/// stream after attention, and the experts' work on it.
pub struct LayerInFlight<P> {
    layer: usize,
    residual: Tensor,
    experts: P,
}

/// Why a layer failed: its own part, or the experts of layer `layer`
/// (whose error counts rows in the layer's input).
#[derive(Debug)]
pub enum LayerError<X> {
    Forward(ForwardError),
    Experts { layer: usize, source: X },
}

impl<X> From<ForwardError> for LayerError<X> {
    fn from(error: ForwardError) -> Self {
        LayerError::Forward(error)
    }
}

impl<X> From<TchError> for LayerError<X> {
    fn from(error: TchError) -> Self {
        LayerError::Forward(error.into())
    }
}

impl DecoderLayer {
    /// Attention, then the MoE's routing, and its experts started.
    pub fn start<E: Experts>(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
        experts: &E,
    ) -> Result<LayerInFlight<E::Pending>, LayerError<E::Error>> {
        let attended = self.attention.forward(
            self.index,
            &self.input_layernorm.forward(xs)?,
            rotary,
            layout,
            pool,
        )?;
        let residual = xs.f_add(&attended)?;
        let experts = self.moe.start(
            self.index,
            &self.post_attention_layernorm.forward(&residual)?,
            experts,
        )?;
        Ok(LayerInFlight {
            layer: self.index,
            residual,
            experts,
        })
    }

    /// The layer's output once its experts have answered.
    pub fn finish<E: Experts>(
        in_flight: LayerInFlight<E::Pending>,
        experts: &E,
    ) -> Result<Tensor, LayerError<E::Error>> {
        let layer = in_flight.layer;
        let out = experts
            .finish(in_flight.experts)
            .map_err(|source| LayerError::Experts { layer, source })?;
        Ok(in_flight.residual.f_add(&out)?)
    }
}
