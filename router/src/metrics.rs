//! The router's Prometheus metrics: declared once here (the dispatch's in
//! `tramontane_dispatch::metrics`), with descriptions and explicit
//! histogram buckets; rendered on the HTTP port's `/metrics`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tramontane_infra::metrics::{STEP_SECONDS_BUCKETS, install_recorder};

pub const RUNNING_REQUESTS: &str = "tramontane_router_running_requests";
pub const WAITING_REQUESTS: &str = "tramontane_router_waiting_requests";
pub const KV_CACHE_USED_TOKENS: &str = "tramontane_router_kv_cache_used_tokens";
pub const KV_CACHE_TOTAL_TOKENS: &str = "tramontane_router_kv_cache_total_tokens";
pub const KV_CACHE_BYTES: &str = "tramontane_router_kv_cache_bytes";
pub const PREEMPTIONS_TOTAL: &str = "tramontane_router_preemptions_total";
pub const PREFIX_CACHE_QUERIES: &str = "tramontane_router_prefix_cache_queries_tokens_total";
pub const PREFIX_CACHE_HITS: &str = "tramontane_router_prefix_cache_hits_tokens_total";
pub const PREFIX_CACHE_EVICTIONS: &str = "tramontane_router_prefix_cache_evictions_total";
pub const PREFIX_CACHE_BLOCKS: &str = "tramontane_router_prefix_cache_blocks";
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

/// From a millisecond to a few minutes, for request latencies.
const REQUEST_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0,
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
    describe_counter!(
        PREFIX_CACHE_QUERIES,
        Unit::Count,
        "Tokens of the sequences admitted with the prefix cache on (looked up in it)."
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        Unit::Count,
        "Tokens admitted sequences found in the prefix cache (not prefilled again)."
    );
    describe_counter!(
        PREFIX_CACHE_EVICTIONS,
        Unit::Count,
        "Cached KV blocks nobody held, handed out again for new positions."
    );
    describe_gauge!(
        PREFIX_CACHE_BLOCKS,
        "KV blocks the prefix cache knows (held by sequences or evictable)."
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
}

/// Installs the process-wide recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    let router: &[(&str, &[f64])] = &[
        (BATCH_SIZE, BATCH_SIZE_BUCKETS),
        (BATCH_TOKENS, BATCH_TOKENS_BUCKETS),
        (QUEUE_TIME, REQUEST_SECONDS_BUCKETS),
        (TIME_TO_FIRST_TOKEN, REQUEST_SECONDS_BUCKETS),
        (INTER_TOKEN_LATENCY, REQUEST_SECONDS_BUCKETS),
        (E2E_REQUEST_LATENCY, REQUEST_SECONDS_BUCKETS),
        (STEP_DURATION, STEP_SECONDS_BUCKETS),
    ];
    let buckets: Vec<_> = router
        .iter()
        .chain(tramontane_dispatch::metrics::BUCKETS)
        .copied()
        .collect();
    let handle = install_recorder(&buckets);
    describe();
    tramontane_dispatch::metrics::describe();
    handle
}
