//! `tramontane gen-model`: a Hugging Face-format checkpoint of any served
//! family with deterministic random weights and the real Mistral tokenizer
//! (see `tramontane_synthetic` for what it writes and the skewed gates).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use tramontane_config::Family;
use tramontane_model::Dtype;
use tramontane_synthetic::{Preset, Spec};

#[derive(Debug, Args)]
pub struct GenModelArgs {
    /// The model family: its config.json, tensor names and presets.
    #[arg(long, default_value = "mixtral", value_parser = family_parser())]
    pub family: Family,
    /// Shape of the model (the family's; bench-fine: qwen3_moe and olmoe).
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Folder to write the checkpoint into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights: the same seed writes the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of routed experts per layer (overrides the preset).
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
    /// config.json's intermediate_size: the experts' width (mixtral, olmoe)
    /// or the dense MLP layers' (qwen3_moe, qwen2_moe).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Routed experts' width, moe_intermediate_size (qwen3_moe, qwen2_moe).
    #[arg(long)]
    pub moe_width: Option<usize>,
    /// Shared expert's width, shared_expert_intermediate_size (qwen2_moe).
    #[arg(long)]
    pub shared_expert_width: Option<usize>,
    /// Dense MLP layers among the routed ones, mlp_only_layers, e.g. 0,2
    /// (qwen3_moe, qwen2_moe).
    #[arg(long, value_delimiter = ',')]
    pub dense_layers: Option<Vec<usize>>,
    /// Route only layers l with (l + 1) a multiple of N, decoder_sparse_step
    /// (qwen3_moe, qwen2_moe).
    #[arg(long)]
    pub sparse_step: Option<usize>,
    /// Divide the top-k weights by their sum, norm_topk_prob (qwen3_moe,
    /// qwen2_moe, olmoe; mixtral always does).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub norm_topk_prob: Option<bool>,
    /// Biases of q, k, v and o, attention_bias (qwen3_moe, olmoe).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub attention_bias: Option<bool>,
    /// Biases of q, k and v, qkv_bias (qwen2_moe; its presets have them).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub qkv_bias: Option<bool>,
    /// Clamp q, k and v to ±X after their projections, clip_qkv (olmoe).
    #[arg(long)]
    pub clip_qkv: Option<f64>,
    /// Attention heads (overrides the preset).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (overrides the preset).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension, when not hidden / heads (mixtral, qwen3_moe, gpt_oss).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Sliding attention window in tokens (mixtral: none by default;
    /// gpt_oss: its windowed layers').
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
    pub dtype: Option<Dtype>,
    /// Store the routed experts in MXFP4 as released gpt-oss checkpoints do
    /// (gpt_oss).
    #[arg(long)]
    pub mxfp4: bool,
    /// Split the weights over this many safetensors files with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Skew of the gates, a Zipf exponent (0: none, the default). Each routed
    /// layer's router gets a logit bias of -X·ln(1+r) (in units of its
    /// logits' spread) for the expert of popularity rank r; the ranks are the
    /// same in every layer: 0, 4, 2, 6, 1, 5, 3, 7 for 8 experts (ids sorted
    /// by e mod 2, then e mod 4, ...). X = 1 gives the hottest expert about
    /// 3× the mean load, X = 2 about 3.8× (8 experts top-2). The last hidden
    /// coordinate carries the bias.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub expert_skew: f64,
    /// Python with transformers and mistral-common, used to convert the tokenizer.
    #[arg(long, env = "TRAMONTANE_PYTHON")]
    pub python: Option<PathBuf>,
}

/// `--family` by the families' config.json `model_type`.
fn family_parser() -> impl TypedValueParser<Value = Family> {
    PossibleValuesParser::new(Family::ALL.map(Family::model_type)).map(|name| {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == name)
            .expect("a possible value is a family")
    })
}

impl GenModelArgs {
    fn spec(&self) -> Spec {
        Spec {
            family: self.family,
            preset: self.preset,
            seed: self.seed,
            experts: self.experts,
            top_k: self.top_k,
            layers: self.layers,
            hidden: self.hidden,
            intermediate: self.intermediate,
            moe_width: self.moe_width,
            shared_expert_width: self.shared_expert_width,
            dense_layers: self.dense_layers.clone(),
            sparse_step: self.sparse_step,
            norm_topk_prob: self.norm_topk_prob,
            attention_bias: self.attention_bias,
            qkv_bias: self.qkv_bias,
            clip_qkv: self.clip_qkv,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
            max_position: self.max_position,
            tie_embeddings: self.tie_embeddings,
            dtype: self.dtype,
            mxfp4: self.mxfp4,
            shards: self.shards,
            expert_skew: self.expert_skew,
            python: self.python.clone(),
        }
    }
}

pub fn run(args: &GenModelArgs) -> Result<()> {
    tramontane_synthetic::write(&args.out, &args.spec())?;
    Ok(())
}
