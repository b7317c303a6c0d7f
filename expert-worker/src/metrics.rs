//! The worker's Prometheus metrics, served as `GET /metrics` (HTTP/1.1) on
//! the same port as its gRPC service.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tramontane_infra::metrics::{STEP_SECONDS_BUCKETS, install_recorder};

pub const FORWARD_LATENCY: &str = "tramontane_worker_forward_latency_seconds";
pub const COMPUTE_DURATION: &str = "tramontane_worker_compute_duration_seconds";
pub const QUEUE_WAIT: &str = "tramontane_worker_queue_wait_seconds";
pub const BATCHED_FORWARDS: &str = "tramontane_worker_batched_forwards";
pub const ABANDONED_FORWARDS: &str = "tramontane_worker_abandoned_forwards_total";
pub const EXPERT_TOKENS_TOTAL: &str = "tramontane_worker_expert_tokens_total";
pub const QUEUE_DEPTH: &str = "tramontane_worker_queue_depth";
pub const MEMORY_BYTES: &str = "tramontane_worker_memory_bytes";
pub const ERRORS_TOTAL: &str = "tramontane_worker_errors_total";
pub const EXPERTS_HELD: &str = "tramontane_worker_experts_held";
pub const EXPERT_LOAD_DURATION: &str = "tramontane_worker_expert_load_seconds";
pub const EXPERTS_LOADED_TOTAL: &str = "tramontane_worker_experts_loaded_total";
pub const EXPERTS_DROPPED_TOTAL: &str = "tramontane_worker_experts_dropped_total";
pub const PLACEMENT_EPOCH: &str = "tramontane_worker_placement_epoch";

/// The worker's recorder, its metrics described.
pub fn install() -> PrometheusHandle {
    let handle = install_recorder(&[
        (FORWARD_LATENCY, STEP_SECONDS_BUCKETS),
        (COMPUTE_DURATION, STEP_SECONDS_BUCKETS),
        (QUEUE_WAIT, STEP_SECONDS_BUCKETS),
        (BATCHED_FORWARDS, &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]),
        (EXPERT_LOAD_DURATION, STEP_SECONDS_BUCKETS),
    ]);
    describe_gauge!(EXPERTS_HELD, "(layer, expert) pairs this worker holds.");
    describe_gauge!(
        PLACEMENT_EPOCH,
        "The highest router placement epoch a Forward or a Hold named."
    );
    describe_histogram!(
        EXPERT_LOAD_DURATION,
        Unit::Seconds,
        "Loading one (layer, expert) pair while serving (Hold), from the memory-mapped checkpoint."
    );
    describe_counter!(
        EXPERTS_LOADED_TOTAL,
        Unit::Count,
        "Pairs loaded while serving (Hold)."
    );
    describe_counter!(
        EXPERTS_DROPPED_TOTAL,
        Unit::Count,
        "Pairs dropped while serving (Hold)."
    );
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
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "How long one Forward waited for the compute thread."
    );
    describe_histogram!(
        BATCHED_FORWARDS,
        "Forwards of one layer computed together (those that waited while the thread was busy: from several routers, or micro-batches)."
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
        "Memory in use: kind=\"rss\" (the process), kind=\"weights\" (expert matrices, by the dtype they are held in: int8, bf16, ...)."
    );
    describe_counter!(ERRORS_TOTAL, "Failed Forwards by gRPC code.");
    describe_counter!(
        ABANDONED_FORWARDS,
        "Forwards dropped unrun because their caller gave up while they waited."
    );
    handle
}
