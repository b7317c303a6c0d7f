//! One description of a served model, whatever its family: the attention
//! variant, the norms and biases, each layer's feed-forward (dense, or
//! routed experts with their gate and a shared expert). A family module
//! (the only code that knows a family's config.json fields) builds it;
//! loading, the forward, the workers, the planner and gen-model follow it.

use std::path::Path;

use serde::Deserialize;

use crate::TokenIds;
use crate::error::ConfigError;

/// The families whose config.json this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Mixtral,
    Qwen3Moe,
    Qwen2Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Mixtral,
        Family::Qwen3Moe,
        Family::Qwen2Moe,
        Family::Olmoe,
        Family::DeepseekV2,
        Family::DeepseekV3,
        Family::GptOss,
    ];

    /// config.json's `architectures` entry.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::DeepseekV2 => "DeepseekV2ForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
            Family::GptOss => "GptOssForCausalLM",
        }
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
        }
    }

    /// The family of the text of a config.json, read before any other field.
    pub fn of_json(text: &str) -> Result<Family, ConfigError> {
        #[derive(Deserialize)]
        struct Said {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
        }
        let said: Said = parse(text)?;
        Family::of(&said.architectures, said.model_type.as_deref())
    }

    /// The family config.json names: its `architectures` when it has
    /// them, else its `model_type`; an error naming what it says and the
    /// families read.
    pub fn of(architectures: &[String], model_type: Option<&str>) -> Result<Family, ConfigError> {
        let found = if architectures.is_empty() {
            Family::ALL
                .into_iter()
                .find(|f| model_type == Some(f.model_type()))
        } else {
            Family::ALL
                .into_iter()
                .find(|f| architectures.iter().any(|a| a == f.architecture()))
        };
        found.ok_or_else(|| ConfigError::UnsupportedArchitecture {
            found: if architectures.is_empty() {
                format!("model_type {:?}", model_type.unwrap_or("<none>"))
            } else {
                architectures.join(", ")
            },
            supported: Family::ALL
                .iter()
                .map(|f| f.architecture())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|error| ConfigError::Parse { path: None, error })
}

/// How q and k are normalised before rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (`head_dim` weights; Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole q and k projections, before the reshape into
    /// heads (`heads × head_dim` and `kv_heads × head_dim` weights; OLMoE).
    WholeProjection,
}

/// Multi-head attention with grouped key/value heads and rotary
/// embeddings, or DeepSeek's latent attention (`latent`: then `heads` are
/// the query heads, `kv_heads` is 1, the one latent vector a position
/// caches, and `head_dim` is the rotary part's width).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    /// Each head's width; the width rotary embeddings turn.
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// q, k and v clamped to ±this after their projections (and norms).
    pub clip_qkv: Option<f64>,
    /// Keys older than this many positions are not attended to (in the
    /// layers `sliding_layers` marks).
    pub sliding_window: Option<usize>,
    /// Which layers the window applies to; None: every layer (gpt-oss
    /// alternates windowed and full layers).
    pub sliding_layers: Option<Vec<bool>>,
    /// A learned logit per head inside the softmax, its weight dropped
    /// after (gpt-oss's `sinks`): the attention may weigh no position.
    pub sinks: bool,
    pub rope_theta: f64,
    /// YaRN's scaled rotary frequencies, where config.json's `rope_scaling` asks.
    pub yarn: Option<Yarn>,
    pub latent: Option<LatentAttention>,
}

impl AttentionSpec {
    /// The window of layer `layer`, where it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let windowed = self
            .sliding_layers
            .as_ref()
            .is_none_or(|layers| layers.get(layer).copied().unwrap_or(false));
        self.sliding_window.filter(|_| windowed)
    }

    /// Elements one position caches per layer: keys and values of every
    /// kv head, or the latent vector and its rotary key.
    pub fn cached_elements_per_position(&self) -> usize {
        match &self.latent {
            Some(latent) => latent.cached_width(),
            None => 2 * self.kv_heads * self.head_dim,
        }
    }

    /// FLOPs one query token spends per cached position and layer (the
    /// scores and the weighted sum): `4 × heads × head_dim`, or with latent
    /// attention decoding over the latent cache `heads × (2 × (kv_lora_rank
    /// + rope_dim) + 2 × kv_lora_rank)`.
    pub fn flops_per_cached_position(&self) -> usize {
        match &self.latent {
            Some(l) => self.heads * (2 * l.cached_width() + 2 * l.kv_lora_rank),
            None => 4 * self.heads * self.head_dim,
        }
    }

    /// The attention's parameters per layer.
    fn parameters(&self, h: usize) -> usize {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        if let Some(l) = &self.latent {
            let heads = self.heads;
            let query = match l.q_lora_rank {
                None => h * heads * l.qk_dim(),
                Some(r) => h * r + r + r * heads * l.qk_dim() + if l.bias { r } else { 0 },
            };
            let kv_a = h * l.cached_width() + if l.bias { l.cached_width() } else { 0 };
            let kv_b = l.kv_lora_rank * heads * (l.nope_dim + l.v_dim) + l.kv_lora_rank;
            let o = heads * l.v_dim * h + if self.o_bias { h } else { 0 };
            return query + kv_a + kv_b + o;
        }
        h * (q + 2 * kv)
            + q * h
            + if self.sinks { self.heads } else { 0 }
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + match self.qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => 2 * self.head_dim,
                QkNorm::WholeProjection => q + kv,
            }
    }
}

/// YaRN's rotary scaling (`rope_scaling` of type `yarn`), as transformers
/// computes it: frequencies interpolated by `factor` below the correction
/// range, kept above it, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Whether the correction range is rounded to whole dimensions.
    pub truncate: bool,
    /// What cos and sin are multiplied by.
    pub attention_factor: f64,
}

impl Yarn {
    /// YaRN's `0.1 · mscale · ln(factor) + 1` (1 for no scaling).
    pub fn mscale(factor: f64, mscale: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * mscale * factor.ln() + 1.0
        }
    }
}

/// `rope_scaling` as configs write it.
#[derive(Deserialize)]
struct RopeScaling {
    /// transformers writes both `rope_type` and the older `type`.
    rope_type: Option<String>,
    #[serde(rename = "type")]
    old_type: Option<String>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
    truncate: Option<bool>,
}

/// A config.json's `rope_scaling`: none, or YaRN as transformers'
/// `_compute_yarn_parameters` reads it (`max_positions` standing in for a
/// missing `original_max_position_embeddings`), with its `mscale_all_dim`
/// where it has one (which DeepSeek-V3 corrects the softmax scale by).
pub(crate) fn yarn(
    rope_scaling: Option<&serde_json::Value>,
    max_positions: usize,
) -> Result<Option<(Yarn, Option<f64>)>, ConfigError> {
    let Some(value) = rope_scaling.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let invalid = |reason: String| ConfigError::Invalid {
        field: "rope_scaling",
        reason,
    };
    let said: RopeScaling = serde_json::from_value(value.clone())
        .map_err(|e| invalid(format!("cannot be read: {e}")))?;
    let rope_type = said.rope_type.or(said.old_type).unwrap_or_default();
    if rope_type != "yarn" {
        return Err(invalid(format!(
            "type {rope_type:?} is not supported (only \"yarn\")"
        )));
    }
    let factor = said
        .factor
        .filter(|f| *f > 0.0)
        .ok_or_else(|| invalid("yarn needs a positive factor".into()))?;
    let attention_factor =
        said.attention_factor
            .unwrap_or(match (said.mscale, said.mscale_all_dim) {
                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    Yarn::mscale(factor, m) / Yarn::mscale(factor, all)
                }
                _ => Yarn::mscale(factor, 1.0),
            });
    Ok(Some((
        Yarn {
            factor,
            original_max_position_embeddings: said
                .original_max_position_embeddings
                .unwrap_or(max_positions),
            beta_fast: said.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
            beta_slow: said.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
            truncate: said.truncate.unwrap_or(true),
            attention_factor,
        },
        said.mscale_all_dim.filter(|m| *m != 0.0),
    )))
}

/// DeepSeek's multi-head latent attention (MLA): keys and values come from
/// one `kv_lora_rank`-wide latent vector per position (normed, then
/// expanded per head by `kv_b_proj`) and a `rope_dim`-wide rotary key that
/// every head shares; the cache holds only those two.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentAttention {
    /// The queries' own low-rank projection (`q_a_proj`, normed, then
    /// `q_b_proj`); None: one `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    /// Each head's query/key part without rotary embeddings.
    pub nope_dim: usize,
    /// Each head's query/key part with them (the shared rotary key's width).
    pub rope_dim: usize,
    pub v_dim: usize,
    /// Biases of `q_a_proj` and `kv_a_proj_with_mqa` (`attention_bias`).
    pub bias: bool,
    /// The rotary part's values turn in adjacent pairs (DeepSeek's
    /// layout) rather than in halves.
    pub interleaved_rope: bool,
    /// The scores' scale: `1 / √(nope_dim + rope_dim)`, times YaRN's
    /// correction where the family applies it.
    pub softmax_scale: f64,
}

impl LatentAttention {
    /// A query or key head's width.
    pub fn qk_dim(&self) -> usize {
        self.nope_dim + self.rope_dim
    }

    /// What a position caches per layer: the latent vector and the rotary key.
    pub fn cached_width(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    /// What a position would cache per layer with every head's key and
    /// value expanded (as transformers' cache holds them).
    pub fn expanded_width(&self, heads: usize) -> usize {
        heads * (self.qk_dim() + self.v_dim)
    }
}

/// How the router turns a token's gate logits into its experts and weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    /// The top-k logits, softmax over them (Mixtral).
    TopKThenSoftmax,
    /// Softmax over every expert, the top-k probabilities, divided by their
    /// sum only with `renormalize` (`norm_topk_prob`; Qwen, OLMoE).
    SoftmaxThenTopK { renormalize: bool },
    /// DeepSeek's: scores of every expert from fp32 logits, experts chosen
    /// within the best groups, weights scaled.
    Grouped(GroupedGate),
}

/// DeepSeek's gate. Each expert's score is the softmax (V2) or the sigmoid
/// (V3) of its fp32 logit; it is chosen by its score plus a correction
/// bias (V3's `e_score_correction_bias`: it chooses, it does not weigh),
/// among the experts of the `top_groups` best of `groups` equal groups
/// (the others count 0); a chosen expert's weight is its score, divided by
/// the chosen scores' sum where `renormalize`, times `scale`
/// (`routed_scaling_factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupedGate {
    pub scoring: Scoring,
    pub groups: usize,
    pub top_groups: usize,
    pub group_score: GroupScore,
    pub correction_bias: bool,
    pub renormalize: bool,
    pub scale: f64,
}

/// How a gate turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// What ranks a group of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// Its best expert's (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// Its two best experts' sum (DeepSeek-V3).
    TopTwoSum,
}

/// An expert every token takes, beside the routed ones (Qwen2-MoE's
/// `shared_expert`, DeepSeek's `shared_experts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertSpec {
    /// Its SwiGLU width.
    pub width: usize,
    /// Its output scaled by `sigmoid(shared_expert_gate · x)`.
    pub sigmoid_gate: bool,
}

/// Where a layer's shared expert runs: on the router beside the dense
/// part (the default: it sees every token, so it costs no wire), or on the
/// workers as one more expert of the layer (id `experts`, after the routed
/// ones) that every token takes with its sigmoid gate as weight, placed
/// like any other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SharedExperts {
    #[default]
    Router,
    Workers,
}

impl SharedExperts {
    /// The command-line value.
    pub fn flag(self) -> &'static str {
        match self {
            SharedExperts::Router => "router",
            SharedExperts::Workers => "workers",
        }
    }
}

/// What an expert's gate and up projections make of a token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu(gate) ⊙ up`.
    SwiGlu,
    /// gpt-oss's: the gate clamped to at most `limit`, the up projection
    /// to ±`limit`, then `(up + 1) ⊙ gate·σ(alpha·gate)`.
    ClampedSwiGlu { limit: f64, alpha: f64 },
}

/// A layer's routed experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's SwiGLU width.
    pub width: usize,
    pub gate: Gate,
    /// The gate's logits have a bias (gpt-oss's router).
    pub router_bias: bool,
    /// The routed experts' activation.
    pub activation: Activation,
    /// The routed experts' projections have biases (gpt-oss).
    pub expert_bias: bool,
    pub shared: Option<SharedExpertSpec>,
}

impl MoeSpec {
    /// The experts a placement places in this layer: the routed ones, and
    /// the shared one (id `experts`) where it runs on the workers.
    pub fn placed_experts(&self, shared: SharedExperts) -> usize {
        self.experts + usize::from(self.shared.is_some() && shared == SharedExperts::Workers)
    }

    /// The expert id a worker may hold: a routed one, or the shared one.
    pub fn holds_id(&self, expert: usize) -> bool {
        expert < self.placed_experts(SharedExperts::Workers)
    }
}

/// A layer's feed-forward part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FfnSpec {
    /// A SwiGLU MLP of this width, on the router.
    Dense {
        width: usize,
    },
    Moe(MoeSpec),
}

/// A served model, as its family's config.json describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub family: Family,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention: AttentionSpec,
    /// One per decoder layer.
    pub layers: Vec<FfnSpec>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
}

impl ModelSpec {
    /// Reads a checkpoint's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        ConfigError::reading(path, Self::from_json)
    }

    /// The description of the text of a `config.json`: the family first (a
    /// checkpoint of another family is refused by name, not by the first
    /// field it lacks), then that family's fields, checked.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        match Family::of_json(text)? {
            Family::Mixtral => Ok(crate::MixtralConfig::from_json(text)?.spec()),
            family @ (Family::Qwen3Moe | Family::Qwen2Moe) => {
                parse::<crate::qwen_moe::QwenMoeConfig>(text)?.spec(family)
            }
            Family::Olmoe => parse::<crate::olmoe::OlmoeConfig>(text)?.spec(),
            family @ (Family::DeepseekV2 | Family::DeepseekV3) => {
                parse::<crate::deepseek::DeepseekConfig>(text)?.spec(family)
            }
            Family::GptOss => parse::<crate::gpt_oss::GptOssConfig>(text)?.spec(),
        }
    }

    /// The routed-expert layers: (layer index, their spec).
    pub fn moe_layers(&self) -> impl Iterator<Item = (usize, &MoeSpec)> {
        self.layers.iter().enumerate().filter_map(|(i, f)| match f {
            FfnSpec::Moe(moe) => Some((i, moe)),
            FfnSpec::Dense { .. } => None,
        })
    }

    /// Each decoder layer's routed experts: 0 for a dense layer. What a
    /// placement has a row of per layer.
    pub fn experts_per_layer(&self) -> Vec<usize> {
        self.placed_experts_per_layer(SharedExperts::Router)
    }

    /// Each decoder layer's experts a placement places: the routed ones,
    /// and the shared one where it runs on the workers.
    pub fn placed_experts_per_layer(&self, shared: SharedExperts) -> Vec<usize> {
        self.layers
            .iter()
            .map(|ffn| match ffn {
                FfnSpec::Moe(moe) => moe.placed_experts(shared),
                FfnSpec::Dense { .. } => 0,
            })
            .collect()
    }

    /// Layer `layer`'s routed experts, None for a dense layer (or none such).
    pub fn moe(&self, layer: usize) -> Option<&MoeSpec> {
        match self.layers.get(layer)? {
            FfnSpec::Moe(moe) => Some(moe),
            FfnSpec::Dense { .. } => None,
        }
    }

    /// The most routed experts any layer has: the expert ids a worker's
    /// `--experts` list may name.
    pub fn max_experts(&self) -> usize {
        self.moe_layers()
            .map(|(_, moe)| moe.experts)
            .max()
            .unwrap_or(0)
    }

    /// The most experts a token takes in any layer.
    pub fn max_top_k(&self) -> usize {
        self.moe_layers()
            .map(|(_, moe)| moe.top_k)
            .max()
            .unwrap_or(0)
    }

    /// Parameters of one routed expert (gate, up and down projections,
    /// and their biases where it has them).
    pub fn expert_parameters(moe: &MoeSpec, hidden_size: usize) -> usize {
        3 * hidden_size * moe.width
            + if moe.expert_bias {
                2 * moe.width + hidden_size
            } else {
                0
            }
    }

    /// Elements one position keeps per layer: keys and values, or the
    /// latent vector and the rotary key.
    pub fn kv_elements_per_position(&self) -> usize {
        self.attention.cached_elements_per_position()
    }

    /// Key and value bytes one token keeps over every layer, at
    /// `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        self.layers.len() * self.kv_elements_per_position() * dtype_bytes
    }

    /// The model's parameters: all of them, and those one token uses.
    pub fn parameters(&self) -> Parameters {
        let h = self.hidden_size;
        let attention = self.attention.parameters(h);
        let norms = 2 * h;
        let mut total = Parameters {
            total: self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 } + h,
            active: 0,
            routed_experts: 0,
        };
        total.active = total.total;
        for ffn in &self.layers {
            let (all, used, routed) = match ffn {
                FfnSpec::Dense { width } => (3 * h * width, 3 * h * width, 0),
                FfnSpec::Moe(moe) => {
                    let expert = Self::expert_parameters(moe, h);
                    let shared = moe
                        .shared
                        .map_or(0, |s| 3 * h * s.width + if s.sigmoid_gate { h } else { 0 });
                    let gate = moe.experts * h
                        + match moe.gate {
                            Gate::Grouped(g) if g.correction_bias => moe.experts,
                            _ => 0,
                        }
                        + if moe.router_bias { moe.experts } else { 0 };
                    (
                        gate + shared + moe.experts * expert,
                        gate + shared + moe.top_k * expert,
                        moe.experts * expert,
                    )
                }
            };
            total.total += attention + norms + all;
            total.active += attention + norms + used;
            total.routed_experts += routed;
        }
        total
    }
}

/// Parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    pub total: usize,
    /// What one token's forward uses: every dense weight, the top-k routed
    /// experts of each layer.
    pub active: usize,
    /// The routed experts' (what workers hold).
    pub routed_experts: usize,
}

/// `hidden_act`'s default in every family's config.
pub(crate) fn silu() -> String {
    "silu".into()
}

/// `rope_theta`'s default in the Qwen MoE and OLMoE configs.
pub(crate) fn rope_theta_10000() -> f64 {
    10000.0
}

/// Checks what every family's attention needs: positive sizes, kv heads
/// dividing the heads, an even head_dim; errors name the config.json
/// fields of the heads, the kv heads and the rotated head width.
pub(crate) fn check_attention(
    attention: &AttentionSpec,
    [heads_field, kv_heads_field, head_dim_field]: [&'static str; 3],
) -> Result<(), ConfigError> {
    let invalid = |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
    if attention.heads == 0 {
        return invalid(heads_field, "must be greater than 0".into());
    }
    if attention.kv_heads == 0 || !attention.heads.is_multiple_of(attention.kv_heads) {
        return invalid(
            kv_heads_field,
            format!(
                "{} does not divide {heads_field} {}",
                attention.kv_heads, attention.heads
            ),
        );
    }
    if attention.head_dim == 0 || !attention.head_dim.is_multiple_of(2) {
        return invalid(
            head_dim_field,
            format!(
                "{} must be even and greater than 0 for rotary embeddings",
                attention.head_dim
            ),
        );
    }
    if !positive(attention.rope_theta) {
        return invalid("rope_theta", "must be positive".into());
    }
    if attention.clip_qkv.is_some_and(|c| !positive(c)) {
        return invalid("clip_qkv", "must be positive or null".into());
    }
    if attention.sliding_window == Some(0) {
        return invalid("sliding_window", "must be greater than 0 or null".into());
    }
    Ok(())
}

/// Greater than 0 (NaN is not).
pub(crate) fn positive(value: f64) -> bool {
    value > 0.0
}

/// Checks fields that must be greater than 0.
pub(crate) fn check_positive(fields: &[(&'static str, usize)]) -> Result<(), ConfigError> {
    match fields.iter().find(|&&(_, value)| value == 0) {
        Some(&(field, _)) => Err(ConfigError::Invalid {
            field,
            reason: "must be greater than 0".into(),
        }),
        None => Ok(()),
    }
}

/// Checks routed experts: top-k within the experts.
pub(crate) fn check_routing(
    experts: usize,
    top_k: usize,
    experts_field: &'static str,
) -> Result<(), ConfigError> {
    if top_k > experts {
        return Err(ConfigError::Invalid {
            field: "num_experts_per_tok",
            reason: format!("{top_k} exceeds {experts_field} {experts}"),
        });
    }
    Ok(())
}

/// What transformers' models read of `hidden_act` and `rope_scaling`
/// and this project serves: SiLU, no scaling.
pub(crate) fn check_activation_and_rope(
    hidden_act: &str,
    rope_scaling: Option<&serde_json::Value>,
    rms_norm_eps: f64,
) -> Result<(), ConfigError> {
    if hidden_act != "silu" {
        return Err(ConfigError::Invalid {
            field: "hidden_act",
            reason: format!("{hidden_act:?} is not supported (only \"silu\")"),
        });
    }
    if rope_scaling.is_some_and(|v| !v.is_null()) {
        return Err(ConfigError::Invalid {
            field: "rope_scaling",
            reason: "scaled rotary embeddings are not supported".into(),
        });
    }
    if !positive(rms_norm_eps) {
        return Err(ConfigError::Invalid {
            field: "rms_norm_eps",
            reason: "must be positive".into(),
        });
    }
    Ok(())
}
