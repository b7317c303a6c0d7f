//! Memory arithmetic: the bytes of the dense part, of the experts, and of the
//! KV cache, from the model's description (its parameter counts are
//! [`ModelSpec::parameters`]'s, summed once there).
//!
//! What lives where: workers hold only routed experts, one (layer, expert)
//! pair at a time, and only MoE layers have them. The router holds the rest
//! (the dense part): embeddings, lm_head unless tied, attention with its
//! biases and q/k norms, every norm, dense-layer MLPs, gates and shared
//! experts (a shared expert sees every token, so it runs on the router).
//!
//! [`ModelSpec::parameters`]: tramontane_config::ModelSpec::parameters

use serde::Serialize;
use tramontane_config::{ModelSpec, Parameters};

use crate::model::SizedModel;
use crate::weight_dtype::WeightDtype;

/// Fraction of a device's memory the plan fills at most; the rest is left to
/// the runtime, activations and fragmentation (vLLM's default is the same).
pub const USABLE_FRACTION: f64 = 0.9;

impl SizedModel {
    /// All parameters, those one token uses, the routed experts'.
    pub fn parameters(&self) -> Parameters {
        self.spec.parameters()
    }

    /// Parameters of the dense part, which the router holds: all but the
    /// routed experts.
    pub fn dense_parameters(&self) -> u64 {
        let p = self.parameters();
        (p.total - p.routed_experts) as u64
    }

    pub fn dense_bytes(&self) -> u64 {
        self.dense_parameters() * self.dtype_bytes as u64
    }

    /// Parameters of one routed expert of decoder layer `layer` (gate, up
    /// and down projections); 0 for a dense layer.
    pub fn expert_parameters_of(&self, layer: usize) -> u64 {
        self.spec.moe(layer).map_or(0, |moe| {
            ModelSpec::expert_parameters(moe, self.spec.hidden_size) as u64
        })
    }

    /// Bytes of one routed expert of decoder layer `layer` as its weights
    /// are stored (gate and up `[width, hidden]`, down `[hidden, width]`,
    /// with their scales when quantized), and its biases where it has them
    /// (gpt-oss: `2 × width` of gate and up, `hidden` of down); 0 for a
    /// dense layer.
    pub fn expert_bytes(&self, layer: usize) -> u64 {
        self.spec.moe(layer).map_or(0, |moe| {
            let (width, hidden) = (moe.width as u64, self.spec.hidden_size as u64);
            let biases = if moe.expert_bias {
                2 * width + hidden
            } else {
                0
            };
            2 * self.experts.matrix_bytes(width, hidden)
                + self.experts.matrix_bytes(hidden, width)
                + biases * self.expert_bias_bytes()
        })
    }

    /// Bytes of one expert bias value: the experts' float dtype, or where
    /// their weights are quantized the compute dtype (quantization leaves
    /// biases alone: gpt-oss's MXFP4 checkpoints keep them in bf16 beside
    /// the blocks and scales).
    fn expert_bias_bytes(&self) -> u64 {
        match self.experts {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
            WeightDtype::Int8 | WeightDtype::Fp8 | WeightDtype::Mxfp4 => self.dtype_bytes as u64,
        }
    }

    /// Parameters of the largest routed expert of any layer (the families'
    /// MoE layers all have the same): what an expert call computes with.
    pub fn expert_parameters(&self) -> u64 {
        (0..self.spec.layers.len())
            .map(|layer| self.expert_parameters_of(layer))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of the largest routed expert of any layer.
    pub fn expert_layer_bytes(&self) -> u64 {
        (0..self.spec.layers.len())
            .map(|layer| self.expert_bytes(layer))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of one expert id across every MoE layer (what a worker holding
    /// "expert e" everywhere stores).
    pub fn expert_bytes_all_layers(&self) -> u64 {
        (0..self.spec.layers.len())
            .map(|layer| self.expert_bytes(layer))
            .sum()
    }

    /// KV cache bytes per token: keys and values of every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.spec.kv_bytes_per_token(self.dtype_bytes) as u64
    }
}

/// What one device holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceMemory {
    /// "router" or "worker N".
    pub device: String,
    /// (layer, expert) pairs held (workers).
    pub expert_slots: usize,
    pub expert_bytes: u64,
    /// The dense weights (router).
    pub dense_bytes: u64,
    /// KV cache for the target concurrency (router).
    pub kv_cache_bytes: u64,
    pub total_bytes: u64,
    pub capacity_bytes: u64,
    pub fits: bool,
}

impl DeviceMemory {
    pub fn new(
        device: String,
        expert_slots: usize,
        expert_bytes: u64,
        dense_bytes: u64,
        kv_cache_bytes: u64,
        capacity_bytes: u64,
    ) -> Self {
        let total_bytes = expert_bytes + dense_bytes + kv_cache_bytes;
        Self {
            device,
            expert_slots,
            expert_bytes,
            dense_bytes,
            kv_cache_bytes,
            total_bytes,
            capacity_bytes,
            fits: total_bytes as f64 <= capacity_bytes as f64 * USABLE_FRACTION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{self, fixture};

    /// What an 80 GB H100 holds at the usable fraction.
    const H100_USABLE: u64 = 72_000_000_000;

    #[test]
    fn mixtral_8x7b_in_int8_fits_one_h100_where_bf16_needs_two() {
        use crate::weight_dtype::WeightDtype;
        let bf16 = fixture("mixtral-8x7b");
        let int8 = SizedModel {
            experts: WeightDtype::Int8,
            ..bf16.clone()
        };
        // bf16: 2 bytes × 176,160,768 weights.
        assert_eq!(bf16.expert_bytes(0), 352_321_536);
        // int8: 176,160,768 bytes of weights, and an f32 scale per output
        // channel: (14336 of w1 + 14336 of w3 + 4096 of w2) × 4 = 131,072.
        assert_eq!(int8.expert_bytes(0), 176_291_840);
        assert_eq!(int8.expert_layer_bytes(), 176_291_840);
        assert_eq!(int8.expert_bytes_all_layers(), 32 * 176_291_840);
        // All 256 (layer, expert) pairs: 45.1 GB, under an H100's 72 GB; in
        // bf16 90.2 GB, two workers of 4 expert ids each.
        assert_eq!(8 * int8.expert_bytes_all_layers(), 45_130_711_040);
        assert_eq!(h100_workers(8, int8.expert_bytes_all_layers()), 1);
        assert_eq!(h100_workers(8, bf16.expert_bytes_all_layers()), 2);
        // The router's dense part stays in the compute dtype.
        assert_eq!(int8.dense_bytes(), bf16.dense_bytes());
        // FP8 with 128×128 block scales: 112 × 32 blocks in w1 and w3, 32 × 112 in w2.
        let fp8 = SizedModel {
            experts: WeightDtype::Fp8,
            ..bf16.clone()
        };
        assert_eq!(fp8.expert_bytes(0), 176_160_768 + 3 * 3_584 * 4);
    }

    /// DeepSeek-V3 as published (FP8 experts in 128×128 blocks): 58 routed
    /// layers of 256 experts, the first 3 dense, the shared expert and the
    /// latent attention on the router.
    #[test]
    fn deepseek_v3_by_hand() {
        use crate::weight_dtype::WeightDtype;
        let bf16 = fixture("deepseek-v3");
        // 3 × 7168 × 2048 weights an expert and layer; none in a dense layer.
        assert_eq!(bf16.expert_parameters(), 44_040_192);
        assert_eq!(bf16.expert_bytes(0), 0);
        assert_eq!(bf16.expert_bytes(3), 88_080_384);
        assert_eq!(bf16.expert_bytes_all_layers(), 58 * 88_080_384);
        // FP8: a byte a weight, and an f32 scale per 128 × 128 block: 16 ×
        // 56 blocks in gate and up, 56 × 16 in down.
        let fp8 = SizedModel {
            experts: WeightDtype::Fp8,
            ..bf16.clone()
        };
        assert_eq!(fp8.expert_bytes(3), 44_040_192 + 3 * 896 * 4);
        // 14,848 (layer, expert) pairs: 654 GB in FP8; an H100 (72 GB
        // usable) holds 28 ids of 2.55 GB, so 10 workers (19 in bf16).
        assert_eq!(fp8.expert_bytes_all_layers(), 2_554_954_752);
        assert_eq!(256 * fp8.expert_bytes_all_layers(), 654_068_416_512);
        assert_eq!(h100_workers(256, fp8.expert_bytes_all_layers()), 10);
        assert_eq!(h100_workers(256, bf16.expert_bytes_all_layers()), 19);
        // The router: 17.1 B parameters (attention, 3 dense MLPs, shared
        // experts, gates and their correction biases, embeddings) in bf16:
        // 34.2 GB, one H100; 70,272 bytes of latent cache a token.
        assert_eq!(bf16.dense_parameters(), 17_117_648_384);
        assert_eq!(fp8.dense_bytes(), 34_235_296_768);
        assert_eq!(bf16.kv_bytes_per_token(), 70_272);
    }

    /// gpt-oss as published: every layer routed, experts of width 2880 over
    /// a hidden size of 2880 with biases, stored in MXFP4 (the config's
    /// `quant_method`), the biases in bf16; the router's part in bf16 (the
    /// config has no `torch_dtype`).
    fn gpt_oss(name: &str) -> (SizedModel, SizedModel) {
        use crate::model::PlannedModel;
        use tramontane_config::Dtype;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        let planned = PlannedModel::read(&path).unwrap();
        let dtype = planned.dtype(None).unwrap();
        assert_eq!(dtype, Dtype::Bf16, "{name}");
        assert_eq!(planned.quant_method.as_deref(), Some("mxfp4"), "{name}");
        let weights = planned.weight_dtype(None, dtype).unwrap();
        assert_eq!(weights, WeightDtype::Mxfp4, "{name}");
        (
            planned.sized(dtype, WeightDtype::Bf16),
            planned.sized(dtype, weights),
        )
    }

    /// One gpt-oss expert, whatever the model: gate and up fused into
    /// `gate_up_proj` [5760 outputs, 2880 inner] with a bias of 5760,
    /// `down_proj` [2880, 2880] with a bias of 2880.
    fn gpt_oss_expert_by_hand(bf16: &SizedModel, mxfp4: &SizedModel) {
        // 3 × 2880 × 2880 = 24,883,200 weights and 2 × 2880 + 2880 =
        // 8,640 biases.
        assert_eq!(bf16.expert_parameters(), 24_883_200 + 8_640);
        // bf16: 2 bytes each, 49,766,400 + 17,280.
        assert_eq!(bf16.expert_bytes(0), 49_783_680);
        // MXFP4: per output row inner / 2 = 1,440 bytes of blocks (two
        // E2M1 values a byte) and inner / 32 = 90 of E8M0 scales. gate_up:
        // 5760 × 1440 + 5760 × 90 = 8,294,400 + 518,400; down: 2880 × 1440
        // + 2880 × 90 = 4,147,200 + 259,200; the biases in bf16, 17,280.
        let gate_up = 5_760 * 1_440 + 5_760 * 90;
        let down = 2_880 * 1_440 + 2_880 * 90;
        assert_eq!((gate_up, down), (8_812_800, 4_406_400));
        assert_eq!(mxfp4.expert_bytes(0), gate_up + down + 17_280);
        assert_eq!(mxfp4.expert_bytes(0), 13_236_480);
        // Every layer is routed: the largest layer's is any layer's.
        assert_eq!(mxfp4.expert_layer_bytes(), 13_236_480);
        // 3.76 × smaller; the weights they compute with are the same.
        assert_eq!(mxfp4.expert_parameters(), bf16.expert_parameters());
        // The router's part stays in bf16 either way.
        assert_eq!(mxfp4.dense_bytes(), bf16.dense_bytes());
    }

    /// gpt-oss-120b: 36 layers of 128 experts. In MXFP4 all its experts
    /// (61.0 GB) fit one H100 worker; in bf16 (229.4 GB) they need 4.
    #[test]
    fn gpt_oss_120b_by_hand() {
        let (bf16, mxfp4) = gpt_oss("gpt-oss-120b");
        gpt_oss_expert_by_hand(&bf16, &mxfp4);
        // One expert id over 36 layers: 36 × 13,236,480 (MXFP4), 36 ×
        // 49,783,680 (bf16).
        assert_eq!(mxfp4.expert_bytes_all_layers(), 476_513_280);
        assert_eq!(bf16.expert_bytes_all_layers(), 1_792_212_480);
        // All 4,608 (layer, expert) pairs: 61.0 GB in MXFP4, 229.4 GB in
        // bf16. An H100 (72 GB usable) holds 151 ids in MXFP4, all 128 of
        // them: one worker; 40 in bf16: 4 workers.
        assert_eq!(128 * mxfp4.expert_bytes_all_layers(), 60_993_699_840);
        assert_eq!(128 * bf16.expert_bytes_all_layers(), 229_403_197_440);
        assert_eq!(H100_USABLE / 476_513_280, 151);
        assert_eq!(H100_USABLE / 1_792_212_480, 40);
        assert_eq!(h100_workers(128, mxfp4.expert_bytes_all_layers()), 1);
        assert_eq!(h100_workers(128, bf16.expert_bytes_all_layers()), 4);
        // The router: 2.13 B parameters (embeddings and lm_head 2 × 201088
        // × 2880, attention with its biases and sinks, norms, the router
        // and its bias) in bf16, 4.26 GB: with the experts in MXFP4, 65.2
        // GB in all, the one 80 GB GPU the model card names.
        assert_eq!(bf16.dense_parameters(), 2_127_557_952);
        assert_eq!(mxfp4.dense_bytes(), 4_255_115_904);
        assert!(128 * mxfp4.expert_bytes_all_layers() + mxfp4.dense_bytes() < H100_USABLE);
        // 36 layers × 2 × 8 kv heads × 64 × 2 bytes (the sliding layers'
        // keep at most 128 positions; the planner sizes every layer whole).
        assert_eq!(mxfp4.kv_bytes_per_token(), 73_728);
    }

    /// gpt-oss-20b: 24 layers of 32 experts. Its experts fit one H100
    /// worker in MXFP4 (10.2 GB) and in bf16 (38.2 GB).
    #[test]
    fn gpt_oss_20b_by_hand() {
        let (bf16, mxfp4) = gpt_oss("gpt-oss-20b");
        gpt_oss_expert_by_hand(&bf16, &mxfp4);
        assert_eq!(mxfp4.expert_bytes_all_layers(), 24 * 13_236_480);
        assert_eq!(bf16.expert_bytes_all_layers(), 24 * 49_783_680);
        // All 768 pairs: 10.2 GB in MXFP4, 38.2 GB in bf16; an H100 holds
        // 226 ids in MXFP4 and 60 in bf16, the 32 either way.
        assert_eq!(32 * mxfp4.expert_bytes_all_layers(), 10_165_616_640);
        assert_eq!(32 * bf16.expert_bytes_all_layers(), 38_233_866_240);
        assert_eq!(H100_USABLE / mxfp4.expert_bytes_all_layers(), 226);
        assert_eq!(H100_USABLE / bf16.expert_bytes_all_layers(), 60);
        assert_eq!(h100_workers(32, mxfp4.expert_bytes_all_layers()), 1);
        assert_eq!(h100_workers(32, bf16.expert_bytes_all_layers()), 1);
        // The router: 1.80 B parameters, 3.60 GB in bf16; with the experts
        // in MXFP4 13.8 GB in all, within the 16 GB the model card names.
        assert_eq!(bf16.dense_parameters(), 1_797_824_064);
        assert_eq!(mxfp4.dense_bytes(), 3_595_648_128);
        assert!(32 * mxfp4.expert_bytes_all_layers() + mxfp4.dense_bytes() < 16_000_000_000);
        // 24 layers × 2 × 8 kv heads × 64 × 2 bytes.
        assert_eq!(mxfp4.kv_bytes_per_token(), 49_152);
    }

    /// DeepSeek-V2-Lite: 26 routed layers of 64 experts of width 1408,
    /// 2 shared ones on the router.
    #[test]
    fn deepseek_v2_lite_by_hand() {
        let m = fixture("deepseek-v2-lite");
        assert_eq!(m.expert_bytes(1), 2 * 3 * 2048 * 1408);
        assert_eq!(m.expert_bytes_all_layers(), 26 * 17_301_504);
        // All experts 28.8 GB in bf16: one H100; the router 1.31 B
        // parameters; 27 layers × 576 values × 2 bytes a token.
        assert_eq!(h100_workers(64, m.expert_bytes_all_layers()), 1);
        assert_eq!(m.dense_parameters(), 1_311_632_896);
        assert_eq!(m.kv_bytes_per_token(), 31_104);
    }

    #[test]
    fn mixtral_8x7b_by_hand() {
        let m = fixture("mixtral-8x7b");
        // 3 × 4096 × 14336 per expert and layer.
        assert_eq!(m.expert_parameters(), 176_160_768);
        // × 32 layers × 2 bytes: about 11.3 GB per expert id.
        assert_eq!(m.expert_bytes_all_layers(), 11_274_289_152);
        // Embeddings and lm_head 2 × 32000 × 4096; per layer q, o 4096²,
        // k, v 4096 × 1024, two norms, a gate 8 × 4096; a final norm.
        let per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 + 8 * 4096;
        assert_eq!(
            m.dense_parameters(),
            2 * 32000 * 4096 + 32 * per_layer + 4096
        );
        // 46.7 B parameters in all: 93.4 GB in bf16, more than an 80 GB GPU.
        assert_eq!(m.parameters().total, 46_702_792_704);
        assert!(m.parameters().total * 2 > 80_000_000_000);
        // K and V: 2 × 32 layers × 8 heads × 128 × 2 bytes = 128 KiB per token.
        assert_eq!(m.kv_bytes_per_token(), 131_072);
    }

    /// Parameters counted by hand from config.json: per decoder layer q, k,
    /// v, o, their biases and q/k norms, two norms, the gate, the shared
    /// expert, the routed experts; embeddings, lm_head and a final norm.
    struct ByHand {
        hidden: u64,
        vocab: u64,
        layers: u64,
        heads: u64,
        kv_heads: u64,
        head_dim: u64,
        experts: u64,
        top_k: u64,
        width: u64,
        /// Parameters of the q/k/v biases and q/k norms of one layer.
        attention_extras: u64,
        /// The shared expert's width (its sigmoid gate is one row of `hidden`).
        shared: Option<u64>,
    }

    impl ByHand {
        fn expert(&self) -> u64 {
            3 * self.hidden * self.width
        }

        /// (total, active, routed experts).
        fn parameters(&self) -> (u64, u64, u64) {
            let h = self.hidden;
            let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
            let attention = h * q + 2 * h * kv + q * h + self.attention_extras;
            let shared = self.shared.map_or(0, |w| 3 * h * w + h);
            let layer = attention + 2 * h + self.experts * h + shared;
            let outside = 2 * self.vocab * h + h;
            let routed = self.layers * self.experts * self.expert();
            (
                outside + self.layers * layer + routed,
                outside + self.layers * (layer + self.top_k * self.expert()),
                routed,
            )
        }

        /// Keys and values of every layer, bf16.
        fn kv_bytes(&self) -> u64 {
            2 * self.layers * self.kv_heads * self.head_dim * 2
        }
    }

    /// The smallest number of workers whose even share of expert ids fits
    /// an H100 (each id `expert_all_layers` bytes).
    fn h100_workers(experts: u64, expert_all_layers: u64) -> u64 {
        let per_worker = H100_USABLE / expert_all_layers;
        experts.div_ceil(per_worker)
    }

    fn check(name: &str, by_hand: &ByHand) -> SizedModel {
        let m = fixture(name);
        let (total, active, routed) = by_hand.parameters();
        let p = m.parameters();
        assert_eq!(
            (p.total as u64, p.active as u64, p.routed_experts as u64),
            (total, active, routed),
            "{name}"
        );
        assert_eq!(m.dense_parameters(), total - routed, "{name}");
        assert_eq!(m.dense_bytes(), 2 * (total - routed), "{name}");
        assert_eq!(m.expert_layer_bytes(), 2 * by_hand.expert(), "{name}");
        assert_eq!(
            m.expert_bytes_all_layers(),
            2 * by_hand.expert() * by_hand.layers,
            "{name}"
        );
        assert_eq!(m.kv_bytes_per_token(), by_hand.kv_bytes(), "{name}");
        m
    }

    #[test]
    fn qwen3_30b_a3b_by_hand() {
        let by_hand = ByHand {
            hidden: 2048,
            vocab: 151_936,
            layers: 48,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            experts: 128,
            top_k: 8,
            width: 768,
            // RMSNorm of each head's q and k: 2 × 128.
            attention_extras: 2 * 128,
            shared: None,
        };
        check("qwen3-30b-a3b", &by_hand);
        // 30.5 B parameters, 3.3 B active, as the model card says.
        assert_eq!(by_hand.parameters().0, 30_532_122_624);
        assert_eq!(by_hand.parameters().1, 3_353_032_704);
        // One expert: 3 × 2048 × 768 × 2 bytes = 9.4 MB a layer, 453 MB
        // over 48 layers; 96 KiB of keys and values per token (head_dim
        // 128 is given, not 2048 / 32).
        assert_eq!(by_hand.expert() * 2, 9_437_184);
        assert_eq!(by_hand.expert() * 2 * 48, 452_984_832);
        assert_eq!(by_hand.kv_bytes(), 98_304);
        // 58 GB of experts: one H100 holds them all.
        assert_eq!(h100_workers(128, 452_984_832), 1);
    }

    #[test]
    fn qwen3_235b_a22b_by_hand() {
        let by_hand = ByHand {
            hidden: 4096,
            vocab: 151_936,
            layers: 94,
            heads: 64,
            kv_heads: 4,
            head_dim: 128,
            experts: 128,
            top_k: 8,
            width: 1536,
            attention_extras: 2 * 128,
            shared: None,
        };
        check("qwen3-235b-a22b", &by_hand);
        // 235 B parameters, 22 B active.
        assert_eq!(by_hand.parameters().0, 235_093_634_560);
        assert_eq!(by_hand.parameters().1, 22_190_763_520);
        // One expert: 3 × 4096 × 1536 × 2 bytes = 37.7 MB a layer, 3.55 GB
        // over 94 layers; 188 KiB of keys and values per token.
        assert_eq!(by_hand.expert() * 2 * 94, 3_548_381_184);
        assert_eq!(by_hand.kv_bytes(), 192_512);
        // An H100 holds 20 expert ids (71 GB): 128 of them need 7 workers.
        assert_eq!(H100_USABLE / 3_548_381_184, 20);
        assert_eq!(h100_workers(128, 3_548_381_184), 7);
    }

    #[test]
    fn qwen2_57b_a14b_by_hand() {
        let by_hand = ByHand {
            hidden: 3584,
            vocab: 151_936,
            layers: 28,
            heads: 28,
            kv_heads: 4,
            // hidden / heads: the config gives no head_dim.
            head_dim: 128,
            experts: 64,
            top_k: 8,
            width: 2560,
            // q, k and v biases.
            attention_extras: 3584 + 2 * 512,
            shared: Some(20480),
        };
        let m = check("qwen2-57b-a14b", &by_hand);
        // 57.4 B parameters, 14.2 B active.
        assert_eq!(by_hand.parameters().0, 57_408_658_944);
        assert_eq!(by_hand.parameters().1, 14_249_270_784);
        // The shared expert (3 × 3584 × 20480 and its gate, 28 layers) is
        // on the router: 6.2 B of its 8.1 B dense parameters.
        assert_eq!(m.dense_parameters(), 8_083_643_904);
        assert_eq!(28 * (3 * 3584 * 20480 + 3584u64), 6_165_727_232);
        // One routed expert: 3 × 3584 × 2560 × 2 bytes = 55 MB a layer,
        // 1.54 GB over 28 layers; 56 KiB of keys and values per token.
        assert_eq!(by_hand.expert() * 2 * 28, 1_541_406_720);
        assert_eq!(by_hand.kv_bytes(), 57_344);
        // 98.7 GB of routed experts: two H100s (46 ids each at most).
        assert_eq!(h100_workers(64, 1_541_406_720), 2);
    }

    #[test]
    fn olmoe_1b_7b_by_hand() {
        let by_hand = ByHand {
            hidden: 2048,
            vocab: 50_304,
            layers: 16,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            experts: 64,
            top_k: 8,
            width: 1024,
            // RMSNorm over the whole q and k projections: 2 × 2048.
            attention_extras: 2 * 2048,
            shared: None,
        };
        check("olmoe-1b-7b-0924", &by_hand);
        // 6.9 B parameters, 1.3 B active.
        assert_eq!(by_hand.parameters().0, 6_919_161_856);
        assert_eq!(by_hand.parameters().1, 1_282_017_280);
        // One expert: 3 × 2048 × 1024 × 2 bytes = 12.6 MB a layer, 201 MB
        // over 16 layers; 128 KiB of keys and values per token.
        assert_eq!(by_hand.expert() * 2 * 16, 201_326_592);
        assert_eq!(by_hand.kv_bytes(), 131_072);
        assert_eq!(h100_workers(64, 201_326_592), 1);
    }

    #[test]
    fn dense_layers_hold_no_experts_and_their_mlp_is_on_the_router() {
        // 4 layers, the first and third dense (an MLP of width 24).
        let m = test_fixtures::with_dense_layers(4, 4, 2, &[0, 2], 24);
        let h = 8;
        assert_eq!(m.expert_bytes(0), 0);
        assert_eq!(m.expert_bytes(1), 3 * h * 16 * 4);
        assert_eq!(m.expert_bytes_all_layers(), 2 * 3 * h * 16 * 4);
        let all_moe = test_fixtures::shape(4, 4, 2);
        // Two MLPs instead of two gates (4 × 8) and two layers of experts.
        assert_eq!(
            m.dense_parameters(),
            all_moe.dense_parameters() + 2 * 3 * h * 24 - 2 * 4 * h
        );
        // Keys and values in every layer, dense or not.
        assert_eq!(m.kv_bytes_per_token(), all_moe.kv_bytes_per_token());
    }

    #[test]
    fn a_device_fits_within_the_usable_fraction() {
        let fits = DeviceMemory::new("w".into(), 1, 89, 0, 0, 100);
        assert!(fits.fits);
        let over = DeviceMemory::new("w".into(), 1, 91, 0, 0, 100);
        assert!(!over.fits);
        assert_eq!(over.total_bytes, 91);
    }
}
