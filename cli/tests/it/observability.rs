//! Counting is exact: after a known workload, the tokens the gate routed per
//! layer are k × the tokens forwarded, in the router's metrics, in
//! `/v1/experts/stats`, in the workers' own metrics and in the routing trace
//! (`--record-routing`), and all of them agree expert by expert.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tramontane_policy::routing_trace;

use crate::support;

const LAYERS: usize = 2;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;

/// Sums `name` samples per (layer, expert).
fn per_expert(text: &str, name: &str) -> BTreeMap<(usize, usize), f64> {
    let mut out = BTreeMap::new();
    for (labels, value) in support::samples(text, name) {
        let layer = labels["layer"].parse().expect("layer label");
        let expert = labels["expert"].parse().expect("expert label");
        *out.entry((layer, expert)).or_default() += value;
    }
    out
}

#[test]
fn routed_tokens_add_up_everywhere() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "23"])?;
    let trace_path = dir.path().join("routing.jsonl");
    let serve = support::serve_two_workers(
        &model,
        &[
            "--max-batch-tokens",
            "64",
            "--record-routing",
            trace_path.to_str().context("path")?,
        ],
    )?;

    // Prompts of 5, 9 and 70 tokens (the last one prefilled in chunks), 6
    // new tokens each: every prompt token and every generated token but the
    // last is forwarded once.
    let lengths = [5usize, 9, 70];
    let new_tokens = 6;
    for (i, len) in lengths.iter().enumerate() {
        let ids: Vec<u32> = (0..*len as u32).map(|t| 100 + 37 * t + i as u32).collect();
        let body = serde_json::json!({
            "model": "model", "prompt": ids, "max_tokens": new_tokens,
            "ignore_eos": true, "temperature": 0,
        });
        let (status, _, text) =
            support::http(&serve.http, "POST", "/v1/completions", &body.to_string())?;
        ensure!(status == 200, "{status} {text}");
    }
    let forwarded: usize = lengths.iter().map(|l| l + new_tokens - 1).sum();

    let (_, _, metrics) = support::http(&serve.http, "GET", "/metrics", "")?;
    let (_, _, stats) = support::http(&serve.http, "GET", "/v1/experts/stats", "")?;
    let stats: Value = serde_json::from_str(&stats)?;
    let routed = per_expert(&metrics, "tramontane_router_routed_tokens_total");
    ensure!(routed.len() == LAYERS * EXPERTS, "{routed:?}");

    // Each worker counts what it computed; the sum over workers is what was routed.
    let mut computed: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for addr in stats["worker_addrs"].as_array().context("worker_addrs")? {
        let addr = addr.as_str().context("address")?;
        let (status, _, text) = support::http(addr, "GET", "/metrics", "")?;
        ensure!(status == 200, "worker {addr} /metrics: {status}");
        ensure!(
            support::metric(&text, "tramontane_worker_memory_bytes{kind=\"rss\"}").unwrap_or(0.0)
                > 0.0,
            "worker RSS"
        );
        for (key, value) in per_expert(&text, "tramontane_worker_expert_tokens_total") {
            *computed.entry(key).or_default() += value;
        }
    }

    let (header, records) = routing_trace::read(&trace_path).map_err(anyhow::Error::msg)?;
    ensure!(header.layers == LAYERS && header.experts == EXPERTS && header.top_k == TOP_K);
    let mut traced: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    let mut traced_tokens = [0usize; LAYERS];
    for record in &records {
        traced_tokens[record.layer] += record.experts.len();
        for token in &record.experts {
            ensure!(token.len() == TOP_K, "{record:?}");
            for &e in token {
                *traced.entry((record.layer, e)).or_default() += 1.0;
            }
        }
    }

    for layer in 0..LAYERS {
        let total: f64 = (0..EXPERTS).map(|e| routed[&(layer, e)]).sum();
        ensure!(
            total as usize == TOP_K * forwarded,
            "layer {layer}: {total} routed, expected {} × {forwarded}",
            TOP_K
        );
        ensure!(traced_tokens[layer] == forwarded, "trace layer {layer}");
        for expert in 0..EXPERTS {
            let key = (layer, expert);
            let from_stats = stats["tokens"][layer][expert].as_f64().context("tokens")?;
            ensure!(
                routed[&key] == from_stats
                    && computed.get(&key).copied().unwrap_or(0.0) == routed[&key]
                    && traced.get(&key).copied().unwrap_or(0.0) == routed[&key],
                "layer {layer} expert {expert}: metrics {} stats {from_stats} workers {:?} trace {:?}",
                routed[&key],
                computed.get(&key),
                traced.get(&key)
            );
        }
        // Pairs per worker add up to the pairs routed, and balancedness agrees.
        let load: f64 = stats["worker_load"][layer]
            .as_array()
            .context("worker_load")?
            .iter()
            .filter_map(Value::as_f64)
            .sum();
        ensure!(
            load as usize == TOP_K * forwarded,
            "worker load of layer {layer}"
        );
        let balancedness = stats["balancedness"][layer]
            .as_f64()
            .context("balancedness")?;
        let gauge = support::metric(
            &metrics,
            &format!("tramontane_router_expert_balancedness_ratio{{layer=\"{layer}\"}}"),
        )
        .context("balancedness gauge")?;
        ensure!(
            (balancedness - gauge).abs() < 1e-9 && balancedness > 0.0 && balancedness <= 1.0,
            "{balancedness} vs {gauge}"
        );
    }
    // Latency histograms saw every request.
    ensure!(
        support::metric(
            &metrics,
            "tramontane_router_e2e_request_latency_seconds_count"
        ) == Some(lengths.len() as f64),
        "e2e count"
    );
    ensure!(
        support::metric(
            &metrics,
            "tramontane_router_time_to_first_token_seconds_count"
        ) == Some(lengths.len() as f64)
    );
    ensure!(
        support::metric(
            &metrics,
            "tramontane_router_inter_token_latency_seconds_count"
        ) == Some((lengths.len() * (new_tokens - 1)) as f64)
    );
    Ok(())
}
