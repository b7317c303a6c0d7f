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
    support::generated_ids(grpc, PROMPT, max_tokens)
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
    let load = Load::start(&serving.http, 3, expected.len() as u64);
    load.answers(6);
    let rebalanced = admin(&admin_addr, ADMIN_KEY, &["rebalance"]);
    let sent = load.stop()?;
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
    ensure!(
        stats["placement"] == after["experts"] && stats["placement_epoch"] == after["epoch"],
        "/v1/experts/stats shows who holds what: {stats}"
    );
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

/// `router` over `workers` with the admin API and `extra` flags.
fn router_with_admin(
    model: &std::path::Path,
    workers: &str,
    extra: &[&str],
) -> Result<support::Serving> {
    let model = model.to_str().context("model path")?;
    let mut args = vec![
        "router",
        "--model",
        model,
        "--workers",
        workers,
        "--threads",
        "1",
        "--served-model-name",
        "skewed",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-key",
        ADMIN_KEY,
    ];
    args.extend_from_slice(extra);
    support::spawn_serving(&args)
}

/// Clients that send completions until `done` and two more each; every
/// answer must be a whole one. Returns the requests sent.
struct Load {
    done: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    clients: Vec<std::thread::JoinHandle<Result<usize>>>,
}

impl Load {
    fn start(http: &str, clients: usize, tokens: u64) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|_| {
                let (http, done, answered) = (http.to_string(), done.clone(), answered.clone());
                std::thread::spawn(move || -> Result<usize> {
                    let mut after_done = 0;
                    for sent in 1..=2000 {
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
                    anyhow::bail!("the changes did not end within 2000 requests")
                })
            })
            .collect();
        Self {
            done,
            answered,
            clients,
        }
    }

    /// Waits (boundedly) for `n` more answers.
    fn answers(&self, n: usize) {
        let target = self.answered.load(Ordering::SeqCst) + n;
        for _ in 0..1200 {
            if self.answered.load(Ordering::SeqCst) >= target {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) -> Result<usize> {
        self.done.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .sum()
    }
}

/// `tramontane admin ...`'s failure: its stderr.
fn admin_refused(addr: &str, action: &[&str]) -> Result<String> {
    let output = support::tramontane()
        .args([
            "admin",
            "--server",
            &format!("http://{addr}"),
            "--admin-key",
            ADMIN_KEY,
        ])
        .args(action)
        .output()?;
    ensure!(!output.status.success(), "{action:?} succeeded");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The workers each expert of `placement` is on, by layer.
fn holders(placement: &Value) -> Vec<Vec<Vec<u64>>> {
    serde_json::from_value(placement["experts"].clone()).unwrap_or_default()
}

#[test]
fn workers_join_and_leave_under_load_without_a_failed_request() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "31"])?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 16)?;
    let w0 = support::worker(&model, "0,2,4,6", "127.0.0.1:0")?;
    let w1 = support::worker(&model, "1,3,5,7", "127.0.0.1:0")?;
    let router = router_with_admin(&model, &support::addrs([&w0, &w1]), &["--spare-slots", "2"])?;
    let admin_addr = router.admin.clone().context("admin address")?;
    let load = Load::start(&router.http, 3, expected.len() as u64);
    load.answers(4);

    // A third worker joins with experts 0 to 3 of every layer.
    let w2 = support::worker(&model, "0-3", "127.0.0.1:0")?;
    let joined = admin(&admin_addr, ADMIN_KEY, &["workers", "add", &w2.addr])?;
    ensure!(joined["worker"] == 2 && joined["epoch"] == 1, "{joined}");
    let placement = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        placement["workers"] == 3 && holders(&placement)[0][3] == [1, 2],
        "{placement}"
    );
    load.answers(4);

    // Worker 1 leaves: 1 and 3 are on worker 2 already, 5 and 7 are copied.
    let left = admin(&admin_addr, ADMIN_KEY, &["workers", "remove", "1"])?;
    ensure!(left["moved"] == 2 * 2, "two pairs a layer: {left}");
    let placement = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        holders(&placement)
            .iter()
            .flatten()
            .all(|on| !on.is_empty() && !on.contains(&1)),
        "{placement}"
    );
    load.answers(4);

    // Worker 0 leaves: worker 2 alone serves every expert.
    admin(&admin_addr, ADMIN_KEY, &["workers", "remove", "0"])?;
    let placement = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        holders(&placement).iter().flatten().all(|on| on == &[2]),
        "{placement}"
    );
    load.answers(4);

    // The last worker cannot leave: its experts have nowhere to go.
    let refused = admin_refused(&admin_addr, &["workers", "remove", "2"])?;
    ensure!(
        refused.contains("409") && refused.contains("layer 0 expert 0 cannot move"),
        "{refused}"
    );
    // Worker 1 (running, holding its experts) is added back: its index again.
    let back = admin(&admin_addr, ADMIN_KEY, &["workers", "add", &w1.addr])?;
    ensure!(back["worker"] == 1, "{back}");
    load.answers(4);
    let sent = load.stop()?;
    ensure!(sent >= 20, "{sent} requests");

    // Refusals, each naming what is wrong.
    let again = admin_refused(&admin_addr, &["workers", "add", &w2.addr])?;
    ensure!(
        again.contains("409") && again.contains("in the pool already"),
        "{again}"
    );
    let unknown = admin_refused(&admin_addr, &["workers", "remove", "7"])?;
    ensure!(
        unknown.contains("404") && unknown.contains("no worker 7"),
        "{unknown}"
    );
    let other = dir.path().join("other");
    support::gen_model(&other, &["--family", "qwen3_moe", "--preset", "tiny"])?;
    let stranger = support::worker(&other, "0-7", "127.0.0.1:0")?;
    let mismatch = admin_refused(&admin_addr, &["workers", "add", &stranger.addr])?;
    let ours = tramontane_config::model_id(&model)?;
    let theirs = tramontane_config::model_id(&other)?;
    ensure!(
        mismatch.contains("409") && mismatch.contains(&ours) && mismatch.contains(&theirs),
        "{mismatch}"
    );
    let (status, _, body) = support::http_with(
        &admin_addr,
        "POST",
        "/admin/workers",
        &[("Authorization", &format!("Bearer {ADMIN_KEY}"))],
        r#"{"adress": "127.0.0.1:1"}"#,
    )?;
    ensure!(status == 400 && body.contains("address"), "{status} {body}");

    ensure!(greedy(&router.process.addr, 16)? == expected);
    Ok(())
}

#[test]
fn a_lost_worker_without_replicas_is_healed_onto_the_others_and_rejoins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "33"])?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 16)?;
    let w0 = support::worker(&model, "0,2,4,6", "127.0.0.1:0")?;
    let mut w1 = support::worker(&model, "1,3,5,7", "127.0.0.1:0")?;
    let w1_addr = w1.addr.clone();
    let router = router_with_admin(
        &model,
        &support::addrs([&w0, &w1]),
        &["--self-heal", "--spare-slots", "4"],
    )?;
    let admin_addr = router.admin.clone().context("admin address")?;
    ensure!(greedy(&router.process.addr, 16)? == expected);

    w1.child.kill()?;
    w1.child.wait()?;
    // Bounded: the router heals on its own and serves again.
    let healed = eventually(300, || {
        let placement = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
        let done = holders(&placement).iter().flatten().all(|on| on == &[0]);
        Ok(done.then_some(placement))
    })
    .context("worker 0 never took worker 1's experts")?;
    ensure!(healed["epoch"].as_u64() >= Some(1), "{healed}");
    // Readiness follows the placement on the monitor's next probe.
    healthy(&router.http).context("once healed")?;
    ensure!(
        greedy(&router.process.addr, 16)? == expected,
        "tokens once healed"
    );
    let (_, _, metrics) = support::http(&router.http, "GET", "/metrics", "")?;
    ensure!(
        support::metric(&metrics, "tramontane_router_self_heals_total") == Some(1.0),
        "{metrics}"
    );
    let (_, _, stats) = support::http(&router.http, "GET", "/v1/experts/stats", "")?;
    let stats: Value = serde_json::from_str(&stats)?;
    ensure!(
        stats["worker_up"] == json!([true, false])
            && stats["worker_in_pool"] == json!([true, false]),
        "{stats}"
    );

    // Back from its restart, worker 1 rejoins with what it holds.
    let _w1_again = support::worker(&model, "1,3,5,7", &w1_addr)?;
    eventually(300, || {
        let placement = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
        Ok((holders(&placement)[0][1] == [0, 1]).then_some(()))
    })
    .context("worker 1 did not rejoin")?;
    ensure!(
        greedy(&router.process.addr, 16)? == expected,
        "tokens once rejoined"
    );
    Ok(())
}

#[test]
fn the_router_serves_once_every_expert_has_a_live_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "34"])?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 16)?;
    // Every expert on both workers; worker 1 is not up yet.
    let placement = dir.path().join("placement.json");
    std::fs::write(
        &placement,
        json!({"workers": 2, "experts": vec![vec![vec![0, 1]; 8]; 2]}).to_string(),
    )?;
    let w0 = support::worker(&model, "0-7", "127.0.0.1:0")?;
    let w1_addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let router = router_with_admin(
        &model,
        &format!("{},{w1_addr}", w0.addr),
        &["--placement", placement.to_str().context("path")?],
    )?;
    ensure!(greedy(&router.process.addr, 16)? == expected);
    let up = |w: usize| -> Result<Option<f64>> {
        let (_, _, metrics) = support::http(&router.http, "GET", "/metrics", "")?;
        Ok(support::metric(
            &metrics,
            &format!("tramontane_router_worker_up{{worker=\"{w}\"}}"),
        ))
    };
    // When it comes up, the router takes it in.
    let _w1 = support::worker(&model, "0-7", &w1_addr)?;
    eventually(300, || Ok((up(1)? == Some(1.0)).then_some(())))
        .context("worker 1 never came up")?;
    ensure!(greedy(&router.process.addr, 16)? == expected);
    Ok(())
}

#[test]
fn a_worker_without_memory_for_the_experts_refuses_them_and_nothing_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "35"])?;
    let w0 = support::worker(&model, "0,2,4,6", "127.0.0.1:0")?;
    // Worker 1's weights: 8 experts (4 a layer, 2 layers); room for one more.
    let probe = support::worker(&model, "1,3,5,7", "127.0.0.1:0")?;
    let (_, _, metrics) = support::http(&probe.addr, "GET", "/metrics", "")?;
    let held = support::samples(&metrics, "tramontane_worker_memory_bytes")
        .into_iter()
        .filter(|(labels, _)| labels.get("kind").map(String::as_str) == Some("weights"))
        .map(|(_, v)| v)
        .sum::<f64>() as u64;
    drop(probe);
    let limit = (held + held / 8).to_string();
    let w1 = support::worker_with(
        &model,
        "1,3,5,7",
        "127.0.0.1:0",
        &["--max-expert-bytes", &limit],
    )?;
    let router = router_with_admin(&model, &support::addrs([&w0, &w1]), &[])?;
    let admin_addr = router.admin.clone().context("admin address")?;
    let before = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    // Worker 0 cannot leave: worker 1 takes one of its 8 experts, not two.
    let refused = admin_refused(&admin_addr, &["workers", "remove", "0"])?;
    ensure!(
        refused.contains("409") && refused.contains("--max-expert-bytes"),
        "{refused}"
    );
    let after = admin(&admin_addr, ADMIN_KEY, &["placement"])?;
    ensure!(
        after == before,
        "the placement changed: {before} -> {after}"
    );
    // What worker 1 loaded before the refusal is dropped again.
    let (_, _, metrics) = support::http(&w1.addr, "GET", "/metrics", "")?;
    ensure!(
        support::metric(&metrics, "tramontane_worker_experts_held") == Some(8.0),
        "{metrics}"
    );
    healthy(&router.http)
}

/// Waits (boundedly) for `GET /health` to answer 200.
fn healthy(http: &str) -> Result<()> {
    let mut status = 0;
    eventually(100, || {
        status = support::http(http, "GET", "/health", "")?.0;
        Ok((status == 200).then_some(()))
    })
    .with_context(|| format!("/health answers {status}"))
}

/// The first `Some` of `check`, polled every 100 ms at most `tries` times.
fn eventually<T>(tries: usize, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    for _ in 0..tries {
        if let Some(found) = check()? {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("not within {tries} tries of 100 ms")
}
