//! A decoder layer's weights, as the model's description names and shapes
//! them: the attention with its biases and q/k norms, the two norms, and a
//! dense MLP or the MoE block's gate and shared expert (the routed experts
//! are [`crate::moe::LocalExperts`]' or a worker's).

use tch::Tensor;
use tramontane_config::{
    ExpertTensors, FfnSpec, Gate as GateRule, ModelSpec, QkNorm, Quantization, SharedExperts,
};

use crate::attention::{Attention, AttentionWeights};
use crate::error::WeightsError;
use crate::expert::Expert;
use crate::gating::Gate;
use crate::latent_attention::{LatentAttention, LatentWeights};
use crate::layer::{DecoderLayer, FeedForward, SelfAttention};
use crate::moe::{Shared, SharedExpert, SparseMoe};
use crate::norm::RmsNorm;
use crate::weight_matrix::WeightMatrix;

/// Layer `i` of `spec`, its tensors read by `load(name, shape)`, its
/// shared expert (if any) run where `shared_experts` says, its attention
/// and MLP projections (the dense MLP's, the shared expert's) held
/// quantized where `quantization` says (the gates, norms and biases never
/// are).
pub(crate) fn load_layer(
    spec: &ModelSpec,
    i: usize,
    (shared_experts, quantization): (SharedExperts, Option<Quantization>),
    load: &impl Fn(&str, &[usize]) -> Result<Tensor, WeightsError>,
) -> Result<DecoderLayer, WeightsError> {
    let p = format!("model.layers.{i}");
    let h = spec.hidden_size;
    let attention = load_attention(spec, i, quantization, load)?;
    let norm = |name: &str| -> Result<RmsNorm, WeightsError> {
        Ok(RmsNorm::new(
            load(&format!("{p}.{name}.weight"), &[h])?,
            spec.rms_norm_eps,
        ))
    };
    let torch = |key: &str| {
        let key = key.to_string();
        move |error| WeightsError::Torch { key, error }
    };
    let mlp = |names: &ExpertTensors, width: usize| -> Result<Expert, WeightsError> {
        let load = |name: &str, shape: [usize; 2]| -> Result<WeightMatrix, WeightsError> {
            WeightMatrix::new(load(name, &shape)?, quantization).map_err(torch(name))
        };
        Expert::from_matrices(
            load(&names.gate, [width, h])?,
            load(&names.down, [h, width])?,
            load(&names.up, [width, h])?,
        )
        .map_err(torch(&names.gate))
    };
    let family = spec.family;
    let ffn = match &spec.layers[i] {
        FfnSpec::Dense { width } => FeedForward::Dense(mlp(&ExpertTensors::dense_mlp(i), *width)?),
        FfnSpec::Moe(moe) => {
            let correction = match moe.gate {
                GateRule::Grouped(g) if g.correction_bias => Some(load(
                    &family.gate_correction_bias_tensor(i),
                    &[moe.experts],
                )?),
                _ => None,
            };
            let gate = Gate::new(
                load(&family.gate_tensor(i), &[moe.experts, h])?,
                moe.top_k,
                moe.gate,
            )
            .with_correction(correction)
            .map_err(torch(&family.gate_tensor(i)))?
            .with_bias(
                moe.router_bias
                    .then(|| load(&family.router_bias_tensor(i), &[moe.experts]))
                    .transpose()?,
            );
            let shared = moe
                .shared
                .map(|shared| -> Result<Shared, WeightsError> {
                    let gate = shared
                        .sigmoid_gate
                        .then(|| load(&family.shared_expert_gate_tensor(i), &[1, h]))
                        .transpose()?;
                    Ok(match shared_experts {
                        SharedExperts::Router => Shared::Here(SharedExpert {
                            mlp: mlp(&family.shared_expert_tensors(i), shared.width)?,
                            gate,
                        }),
                        SharedExperts::Workers => Shared::Experts {
                            id: moe.experts,
                            gate,
                        },
                    })
                })
                .transpose()?;
            FeedForward::Moe(SparseMoe::new(gate, shared))
        }
    };
    Ok(DecoderLayer {
        index: i,
        input_layernorm: norm("input_layernorm")?,
        attention,
        post_attention_layernorm: norm("post_attention_layernorm")?,
        ffn,
    })
}

/// Layer `i`'s attention: grouped-query, or latent.
fn load_attention(
    spec: &ModelSpec,
    i: usize,
    quantization: Option<Quantization>,
    load: &impl Fn(&str, &[usize]) -> Result<Tensor, WeightsError>,
) -> Result<SelfAttention, WeightsError> {
    let p = format!("model.layers.{i}.self_attn");
    let h = spec.hidden_size;
    let a = &spec.attention;
    let attn = |name: &str, shape: &[usize]| load(&format!("{p}.{name}"), shape);
    let torch = |name: &str| {
        let key = format!("{p}.{name}");
        move |error| WeightsError::Torch { key, error }
    };
    if let Some(l) = &a.latent {
        let q = a.heads * l.qk_dim();
        let cached = l.cached_width();
        let weights = LatentWeights {
            q_proj: match l.q_lora_rank {
                None => Some(attn("q_proj.weight", &[q, h])?),
                Some(_) => None,
            },
            q_a: l
                .q_lora_rank
                .map(|r| -> Result<_, WeightsError> {
                    Ok((
                        attn("q_a_proj.weight", &[r, h])?,
                        l.bias.then(|| attn("q_a_proj.bias", &[r])).transpose()?,
                        attn("q_a_layernorm.weight", &[r])?,
                        attn("q_b_proj.weight", &[q, r])?,
                    ))
                })
                .transpose()?,
            kv_a: attn("kv_a_proj_with_mqa.weight", &[cached, h])?,
            kv_a_bias: l
                .bias
                .then(|| attn("kv_a_proj_with_mqa.bias", &[cached]))
                .transpose()?,
            kv_a_norm: attn("kv_a_layernorm.weight", &[l.kv_lora_rank])?,
            kv_b: attn(
                "kv_b_proj.weight",
                &[a.heads * (l.nope_dim + l.v_dim), l.kv_lora_rank],
            )?,
            o_proj: attn("o_proj.weight", &[h, a.heads * l.v_dim])?,
            o_bias: a.o_bias.then(|| attn("o_proj.bias", &[h])).transpose()?,
        };
        return LatentAttention::new(l, a.heads, weights, quantization)
            .map(SelfAttention::Latent)
            .map_err(torch("kv_b_proj.weight"));
    }
    let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let qk_norm = match a.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
        QkNorm::WholeProjection => Some((q, kv)),
    };
    let weights = AttentionWeights {
        q_proj: attn("q_proj.weight", &[q, h])?,
        k_proj: attn("k_proj.weight", &[kv, h])?,
        v_proj: attn("v_proj.weight", &[kv, h])?,
        o_proj: attn("o_proj.weight", &[h, q])?,
        qkv_bias: a
            .qkv_bias
            .then(|| -> Result<_, WeightsError> {
                Ok([
                    attn("q_proj.bias", &[q])?,
                    attn("k_proj.bias", &[kv])?,
                    attn("v_proj.bias", &[kv])?,
                ])
            })
            .transpose()?,
        o_bias: a.o_bias.then(|| attn("o_proj.bias", &[h])).transpose()?,
        qk_norm: qk_norm
            .map(|(q_norm, k_norm)| -> Result<_, WeightsError> {
                Ok([
                    attn("q_norm.weight", &[q_norm])?,
                    attn("k_norm.weight", &[k_norm])?,
                ])
            })
            .transpose()?,
        sinks: a.sinks.then(|| attn("sinks", &[a.heads])).transpose()?,
    };
    Attention::new(a, i, weights, spec.rms_norm_eps, quantization)
        .map(SelfAttention::Grouped)
        .map_err(torch("q_proj.weight"))
}
