//! The worker's Prometheus metrics, served as `GET /metrics` (HTTP/1.1) on
//! the same port as its gRPC service. Also the recorder setup the router
//! shares: every histogram with explicit buckets (no summaries: they cannot
//! be aggregated across processes).

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const FORWARD_LATENCY: &str = "tramontane_worker_forward_latency_seconds";
pub const COMPUTE_DURATION: &str = "tramontane_worker_compute_duration_seconds";
pub const EXPERT_TOKENS_TOTAL: &str = "tramontane_worker_expert_tokens_total";
pub const QUEUE_DEPTH: &str = "tramontane_worker_queue_depth";
pub const MEMORY_BYTES: &str = "tramontane_worker_memory_bytes";
pub const ERRORS_TOTAL: &str = "tramontane_worker_errors_total";

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

/// The worker's recorder, its metrics described.
pub fn install() -> PrometheusHandle {
    let handle = install_recorder(&[
        (FORWARD_LATENCY, STEP_SECONDS_BUCKETS),
        (COMPUTE_DURATION, STEP_SECONDS_BUCKETS),
    ]);
    describe_histogram!(
        FORWARD_LATENCY,
        Unit::Seconds,
        "One Forward, from its arrival to its answer (validation, queue, compute, encoding)."
    );
    describe_histogram!(
        COMPUTE_DURATION,
        Unit::Seconds,
        "The expert computation of one Forward on the compute thread."
    );
    describe_counter!(
        EXPERT_TOKENS_TOTAL,
        Unit::Count,
        "Token rows computed per (layer, expert)."
    );
    describe_gauge!(QUEUE_DEPTH, "Forwards waiting for the compute thread.");
    describe_gauge!(
        MEMORY_BYTES,
        Unit::Bytes,
        "Memory in use: kind=\"rss\" (the process), kind=\"weights\" (expert tensors)."
    );
    describe_counter!(ERRORS_TOTAL, "Failed Forwards by gRPC code.");
    handle
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

/// The gRPC code as its canonical name (a metrics label).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
