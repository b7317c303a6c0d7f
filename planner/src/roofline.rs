//! Built-in profiles for data-centre GPUs, estimated from datasheet figures
//! with a roofline: an operation takes the longer of its FLOPs at the
//! achievable matmul rate and its bytes at the achievable memory bandwidth,
//! plus kernel launches. Labelled as estimates in every report.

use crate::model::SizedModel;
use crate::profile::{FORMAT, Point, Profile};

/// Datasheet figures of one GPU (SXM parts, dense bf16 tensor-core rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    pub key: &'static str,
    pub bf16_flops: f64,
    pub memory_bandwidth: f64,
    pub memory_bytes: u64,
    /// Network bandwidth per GPU for router ↔ worker traffic, bytes/s.
    pub network_bandwidth: f64,
}

pub const GPUS: [Gpu; 3] = [
    Gpu {
        name: "NVIDIA H100 SXM 80GB",
        key: "h100",
        bf16_flops: 989e12,
        memory_bandwidth: 3.35e12,
        memory_bytes: 80_000_000_000,
        network_bandwidth: 50e9, // 400 Gb/s ConnectX-7 per GPU
    },
    Gpu {
        name: "NVIDIA H200 SXM 141GB",
        key: "h200",
        bf16_flops: 989e12,
        memory_bandwidth: 4.8e12,
        memory_bytes: 141_000_000_000,
        network_bandwidth: 50e9,
    },
    Gpu {
        name: "NVIDIA A100 SXM 80GB",
        key: "a100",
        bf16_flops: 312e12,
        memory_bandwidth: 2.039e12,
        memory_bytes: 80_000_000_000,
        network_bandwidth: 25e9, // 200 Gb/s HDR InfiniBand per GPU
    },
];

/// Fraction of the peak matmul rate large GEMMs reach.
const FLOPS_EFFICIENCY: f64 = 0.7;
/// Fraction of the memory bandwidth streaming reads reach.
const BANDWIDTH_EFFICIENCY: f64 = 0.8;
/// One kernel launch without CUDA graphs.
const LAUNCH_SECONDS: f64 = 5e-6;
/// Kernels of one decoder layer's dense part (norms, projections, rotary,
/// attention, gate, top-k).
const DENSE_KERNELS_PER_LAYER: f64 = 16.0;
/// Kernels of one sequence's attention in one layer (scores, softmax, values).
const ATTENTION_KERNELS_PER_SEQUENCE: f64 = 3.0;
/// Kernels of one expert's FFN (w1, w3, SiLU·mul, w2, gather, scatter-add).
const EXPERT_KERNELS: f64 = 6.0;
/// Kernels of a dense SwiGLU MLP on the router (a dense layer's, or a shared
/// expert's: gate and up projections, SiLU·mul, down projection).
const MLP_KERNELS: f64 = 4.0;
/// gRPC round trip between hosts with no payload.
const RPC_SECONDS: f64 = 100e-6;

pub fn by_key(key: &str) -> Option<Gpu> {
    GPUS.iter()
        .copied()
        .find(|g| g.key == key.to_ascii_lowercase())
}

impl Gpu {
    fn roofline(&self, flops: f64, bytes: f64) -> f64 {
        (flops / (self.bf16_flops * FLOPS_EFFICIENCY))
            .max(bytes / (self.memory_bandwidth * BANDWIDTH_EFFICIENCY))
    }

    /// The estimated profile of `model` on this GPU. The routed experts
    /// are the workers' (`expert_ffn`: one expert of the fine-grained width
    /// against its rows; the simulation draws each token's top-k of the
    /// layer's experts); everything else is the router's dense step, a
    /// dense layer's MLP and a shared expert included, with their FLOPs and
    /// bytes.
    pub fn profile(&self, model: &SizedModel) -> Profile {
        let spec = &model.spec;
        let bytes = model.dtype_bytes as f64;
        let rows: Vec<f64> = (0..=14).map(|p| f64::from(1u32 << p)).collect();
        let expert_params = model.expert_parameters() as f64;
        // The weights an expert call streams, as they are stored.
        let expert_bytes = model.expert_layer_bytes() as f64;
        let expert_ffn = rows
            .iter()
            .map(|&n| Point {
                x: n,
                seconds: self.roofline(2.0 * expert_params * n, expert_bytes)
                    + EXPERT_KERNELS * LAUNCH_SECONDS,
            })
            .collect();
        // The layers' dense weights, without the embeddings (gathered) and
        // lm_head (its own table; the embeddings' own when tied).
        let vocab_params = (spec.vocab_size * spec.hidden_size) as f64;
        let tables = if spec.tie_word_embeddings { 1.0 } else { 2.0 };
        let layer_params = model.dense_parameters() as f64 - tables * vocab_params;
        let mlps = spec.layers.len() - spec.moe_layers().count()
            + spec
                .moe_layers()
                .filter(|(_, m)| m.shared.is_some())
                .count();
        let dense_kernels =
            DENSE_KERNELS_PER_LAYER * spec.layers.len() as f64 + MLP_KERNELS * mlps as f64;
        let dense_step = rows
            .iter()
            .map(|&n| Point {
                x: n,
                seconds: self.roofline(2.0 * layer_params * n, layer_params * bytes)
                    + dense_kernels * LAUNCH_SECONDS,
            })
            .collect();
        let lm_head = rows
            .iter()
            .map(|&n| Point {
                x: n,
                seconds: self.roofline(2.0 * vocab_params * n, vocab_params * bytes)
                    + 3.0 * LAUNCH_SECONDS,
            })
            .collect();
        // QKᵀ and PV per pair and layer (4 × heads × head_dim; latent
        // attention's over its latent cache); the cache is read once per
        // sequence and step.
        let pair_flops = (spec.attention.flops_per_cached_position() * spec.layers.len()) as f64;
        let dispatch = (0..=30)
            .step_by(2)
            .map(|p| {
                let b = f64::from(1u32 << p);
                Point {
                    x: b,
                    seconds: RPC_SECONDS + b / self.network_bandwidth,
                }
            })
            .collect();
        Profile {
            format: FORMAT.into(),
            device: self.name.into(),
            estimate: true,
            source: format!(
                "estimate from datasheet figures: {:.0} TFLOP/s bf16 at {:.0}%, {:.2} TB/s memory at {:.0}%, {} GB, {:.0} GB/s network; {:.0} µs per kernel launch, {:.0} µs per gRPC round trip",
                self.bf16_flops / 1e12,
                FLOPS_EFFICIENCY * 100.0,
                self.memory_bandwidth / 1e12,
                BANDWIDTH_EFFICIENCY * 100.0,
                self.memory_bytes / 1_000_000_000,
                self.network_bandwidth / 1e9,
                LAUNCH_SECONDS * 1e6,
                RPC_SECONDS * 1e6,
            ),
            memory_bytes: self.memory_bytes,
            shared_lanes: None,
            model: model.shape(),
            expert_ffn,
            dense_step,
            // Each sequence's attention runs its own kernels in every layer.
            per_sequence: ATTENTION_KERNELS_PER_SEQUENCE
                * spec.layers.len() as f64
                * LAUNCH_SECONDS,
            lm_head,
            attention_per_token_pair: pair_flops / (self.bf16_flops * FLOPS_EFFICIENCY),
            attention_per_context_token: model.kv_bytes_per_token() as f64
                / (self.memory_bandwidth * BANDWIDTH_EFFICIENCY),
            dispatch,
            // Each worker has a device of its own.
            alone_factor: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{fixture, with_dense_layers};

    fn mixtral_8x7b() -> SizedModel {
        fixture("mixtral-8x7b")
    }

    #[test]
    fn an_h100_expert_is_memory_bound_at_one_row_and_compute_bound_at_many() {
        let p = by_key("H100").unwrap().profile(&mixtral_8x7b());
        p.validate().unwrap();
        // One row: 352 MB of weights at 2.68 TB/s ≈ 131 µs (+ launches).
        let one = p.expert_seconds(1);
        assert!(
            (one - (176_160_768.0 * 2.0 / 2.68e12 + 30e-6)).abs() < 1e-9,
            "{one}"
        );
        // Doubling the rows costs nothing while memory bound...
        assert_eq!(p.expert_seconds(2), one);
        // ...and doubles the time once compute bound.
        let (a, b) = (p.expert_seconds(4096), p.expert_seconds(8192));
        assert!((b - 30e-6) / (a - 30e-6) > 1.99, "{a} {b}");
    }

    #[test]
    fn the_h200_reads_faster_than_the_h100_and_the_a100_computes_slower() {
        let m = mixtral_8x7b();
        let [h100, h200, a100] = GPUS.map(|g| g.profile(&m));
        assert!(h200.expert_seconds(1) < h100.expert_seconds(1));
        assert!(a100.expert_seconds(8192) > 3.0 * h100.expert_seconds(8192) * 0.9);
        assert!(by_key("v100").is_none());
    }

    #[test]
    fn a_fine_grained_expert_reads_its_own_width_and_the_rest_is_the_routers() {
        let h100 = by_key("h100").unwrap();
        let m = fixture("qwen3-30b-a3b");
        let p = h100.profile(&m);
        p.validate().unwrap();
        // One expert of width 768 (not the dense intermediate_size 6144):
        // 3 × 2048 × 768 × 2 bytes at 2.68 TB/s, + 6 launches.
        let one = p.expert_seconds(1);
        assert!(
            (one - (9_437_184.0 / 2.68e12 + 30e-6)).abs() < 1e-12,
            "{one}"
        );
        // A decode token's dense step reads the dense part but the
        // embeddings and lm_head: 1.54 B parameters less 2 × 151936 × 2048,
        // in bf16, + 16 launches per layer.
        let layer_params = (1_541_093_376u64 - 2 * 151_936 * 2048) as f64;
        let dense = p.dense_seconds(std::iter::once((1, 0)))
            - p.per_sequence
            - p.lm_head[0].seconds
            - p.attention_per_token_pair
            - p.attention_per_context_token;
        let expected = layer_params * 2.0 / 2.68e12 + 16.0 * 48.0 * 5e-6;
        assert!((dense - expected).abs() < 1e-9, "{dense} {expected}");
        // 96 KiB of keys and values read per cached token.
        assert!((p.attention_per_context_token - 98_304.0 / 2.68e12).abs() < 1e-18);
    }

    #[test]
    fn dense_layers_and_shared_experts_are_dense_work_on_the_router() {
        let h100 = by_key("h100").unwrap();
        let all_moe = with_dense_layers(4, 4, 2, &[], 0);
        let dense = with_dense_layers(4, 4, 2, &[1, 3], 64);
        let (a, b) = (h100.profile(&all_moe), h100.profile(&dense));
        // The same experts; a dense step with two MLPs more to read and launch.
        assert_eq!(a.expert_ffn, b.expert_ffn);
        let step = |p: &Profile| p.dense_step[0].seconds;
        let extra = (2 * 3 * 8 * 64 - 2 * 4 * 8) as f64 * 4.0 / 2.68e12 + 2.0 * 4.0 * 5e-6;
        assert!((step(&b) - step(&a) - extra).abs() < 1e-15);
        // Qwen2-57B-A14B's dense step reads its 8.08 B dense parameters but
        // the embeddings and lm_head, 6.17 B of them its shared experts
        // (3 × 3584 × 20480 and a gate row in every layer), and launches
        // 16 kernels a layer and 4 for each shared expert.
        let qwen2 = h100.profile(&fixture("qwen2-57b-a14b"));
        let params = (8_083_643_904u64 - 2 * 151_936 * 3584) as f64;
        let expected = params * 2.0 / 2.68e12 + (16.0 + 4.0) * 28.0 * 5e-6;
        let step = qwen2.dense_step[0].seconds;
        assert!((step - expected).abs() < 1e-9, "{step} {expected}");
    }
}
