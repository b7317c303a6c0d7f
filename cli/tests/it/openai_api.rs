//! The OpenAI-compatible HTTP API through the official `openai` Python
//! client: `tramontane serve --workers 2` on a generated tiny checkpoint, and
//! the pytest suite in `tests/openai/` against it (completions and chat,
//! streamed and not, usage, stop strings, seeds, logprobs, logit bias,
//! control-token strings in chat content, error bodies for bad input, batch
//! invariance under concurrency, client disconnects, structured outputs,
//! tool calls).

use std::path::Path;

use anyhow::{Context, Result};

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

/// Tool calls in the Hermes format: a Qwen3-MoE checkpoint with Qwen's chat
/// template (tools, `<tool_call>` blocks), served over two workers, through
/// the suite's tool-call tests; the prompt of a conversation with tools,
/// calls and results is transformers' apply_chat_template's.
#[test]
fn tool_calls_through_a_qwen_template_are_hermes_blocks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(
        &model,
        &["--family", "qwen3_moe", "--preset", "tiny", "--seed", "3"],
    )?;
    let serve = support::serve_two_workers(&model, &["--served-model-name", "tramontane-qwen"])?;
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/test_tool_calls.py");
    support::pytest(
        &suite,
        &[
            ("TRAMONTANE_HTTP", &serve.http),
            ("TRAMONTANE_MODEL_NAME", "tramontane-qwen"),
            ("TRAMONTANE_TOOL_FORMAT", "hermes"),
            (
                "TRAMONTANE_MODEL_DIR",
                model.to_str().context("model path")?,
            ),
        ],
    )
}
