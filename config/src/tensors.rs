//! The tensors of a checkpoint, as each family's transformers class names
//! and shapes them (`model.layers.{l}.self_attn.q_proj.weight`, ...): what
//! loading reads and gen-model writes. The family decides the names of the
//! routed experts and their gate; everything else follows the spec.

use crate::spec::{Family, FfnSpec, ModelSpec, QkNorm};

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
            Family::Qwen3Moe | Family::Qwen2Moe | Family::Olmoe => {
                format!("model.layers.{layer}.mlp")
            }
        }
    }

    /// The router gate's weight of layer `layer`, `[experts, hidden]`.
    pub fn gate_tensor(self, layer: usize) -> String {
        format!("{}.gate.weight", self.moe_block(layer))
    }

    /// The weights of expert `expert` of layer `layer`.
    pub fn expert_tensors(self, layer: usize, expert: usize) -> ExpertTensors {
        let (gate, up, down) = match self {
            Family::Mixtral => ("w1", "w3", "w2"),
            Family::Qwen3Moe | Family::Qwen2Moe | Family::Olmoe => {
                ("gate_proj", "up_proj", "down_proj")
            }
        };
        let expert = format!("{}.experts.{expert}", self.moe_block(layer));
        ExpertTensors {
            gate: format!("{expert}.{gate}.weight"),
            up: format!("{expert}.{up}.weight"),
            down: format!("{expert}.{down}.weight"),
        }
    }
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
}

impl Family {
    /// The shared expert of layer `layer`, every token's.
    pub fn shared_expert_tensors(self, layer: usize) -> ExpertTensors {
        ExpertTensors::projections(&format!("{}.shared_expert", self.moe_block(layer)))
    }

    /// The shared expert's sigmoid gate of layer `layer`, `[1, hidden]`.
    pub fn shared_expert_gate_tensor(self, layer: usize) -> String {
        format!("{}.shared_expert_gate.weight", self.moe_block(layer))
    }
}

impl ModelSpec {
    /// Every tensor of the checkpoint (the tied lm_head left out), sorted by name.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let mut add = |name: String, shape: &[usize]| {
            out.push(TensorSpec {
                name,
                shape: shape.to_vec(),
            })
        };
        let (h, a) = (self.hidden_size, &self.attention);
        let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        add("model.embed_tokens.weight".into(), &[self.vocab_size, h]);
        add("model.norm.weight".into(), &[h]);
        if !self.tie_word_embeddings {
            add("lm_head.weight".into(), &[self.vocab_size, h]);
        }
        let family = self.family;
        for (l, ffn) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), &[h]);
            add(format!("{p}.post_attention_layernorm.weight"), &[h]);
            for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                add(format!("{p}.self_attn.{proj}.weight"), &[rows, h]);
                if a.qkv_bias {
                    add(format!("{p}.self_attn.{proj}.bias"), &[rows]);
                }
            }
            add(format!("{p}.self_attn.o_proj.weight"), &[h, q]);
            if a.o_bias {
                add(format!("{p}.self_attn.o_proj.bias"), &[h]);
            }
            let norms = match a.qk_norm {
                QkNorm::None => None,
                QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
                QkNorm::WholeProjection => Some((q, kv)),
            };
            if let Some((q_norm, k_norm)) = norms {
                add(format!("{p}.self_attn.q_norm.weight"), &[q_norm]);
                add(format!("{p}.self_attn.k_norm.weight"), &[k_norm]);
            }
            match ffn {
                FfnSpec::Dense { width } => {
                    let mlp = ExpertTensors::dense_mlp(l);
                    add(mlp.gate, &[*width, h]);
                    add(mlp.up, &[*width, h]);
                    add(mlp.down, &[h, *width]);
                }
                FfnSpec::Moe(moe) => {
                    add(family.gate_tensor(l), &[moe.experts, h]);
                    for e in 0..moe.experts {
                        let expert = family.expert_tensors(l, e);
                        add(expert.gate, &[moe.width, h]);
                        add(expert.up, &[moe.width, h]);
                        add(expert.down, &[h, moe.width]);
                    }
                    if let Some(shared) = moe.shared {
                        let s = family.shared_expert_tensors(l);
                        add(s.gate, &[shared.width, h]);
                        add(s.up, &[shared.width, h]);
                        add(s.down, &[h, shared.width]);
                        if shared.sigmoid_gate {
                            add(family.shared_expert_gate_tensor(l), &[1, h]);
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }
}
