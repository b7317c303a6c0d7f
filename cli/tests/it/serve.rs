//! `tramontane serve`: N worker processes and the router on this machine;
//! readiness follows the workers; a worker that dies is started again;
//! SIGTERM drains the requests in flight, then stops every child.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support;

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `tramontane generate --json` of 12 tokens of "Hello world" from `from`
/// (`--server ADDR` or `--model DIR`).
fn generate_json(from: &[&str]) -> Result<serde_json::Value> {
    let output = support::run_ok(
        support::tramontane()
            .args([
                "generate",
                "--json",
                "--max-tokens",
                "12",
                "--prompt",
                "Hello world",
            ])
            .args(from),
    )?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

async fn health(addr: &str) -> Result<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status)
}

#[test]
fn serve_starts_workers_and_router_and_stops_them_all() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "31"])?;
    let model = model.to_str().context("path")?;
    let serving = support::spawn_serving(&[
        "serve",
        "--model",
        model,
        "--workers",
        "3",
        "--threads",
        "1",
    ])?;
    let http = serving.http.clone();
    let mut serve = serving.process;
    let workers = children_of(serve.child.id());
    ensure!(
        workers.len() == 3,
        "expected 3 worker processes, found {workers:?}"
    );

    // Through the served cluster, the same tokens as in process.
    let remote = generate_json(&["--server", &serve.addr])?;
    let local = generate_json(&["--model", model])?;
    ensure!(
        remote["token_ids"] == local["token_ids"] && remote["text"] == local["text"],
        "{remote} vs {local}"
    );

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        ensure!(
            health(&serve.addr).await? == ServingStatus::Serving as i32,
            "ready with every worker up"
        );
        // A worker dies: the router reports not ready, serve starts it
        // again on its address, and the router takes it back.
        support::run_ok(std::process::Command::new("kill").args(["-9", &workers[1].to_string()]))?;
        wait_for_health(
            &serve.addr,
            ServingStatus::NotServing,
            "the router never reported not ready",
        )
        .await?;
        wait_for_health(
            &serve.addr,
            ServingStatus::Serving,
            "the restarted worker was never taken back",
        )
        .await
    })?;
    let restarted = children_of(serve.child.id());
    ensure!(
        restarted.len() == 3 && !restarted.contains(&workers[1]),
        "{workers:?} then {restarted:?}"
    );
    let (_, _, metrics) = support::http(&http, "GET", "/metrics", "")?;
    ensure!(
        support::metric(
            &metrics,
            "tramontane_serve_worker_restarts_total{worker=\"1\"}"
        ) == Some(1.0),
        "{metrics}"
    );
    let again = generate_json(&["--server", &serve.addr])?;
    ensure!(
        again["token_ids"] == local["token_ids"],
        "{again} vs {local}"
    );

    // SIGTERM with a stream in flight: health turns 503 and new requests
    // are refused, the stream runs to its end, then serve exits cleanly.
    let mut stream = std::net::TcpStream::connect(&http)?;
    let body = r#"{"model":"model","prompt":"Hello","max_tokens":600,"ignore_eos":true,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#;
    use std::io::{BufRead, Read, Write};
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("data: {") {
        line.clear();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "the stream ended before its first chunk"
        );
    }
    support::run_ok(
        std::process::Command::new("kill").args(["-TERM", &serve.child.id().to_string()]),
    )?;
    let mut draining = false;
    for _ in 0..200 {
        let (status, _, body) = support::http(&http, "GET", "/health", "")?;
        if status == 503 {
            ensure!(body.contains("shutting down"), "{body}");
            draining = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(draining, "health never said the router is draining");
    let (status, _, refused) = support::http(
        &http,
        "POST",
        "/v1/completions",
        r#"{"model":"model","prompt":"Hello","max_tokens":2}"#,
    )?;
    ensure!(
        status == 503 && refused.contains("shutting down"),
        "{status} {refused}"
    );
    let mut rest = String::new();
    reader.read_to_string(&mut rest)?;
    ensure!(
        rest.contains(r#""completion_tokens":600"#) && rest.contains("data: [DONE]"),
        "the stream in flight was cut: {}",
        &rest[rest.len().saturating_sub(400)..]
    );
    let status = serve.child.wait()?;
    ensure!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    all_gone(&restarted, 50, "workers outlived serve")
}

/// Polls grpc.health.v1 (up to 300 × 100 ms) until it reports `wanted`.
async fn wait_for_health(addr: &str, wanted: ServingStatus, failure: &str) -> Result<()> {
    for _ in 0..300 {
        if health(addr).await? == wanted as i32 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{failure}")
}

/// Waits (not timing: up to `tries` × 100 ms) until none of `pids` is alive.
fn all_gone(pids: &[u32], tries: usize, failure: &str) -> Result<()> {
    for _ in 0..tries {
        if pids.iter().all(|&pid| !alive(pid)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "{failure}: {:?}",
        pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
    )
}

#[test]
fn workers_do_not_outlive_a_killed_serve() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "33"])?;
    let mut serve = support::serve_two_workers(&model, &[])?;
    let workers = children_of(serve.process.child.id());
    ensure!(workers.len() == 2, "expected 2 workers, found {workers:?}");
    serve.process.child.kill()?; // SIGKILL: serve cannot clean up
    serve.process.child.wait()?;
    // The workers see their stdin close and exit.
    all_gone(&workers, 100, "workers outlived a killed serve")
}

#[test]
fn serve_refuses_bad_options() -> Result<()> {
    for (args, needle) in [
        (
            vec!["serve", "--workers", "0"],
            "--workers must be at least 1",
        ),
        (
            vec!["serve", "--workers", "2", "--devices", "tpu"],
            "cpu or cuda:N",
        ),
        // A scheduler limit is named by its flag, before anything starts.
        (
            vec!["serve", "--workers", "2", "--queue", "0"],
            "--queue must be at least 1",
        ),
        (
            vec!["serve", "--workers", "2", "--admin-listen", "127.0.0.1:0"],
            "--admin-listen needs --admin-key",
        ),
        (
            vec![
                "serve",
                "--admin-listen",
                "127.0.0.1:0",
                "--admin-key",
                "k",
                "--api-key",
                "k",
            ],
            "--admin-key must not be one of the API keys",
        ),
        (
            vec![
                "router",
                "--model",
                "/nonexistent",
                "--workers",
                "127.0.0.1:1",
                "--queue",
                "0",
            ],
            "--queue must be at least 1",
        ),
        (
            vec![
                "router",
                "--model",
                "/nonexistent",
                "--workers",
                "127.0.0.1:1",
                "--max-running",
                "32",
                "--max-batch-tokens",
                "16",
            ],
            "--max-batch-tokens (16) must be at least --max-running (32)",
        ),
    ] {
        let output = support::tramontane()
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(1) && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}
