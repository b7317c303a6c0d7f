//! Admission and backpressure of the served cluster: the KV pool bounds what
//! the running sequences hold (the newest are preempted and recomputed when
//! it runs out), a full queue refuses with HTTP 429 / gRPC
//! RESOURCE_EXHAUSTED and Retry-After, and every accepted request completes.

use anyhow::{Context, Result, ensure};
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

#[test]
fn kv_bound_and_full_queue_refuse_cleanly_and_lose_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "5"])?;
    // 100 KV positions are 7 blocks of 16. Each request below starts with
    // one block (a 3-token prompt) and ends holding three (3 + 40 tokens):
    // four are admitted by --max-running, two fit to the end, so the newest
    // are preempted and recomputed. Ten arrive at once: however late the
    // engine thread takes them from the queue (a loaded machine may take
    // none before all ten have arrived), at least the queue's four are
    // accepted and at most 4 running + 4 waiting, so some are refused and
    // more than two share steps.
    let serve = support::serve_two_workers(
        &model,
        &[
            "--max-running",
            "4",
            "--max-batch-tokens",
            "16",
            "--max-kv-tokens",
            "100",
            "--queue",
            "4",
        ],
    )?;
    let http_addr = serve.http.clone();

    // More than the KV pool (7 blocks, 112 positions) can ever hold: a 400
    // naming the limit.
    let (status, _, body) = support::http(
        &http_addr,
        "POST",
        "/v1/completions",
        r#"{"model":"model","prompt":"Hello","max_tokens":200}"#,
    )?;
    ensure!(status == 400 && body.contains("112"), "{status} {body}");

    // Ten at once over HTTP: some refused with 429 and Retry-After, the
    // others complete with all their tokens.
    let request =
        r#"{"model":"model","prompt":"Hello","max_tokens":40,"ignore_eos":true,"temperature":0}"#;
    let answers: Vec<(u16, String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| support::http(&http_addr, "POST", "/v1/completions", request)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect::<Result<_>>()
    })?;
    let refused = answers.iter().filter(|a| a.0 == 429).count();
    let served = answers.iter().filter(|a| a.0 == 200).count();
    ensure!(
        refused >= 1 && served >= 4 && refused + served == 10,
        "statuses: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    for (status, head, body) in &answers {
        if *status == 429 {
            ensure!(head.contains("retry-after: 1"), "{head}");
            let error: serde_json::Value = serde_json::from_str(body)?;
            ensure!(error["error"]["type"] == "rate_limit_error", "{body}");
        } else {
            let completion: serde_json::Value = serde_json::from_str(body)?;
            ensure!(completion["usage"]["completion_tokens"] == 40, "{body}");
        }
    }

    // The same over gRPC: RESOURCE_EXHAUSTED with retry-after metadata.
    let runtime = tokio::runtime::Runtime::new()?;
    let codes = runtime.block_on(async {
        let client = GenerationClient::connect(format!("http://{}", serve.process.addr)).await?;
        let calls = (0..10).map(|_| {
            let mut client = client.clone();
            async move {
                client
                    .generate(GenerateRequest {
                        prompt: "Hello".into(),
                        max_tokens: 40,
                        temperature: Some(0.0),
                        ignore_eos: true,
                        ..Default::default()
                    })
                    .await
            }
        });
        let mut codes = Vec::new();
        for result in futures::future::join_all(calls).await {
            match result {
                Ok(response) => {
                    ensure!(response.get_ref().token_ids.len() == 40);
                    codes.push(tonic::Code::Ok);
                }
                Err(status) => {
                    ensure!(
                        status.code() == tonic::Code::ResourceExhausted
                            && status.metadata().get("retry-after").is_some(),
                        "{status:?}"
                    );
                    codes.push(status.code());
                }
            }
        }
        anyhow::Ok(codes)
    })?;
    ensure!(
        codes.contains(&tonic::Code::ResourceExhausted) && codes.contains(&tonic::Code::Ok),
        "{codes:?}"
    );

    // The pool held: sequences were preempted rather than refused or
    // reserved up front, more than two shared a step while their caches
    // were short, and nothing is held once everything finished.
    let (_, _, metrics) = support::http(&http_addr, "GET", "/metrics", "")?;
    let steps = support::metric(&metrics, "tramontane_router_batch_size_count").context("count")?;
    let at_most_two = support::metric(&metrics, "tramontane_router_batch_size_bucket{le=\"2\"}")
        .context("bucket")?;
    ensure!(steps > 0.0 && at_most_two < steps, "{metrics}");
    let preempted =
        support::metric(&metrics, "tramontane_router_preemptions_total").context("preemptions")?;
    ensure!(preempted > 0.0, "{metrics}");
    ensure!(support::metric(&metrics, "tramontane_router_kv_cache_used_tokens") == Some(0.0));
    ensure!(support::metric(&metrics, "tramontane_router_kv_cache_total_tokens") == Some(112.0));
    Ok(())
}
