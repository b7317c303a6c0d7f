//! The router's Prometheus metrics: declared once here, with descriptions
//! and explicit histogram buckets; rendered on the HTTP port's `/metrics`.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const RUNNING_REQUESTS: &str = "tramontane_router_running_requests";
pub const WAITING_REQUESTS: &str = "tramontane_router_waiting_requests";
pub const KV_CACHE_USED_TOKENS: &str = "tramontane_router_kv_cache_used_tokens";
pub const KV_CACHE_TOTAL_TOKENS: &str = "tramontane_router_kv_cache_total_tokens";
pub const BATCH_SIZE: &str = "tramontane_router_batch_size";
pub const BATCH_TOKENS: &str = "tramontane_router_batch_tokens";
pub const REQUESTS_TOTAL: &str = "tramontane_router_requests_total";
pub const PROMPT_TOKENS_TOTAL: &str = "tramontane_router_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "tramontane_router_generation_tokens_total";

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
        "KV cache tokens reserved by running sequences (prompt + max_tokens each)."
    );
    describe_gauge!(
        KV_CACHE_TOTAL_TOKENS,
        "KV cache tokens the router may reserve."
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
}

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BATCH_TOKENS.into()),
                        BATCH_TOKENS_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // A recorder set before (by an embedding program) keeps its place.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}
