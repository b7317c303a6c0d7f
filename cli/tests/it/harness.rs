//! The evaluation harness (lm-evaluation-harness) through its own OpenAI
//! completions model class against `tramontane serve` in f32: its
//! loglikelihood requests (echo, logprobs, token prompts) and a small
//! multiple-choice task written by the test, against transformers'
//! loglikelihoods on the same checkpoint (`tests/harness/`).

use std::path::Path;

use anyhow::{Context, Result};

use crate::support;

#[test]
fn the_harness_loglikelihoods_match_transformers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "23"])?;
    let serve = support::serve_two_workers(
        &model,
        &["--served-model-name", "tramontane-tiny", "--dtype", "f32"],
    )?;
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness");
    let cache = dir.path().join("datasets");
    support::pytest(
        &suite,
        &[
            ("TRAMONTANE_HTTP", &serve.http),
            ("TRAMONTANE_MODEL_NAME", "tramontane-tiny"),
            (
                "TRAMONTANE_MODEL_DIR",
                model.to_str().context("model path")?,
            ),
            ("HF_DATASETS_OFFLINE", "1"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_DATASETS_CACHE", cache.to_str().context("cache path")?),
        ],
    )
}
