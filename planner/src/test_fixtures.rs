//! Shapes, profiles and routing traces the unit tests share.

use std::path::{Path, PathBuf};

use tramontane_policy::routing_trace::{FORMAT as TRACE_FORMAT, Header, RoutingTrace};

use crate::profile::{FORMAT, ModelShape, Point, Profile};

/// A small model: hidden 8, `layers` layers of `experts` experts, top-k.
pub fn shape(layers: usize, experts: usize, top_k: usize) -> ModelShape {
    ModelShape {
        hidden_size: 8,
        intermediate_size: 16,
        layers,
        experts,
        top_k,
        attention_heads: 2,
        kv_heads: 1,
        head_dim: 4,
        vocab_size: 10,
        dtype_bytes: 4,
    }
}

/// Mixtral-8x7B's config.json values, bf16.
pub fn mixtral_8x7b() -> ModelShape {
    ModelShape {
        hidden_size: 4096,
        intermediate_size: 14336,
        layers: 32,
        experts: 8,
        top_k: 2,
        attention_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab_size: 32000,
        dtype_bytes: 2,
    }
}

/// A profile of `model` where a step's dense part costs `dense` seconds and
/// an expert call `fixed` plus `per_row` per row; everything else is free.
pub fn profile(model: ModelShape, dense: f64, fixed: f64, per_row: f64) -> Profile {
    let flat = |seconds| vec![Point { x: 1.0, seconds }, Point { x: 1024.0, seconds }];
    Profile {
        format: FORMAT.into(),
        device: "test".into(),
        estimate: true,
        source: "test".into(),
        memory_bytes: 1 << 40,
        shared_lanes: None,
        model,
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
    let path = dir.join("routing.jsonl");
    let header = Header {
        format: TRACE_FORMAT.into(),
        model_id: model_id.into(),
        layers,
        experts,
        top_k: 2,
    };
    let trace = RoutingTrace::create(&path, &header, u64::MAX).expect("create the trace");
    for layer in 0..layers {
        trace.record(layer, 2, chosen);
    }
    path
}
