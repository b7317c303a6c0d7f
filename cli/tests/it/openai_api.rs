//! The OpenAI-compatible HTTP API through the official `openai` Python
//! client: `tramontane serve --workers 2` on a generated tiny checkpoint, and
//! the pytest suite in `tests/openai/` against it (completions and chat,
//! streamed and not, usage, stop strings, seeds, logprobs, logit bias,
//! control-token strings in chat content, error bodies for bad input, batch
//! invariance under concurrency, client disconnects).

use std::path::Path;

use anyhow::Result;

use crate::support;

#[test]
fn openai_client_suite_passes_against_a_served_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "11"])?;
    let serve = support::serve_two_workers(&model, &["--served-model-name", "tramontane-tiny"])?;
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai");
    support::pytest(
        &suite,
        &[
            ("TRAMONTANE_HTTP", &serve.http),
            ("TRAMONTANE_MODEL_NAME", "tramontane-tiny"),
        ],
    )
}
