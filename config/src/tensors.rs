//! The tensors of a checkpoint, as each family's transformers class names
//! and shapes them (`model.layers.{l}.self_attn.q_proj.weight`, ...): what
//! loading reads and gen-model writes. The family decides the names of the
//! routed experts and their gate; everything else follows the spec.

use crate::spec::{Family, FfnSpec, Gate, LatentAttention, ModelSpec, QkNorm};

/// One tensor: its name in the checkpoint and its shape.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The weights of one routed expert: its gate, up and down projections
/// (`[width, hidden]`, `[width, hidden]`, `[hidden, width]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTensors {
    pub gate: String,
    pub up: String,
    pub down: String,
}

impl Family {
    /// Where a layer's routed block sits: `block_sparse_moe` (Mixtral) or `mlp`.
    fn moe_block(self, layer: usize) -> String {
        match self {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
            Family::Qwen3Moe
            | Family::Qwen2Moe
            | Family::Olmoe
            | Family::DeepseekV2
            | Family::DeepseekV3
            | Family::GptOss => format!("model.layers.{layer}.mlp"),
        }
    }

    /// The router gate's weight of layer `layer`, `[experts, hidden]`.
    pub fn gate_tensor(self, layer: usize) -> String {
        match self {
            Family::GptOss => format!("{}.router.weight", self.moe_block(layer)),
            _ => format!("{}.gate.weight", self.moe_block(layer)),
        }
    }

    /// The router's bias of layer `layer`, `[experts]` (gpt-oss).
    pub fn router_bias_tensor(self, layer: usize) -> String {
        format!("{}.router.bias", self.moe_block(layer))
    }

    /// Whether a layer's routed experts are stored together, one tensor per
    /// projection ([`FusedExperts`]), rather than one tensor per expert.
    pub fn fuses_experts(self) -> bool {
        self == Family::GptOss
    }

    /// The fused experts of layer `layer` (gpt-oss).
    pub fn fused_expert_tensors(self, layer: usize) -> FusedExperts {
        let experts = format!("{}.experts", self.moe_block(layer));
        FusedExperts {
            gate_up: format!("{experts}.gate_up_proj"),
            gate_up_bias: format!("{experts}.gate_up_proj_bias"),
            down: format!("{experts}.down_proj"),
            down_bias: format!("{experts}.down_proj_bias"),
        }
    }

    /// The weights of expert `expert` of layer `layer`.
    pub fn expert_tensors(self, layer: usize, expert: usize) -> ExpertTensors {
        let (gate, up, down) = match self {
            Family::Mixtral => ("w1", "w3", "w2"),
            _ => ("gate_proj", "up_proj", "down_proj"),
        };
        let expert = format!("{}.experts.{expert}", self.moe_block(layer));
        ExpertTensors {
            gate: format!("{expert}.{gate}.weight"),
            up: format!("{expert}.{up}.weight"),
            down: format!("{expert}.{down}.weight"),
        }
    }
}

/// A layer's routed experts as gpt-oss stores them, every expert in one
/// tensor per projection, input-major: `gate_up` `[experts, hidden, 2 ×
/// width]` (gate and up interleaved: gate at even columns), its bias
/// `[experts, 2 × width]`, `down` `[experts, width, hidden]`, its bias
/// `[experts, hidden]`. An MXFP4 checkpoint stores each weight `name` as
/// `{name}_blocks` (`[experts, outputs, inner / 32, 16]` bytes, two E2M1
/// values each, the low nibble first) and `{name}_scales` (`[experts,
/// outputs, inner / 32]`, E8M0): output-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedExperts {
    pub gate_up: String,
    pub gate_up_bias: String,
    pub down: String,
    pub down_bias: String,
}

impl ExpertTensors {
    /// The `gate_proj`, `up_proj` and `down_proj` weights under `prefix`.
    fn projections(prefix: &str) -> Self {
        Self {
            gate: format!("{prefix}.gate_proj.weight"),
            up: format!("{prefix}.up_proj.weight"),
            down: format!("{prefix}.down_proj.weight"),
        }
    }

    /// A dense layer's MLP (`model.layers.{l}.mlp`).
    pub fn dense_mlp(layer: usize) -> Self {
        Self::projections(&format!("model.layers.{layer}.mlp"))
    }

    /// The gate, down and up projections of a SwiGLU of `width` over
    /// `hidden`, in that order, with their shapes and roles.
    fn parts(self, width: usize, hidden: usize) -> [(String, [usize; 2], TensorRole); 3] {
        [
            (self.gate, [width, hidden], TensorRole::Reads),
            (self.down, [hidden, width], TensorRole::Writes),
            (self.up, [width, hidden], TensorRole::Reads),
        ]
    }
}

impl Family {
    /// The shared expert of layer `layer`, every token's.
    pub fn shared_expert_tensors(self, layer: usize) -> ExpertTensors {
        let name = match self {
            Family::DeepseekV2 | Family::DeepseekV3 => "shared_experts",
            _ => "shared_expert",
        };
        ExpertTensors::projections(&format!("{}.{name}", self.moe_block(layer)))
    }

    /// The gate's correction bias of layer `layer`, `[experts]` (DeepSeek-V3).
    pub fn gate_correction_bias_tensor(self, layer: usize) -> String {
        format!("{}.gate.e_score_correction_bias", self.moe_block(layer))
    }

    /// The shared expert's sigmoid gate of layer `layer`, `[1, hidden]`.
    pub fn shared_expert_gate_tensor(self, layer: usize) -> String {
        format!("{}.shared_expert_gate.weight", self.moe_block(layer))
    }
}

/// What a tensor is to the residual stream, the one sum every layer reads
/// and adds to: enough to draw a checkpoint's weights and to bias its
/// routers (gen-model) without knowing any family's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// The token embeddings `[vocab, hidden]`: the stream's first value
    /// (and the lm_head when tied).
    Embeddings,
    /// An RMSNorm's scale: each layer's input norm, q/k norms, the final norm.
    Norm,
    /// A layer's post-attention norm: what its feed-forward, the router's
    /// gate included, reads the stream through.
    FeedForwardNorm,
    /// A projection of the normed stream (weight `[out, hidden]`, bias
    /// `[out]`): q, k and v, a dense MLP's, an expert's and the shared
    /// expert's gate and up projections, the shared expert's gate, lm_head.
    Reads,
    /// A projection whose output is added to the stream (weight `[hidden,
    /// in]`, bias `[hidden]`): o and every down projection.
    Writes,
    /// A projection of another projection's normed output, not of the
    /// stream: latent attention's `q_b_proj` and `kv_b_proj`.
    Inner,
    /// A gate's correction of its scores, `[experts]` (DeepSeek-V3's
    /// `e_score_correction_bias`).
    GateCorrection,
    /// The router's gate of a routed layer, `[experts, hidden]`.
    RouterGate { layer: usize },
    /// The router's bias, `[experts]` (gpt-oss).
    RouterBias,
    /// Attention sinks, a logit per head (gpt-oss).
    Sinks,
    /// A layer's fused experts (gpt-oss): a weight `[experts, in, out]`
    /// or a bias `[experts, out]`, of a projection that reads the normed
    /// stream (gate/up) or writes to the stream (down).
    Experts { writes: bool },
}

impl ModelSpec {
    /// Every tensor of the checkpoint (the tied lm_head left out), sorted by name.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out: Vec<TensorSpec> = self
            .tensors_layer_by_layer()
            .into_iter()
            .map(|(tensor, _)| tensor)
            .collect();
        out.sort();
        out
    }

    /// Every tensor of the checkpoint (the tied lm_head left out) with its
    /// role, layer by layer: the embeddings; per layer its input norm, the
    /// q, k, v and o projections (each weight before its bias), the q/k
    /// norms, the post-attention norm, then its feed-forward (the router's
    /// gate, then each expert in turn, the shared expert and its gate; an
    /// MLP's or an expert's gate, down and up projections in that order,
    /// Mixtral's w1, w2, w3); the final norm; lm_head. The order gen-model
    /// draws random weights in, so a checkpoint's values follow from its seed.
    pub fn tensors_layer_by_layer(&self) -> Vec<(TensorSpec, TensorRole)> {
        let mut out = Vec::new();
        let mut add = |name: String, shape: &[usize], role: TensorRole| {
            out.push((
                TensorSpec {
                    name,
                    shape: shape.to_vec(),
                },
                role,
            ))
        };
        let (h, a) = (self.hidden_size, &self.attention);
        let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        add(
            "model.embed_tokens.weight".into(),
            &[self.vocab_size, h],
            TensorRole::Embeddings,
        );
        let family = self.family;
        for (l, ffn) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            add(
                format!("{p}.input_layernorm.weight"),
                &[h],
                TensorRole::Norm,
            );
            if let Some(latent) = &a.latent {
                latent_attention_tensors(&mut add, &p, (h, a.heads), latent);
            } else {
                for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                    add(
                        format!("{p}.self_attn.{proj}.weight"),
                        &[rows, h],
                        TensorRole::Reads,
                    );
                    if a.qkv_bias {
                        add(
                            format!("{p}.self_attn.{proj}.bias"),
                            &[rows],
                            TensorRole::Reads,
                        );
                    }
                }
                add(
                    format!("{p}.self_attn.o_proj.weight"),
                    &[h, q],
                    TensorRole::Writes,
                );
                if a.o_bias {
                    add(
                        format!("{p}.self_attn.o_proj.bias"),
                        &[h],
                        TensorRole::Writes,
                    );
                }
                if a.sinks {
                    add(
                        format!("{p}.self_attn.sinks"),
                        &[a.heads],
                        TensorRole::Sinks,
                    );
                }
                let norms = match a.qk_norm {
                    QkNorm::None => None,
                    QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
                    QkNorm::WholeProjection => Some((q, kv)),
                };
                if let Some((q_norm, k_norm)) = norms {
                    add(
                        format!("{p}.self_attn.q_norm.weight"),
                        &[q_norm],
                        TensorRole::Norm,
                    );
                    add(
                        format!("{p}.self_attn.k_norm.weight"),
                        &[k_norm],
                        TensorRole::Norm,
                    );
                }
            }
            add(
                format!("{p}.post_attention_layernorm.weight"),
                &[h],
                TensorRole::FeedForwardNorm,
            );
            match ffn {
                FfnSpec::Dense { width } => {
                    for (name, shape, role) in ExpertTensors::dense_mlp(l).parts(*width, h) {
                        add(name, &shape, role);
                    }
                }
                FfnSpec::Moe(moe) => {
                    add(
                        family.gate_tensor(l),
                        &[moe.experts, h],
                        TensorRole::RouterGate { layer: l },
                    );
                    if moe.router_bias {
                        add(
                            family.router_bias_tensor(l),
                            &[moe.experts],
                            TensorRole::RouterBias,
                        );
                    }
                    if matches!(moe.gate, Gate::Grouped(g) if g.correction_bias) {
                        add(
                            family.gate_correction_bias_tensor(l),
                            &[moe.experts],
                            TensorRole::GateCorrection,
                        );
                    }
                    if family.fuses_experts() {
                        let fused = family.fused_expert_tensors(l);
                        let (e, w) = (moe.experts, moe.width);
                        let reads = TensorRole::Experts { writes: false };
                        let writes = TensorRole::Experts { writes: true };
                        add(fused.gate_up, &[e, h, 2 * w], reads);
                        add(fused.gate_up_bias, &[e, 2 * w], reads);
                        add(fused.down, &[e, w, h], writes);
                        add(fused.down_bias, &[e, h], writes);
                    }
                    for e in (0..moe.experts).filter(|_| !family.fuses_experts()) {
                        for (name, shape, role) in family.expert_tensors(l, e).parts(moe.width, h) {
                            add(name, &shape, role);
                        }
                    }
                    if let Some(shared) = moe.shared {
                        let parts = family.shared_expert_tensors(l).parts(shared.width, h);
                        for (name, shape, role) in parts {
                            add(name, &shape, role);
                        }
                        if shared.sigmoid_gate {
                            add(
                                family.shared_expert_gate_tensor(l),
                                &[1, h],
                                TensorRole::Reads,
                            );
                        }
                    }
                }
            }
        }
        add("model.norm.weight".into(), &[h], TensorRole::Norm);
        if !self.tie_word_embeddings {
            add(
                "lm_head.weight".into(),
                &[self.vocab_size, h],
                TensorRole::Reads,
            );
        }
        out
    }
}

/// Latent attention's tensors under `p` (a layer), for `heads` query heads
/// over `hidden`: the queries' projection (one, or `q_a_proj`, its norm and
/// `q_b_proj`), `kv_a_proj_with_mqa`, its norm, `kv_b_proj`, `o_proj`; each
/// weight before its bias.
fn latent_attention_tensors(
    add: &mut impl FnMut(String, &[usize], TensorRole),
    p: &str,
    (h, heads): (usize, usize),
    latent: &LatentAttention,
) {
    let attn = |name: &str| format!("{p}.self_attn.{name}");
    let q = heads * latent.qk_dim();
    match latent.q_lora_rank {
        None => add(attn("q_proj.weight"), &[q, h], TensorRole::Reads),
        Some(rank) => {
            add(attn("q_a_proj.weight"), &[rank, h], TensorRole::Reads);
            if latent.bias {
                add(attn("q_a_proj.bias"), &[rank], TensorRole::Reads);
            }
            add(attn("q_a_layernorm.weight"), &[rank], TensorRole::Norm);
            add(attn("q_b_proj.weight"), &[q, rank], TensorRole::Inner);
        }
    }
    let cached = latent.cached_width();
    add(
        attn("kv_a_proj_with_mqa.weight"),
        &[cached, h],
        TensorRole::Reads,
    );
    if latent.bias {
        add(
            attn("kv_a_proj_with_mqa.bias"),
            &[cached],
            TensorRole::Reads,
        );
    }
    let rank = latent.kv_lora_rank;
    add(attn("kv_a_layernorm.weight"), &[rank], TensorRole::Norm);
    add(
        attn("kv_b_proj.weight"),
        &[heads * (latent.nope_dim + latent.v_dim), rank],
        TensorRole::Inner,
    );
    add(
        attn("o_proj.weight"),
        &[h, heads * latent.v_dim],
        TensorRole::Writes,
    );
    if latent.bias {
        add(attn("o_proj.bias"), &[h], TensorRole::Writes);
    }
}
