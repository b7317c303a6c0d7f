//! The shipped monitoring against a real Prometheus: `promtool check config`
//! passes on deploy/prometheus/prometheus.yml; Prometheus, run with that
//! configuration, scrapes `tramontane serve --workers 2` under a short load,
//! and every PromQL expression of the Grafana dashboard returns data.
//!
//! Needs the `prometheus` binary (Debian package `prometheus`; `make test`
//! installs it when missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::support;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find(binary: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(binary))
        .find(|p| p.exists())
        .with_context(|| {
            format!("{binary} not found: install the Debian package prometheus (make test does)")
        })
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of the dashboard, with Grafana's variables substituted.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = repo().join("deploy/helm/tramontane/dashboards/tramontane.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            // The variables' "All" (the local targets have no namespace
            // or release label).
            let expr = expr
                .replace("$namespace", ".*")
                .replace("$release", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "5s")
                .replace("$__range", "5m");
            ensure!(!expr.contains('$'), "unknown template variable in {expr}");
            queries.push((panel["title"].as_str().unwrap_or("?").to_string(), expr));
        }
    }
    Ok(queries)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() -> Result<()> {
    let prometheus = find("prometheus")?;
    let promtool = find("promtool")?;
    let shipped = repo().join("deploy/prometheus/prometheus.yml");
    let check = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&shipped)
        .output()?;
    ensure!(
        check.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "41"])?;
    // The shipped configuration, scraping every second for the test.
    let config = std::fs::read_to_string(&shipped)?
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("refresh_interval: 5s", "refresh_interval: 1s");
    ensure!(
        config.contains("scrape_interval: 1s"),
        "the shipped scrape interval changed"
    );
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(prom_dir.join("targets"))?;
    std::fs::write(prom_dir.join("prometheus.yml"), config)?;
    let targets = prom_dir.join("targets/local.json");
    let serve = support::serve_two_workers(
        &model,
        &["--prometheus-targets", targets.to_str().context("path")?],
    )?;

    let port = free_port()?;
    let _prometheus = Killed(
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus")?,
    );
    let api = format!("127.0.0.1:{port}");

    // A short load: streamed and unary requests, a few at a time, plus one
    // bad request, over several scrapes.
    let queries = dashboard_queries()?;
    let mut missing = queries.clone();
    for round in 0..90 {
        std::thread::scope(|scope| {
            for i in 0..3 {
                let http = &serve.http;
                scope.spawn(move || {
                    let body = serde_json::json!({
                        "model": "model", "prompt": format!("Round {round} request {i}"),
                        "max_tokens": 8, "stream": i == 0, "temperature": 0,
                    });
                    let _ = support::http(http, "POST", "/v1/completions", &body.to_string());
                });
            }
        });
        let _ = support::http(&serve.http, "POST", "/v1/completions", "{not json");
        missing.retain(|(_, expr)| {
            let path = format!("/api/v1/query?query={}", encode(expr));
            let Ok((200, _, body)) = support::http(&api, "GET", &path, "") else {
                return true;
            };
            let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let result = &answer["data"]["result"];
            !(answer["status"] == "success" && result.as_array().is_some_and(|r| !r.is_empty()))
        });
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !missing.is_empty() {
        bail!(
            "{} of {} dashboard queries returned no data:\n{}",
            missing.len(),
            queries.len(),
            missing
                .iter()
                .map(|(title, expr)| format!("  [{title}] {expr}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Both kinds of target were scraped and are up.
    for component in ["router", "worker"] {
        let query = encode(&format!("up{{component=\"{component}\"}}"));
        let (_, _, body) = support::http(&api, "GET", &format!("/api/v1/query?query={query}"), "")?;
        let answer: Value = serde_json::from_str(&body)?;
        let results = answer["data"]["result"].as_array().context("result")?;
        let expected = if component == "worker" { 2 } else { 1 };
        ensure!(
            results.len() == expected && results.iter().all(|r| r["value"][1] == "1"),
            "up of {component}: {body}"
        );
    }
    println!("{} dashboard queries returned data", queries.len());
    Ok(())
}
