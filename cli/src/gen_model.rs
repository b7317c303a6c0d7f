//! `tramontane gen-model`: writes a Hugging Face-format Mixtral checkpoint with
//! deterministic random weights and the real Mistral tokenizer, for demos,
//! tests and benchmarks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, View};
use serde_json::json;
use tch::{Kind, Tensor};
use tramontane_model::MixtralConfig;

use crate::options::WeightDtype;

/// Converts the tokenizer shipped in mistral-common to tokenizer.json.
const CONVERT_TOKENIZER: &str = include_str!("../../scripts/convert_tokenizer.py");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// hidden 64, intermediate 128, 2 layers, 8 experts top-2, 4 heads / 2 kv heads: for tests.
    Tiny,
    /// hidden 1024, intermediate 3584, 8 layers, 8 experts top-2, 16 heads / 4 kv heads: for benchmarks.
    Bench,
}

#[derive(Debug, Args)]
pub struct GenModelArgs {
    /// Shape of the model.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Folder to write the checkpoint into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights: the same seed writes the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of experts per layer (overrides the preset).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token (overrides the preset).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Number of decoder layers (overrides the preset).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size (overrides the preset).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert intermediate size (overrides the preset).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads (overrides the preset).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (overrides the preset).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension, when not hidden / heads.
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Sliding attention window in tokens (none by default).
    #[arg(long)]
    pub sliding_window: Option<usize>,
    /// max_position_embeddings (overrides the preset).
    #[arg(long)]
    pub max_position: Option<usize>,
    /// Tie lm_head to the token embeddings (no lm_head.weight is written).
    #[arg(long)]
    pub tie_embeddings: bool,
    /// dtype of the stored weights.
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// Split the weights over this many safetensors files with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Python with transformers and mistral-common, used to convert the tokenizer.
    #[arg(long, env = "TRAMONTANE_PYTHON")]
    pub python: Option<PathBuf>,
}

impl GenModelArgs {
    /// The demo checkpoint `serve` generates when no model is given.
    pub fn demo(out: PathBuf) -> Self {
        Self {
            preset: Preset::Tiny,
            out,
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
            python: None,
        }
    }

    fn config(&self) -> Result<MixtralConfig> {
        let (hidden, intermediate, layers, heads, kv_heads, theta, max_pos, dtype) =
            match self.preset {
                Preset::Tiny => (64, 128, 2, 4, 2, 1e6, 1024, WeightDtype::F32),
                Preset::Bench => (1024, 3584, 8, 16, 4, 1e6, 32768, WeightDtype::Bf16),
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
            eos_token_id: Some(tramontane_model::config::TokenIds::One(2)),
        };
        config.validate()?;
        ensure!(self.shards >= 1, "--shards must be at least 1");
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

/// A tensor's bytes ready for the safetensors writer.
struct StoredTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &StoredTensor {
    fn dtype(&self) -> Dtype {
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

fn stored(tensor: &Tensor, dtype: WeightDtype) -> StoredTensor {
    let t = tensor.to_kind(dtype.kind()).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, numel);
    StoredTensor {
        dtype: dtype.safetensors(),
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    }
}

pub fn run(args: &GenModelArgs) -> Result<()> {
    let config = args.config()?;
    let dtype = WeightDtype::from_hf_name(config.torch_dtype.as_deref().unwrap_or("float32"))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_config(&args.out, &config)?;
    write_weights(&args.out, &config, dtype, args.seed, args.shards)?;
    write_tokenizer(&args.out, args.python.as_deref())?;
    Ok(())
}

fn write_config(out: &Path, config: &MixtralConfig) -> Result<()> {
    let mut value = serde_json::to_value(config)?;
    let extra = json!({
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "use_cache": true,
    });
    value
        .as_object_mut()
        .context("config serialises to an object")?
        .extend(extra.as_object().cloned().unwrap_or_default());
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&value)?,
    )?;
    let generation = json!({"bos_token_id": 1, "eos_token_id": 2});
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?,
    )?;
    Ok(())
}

fn write_weights(
    out: &Path,
    config: &MixtralConfig,
    dtype: WeightDtype,
    seed: u64,
    shards: usize,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
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
            (name, stored(&t, dtype))
        })
        .collect();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    for stale in std::fs::read_dir(out)? {
        let path = stale?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("model")
            && (name.ends_with(".safetensors") || name.ends_with(".index.json"))
        {
            std::fs::remove_file(&path)?;
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
    ensure!(
        shards <= tensors.len(),
        "--shards {shards} is more than the {} tensors of this checkpoint",
        tensors.len()
    );
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
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}

fn write_tokenizer(out: &Path, python: Option<&Path>) -> Result<()> {
    let python = python.map(Path::to_path_buf).unwrap_or_else(default_python);
    let status = Command::new(&python)
        .arg("-c")
        .arg(CONVERT_TOKENIZER)
        .arg(out)
        .status()
        .with_context(|| format!("running {} to convert the tokenizer", python.display()))?;
    ensure!(
        status.success(),
        "{} could not write the tokenizer (it needs transformers, sentencepiece and mistral-common: run `make setup`, or pass --python)",
        python.display()
    );
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
