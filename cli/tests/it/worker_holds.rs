//! A worker loads and drops (layer, expert) pairs while serving (`Hold`):
//! what it reports holding follows, a loaded pair computes what a worker
//! that loaded it at start computes, a dropped pair is NOT_FOUND, the
//! metrics count it, and bad pairs are INVALID_ARGUMENT naming the field.

use anyhow::{Context, Result, ensure};
use tonic::Code;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{
    ExpertPair, ExpertRows, ForwardRequest, HoldRequest, InfoRequest, TensorPayload,
};

use crate::support;

const HIDDEN: usize = 64;

fn forward(layer: u32, expert: u32) -> ForwardRequest {
    let rows = 3;
    let values: Vec<u8> = (0..rows * HIDDEN)
        .flat_map(|i| (((i * 13) % 11) as f32 * 0.07 - 0.3).to_le_bytes())
        .collect();
    ForwardRequest {
        dispatch_id: 7,
        epoch: 0,
        layer,
        hidden: Some(TensorPayload {
            dtype: 1,
            shape: vec![rows as i64, HIDDEN as i64],
            data: values.into(),
        }),
        experts: vec![ExpertRows {
            expert,
            rows: vec![0, 2],
            weights: vec![0.6, 0.4],
        }],
    }
}

fn pair(layer: u32, expert: u32) -> ExpertPair {
    ExpertPair { layer, expert }
}

#[test]
fn a_worker_loads_and_drops_pairs_while_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    support::gen_model(dir.path(), &["--preset", "tiny"])?;
    let model = dir.path().to_str().context("model path")?.to_string();
    let spawn = |experts: &str| {
        support::spawn_listening(&[
            "worker",
            "--model",
            &model,
            "--experts",
            experts,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
        ])
    };
    let worker = spawn("0-3")?;
    let reference = spawn("0-7")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{}", worker.addr)).await?;
        let mut all = ExpertServiceClient::connect(format!("http://{}", reference.addr)).await?;
        let before = client.info(InfoRequest {}).await?.into_inner();
        let missing = client.forward(forward(1, 5)).await.unwrap_err();
        ensure!(missing.code() == Code::NotFound, "{missing:?}");

        let held = client
            .hold(HoldRequest {
                epoch: 0,
                load: vec![pair(1, 5), pair(0, 6), pair(1, 1)],
                drop: vec![pair(1, 0)],
            })
            .await?
            .into_inner();
        let loaded: Vec<(u32, u32)> = held
            .loaded
            .iter()
            .filter_map(|l| l.pair.as_ref().map(|p| (p.layer, p.expert)))
            .collect();
        ensure!(loaded == [(1, 5), (0, 6)], "(1, 1) was held: {loaded:?}");
        for l in &held.loaded {
            println!("loaded {:?} in {:.3} ms", l.pair, l.load_ns as f64 / 1e6);
        }
        ensure!(held.dropped.len() == 1 && held.dropped[0] == pair(1, 0));
        let experts = |info: &[tramontane_proto::v1::LayerExperts]| -> Vec<(u32, Vec<u32>)> {
            info.iter().map(|l| (l.layer, l.experts.clone())).collect()
        };
        ensure!(
            experts(&held.held) == [(0, vec![0, 1, 2, 3, 6]), (1, vec![1, 2, 3, 5])],
            "{:?}",
            held.held
        );
        let after = client.info(InfoRequest {}).await?.into_inner();
        ensure!(experts(&after.held) == experts(&held.held));
        // Two pairs more, one less: 5 in 4 out of the tiny model's 8 per layer.
        ensure!(
            after.weight_bytes * 8 == before.weight_bytes * 9,
            "{} then {}",
            before.weight_bytes,
            after.weight_bytes
        );

        for (layer, expert) in [(1, 5), (0, 6)] {
            let ours = client.forward(forward(layer, expert)).await?.into_inner();
            let theirs = all.forward(forward(layer, expert)).await?.into_inner();
            ensure!(
                ours.output.context("output")?.data == theirs.output.context("output")?.data,
                "layer {layer} expert {expert}"
            );
        }
        let dropped = client.forward(forward(1, 0)).await.unwrap_err();
        ensure!(dropped.code() == Code::NotFound, "{dropped:?}");

        for (request, says) in [
            (
                HoldRequest {
                    epoch: 0,
                    load: vec![pair(1, 9)],
                    drop: vec![],
                },
                "load[0]: layer 1 has no expert 9",
            ),
            (
                HoldRequest {
                    epoch: 0,
                    load: vec![],
                    drop: vec![pair(0, 2), pair(5, 0)],
                },
                "drop[1]: layer 5 is not a MoE layer",
            ),
            (
                HoldRequest {
                    epoch: 0,
                    load: vec![pair(0, 4)],
                    drop: vec![pair(0, 4)],
                },
                "also to be loaded",
            ),
        ] {
            let status = client.hold(request).await.unwrap_err();
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(status.message().contains(says), "{status:?}");
        }
        let unchanged = client.info(InfoRequest {}).await?.into_inner();
        ensure!(experts(&unchanged.held) == experts(&held.held));
        anyhow::Ok(())
    })?;
    let (_, _, metrics) = support::http(&worker.addr, "GET", "/metrics", "")?;
    for line in [
        "tramontane_worker_experts_held 9",
        "tramontane_worker_experts_loaded_total 2",
        "tramontane_worker_experts_dropped_total 1",
        "tramontane_worker_expert_load_seconds_count 2",
    ] {
        ensure!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    Ok(())
}
