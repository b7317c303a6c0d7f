//! The expert pool while it serves: a rebalance under load, driven by
//! `tramontane admin`, moves the hot experts apart without a failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::support;

const PROMPT: &str = "The wind from the north crosses the mountains and";
const ADMIN_KEY: &str = "admin-key";

/// `tramontane admin ACTION... --server http://ADDR --admin-key KEY`'s JSON.
fn admin(addr: &str, key: &str, action: &[&str]) -> Result<Value> {
    let output = support::run_ok(
        support::tramontane()
            .args([
                "admin",
                "--server",
                &format!("http://{addr}"),
                "--admin-key",
                key,
            ])
            .args(action),
    )?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Per worker, the (layer, expert) pairs `placement` (the admin API's
/// answer) gives it.
fn pairs_per_worker(placement: &Value) -> Result<Vec<usize>> {
    let workers = placement["workers"].as_u64().context("workers")? as usize;
    let mut pairs = vec![0; workers];
    for row in placement["experts"].as_array().context("experts")? {
        for on in row.as_array().context("layer")? {
            for w in on.as_array().context("replicas")? {
                pairs[w.as_u64().context("worker")? as usize] += 1;
            }
        }
    }
    Ok(pairs)
}

/// One completion over HTTP: its generated tokens.
fn completion(http: &str) -> Result<u64> {
    let body = json!({"model": "skewed", "prompt": PROMPT, "max_tokens": 16, "temperature": 0});
    let (status, _, text) = support::http(http, "POST", "/v1/completions", &body.to_string())?;
    ensure!(status == 200, "{status} {text}");
    let answer: Value = serde_json::from_str(&text)?;
    answer["usage"]["completion_tokens"]
        .as_u64()
        .context("usage.completion_tokens")
}

/// Greedy tokens through the router's gRPC API (`tramontane generate`).
fn greedy(grpc: &str, max_tokens: usize) -> Result<Vec<u32>> {
    let output = support::run_ok(support::tramontane().args([
        "generate",
        "--server",
        grpc,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]))?;
    let answer: Value = serde_json::from_slice(&output.stdout)?;
    Ok(serde_json::from_value(answer["token_ids"].clone())?)
}

#[test]
fn a_rebalance_under_load_moves_the_hot_experts_apart_without_a_failed_request() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    // Experts 0, 4, 2, 6 are the hottest: round robin puts all four on
    // worker 0.
    support::gen_model(
        &model,
        &["--preset", "tiny", "--seed", "29", "--expert-skew", "1"],
    )?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 16)?;
    let serving = support::serve_two_workers(
        &model,
        &[
            "--served-model-name",
            "skewed",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-key",
            ADMIN_KEY,
            "--spare-slots",
            "1",
        ],
    )?;
    let admin_addr = serving.admin.clone().context("admin address")?;
    let before = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        before["epoch"] == 0 && pairs_per_worker(&before)? == [8, 8],
        "{before}"
    );

    // Clients send requests until the rebalance is done and each has sent
    // two more; every answer is checked.
    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (http, done, answered) = (serving.http.clone(), done.clone(), answered.clone());
            let tokens = expected.len() as u64;
            std::thread::spawn(move || -> Result<usize> {
                let mut after_done = 0;
                for sent in 1..=400 {
                    let generated = completion(&http)?;
                    ensure!(generated == tokens, "request {sent}: {generated} tokens");
                    answered.fetch_add(1, Ordering::SeqCst);
                    if done.load(Ordering::SeqCst) {
                        after_done += 1;
                        if after_done == 2 {
                            return Ok(sent);
                        }
                    }
                }
                anyhow::bail!("the rebalance did not end within 400 requests")
            })
        })
        .collect();
    for _ in 0..600 {
        if answered.load(Ordering::SeqCst) >= 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rebalanced = admin(&admin_addr, ADMIN_KEY, &["rebalance"]);
    done.store(true, Ordering::SeqCst);
    let sent: usize = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .sum::<Result<usize>>()?;
    let rebalanced = rebalanced?;
    ensure!(sent >= 12, "{sent} requests");

    // The hot experts were moved apart: more balanced, within one spare
    // slot per worker and layer.
    let moved = rebalanced["moved"].as_u64().context("moved")?;
    let (b0, b1) = (
        rebalanced["balancedness_before"]
            .as_f64()
            .context("before")?,
        rebalanced["balancedness_after"].as_f64().context("after")?,
    );
    ensure!(moved > 0 && b1 > b0 + 0.1 && b1 > 0.9, "{rebalanced}");
    let after = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        after["epoch"] == rebalanced["epoch"] && after["epoch"].as_u64() >= Some(1),
        "{after} {rebalanced}"
    );
    for row in after["experts"].as_array().context("experts")? {
        let row = row.as_array().context("layer")?;
        for w in 0..2 {
            let held = row
                .iter()
                .filter(|on| on.as_array().is_some_and(|on| on.contains(&json!(w))))
                .count();
            ensure!(
                held <= 5,
                "worker {w} holds {held} experts of a layer: {after}"
            );
        }
    }

    // Each worker holds what the placement gives it: the new copies loaded,
    // the old ones dropped.
    let (_, _, stats) = support::http(&serving.http, "GET", "/v1/experts/stats", "")?;
    let stats: Value = serde_json::from_str(&stats)?;
    let placed = pairs_per_worker(&after)?;
    for (w, addr) in stats["worker_addrs"]
        .as_array()
        .context("worker_addrs")?
        .iter()
        .enumerate()
    {
        let (_, _, metrics) = support::http(addr.as_str().context("addr")?, "GET", "/metrics", "")?;
        let held = support::metric(&metrics, "tramontane_worker_experts_held");
        ensure!(
            held == Some(placed[w] as f64),
            "worker {w} holds {held:?}, placed {}",
            placed[w]
        );
        ensure!(
            support::metric(&metrics, "tramontane_worker_placement_epoch")
                == after["epoch"].as_f64(),
            "worker {w}'s epoch"
        );
    }
    let (_, _, metrics) = support::http(&serving.http, "GET", "/metrics", "")?;
    let value = |sample: &str| support::metric(&metrics, sample);
    ensure!(
        value("tramontane_router_rebalances_total{outcome=\"moved\"}") == Some(1.0)
            && value("tramontane_router_expert_pairs_moved_total") == Some(moved as f64)
            && value("tramontane_router_expert_bytes_loaded_total").is_some_and(|b| b > 0.0)
            && value("tramontane_router_placement_epoch") == after["epoch"].as_f64(),
        "{metrics}"
    );

    // The same tokens as in process, now over the new placement.
    ensure!(greedy(&serving.process.addr, 16)? == expected);
    Ok(())
}

#[test]
fn the_admin_cli_names_what_the_router_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "30"])?;
    let serving = support::serve_two_workers(
        &model,
        &["--admin-listen", "127.0.0.1:0", "--admin-key", ADMIN_KEY],
    )?;
    let admin_addr = serving.admin.clone().context("admin address")?;
    let output = support::tramontane()
        .args(["admin", "--server", &format!("http://{admin_addr}")])
        .args(["--admin-key", "wrong", "rebalance"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("401") && stderr.contains("admin key"),
        "{stderr}"
    );
    // Without traffic there is nothing to balance: nothing moves.
    let idle = admin(&admin_addr, ADMIN_KEY, &["rebalance"])?;
    ensure!(idle["moved"] == 0 && idle["epoch"] == 0, "{idle}");
    Ok(())
}
