//! Shapes, profiles and routing traces the unit tests share.

use std::path::{Path, PathBuf};

use tramontane_config::{
    Activation, AttentionSpec, Dtype, Family, FfnSpec, Gate, ModelSpec, MoeSpec, QkNorm,
};
use tramontane_policy::routing_trace::{FORMAT as TRACE_FORMAT, Header, RoutingTrace};

use crate::model::{PlannedModel, SizedModel};
use crate::profile::{FORMAT, Point, Profile};
use crate::weight_dtype::WeightDtype;

/// A small model in f32: hidden 8, `layers` layers of `experts` experts
/// of width 16, top-k; two heads of 4 over one KV head, a vocabulary of 10.
pub fn shape(layers: usize, experts: usize, top_k: usize) -> SizedModel {
    with_dense_layers(layers, experts, top_k, &[], 0)
}

/// [`shape`] with the layers `dense` a dense MLP of width `width`.
pub fn with_dense_layers(
    layers: usize,
    experts: usize,
    top_k: usize,
    dense: &[usize],
    width: usize,
) -> SizedModel {
    let moe = MoeSpec {
        experts,
        top_k,
        width: 16,
        gate: Gate::TopKThenSoftmax,
        router_bias: false,
        activation: Activation::SwiGlu,
        expert_bias: false,
        shared: None,
    };
    let spec = ModelSpec {
        family: Family::Mixtral,
        hidden_size: 8,
        vocab_size: 10,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        attention: AttentionSpec {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: None,
            sliding_layers: None,
            sinks: false,
            rope_theta: 1e6,
            yarn: None,
            latent: None,
        },
        layers: (0..layers)
            .map(|layer| match dense.contains(&layer) {
                true => FfnSpec::Dense { width },
                false => FfnSpec::Moe(moe),
            })
            .collect(),
        bos_token_id: None,
        eos_token_id: None,
    };
    SizedModel {
        spec,
        dtype_bytes: 4,
        experts: WeightDtype::F32,
    }
}

/// The config.json of `planner/fixtures/<name>`, in bf16.
pub fn fixture(name: &str) -> SizedModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    PlannedModel::read(&path)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .sized(Dtype::Bf16, WeightDtype::Bf16)
}

/// A profile of `model` where a step's dense part costs `dense` seconds and
/// an expert call `fixed` plus `per_row` per row; everything else is free.
pub fn profile(model: &SizedModel, dense: f64, fixed: f64, per_row: f64) -> Profile {
    let flat = |seconds| vec![Point { x: 1.0, seconds }, Point { x: 1024.0, seconds }];
    Profile {
        format: FORMAT.into(),
        device: "test".into(),
        estimate: true,
        source: "test".into(),
        memory_bytes: 1 << 40,
        shared_lanes: None,
        model: model.shape(),
        expert_ffn: vec![
            Point {
                x: 1.0,
                seconds: fixed + per_row,
            },
            Point {
                x: 1024.0,
                seconds: fixed + 1024.0 * per_row,
            },
        ],
        dense_step: flat(dense),
        per_sequence: 0.0,
        lm_head: flat(0.0),
        attention_per_token_pair: 0.0,
        attention_per_context_token: 0.0,
        dispatch: flat(0.0),
        alone_factor: 1.0,
    }
}

/// A top-2 routing trace of model `model_id` in `dir`: one step whose tokens
/// choose the pairs in `chosen` (two ids per token), in every layer.
pub fn trace(
    dir: &Path,
    model_id: &str,
    layers: usize,
    experts: usize,
    chosen: &[usize],
) -> PathBuf {
    let every: Vec<usize> = (0..layers).collect();
    trace_of_layers(dir, model_id, layers, experts, &every, chosen)
}

/// A top-2 routing trace with a header of `layers` decoder layers, whose one
/// step routes the pairs in `chosen` in the layers `routed` only (the
/// router records MoE layers, not dense ones).
pub fn trace_of_layers(
    dir: &Path,
    model_id: &str,
    layers: usize,
    experts: usize,
    routed: &[usize],
    chosen: &[usize],
) -> PathBuf {
    let path = dir.join("routing.jsonl");
    let header = Header {
        format: TRACE_FORMAT.into(),
        model_id: model_id.into(),
        layers,
        experts,
        top_k: 2,
    };
    let trace = RoutingTrace::create(&path, &header, u64::MAX).expect("create the trace");
    for &layer in routed {
        trace.record(layer, 2, chosen);
    }
    path
}
