//! One decoder layer: pre-norm attention, then pre-norm sparse MoE, each
//! added to the residual stream.

use tch::Tensor;

use crate::attention::{Attention, StepLayout};
use crate::error::ForwardError;
use crate::kv_cache::KvPool;
use crate::moe::{Experts, SparseMoe};
use crate::norm::RmsNorm;
use crate::rotary::RotaryTables;

pub struct DecoderLayer {
    pub(crate) index: usize,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) attention: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) moe: SparseMoe,
}

impl DecoderLayer {
    pub fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
        experts: &dyn Experts,
    ) -> Result<Tensor, ForwardError> {
        let attended = self.attention.forward(
            self.index,
            &self.input_layernorm.forward(xs),
            rotary,
            layout,
            pool,
        )?;
        let xs = xs + attended;
        let moe_out = self.moe.forward(
            self.index,
            &self.post_attention_layernorm.forward(&xs),
            experts,
        )?;
        Ok(xs + moe_out)
    }
}
