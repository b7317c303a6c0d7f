//! Round trips of one layer's Forward with a one-row payload to a running
//! worker, beside the bare gRPC round trip of `Info` (no compute, no thread
//! hand-off) — `tramontane bench-dispatch`.

use std::time::Instant;

use serde::Serialize;
use tramontane_config::Dtype;
use tramontane_proto::codec;
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ExpertRows, ForwardRequest, InfoRequest};

use crate::error::MeasureError;

/// Warm-up round trips before the timed ones.
const WARM_UP: usize = 20;

/// Percentiles of the round trips, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrips {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub info_p50_us: f64,
    pub info_p99_us: f64,
}

/// p-th percentile (0..=100) of sorted samples (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// `samples` Forward and Info round trips to the worker at `addr`, one after
/// the other, after [`WARM_UP`] of each.
pub async fn round_trips(addr: &str, samples: usize) -> Result<RoundTrips, MeasureError> {
    if samples == 0 {
        return Err(MeasureError::Invalid("--samples must be at least 1".into()));
    }
    let mut client = ExpertServiceClient::connect(tramontane_infra::grpc::uri(addr)).await?;
    let info = client.info(InfoRequest {}).await?.into_inner();
    let no_expert = || MeasureError::Invalid("the worker holds no expert".into());
    let held = info.held.first().ok_or_else(no_expert)?;
    let expert = *held.experts.first().ok_or_else(no_expert)?;
    let row: Vec<u8> = (0..info.hidden_size)
        .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
        .collect();
    let request = ForwardRequest {
        dispatch_id: 0,
        epoch: 0,
        layer: held.layer,
        hidden: Some(codec::payload(
            Dtype::F32,
            vec![1, info.hidden_size as i64],
            row,
        )),
        experts: vec![ExpertRows {
            expert,
            rows: vec![0],
            weights: vec![1.0],
        }],
    };
    let mut forward = Vec::with_capacity(samples);
    let mut info = Vec::with_capacity(samples);
    for i in 0..samples + WARM_UP {
        let start = Instant::now();
        client.forward(request.clone()).await?;
        let between = Instant::now();
        client.info(InfoRequest {}).await?;
        if i >= WARM_UP {
            forward.push((between - start).as_secs_f64() * 1e6);
            info.push(between.elapsed().as_secs_f64() * 1e6);
        }
    }
    forward.sort_by(f64::total_cmp);
    info.sort_by(f64::total_cmp);
    Ok(RoundTrips {
        samples: forward.len(),
        p50_us: percentile(&forward, 50.0),
        p99_us: percentile(&forward, 99.0),
        info_p50_us: percentile(&info, 50.0),
        info_p99_us: percentile(&info, 99.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 51.0);
        assert_eq!(percentile(&sorted, 99.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
