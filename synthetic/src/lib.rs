//! # tramontane-synthetic
//!
//! Writes a Hugging Face-format Mixtral checkpoint with deterministic random
//! weights and the real Mistral tokenizer, for demos, tests and benchmarks
//! (`tramontane gen-model`, `serve`'s demo model, the tests' checkpoints):
//! [`Spec`] says what to write, [`write`] writes it.
//!
//! # Skewed gates (`--expert-skew X`)
//!
//! Random gates spread tokens about evenly over the experts; capacity planning
//! needs checkpoints whose gates prefer some experts, as trained ones do. With
//! `X > 0` the weights keep their shapes and keys (a plain HF Mixtral
//! checkpoint), but the last hidden coordinate becomes a constant "bias
//! feature" that every router reads:
//!
//! - every token embedding holds 1 there, and no layer writes to it (that row
//!   of every `o_proj` and `w2` is 0), so the residual stream carries it
//!   unchanged to every layer;
//! - no other weight reads it (that column of `q/k/v_proj`, `w1`, `w3` and
//!   `lm_head` is 0), so attention, the experts and the logits ignore it
//!   (with `--tie-embeddings` it adds the same to every token's logit);
//! - column `h-1` of every `gate.weight` is then a per-expert logit bias: the
//!   expert of popularity rank r (0 = hottest) gets `-X · ln(1 + r)` times
//!   the spread (standard deviation) of the token-dependent part of the
//!   logits. Alone, that bias makes the gate's softmax ∝ `(1 + r)^-X`: X is
//!   a Zipf exponent. The spread grows with depth, so the bias is scaled per
//!   layer (see [`residual_rms`]) and the skew is about the same in every
//!   layer.
//!
//! Measured on the presets (8 experts top-2, 1024 pseudo-random tokens; load
//! of each expert ÷ the mean load, hottest first, range over layers):
//!
//! | X   | 0         | 4         | 2         | 6         | 1         | 5         | 3         | 7         |
//! |-----|-----------|-----------|-----------|-----------|-----------|-----------|-----------|-----------|
//! | 0.5 | 1.8 - 2.2 | 1.3 - 1.6 | 0.9 - 1.4 | 0.7 - 1.1 | 0.5 - 0.8 | 0.6 - 0.9 | 0.4 - 0.8 | 0.5 - 0.8 |
//! | 1   | 2.7 - 3.1 | 1.7 - 2.0 | 0.9 - 1.3 | 0.5 - 1.0 | 0.3 - 0.6 | 0.3 - 0.5 | 0.2 - 0.5 | 0.2 - 0.3 |
//! | 2   | 3.8       | 2.3 - 2.7 | 0.8 - 1.1 | 0.3 - 0.5 | 0.1 - 0.2 | 0.0 - 0.2 | 0.0 - 0.1 | 0.0       |
//!
//! (the most a top-2 expert of 8 can get is 4×). With X = 1 and the default
//! placement on 2 workers, worker 0 computes 80-85% of the expert rows.
//!
//! The popularity order is the same in every layer: expert ids sorted by
//! their bits read from the lowest (by `e mod 2`, then `e mod 4`, `e mod 8`,
//! ...), i.e. 0, 4, 2, 6, 1, 5, 3, 7 for 8 experts. So the default placement
//! "expert e on worker e mod W" puts the E/W hottest experts together on
//! worker 0 whenever W is a power of two: the worst case a load-aware
//! placement should fix. `X = 0` writes exactly the weights of an unskewed
//! checkpoint.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::View;
use serde_json::json;
use tch::{Kind, Tensor};
use tramontane_config::{ConfigError, Dtype, MixtralConfig, TokenIds};

/// Converts the tokenizer shipped in mistral-common to tokenizer.json.
const CONVERT_TOKENIZER: &str = include_str!("../../scripts/convert_tokenizer.py");

/// Why a checkpoint cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Spec(String),
    #[error("writing {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("writing safetensors")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("{}: {reason}", python.display())]
    Tokenizer { python: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, SyntheticError>;

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(SyntheticError::Spec(message()))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyntheticError + '_ {
    move |error| SyntheticError::Io {
        path: path.to_owned(),
        error,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Preset {
    /// hidden 64, intermediate 128, 2 layers, 8 experts top-2, 4 heads / 2 kv heads: for tests.
    Tiny,
    /// hidden 1024, intermediate 3584, 8 layers, 8 experts top-2, 16 heads / 4 kv heads: for benchmarks.
    Bench,
}

/// What checkpoint to write: a preset's shape, with any field overridden.
/// `Spec::default()` is the tiny preset: the demo and test checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub preset: Preset,
    /// Seed of the random weights: the same seed writes the same weights.
    pub seed: u64,
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub intermediate: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    /// Head dimension, when not hidden / heads.
    pub head_dim: Option<usize>,
    pub sliding_window: Option<usize>,
    pub max_position: Option<usize>,
    /// Tie lm_head to the token embeddings (no lm_head.weight is written).
    pub tie_embeddings: bool,
    /// dtype of the stored weights (default: the preset's).
    pub dtype: Option<Dtype>,
    /// Split the weights over this many safetensors files with an index.
    pub shards: usize,
    /// Skew of the gates, a Zipf exponent (0: none); see the crate docs.
    pub expert_skew: f64,
    /// Python with transformers and mistral-common, used to convert the
    /// tokenizer (default: the project's `.venv`).
    pub python: Option<PathBuf>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            preset: Preset::Tiny,
            seed: 0,
            experts: None,
            top_k: None,
            layers: None,
            hidden: None,
            intermediate: None,
            heads: None,
            kv_heads: None,
            head_dim: None,
            sliding_window: None,
            max_position: None,
            tie_embeddings: false,
            dtype: None,
            shards: 1,
            expert_skew: 0.0,
            python: None,
        }
    }
}

impl Spec {
    /// The preset's shape, no override.
    pub fn preset(preset: Preset) -> Self {
        Self {
            preset,
            ..Self::default()
        }
    }

    /// The config.json this spec writes.
    pub fn config(&self) -> Result<MixtralConfig> {
        let (hidden, intermediate, layers, heads, kv_heads, theta, max_pos, dtype) =
            match self.preset {
                Preset::Tiny => (64, 128, 2, 4, 2, 1e6, 1024, Dtype::F32),
                Preset::Bench => (1024, 3584, 8, 16, 4, 1e6, 32768, Dtype::Bf16),
            };
        let config = MixtralConfig {
            architectures: vec!["MixtralForCausalLM".into()],
            model_type: Some("mixtral".into()),
            hidden_size: self.hidden.unwrap_or(hidden),
            intermediate_size: self.intermediate.unwrap_or(intermediate),
            num_hidden_layers: self.layers.unwrap_or(layers),
            num_attention_heads: self.heads.unwrap_or(heads),
            num_key_value_heads: Some(self.kv_heads.unwrap_or(kv_heads)),
            head_dim: self.head_dim,
            num_local_experts: self.experts.unwrap_or(8),
            num_experts_per_tok: self.top_k.unwrap_or(2),
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            max_position_embeddings: self.max_position.unwrap_or(max_pos),
            sliding_window: self.sliding_window,
            vocab_size: 32000,
            tie_word_embeddings: self.tie_embeddings,
            torch_dtype: Some(self.dtype.unwrap_or(dtype).hf_name().into()),
            hidden_act: "silu".into(),
            rope_scaling: None,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
        };
        config.validate()?;
        ensure(self.shards >= 1, || "--shards must be at least 1".into())?;
        ensure(
            self.expert_skew.is_finite() && self.expert_skew >= 0.0,
            || {
                format!(
                    "--expert-skew must be a finite number >= 0 (0: no skew), got {}",
                    self.expert_skew
                )
            },
        )?;
        ensure(self.expert_skew == 0.0 || config.hidden_size >= 2, || {
            "--expert-skew needs a hidden size of at least 2 (one coordinate carries the bias)"
                .into()
        })?;
        Ok(config)
    }
}

/// The checkpoint's tensors in a fixed order with the standard deviation of
/// their random values: about unit-variance activations at every layer, so
/// logits are well spread and greedy choices are not near-ties.
fn tensor_specs(c: &MixtralConfig) -> Vec<(String, Vec<i64>, TensorInit)> {
    let h = c.hidden_size as i64;
    let i = c.intermediate_size as i64;
    let q = (c.num_attention_heads * c.head_dim()) as i64;
    let kv = (c.num_key_value_heads() * c.head_dim()) as i64;
    let v = c.vocab_size as i64;
    let fan_in = |n: i64| TensorInit::Normal(1.0 / (n as f64).sqrt());
    let mut specs = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        TensorInit::Normal(1.0),
    )];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        specs.push((
            format!("{p}.input_layernorm.weight"),
            vec![h],
            TensorInit::NormScale,
        ));
        specs.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            fan_in(h),
        ));
        specs.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            fan_in(h),
        ));
        specs.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            fan_in(h),
        ));
        specs.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            fan_in(q),
        ));
        specs.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            TensorInit::NormScale,
        ));
        specs.push((
            format!("{p}.block_sparse_moe.gate.weight"),
            vec![c.num_local_experts as i64, h],
            fan_in(h),
        ));
        for e in 0..c.num_local_experts {
            let ep = format!("{p}.block_sparse_moe.experts.{e}");
            specs.push((format!("{ep}.w1.weight"), vec![i, h], fan_in(h)));
            specs.push((format!("{ep}.w2.weight"), vec![h, i], fan_in(i)));
            specs.push((format!("{ep}.w3.weight"), vec![i, h], fan_in(h)));
        }
    }
    specs.push((
        "model.norm.weight".to_string(),
        vec![h],
        TensorInit::NormScale,
    ));
    if !c.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h], fan_in(h)));
    }
    specs
}

#[derive(Debug, Clone, Copy)]
enum TensorInit {
    Normal(f64),
    /// Around 1, as a trained norm's scale.
    NormScale,
}

/// Expert ids hottest first under `--expert-skew`: sorted by their bits read
/// from the lowest (e mod 2, then e mod 4, ...), so that worker 0 of the
/// default placement (e mod W, W a power of two) gets the hottest ones.
pub fn popularity_order(experts: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..experts).collect();
    ids.sort_by_key(|e| e.reverse_bits());
    ids
}

/// Typical RMS of the residual stream (without the bias feature) at layer
/// `layer`'s router. The embeddings give about 1 and each layer's attention
/// and experts add to it: measured on these random weights (tiny and bench,
/// pseudo-random prompts), it grows by about 0.16 per layer, 1.06 at layer 0
/// and 2.17 at layer 7. The gate's bias is scaled by it so that the skew is
/// about the same in every layer.
fn residual_rms(layer: usize) -> f64 {
    1.06 + 0.16 * layer as f64
}

/// Edits the random weights so that the routers prefer experts in
/// [`popularity_order`] (see the module docs).
struct Skew {
    exponent: f64,
    /// The hidden coordinate holding the constant bias feature.
    channel: i64,
    /// `rank[e]`: popularity rank of expert e, 0 = hottest.
    rank: Vec<usize>,
}

impl Skew {
    fn new(config: &MixtralConfig, exponent: f64) -> Self {
        let mut rank = vec![0; config.num_local_experts];
        for (r, e) in popularity_order(config.num_local_experts)
            .into_iter()
            .enumerate()
        {
            rank[e] = r;
        }
        Self {
            exponent,
            channel: config.hidden_size as i64 - 1,
            rank,
        }
    }

    fn apply(&self, name: &str, t: Tensor) -> Tensor {
        let j = self.channel;
        let reads = [
            ".q_proj.weight",
            ".k_proj.weight",
            ".v_proj.weight",
            ".w1.weight",
            ".w3.weight",
        ];
        if name == "model.embed_tokens.weight" {
            let _ = t.narrow(1, j, 1).fill_(1.0);
        } else if name == "lm_head.weight" || reads.iter().any(|r| name.ends_with(r)) {
            let _ = t.narrow(1, j, 1).fill_(0.0);
        } else if name.ends_with(".o_proj.weight") || name.ends_with(".w2.weight") {
            let _ = t.narrow(0, j, 1).fill_(0.0);
        } else if name.ends_with(".post_attention_layernorm.weight") {
            let _ = t.narrow(0, j, 1).fill_(1.0);
        } else if name.ends_with(".block_sparse_moe.gate.weight") {
            let layer = name
                .strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            // The feature reaches the gate as 1 / rms(x) and the logits'
            // token-dependent part spreads as rms_perp(x) / rms(x).
            let bias: Vec<f32> = self
                .rank
                .iter()
                .map(|&r| (-self.exponent * (1.0 + r as f64).ln() * residual_rms(layer)) as f32)
                .collect();
            let column = Tensor::from_slice(&bias).view([bias.len() as i64, 1]);
            t.narrow(1, j, 1).copy_(&column);
        }
        t
    }
}

/// A tensor's bytes ready for the safetensors writer.
struct StoredTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &StoredTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn stored(tensor: &Tensor, dtype: Dtype) -> StoredTensor {
    let (kind, stored) = match dtype {
        Dtype::F32 => (Kind::Float, safetensors::Dtype::F32),
        Dtype::Bf16 => (Kind::BFloat16, safetensors::Dtype::BF16),
        Dtype::F16 => (Kind::Half, safetensors::Dtype::F16),
    };
    let t = tensor.to_kind(kind).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.bytes()];
    t.copy_data_u8(&mut bytes, numel);
    StoredTensor {
        dtype: stored,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    }
}

/// Writes the checkpoint `spec` describes into `out` (created if missing):
/// config.json, generation_config.json, the weights (replacing any there)
/// and the tokenizer.
pub fn write(out: &Path, spec: &Spec) -> Result<()> {
    let config = spec.config()?;
    let dtype = Dtype::from_hf_name(config.torch_dtype.as_deref().unwrap_or("float32"))?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    write_config(out, &config)?;
    let skew = (spec.expert_skew > 0.0).then(|| Skew::new(&config, spec.expert_skew));
    write_weights(out, &config, dtype, spec.seed, spec.shards, skew.as_ref())?;
    write_tokenizer(out, spec.python.as_deref())?;
    Ok(())
}

fn write_config(out: &Path, config: &MixtralConfig) -> Result<()> {
    let mut value = serde_json::to_value(config).expect("a config serialises");
    let extra = json!({
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "use_cache": true,
    });
    if let (Some(config), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text).map_err(io(&path))
    };
    write_json("config.json", &value)?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": 1, "eos_token_id": 2}),
    )
}

fn write_weights(
    out: &Path,
    config: &MixtralConfig,
    dtype: Dtype,
    seed: u64,
    shards: usize,
    skew: Option<&Skew>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    // The weights come from libtorch's process-wide generator: the seed and
    // every draw are taken under one lock, so that checkpoints written at
    // once from several threads each get their own seed's weights.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let drawing = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let specs = tensor_specs(config);
    let tensors: Vec<(String, StoredTensor)> = specs
        .into_iter()
        .map(|(name, shape, init)| {
            let t = match init {
                TensorInit::Normal(std) => {
                    Tensor::randn(&shape, (Kind::Float, tch::Device::Cpu)) * std
                }
                TensorInit::NormScale => {
                    Tensor::randn(&shape, (Kind::Float, tch::Device::Cpu)) * 0.1 + 1.0
                }
            };
            // After the draw: the random stream, and so every value the skew
            // leaves alone, is the same as without it.
            let t = match skew {
                Some(skew) => skew.apply(&name, t),
                None => t,
            };
            (name, stored(&t, dtype))
        })
        .collect();
    drop(drawing);
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    for stale in std::fs::read_dir(out).map_err(io(out))? {
        let path = stale.map_err(io(out))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("model")
            && (name.ends_with(".safetensors") || name.ends_with(".index.json"))
        {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    if shards == 1 {
        let views: Vec<(&str, &StoredTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize_to_file(views, metadata, &out.join("model.safetensors"))?;
        return Ok(());
    }
    // Contiguous groups of about equal tensor count, like HF's sharded layout
    // (embeddings first, lm_head last).
    ensure(shards <= tensors.len(), || {
        format!(
            "--shards {shards} is more than the {} tensors of this checkpoint",
            tensors.len()
        )
    })?;
    let total: usize = tensors.iter().map(|(_, t)| t.bytes.len()).sum();
    let groups: Vec<&[(String, StoredTensor)]> = (0..shards)
        .map(|i| &tensors[i * tensors.len() / shards..(i + 1) * tensors.len() / shards])
        .collect();
    let mut weight_map = BTreeMap::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let views: Vec<(&str, &StoredTensor)> =
            group.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize_to_file(views, metadata.clone(), &out.join(&file))?;
        for (name, _) in group.iter() {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = out.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
    std::fs::write(&path, text).map_err(io(&path))
}

fn write_tokenizer(out: &Path, python: Option<&Path>) -> Result<()> {
    let python = python.map(Path::to_path_buf).unwrap_or_else(default_python);
    let status = Command::new(&python)
        .arg("-c")
        .arg(CONVERT_TOKENIZER)
        .arg(out)
        .status()
        .map_err(|e| SyntheticError::Tokenizer {
            python: python.clone(),
            reason: format!("cannot run it to convert the tokenizer: {e}"),
        })?;
    if !status.success() {
        return Err(SyntheticError::Tokenizer {
            python,
            reason: "could not write the tokenizer (it needs transformers, sentencepiece and mistral-common: run `make setup`, or pass --python)".into(),
        });
    }
    Ok(())
}

/// The project's `.venv` when the binary runs from its target folder, else python3.
fn default_python() -> PathBuf {
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        return PathBuf::from(venv).join("bin/python");
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .map(|dir| dir.join(".venv/bin/python"))
            .find(|p| p.exists())
    });
    from_exe.unwrap_or_else(|| PathBuf::from("python3"))
}

#[cfg(test)]
mod skew_tests;
