//! One decoder layer: pre-norm attention, then pre-norm sparse MoE, each
//! added to the residual stream.

use tch::Tensor;

use crate::attention::{Attention, StepLayout};
use crate::error::ForwardError;
use crate::kv_cache::KvPool;
use crate::moe::{Experts, InFlight, SparseMoe};
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
pub struct LayerInFlight {
    residual: Tensor,
    experts: InFlight,
}

impl DecoderLayer {
    /// Attention, then the MoE's routing, and its experts started.
    pub fn start(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
        experts: &dyn Experts,
    ) -> Result<LayerInFlight, ForwardError> {
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
        Ok(LayerInFlight { residual, experts })
    }

    /// The layer's output once its experts have answered.
    pub fn finish(in_flight: LayerInFlight, experts: &dyn Experts) -> Result<Tensor, ForwardError> {
        Ok(in_flight
            .residual
            .f_add(&experts.finish(in_flight.experts)?)?)
    }
}
