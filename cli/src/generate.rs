//! `tramontane generate`: greedy continuation of one prompt, in process.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tramontane_model::generate::{StopRule, generate_greedy};
use tramontane_model::model::CausalLm;
use tramontane_model::weights::Checkpoint;
use tramontane_model::{ModelSpec, Tokenizer};
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use tramontane_infra::tls::Tls;

use crate::options::ComputeArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (HF format: config.json, safetensors, tokenizer.json), run in process.
    #[arg(
        long,
        env = "TRAMONTANE_MODEL",
        required_unless_present = "server",
        conflicts_with = "server"
    )]
    pub model: Option<PathBuf>,
    /// A running router (`host:port`) to ask instead, over gRPC moe.v1.Generation.
    #[arg(long)]
    pub server: Option<String>,
    /// The CA that signed the server's certificate: connect over TLS (with --server).
    #[arg(long, requires = "server")]
    pub tls_ca: Option<PathBuf>,
    /// The server's API key, sent as `authorization: Bearer KEY` (with --server).
    #[arg(long, env = "TRAMONTANE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most new tokens to generate (fewer when EOS comes first).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Print one JSON object {"text", "prompt_token_ids", "token_ids"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Serialize)]
struct Output {
    text: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
}

/// Loads config, weights (with a progress bar on stderr) and tokenizer.
pub fn load_model(dir: &std::path::Path, compute: &ComputeArgs) -> Result<(CausalLm, Tokenizer)> {
    let options = compute.load_options()?;
    let config = ModelSpec::from_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut checkpoint = Checkpoint::open(dir)?;
    let bar = ProgressBar::new(checkpoint.stored_bytes(|_| true)).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} {elapsed}")
            .context("progress template")?,
    );
    let ticker = bar.clone();
    checkpoint.set_progress(Box::new(move |bytes| ticker.inc(bytes)));
    let model = CausalLm::from_checkpoint_in_process(&checkpoint, config, options)?;
    bar.finish_and_clear();
    Ok((model, tokenizer))
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    match (&args.model, &args.server) {
        (Some(model), None) => run_in_process(args, model),
        (None, Some(server)) => run_remote(args, server),
        _ => bail!("give either --model or --server"),
    }
}

fn print_output(args: &GenerateArgs, output: Output) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(&output)?);
    } else {
        println!("{}{}", args.prompt, output.text);
    }
    Ok(())
}

fn run_remote(args: &GenerateArgs, server: &str) -> Result<()> {
    let tls = Tls::from_files(None, None, args.tls_ca.as_deref())?;
    let uri = match &tls {
        Some(_) => tramontane_infra::grpc::tls_uri(server),
        None => tramontane_infra::grpc::uri(server),
    };
    let max_tokens = u32::try_from(args.max_tokens).context("--max-tokens is too large")?;
    let response = tokio::runtime::Runtime::new()?.block_on(async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(uri.clone())?;
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.client())?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        let mut client = GenerationClient::new(channel);
        let mut request = tonic::Request::new(GenerateRequest {
            prompt: args.prompt.clone(),
            max_tokens,
            temperature: Some(0.0), // greedy, as in process
            ..Default::default()
        });
        if let Some(key) = &args.api_key {
            let value = format!("Bearer {key}")
                .parse()
                .context("--api-key: not a valid metadata value")?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = client
            .generate(request)
            .await
            .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?;
        anyhow::Ok(response.into_inner())
    })?;
    print_output(
        args,
        Output {
            text: response.text,
            prompt_token_ids: response.prompt_token_ids,
            token_ids: response.token_ids,
        },
    )
}

fn run_in_process(args: &GenerateArgs, model_dir: &std::path::Path) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let (model, tokenizer) = load_model(model_dir, &args.compute)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let limit = model.config().max_position_embeddings;
    if prompt.len() + args.max_tokens > limit {
        bail!(
            "prompt of {} tokens plus --max-tokens {} exceeds the model's context of {limit} positions (max_position_embeddings)",
            prompt.len(),
            args.max_tokens
        );
    }
    let stop = StopRule {
        max_new_tokens: args.max_tokens,
        eos_ids: tokenizer.eos_token_id().into_iter().collect(),
    };
    let token_ids = generate_greedy(&model, std::slice::from_ref(&prompt), &stop)?
        .pop()
        .unwrap_or_default();
    let text = continuation_text(&tokenizer, &prompt, &token_ids)?;
    print_output(
        args,
        Output {
            text,
            prompt_token_ids: prompt,
            token_ids,
        },
    )
}

/// The text the new tokens add to the prompt's text. Decoding them alone would
/// lose the leading space a sentencepiece tokenizer strips from a text's start.
pub fn continuation_text(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    generated: &[u32],
) -> Result<String> {
    let prefix = tokenizer.decode(prompt)?;
    let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let full = tokenizer.decode(&all)?;
    Ok(match full.strip_prefix(&prefix) {
        Some(rest) => rest.to_string(),
        None => tokenizer.decode(generated)?,
    })
}
