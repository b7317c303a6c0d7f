//! One decoder layer: pre-norm attention, then a pre-norm feed-forward (a
//! dense MLP, or the sparse MoE block), each added to the residual stream.

use tch::{TchError, Tensor};

use crate::attention::{Attention, StepLayout};
use crate::error::ForwardError;
use crate::expert::Expert;
use crate::experts::Experts;
use crate::kv_cache::KvPool;
use crate::latent_attention::LatentAttention;
use crate::moe::{MoeInFlight, SparseMoe};
use crate::norm::RmsNorm;
use crate::rotary::RotaryTables;

pub struct DecoderLayer {
    pub(crate) index: usize,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) attention: SelfAttention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) ffn: FeedForward,
}

/// A layer's attention: grouped-query, or DeepSeek's latent attention.
pub enum SelfAttention {
    Grouped(Attention),
    Latent(LatentAttention),
}

impl SelfAttention {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rotary: &RotaryTables,
        layout: &StepLayout,
        pool: &KvPool,
    ) -> Result<Tensor, ForwardError> {
        match self {
            SelfAttention::Grouped(a) => a.forward(layer, xs, rotary, layout, pool),
            SelfAttention::Latent(a) => a.forward(layer, xs, rotary, layout, pool),
        }
    }
}

/// A layer's feed-forward part.
pub enum FeedForward {
    /// A SwiGLU MLP every token takes, here.
    Dense(Expert),
    Moe(SparseMoe),
}

/// A layer between its attention and its experts' answer: the residual
/// stream after attention, and the feed-forward's work on it.
pub struct LayerInFlight<P> {
    layer: usize,
    residual: Tensor,
    ffn: FeedForwardInFlight<P>,
}

enum FeedForwardInFlight<P> {
    /// A dense layer's output, computed at the start.
    Done(Tensor),
    Moe(MoeInFlight<P>),
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
    /// Attention, then the feed-forward: a dense MLP computed, or the MoE's
    /// routing with its experts started.
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
        let normed = self.post_attention_layernorm.forward(&residual)?;
        let ffn = match &self.ffn {
            FeedForward::Dense(mlp) => FeedForwardInFlight::Done(mlp.forward(&normed)?),
            FeedForward::Moe(moe) => {
                FeedForwardInFlight::Moe(moe.start(self.index, &normed, experts)?)
            }
        };
        Ok(LayerInFlight {
            layer: self.index,
            residual,
            ffn,
        })
    }

    /// The layer's output once its experts have answered.
    pub fn finish<E: Experts>(
        in_flight: LayerInFlight<E::Pending>,
        experts: &E,
    ) -> Result<Tensor, LayerError<E::Error>> {
        let out = match in_flight.ffn {
            FeedForwardInFlight::Done(out) => out,
            FeedForwardInFlight::Moe(moe) => SparseMoe::finish(in_flight.layer, moe, experts)?,
        };
        Ok(in_flight.residual.f_add(&out)?)
    }
}
