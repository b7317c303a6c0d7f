//! The process-wide Prometheus recorder the router and the workers install:
//! every histogram with explicit buckets (no summaries: they cannot be
//! aggregated across processes).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// From 50 µs to seconds: one layer of one step.
pub const STEP_SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Installs the process-wide recorder once, with `buckets` per histogram
/// name, and returns its handle. A recorder set before keeps its place.
pub fn install_recorder(buckets: &[(&str, &[f64])]) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for &(name, bounds) in buckets {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), bounds)
                    .expect("bucket lists are not empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Resident set size of this process, from /proc (0 where there is none).
pub fn rss_bytes() -> u64 {
    let kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    kib * 1024
}
