//! Bad gRPC input to a worker gets the right status code, naming the field,
//! and the worker still answers the next good request.

use anyhow::{Result, ensure};
use tonic::Code;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ExpertRows, ForwardRequest, InfoRequest, TensorPayload};

use crate::support;

const HIDDEN: usize = 64;

fn payload(rows: usize) -> TensorPayload {
    let values: Vec<u8> = (0..rows * HIDDEN)
        .flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes())
        .collect();
    TensorPayload {
        dtype: 1,
        shape: vec![rows as i64, HIDDEN as i64],
        data: values.into(),
    }
}

fn good() -> ForwardRequest {
    ForwardRequest {
        dispatch_id: 1,
        epoch: 0,
        layer: 1,
        hidden: Some(payload(3)),
        experts: vec![
            ExpertRows {
                expert: 0,
                rows: vec![0, 2],
                weights: vec![0.5, 1.0],
            },
            ExpertRows {
                expert: 3,
                rows: vec![2, 1],
                weights: vec![0.5, 1.0],
            },
        ],
    }
}

#[test]
fn bad_forward_requests_get_the_right_status_and_the_worker_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    support::gen_model(dir.path(), &["--preset", "tiny"])?;
    let model = dir.path().to_str().unwrap_or_default().to_string();
    let worker = support::spawn_listening(&[
        "worker",
        "--model",
        &model,
        "--experts",
        "0-3",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--max-message-bytes",
        "65536",
    ])?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{}", worker.addr))
            .await?
            .max_encoding_message_size(1 << 30);
        let info = client.info(InfoRequest {}).await?.into_inner();
        ensure!(
            info.num_experts == 8 && info.hidden_size == HIDDEN as u32,
            "{info:?}"
        );
        ensure!(
            info.held.len() == 2 && info.held.iter().all(|h| h.experts == vec![0, 1, 2, 3]),
            "{info:?}"
        );
        ensure!(info.device == "cpu", "{info:?}");
        let response = client.forward(good()).await?.into_inner();
        let output = response.output.unwrap_or_default();
        ensure!(output.shape == vec![3, HIDDEN as i64], "{:?}", output.shape);
        ensure!(response.dispatch_id == 1);

        let mut cases: Vec<(&str, ForwardRequest, Code, &str)> = Vec::new();
        let mut r = good();
        r.hidden.as_mut().unwrap().data = r.hidden.as_ref().unwrap().data.slice(0..100);
        cases.push(("wrong byte length", r, Code::InvalidArgument, "hidden"));
        let mut r = good();
        r.hidden.as_mut().unwrap().dtype = 0;
        cases.push(("unspecified dtype", r, Code::InvalidArgument, "dtype"));
        let mut r = good();
        r.hidden.as_mut().unwrap().dtype = 42;
        cases.push(("unknown dtype", r, Code::InvalidArgument, "dtype"));
        let mut r = good();
        r.hidden.as_mut().unwrap().shape = vec![4, 48];
        cases.push(("shape mismatch", r, Code::InvalidArgument, "hidden_size"));
        let mut r = good();
        r.hidden.as_mut().unwrap().shape = vec![3 * HIDDEN as i64];
        cases.push(("wrong rank", r, Code::InvalidArgument, "hidden"));
        let mut r = good();
        r.hidden = None;
        cases.push(("missing payload", r, Code::InvalidArgument, "hidden"));
        let mut r = good();
        r.experts[0].expert = 8;
        cases.push((
            "unknown expert",
            r,
            Code::InvalidArgument,
            "experts[0].expert",
        ));
        let mut r = good();
        r.experts[1].expert = 5;
        cases.push(("expert not held", r, Code::NotFound, "not held"));
        let mut r = good();
        r.layer = 2;
        cases.push(("layer out of range", r, Code::InvalidArgument, "layer"));
        let mut r = good();
        r.experts[0].weights[1] = f32::NAN;
        cases.push(("NaN weight", r, Code::InvalidArgument, "weights"));
        let mut r = good();
        r.experts[1].weights[0] = f32::INFINITY;
        cases.push(("infinite weight", r, Code::InvalidArgument, "weights"));
        let mut r = good();
        r.experts[0].rows = vec![0, 3];
        cases.push(("row out of range", r, Code::InvalidArgument, "rows"));
        let mut r = good();
        r.experts[0].weights.pop();
        cases.push((
            "rows and weights disagree",
            r,
            Code::InvalidArgument,
            "weights",
        ));
        let mut r = good();
        r.experts[1].expert = 0;
        cases.push(("expert twice", r, Code::InvalidArgument, "twice"));
        cases.push((
            "empty request",
            ForwardRequest::default(),
            Code::InvalidArgument,
            "empty",
        ));
        let mut r = good();
        r.hidden = Some(payload(512)); // 128 KiB > the 64 KiB limit
        r.experts[0].rows = vec![0];
        r.experts[0].weights = vec![1.0];
        r.experts.truncate(1);
        cases.push(("over the size limit", r, Code::OutOfRange, "too large"));

        for (name, request, code, needle) in cases {
            let status = client.forward(request).await.unwrap_err();
            ensure!(
                status.code() == code,
                "{name}: {:?} {}",
                status.code(),
                status.message()
            );
            ensure!(
                status.message().contains(needle),
                "{name}: {:?} should name {needle:?}",
                status.message()
            );
            let again = client.forward(good()).await?.into_inner();
            ensure!(
                again.output.unwrap_or_default().data == output.data,
                "{name}: worker answers differently after it"
            );
        }
        // The refusals are counted by code on the worker's /metrics.
        let (status, _, metrics) = support::http(&worker.addr, "GET", "/metrics", "")?;
        ensure!(status == 200, "worker /metrics: {status}");
        let invalid = support::metric(
            &metrics,
            "tramontane_worker_errors_total{code=\"INVALID_ARGUMENT\"}",
        )
        .unwrap_or(0.0);
        let not_found = support::metric(
            &metrics,
            "tramontane_worker_errors_total{code=\"NOT_FOUND\"}",
        )
        .unwrap_or(0.0);
        ensure!(invalid >= 10.0 && not_found >= 1.0, "{metrics}");
        Ok(())
    })
}
