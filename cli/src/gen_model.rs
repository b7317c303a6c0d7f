//! `tramontane gen-model`: a Hugging Face-format Mixtral checkpoint with
//! deterministic random weights and the real Mistral tokenizer (see
//! `tramontane_synthetic` for what it writes and the skewed gates).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tramontane_model::Dtype;
use tramontane_synthetic::{Preset, Spec};

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
    pub dtype: Option<Dtype>,
    /// Split the weights over this many safetensors files with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Skew of the gates, a Zipf exponent (0: none, the default). Each layer's
    /// router gets a logit bias of -X·ln(1+r) (in units of its logits' spread)
    /// for the expert of popularity rank r; the ranks are the same in every
    /// layer: 0, 4, 2, 6, 1, 5, 3, 7 for 8 experts (ids sorted by e mod 2,
    /// then e mod 4, ...). X = 1 gives the hottest expert about 3× the mean
    /// load, X = 2 about 3.8×. The last hidden coordinate carries the bias.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub expert_skew: f64,
    /// Python with transformers and mistral-common, used to convert the tokenizer.
    #[arg(long, env = "TRAMONTANE_PYTHON")]
    pub python: Option<PathBuf>,
}

impl GenModelArgs {
    fn spec(&self) -> Spec {
        Spec {
            preset: self.preset,
            seed: self.seed,
            experts: self.experts,
            top_k: self.top_k,
            layers: self.layers,
            hidden: self.hidden,
            intermediate: self.intermediate,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
            max_position: self.max_position,
            tie_embeddings: self.tie_embeddings,
            dtype: self.dtype,
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
