//! Workers started from a placement file (`worker --placement F
//! --worker-index I`, as `serve --placement F` starts them) hold exactly the
//! (layer, expert) pairs it gives them, which differ from layer to layer, and
//! the cluster generates what the model generates in process.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use tramontane_proto::v1::InfoRequest;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;

use crate::support;

/// Tiny: 2 layers of 8 experts on 2 workers, split differently in each layer,
/// with expert 0 of layer 1 on both.
const PLACEMENT: &str = r#"{"workers": 2, "experts": [
    [[0], [0], [0], [0], [1], [1], [1], [1]],
    [[0, 1], [1], [1], [1], [1], [0], [0], [0]]
]}"#;

/// Per worker, per layer, the experts `PLACEMENT` gives it.
fn expected() -> [Vec<(u32, Vec<u32>)>; 2] {
    [
        vec![(0, vec![0, 1, 2, 3]), (1, vec![0, 5, 6, 7])],
        vec![(0, vec![4, 5, 6, 7]), (1, vec![0, 1, 2, 3, 4])],
    ]
}

/// Bytes of one tiny expert in f32: w1, w2, w3 of 64 × 128.
const EXPERT_BYTES: f64 = (3 * 64 * 128 * 4) as f64;

fn greedy(model_or_server: &[&str], prompt: &str) -> Result<serde_json::Value> {
    let output = support::run_ok(
        support::tramontane()
            .args([
                "generate",
                "--json",
                "--max-tokens",
                "12",
                "--prompt",
                prompt,
            ])
            .args(model_or_server),
    )?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn serve_starts_each_worker_with_its_own_pairs_per_layer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "23"])?;
    let placement = dir.path().join("placement.json");
    std::fs::write(&placement, PLACEMENT)?;
    let targets = dir.path().join("targets.json");
    let serve = support::serve_two_workers(
        &model,
        &[
            "--placement",
            placement.to_str().context("path")?,
            "--prometheus-targets",
            targets.to_str().context("path")?,
        ],
    )?;
    let addrs = support::worker_addrs(&targets)?;
    ensure!(addrs.len() == 2, "{addrs:?}");

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        for (i, (addr, want)) in addrs.iter().zip(expected()).enumerate() {
            let mut client = ExpertServiceClient::connect(format!("http://{addr}")).await?;
            let info = client.info(InfoRequest {}).await?.into_inner();
            let held: Vec<(u32, Vec<u32>)> = info
                .held
                .iter()
                .map(|h| (h.layer, h.experts.clone()))
                .collect();
            ensure!(held == want, "worker {i} holds {held:?}, not {want:?}");
            let pairs: usize = want.iter().map(|(_, e)| e.len()).sum();
            let (_, _, metrics) = support::http(addr, "GET", "/metrics", "")?;
            let weights = support::metric(
                &metrics,
                "tramontane_worker_memory_bytes{kind=\"weights\",dtype=\"f32\"}",
            )
            .context("no weights memory metric")?;
            ensure!(
                weights == pairs as f64 * EXPERT_BYTES,
                "worker {i}: {weights} bytes of weights for {pairs} experts"
            );
        }
        Ok(())
    })?;

    let model = model.to_str().context("path")?;
    for prompt in ["Hello world", "The experts of layer one are"] {
        let remote = greedy(&["--server", &serve.process.addr], prompt)?;
        let local = greedy(&["--model", model], prompt)?;
        ensure!(
            remote["token_ids"] == local["token_ids"] && remote["text"] == local["text"],
            "{prompt:?}: {remote} vs {local}"
        );
    }
    Ok(())
}

#[test]
fn worker_refuses_a_placement_it_has_no_share_of() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny"])?;
    let placement = dir.path().join("placement.json");
    std::fs::write(&placement, PLACEMENT)?;
    // Worker 2 of 3 holds nothing.
    let idle = dir.path().join("idle.json");
    std::fs::write(
        &idle,
        PLACEMENT.replace(r#""workers": 2"#, r#""workers": 3"#),
    )?;
    // 1 layer where the model has 2.
    let short = dir.path().join("short.json");
    std::fs::write(
        &short,
        r#"{"workers": 1, "experts": [[[0], [0], [0], [0], [0], [0], [0], [0]]]}"#,
    )?;
    let model = model.to_str().context("path")?;
    let path = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--placement".into(),
                path(&placement),
                "--worker-index".into(),
                "5".into(),
            ],
            "--worker-index 5 is out of range",
        ),
        (
            vec![
                "--placement".into(),
                path(&idle),
                "--worker-index".into(),
                "2".into(),
            ],
            "no expert",
        ),
        (
            vec![
                "--placement".into(),
                path(&short),
                "--worker-index".into(),
                "0".into(),
            ],
            "1 layers, the model has 2",
        ),
        (
            vec!["--placement".into(), path(&placement)],
            "--worker-index",
        ),
        (
            vec![
                "--placement".into(),
                path(&placement),
                "--worker-index".into(),
                "0".into(),
                "--experts".into(),
                "0-3".into(),
            ],
            "--experts",
        ),
    ];
    for (args, message) in cases {
        let output = support::tramontane()
            .args(["worker", "--model", model, "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{args:?} was accepted");
        ensure!(
            stderr.contains(message),
            "{args:?}: the error does not say {message:?}: {stderr}"
        );
    }
    Ok(())
}
