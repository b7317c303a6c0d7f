//! The router's Prometheus metrics: declared once here, with descriptions
//! and explicit histogram buckets; rendered on the HTTP port's `/metrics`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tramontane_infra::metrics::{STEP_SECONDS_BUCKETS, install_recorder};

pub const RUNNING_REQUESTS: &str = "tramontane_router_running_requests";
pub const WAITING_REQUESTS: &str = "tramontane_router_waiting_requests";
pub const KV_CACHE_USED_TOKENS: &str = "tramontane_router_kv_cache_used_tokens";
pub const KV_CACHE_TOTAL_TOKENS: &str = "tramontane_router_kv_cache_total_tokens";
pub const KV_CACHE_BYTES: &str = "tramontane_router_kv_cache_bytes";
pub const PREEMPTIONS_TOTAL: &str = "tramontane_router_preemptions_total";
pub const BATCH_SIZE: &str = "tramontane_router_batch_size";
pub const BATCH_TOKENS: &str = "tramontane_router_batch_tokens";
pub const REQUESTS_TOTAL: &str = "tramontane_router_requests_total";
pub const PROMPT_TOKENS_TOTAL: &str = "tramontane_router_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "tramontane_router_generation_tokens_total";
pub const QUEUE_TIME: &str = "tramontane_router_request_queue_time_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "tramontane_router_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "tramontane_router_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "tramontane_router_e2e_request_latency_seconds";
pub const STEP_DURATION: &str = "tramontane_router_step_duration_seconds";
pub const ROUTED_TOKENS_TOTAL: &str = "tramontane_router_routed_tokens_total";
pub const EXPERT_BALANCEDNESS: &str = "tramontane_router_expert_balancedness_ratio";
pub const WORKER_PAIRS_TOTAL: &str = "tramontane_router_worker_expert_pairs_total";
pub const DISPATCH_LATENCY: &str = "tramontane_router_dispatch_latency_seconds";
pub const DISPATCH_PHASE: &str = "tramontane_router_dispatch_phase_seconds";
pub const DISPATCH_ERRORS_TOTAL: &str = "tramontane_router_dispatch_errors_total";
pub const WORKER_UP: &str = "tramontane_router_worker_up";

/// From a millisecond to a few minutes, for request latencies.
const REQUEST_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0,
];
/// From 5 µs to seconds, for the phases of one layer's dispatch.
const PHASE_SECONDS_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const BATCH_TOKENS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

fn describe() {
    describe_gauge!(RUNNING_REQUESTS, "Sequences in the running batch.");
    describe_gauge!(
        WAITING_REQUESTS,
        "Requests accepted and waiting for admission."
    );
    describe_gauge!(
        KV_CACHE_USED_TOKENS,
        "KV cache positions reserved by running sequences, in whole blocks."
    );
    describe_gauge!(
        KV_CACHE_TOTAL_TOKENS,
        "KV cache positions the pool holds (--max-kv-tokens in whole blocks)."
    );
    describe_gauge!(
        KV_CACHE_BYTES,
        Unit::Bytes,
        "Bytes of the KV pool, allocated at start."
    );
    describe_counter!(
        PREEMPTIONS_TOTAL,
        Unit::Count,
        "Sequences preempted (and requeued, to be recomputed) because the KV cache ran out."
    );
    describe_histogram!(BATCH_SIZE, "Sequences in one forward step.");
    describe_histogram!(
        BATCH_TOKENS,
        "Tokens (decode tokens and prompt chunks) in one forward step."
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "Finished requests by endpoint and status (HTTP code or gRPC code name)."
    );
    describe_counter!(PROMPT_TOKENS_TOTAL, Unit::Count, "Prompt tokens prefilled.");
    describe_counter!(GENERATION_TOKENS_TOTAL, Unit::Count, "Tokens generated.");
    describe_histogram!(
        QUEUE_TIME,
        Unit::Seconds,
        "From submission to admission into the running batch."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From submission to the first generated token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Between successive tokens of a request."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "From submission to the last token (or cancellation)."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "One forward step of the batch."
    );
    describe_counter!(
        ROUTED_TOKENS_TOTAL,
        Unit::Count,
        "Tokens the gate routed to each (layer, expert); k per token and layer."
    );
    describe_gauge!(
        EXPERT_BALANCEDNESS,
        "Per layer, mean / max of (token, expert) pairs per worker over the last dispatches; 1 is even."
    );
    describe_counter!(
        WORKER_PAIRS_TOTAL,
        Unit::Count,
        "(token, expert) pairs each worker computed."
    );
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "One layer's Forward to one worker, round trip."
    );
    describe_histogram!(
        DISPATCH_PHASE,
        Unit::Seconds,
        "One layer's dispatch by phase: layer (all of it), encode, wait (for all Forwards), decode and combine on the router; per Forward round_trip, the worker's worker_decode, worker_queue, worker_compute and worker_encode, and transport (the round trip less the worker's time)."
    );
    describe_counter!(
        DISPATCH_ERRORS_TOTAL,
        "Failed Forwards by worker and gRPC code."
    );
    describe_gauge!(WORKER_UP, "1 while the worker answers, 0 while it is down.");
}

/// Installs the process-wide recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    let handle = install_recorder(&[
        (BATCH_SIZE, BATCH_SIZE_BUCKETS),
        (BATCH_TOKENS, BATCH_TOKENS_BUCKETS),
        (QUEUE_TIME, REQUEST_SECONDS_BUCKETS),
        (TIME_TO_FIRST_TOKEN, REQUEST_SECONDS_BUCKETS),
        (INTER_TOKEN_LATENCY, REQUEST_SECONDS_BUCKETS),
        (E2E_REQUEST_LATENCY, REQUEST_SECONDS_BUCKETS),
        (STEP_DURATION, STEP_SECONDS_BUCKETS),
        (DISPATCH_LATENCY, STEP_SECONDS_BUCKETS),
        (DISPATCH_PHASE, PHASE_SECONDS_BUCKETS),
    ]);
    describe();
    handle
}
