//! The presets: each family's shapes for tests and for benchmarks.

use tramontane_config::{Dtype, Family};

use crate::{Result, SyntheticError};

/// A preset (`--preset`); what it is depends on the family (`--family`).
/// Every preset has the Mistral vocabulary (32,000 tokens, embeddings and
/// lm_head untied); the bench presets are bf16, hidden 1024, 8 layers, 16
/// heads. Bytes are of the weights as stored (parameters × 2 in bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Preset {
    /// For tests (f32, hidden 64, 2 layers, 4 heads). mixtral: 8 experts
    /// top-2 of width 128, 2 kv heads; qwen3_moe: 16 experts top-4 of width
    /// 32, top-k weights renormalised, head_dim 32 (not hidden / heads), 2
    /// kv heads; qwen2_moe: 16 experts top-4 of width 32 and a shared expert
    /// of width 128, q/k/v biases, 2 kv heads; olmoe: 16 experts top-4 of
    /// width 32, 4 kv heads. deepseek_v2: latent attention (queries at full
    /// rank, a latent of 32 and a rotary key of 8 per position, q/k heads
    /// of 24 and values of 16), 16 experts top-4 of width 32 and 2 shared,
    /// greedy; deepseek_v3: the same latent with queries through a rank of
    /// 48 and values of 24, 16 experts in 4 groups (2 kept) top-4, 1
    /// shared, sigmoid scores renormalised and scaled by 2.5. gpt_oss: 16
    /// experts top-4 of width 32 with biases and the clamped SwiGLU, 2 kv
    /// heads, a sink per head, a window of 8 positions at even layers,
    /// YaRN as gpt-oss has it.
    Tiny,
    /// For benchmarks. mixtral: 8 experts top-2 of width 3584, 4 kv heads,
    /// 1,582,467,072 bytes; qwen3_moe: the same experts, head_dim 128,
    /// 1,624,414,208 bytes; qwen2_moe (Qwen1.5-MoE-A2.7B's routing): 60
    /// experts top-4 of width 448 and a shared expert of width 1792, 4 kv
    /// heads, 1,583,360,000 bytes; olmoe: 8 experts top-2 of width 3584, 16
    /// kv heads, 1,607,665,664 bytes. deepseek_v2 (DeepSeek-V2-Lite's
    /// attention and routing, fine-grained): a latent of 512 and a rotary
    /// key of 64, q/k heads of 192 and values of 128, 64 experts top-6 of
    /// width 448 and 2 shared, 1,712,367,616 bytes; deepseek_v3: queries
    /// through a rank of 768, 64 experts in 8 groups (4 kept) top-8 and 1
    /// shared, 1,690,360,832 bytes; gpt_oss (gpt-oss-20b's routing and
    /// attention): 32 experts top-4 of width 896, head_dim 64, 4 kv heads,
    /// a window of 128 at even layers, 1,584,343,808 bytes in bf16 (its
    /// experts in MXFP4 with `--mxfp4`).
    Bench,
    /// Fine-grained experts for benchmarks, about the bytes of mixtral's
    /// `bench` (its experts' 8 × 3584 width per layer cut finer). qwen3_moe
    /// (as Qwen3-30B-A3B): 128 experts top-8 of width 224, head_dim 128, 4
    /// kv heads, 1,626,380,288 bytes; olmoe (as OLMoE-1B-7B): 64 experts
    /// top-8 of width 448, 16 kv heads, 1,608,583,168 bytes. mixtral and
    /// qwen2_moe have none.
    BenchFine,
}

impl Preset {
    /// The `--preset` value.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Bench => "bench",
            Preset::BenchFine => "bench-fine",
        }
    }
}

/// A preset's shape, in terms every family shares; a family's config.json
/// takes what it has of it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written to config.json when set.
    pub head_dim: Option<usize>,
    pub experts: usize,
    pub top_k: usize,
    /// Each routed expert's width.
    pub expert_width: usize,
    /// The dense MLP layers' width (the Qwen families' `intermediate_size`):
    /// top-k × the expert width, what a token's routed experts compute.
    pub dense_width: usize,
    /// The shared expert's width (Qwen2-MoE).
    pub shared_width: Option<usize>,
    /// Dense layers among the routed ones (the Qwen families' `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
    /// `decoder_sparse_step` (the Qwen families).
    pub sparse_step: usize,
    /// Top-k weights divided by their sum (not Mixtral's: it always is).
    pub norm_topk_prob: bool,
    /// The family's attention biases: Qwen3-MoE's and OLMoE's
    /// `attention_bias`, Qwen2-MoE's `qkv_bias`.
    pub attention_bias: bool,
    /// OLMoE's `clip_qkv`.
    pub clip_qkv: Option<f64>,
    /// Mixtral's `sliding_window`.
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position: usize,
    pub dtype: Dtype,
    /// DeepSeek's latent attention.
    pub latent: Option<LatentShape>,
    /// DeepSeek's expert groups: `n_group`, `topk_group` (1, 1: greedy).
    pub groups: (usize, usize),
    /// DeepSeek's `routed_scaling_factor`.
    pub routed_scale: f64,
}

/// gpt-oss's YaRN (transformers' default): positions as 32 × 4096.
const GPT_OSS_MAX_POSITION: usize = 131072;

/// DeepSeek's latent attention's widths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LatentShape {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

/// The shape of `preset` in `family`.
pub(crate) fn shape(family: Family, preset: Preset) -> Result<Shape> {
    let tiny = Shape {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: None,
        experts: 16,
        top_k: 4,
        expert_width: 32,
        dense_width: 128,
        shared_width: None,
        dense_layers: Vec::new(),
        sparse_step: 1,
        norm_topk_prob: false,
        attention_bias: false,
        clip_qkv: None,
        sliding_window: None,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        max_position: 1024,
        dtype: Dtype::F32,
        latent: None,
        groups: (1, 1),
        routed_scale: 1.0,
    };
    let bench = Shape {
        hidden: 1024,
        layers: 8,
        heads: 16,
        kv_heads: 4,
        experts: 8,
        top_k: 2,
        expert_width: 3584,
        dense_width: 2 * 3584,
        max_position: 32768,
        dtype: Dtype::Bf16,
        ..tiny.clone()
    };
    // Each family's bench, and its fine-grained bench: the same but its
    // experts (a dense layer as wide as a token's routed experts).
    let qwen3_bench = Shape {
        head_dim: Some(128),
        norm_topk_prob: true,
        ..bench.clone()
    };
    let olmoe_bench = Shape {
        kv_heads: 16,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position: 4096,
        ..bench.clone()
    };
    let fine = |bench: Shape, experts: usize, expert_width: usize| Shape {
        experts,
        top_k: 8,
        expert_width,
        dense_width: 8 * expert_width,
        ..bench
    };
    // DeepSeek's: a latent cache of kv_lora_rank + rope values a position
    // (V2-Lite's and V3's widths in the bench presets), fine-grained
    // experts beside shared ones.
    let tiny_latent = LatentShape {
        q_lora_rank: None,
        kv_lora_rank: 32,
        nope: 16,
        rope: 8,
        v: 16,
    };
    let bench_latent = LatentShape {
        q_lora_rank: None,
        kv_lora_rank: 512,
        nope: 128,
        rope: 64,
        v: 128,
    };
    let deepseek_bench = Shape {
        experts: 64,
        top_k: 6,
        expert_width: 448,
        dense_width: 6 * 448,
        shared_width: Some(2 * 448),
        kv_heads: 16,
        rope_theta: 10000.0,
        max_position: 4096,
        latent: Some(bench_latent),
        ..bench.clone()
    };
    let shape = match (family, preset) {
        (Family::Mixtral, Preset::Tiny) => Shape {
            experts: 8,
            top_k: 2,
            expert_width: 128,
            rms_norm_eps: 1e-5,
            ..tiny
        },
        (Family::Mixtral, Preset::Bench) => Shape {
            rms_norm_eps: 1e-5,
            ..bench
        },
        (Family::Qwen3Moe, Preset::Tiny) => Shape {
            head_dim: Some(32),
            norm_topk_prob: true,
            ..tiny
        },
        (Family::Qwen3Moe, Preset::Bench) => qwen3_bench,
        (Family::Qwen3Moe, Preset::BenchFine) => fine(qwen3_bench, 128, 224),
        (Family::Qwen2Moe, Preset::Tiny) => Shape {
            shared_width: Some(128),
            attention_bias: true,
            ..tiny
        },
        (Family::Qwen2Moe, Preset::Bench) => Shape {
            experts: 60,
            top_k: 4,
            expert_width: 448,
            dense_width: 4 * 448,
            shared_width: Some(4 * 448),
            attention_bias: true,
            ..bench
        },
        (Family::Olmoe, Preset::Tiny) => Shape {
            kv_heads: 4,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            ..tiny
        },
        (Family::Olmoe, Preset::Bench) => olmoe_bench,
        (Family::Olmoe, Preset::BenchFine) => fine(olmoe_bench, 64, 448),
        (Family::DeepseekV2, Preset::Tiny) => Shape {
            shared_width: Some(2 * 32),
            kv_heads: 4,
            rope_theta: 10000.0,
            latent: Some(tiny_latent),
            ..tiny
        },
        (Family::DeepseekV3, Preset::Tiny) => Shape {
            shared_width: Some(32),
            kv_heads: 4,
            rope_theta: 10000.0,
            norm_topk_prob: true,
            latent: Some(LatentShape {
                q_lora_rank: Some(48),
                v: 24,
                ..tiny_latent
            }),
            groups: (4, 2),
            routed_scale: 2.5,
            ..tiny
        },
        (Family::GptOss, Preset::Tiny) => Shape {
            sliding_window: Some(8),
            rope_theta: 150000.0,
            rms_norm_eps: 1e-5,
            max_position: GPT_OSS_MAX_POSITION,
            ..tiny
        },
        (Family::GptOss, Preset::Bench) => Shape {
            experts: 32,
            top_k: 4,
            expert_width: 896,
            head_dim: Some(64),
            sliding_window: Some(128),
            rope_theta: 150000.0,
            rms_norm_eps: 1e-5,
            max_position: GPT_OSS_MAX_POSITION,
            ..bench
        },
        (Family::DeepseekV2, Preset::Bench) => deepseek_bench,
        (Family::DeepseekV3, Preset::Bench) => Shape {
            top_k: 8,
            dense_width: 8 * 448,
            shared_width: Some(448),
            norm_topk_prob: true,
            latent: Some(LatentShape {
                q_lora_rank: Some(768),
                ..bench_latent
            }),
            groups: (8, 4),
            routed_scale: 2.5,
            ..deepseek_bench
        },
        (
            Family::Mixtral
            | Family::Qwen2Moe
            | Family::DeepseekV2
            | Family::DeepseekV3
            | Family::GptOss,
            Preset::BenchFine,
        ) => {
            return Err(SyntheticError::Spec(format!(
                "--preset bench-fine: {} has no fine-grained preset (qwen3_moe and olmoe have; \
                 deepseek's and gpt_oss's bench are fine-grained)",
                family.model_type()
            )));
        }
    };
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use tramontane_config::{Family, FfnSpec};

    use super::*;
    use crate::Spec;

    /// The bytes of each preset's weights as stored, as [`Preset`] states them.
    const BYTES: [(Family, Preset, usize); 9] = [
        (Family::Mixtral, Preset::Bench, 1_582_467_072),
        (Family::Qwen3Moe, Preset::Bench, 1_624_414_208),
        (Family::Qwen3Moe, Preset::BenchFine, 1_626_380_288),
        (Family::Qwen2Moe, Preset::Bench, 1_583_360_000),
        (Family::Olmoe, Preset::Bench, 1_607_665_664),
        (Family::Olmoe, Preset::BenchFine, 1_608_583_168),
        (Family::DeepseekV2, Preset::Bench, 1_712_367_616),
        (Family::DeepseekV3, Preset::Bench, 1_690_360_832),
        (Family::GptOss, Preset::Bench, 1_584_343_808),
    ];

    #[test]
    fn every_preset_reads_back_as_its_family_with_the_documented_bytes() -> anyhow::Result<()> {
        let mut found = Vec::new();
        for family in Family::ALL {
            for preset in [Preset::Tiny, Preset::Bench, Preset::BenchFine] {
                let Ok(shape) = shape(family, preset) else {
                    continue;
                };
                let (json, model) = Spec::family(family, preset).config()?;
                assert_eq!(model.family, family);
                assert_eq!(json["torch_dtype"], shape.dtype.hf_name());
                let bytes = model.parameters().total * shape.dtype.bytes();
                found.push((family, preset, bytes));
                let moe = model.moe(0).expect("layer 0 is routed");
                eprintln!(
                    "{} {}: {} experts top-{} of width {}, {bytes} bytes",
                    family.model_type(),
                    preset.name(),
                    moe.experts,
                    moe.top_k,
                    moe.width
                );
                assert!(model.layers.iter().all(|l| matches!(l, FfnSpec::Moe(_))));
            }
        }
        let documented: Vec<_> = found
            .iter()
            .copied()
            .filter(|&(_, preset, _)| preset != Preset::Tiny)
            .collect();
        assert_eq!(documented, BYTES);
        Ok(())
    }

    /// The fine-grained presets: 64-128 experts top-8, within 5% of the
    /// bytes of Mixtral's bench.
    #[test]
    fn fine_grained_presets_have_about_the_bytes_of_mixtral_bench() -> anyhow::Result<()> {
        let (_, mixtral) = Spec::preset(Preset::Bench).config()?;
        let reference = mixtral.parameters().total as f64;
        for family in [Family::Qwen3Moe, Family::Olmoe] {
            let (_, model) = Spec::family(family, Preset::BenchFine).config()?;
            for (_, moe) in model.moe_layers() {
                assert!(
                    (64..=128).contains(&moe.experts) && moe.top_k == 8,
                    "{moe:?}"
                );
            }
            let ratio = model.parameters().total as f64 / reference;
            assert!((0.95..=1.05).contains(&ratio), "{family:?}: {ratio}");
        }
        Ok(())
    }

    /// The DeepSeek bench presets' latent cache: 576 values a position and
    /// layer where expanded heads would take 16 × (192 + 128) = 5,120, so
    /// the same pool bytes hold 8.9 times the positions (at least 4 asked).
    #[test]
    fn deepseek_bench_caches_a_ninth_of_the_expanded_heads() -> anyhow::Result<()> {
        for family in [Family::DeepseekV2, Family::DeepseekV3] {
            let (_, model) = Spec::family(family, Preset::Bench).config()?;
            let latent = model.attention.latent.expect("latent attention");
            assert_eq!(model.kv_elements_per_position(), 576);
            assert_eq!(latent.expanded_width(model.attention.heads), 5120);
            let ratio = 5120.0 / 576.0;
            assert!(ratio >= 4.0 && (ratio - 8.89f64).abs() < 0.01, "{ratio}");
        }
        Ok(())
    }

    #[test]
    fn no_fine_grained_preset_is_refused_naming_the_family() {
        for family in [Family::Mixtral, Family::Qwen2Moe] {
            let err = Spec::family(family, Preset::BenchFine)
                .config()
                .expect_err("no bench-fine");
            let message = err.to_string();
            assert!(message.contains("--preset bench-fine"), "{message}");
            assert!(message.contains(family.model_type()), "{message}");
        }
    }
}
