//! The dispatch's Prometheus metrics, which the router's process exports
//! (`tramontane_router_*`): declared here, described and given their
//! histogram buckets by the router's recorder ([`describe`], [`BUCKETS`]).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use tramontane_infra::metrics::STEP_SECONDS_BUCKETS;

pub const ROUTED_TOKENS_TOTAL: &str = "tramontane_router_routed_tokens_total";
pub const EXPERT_BALANCEDNESS: &str = "tramontane_router_expert_balancedness_ratio";
pub const WORKER_PAIRS_TOTAL: &str = "tramontane_router_worker_expert_pairs_total";
pub const DISPATCH_LATENCY: &str = "tramontane_router_dispatch_latency_seconds";
pub const DISPATCH_PHASE: &str = "tramontane_router_dispatch_phase_seconds";
pub const DISPATCH_BYTES_TOTAL: &str = "tramontane_router_dispatch_bytes_total";
pub const DISPATCH_ERRORS_TOTAL: &str = "tramontane_router_dispatch_errors_total";
pub const WORKER_UP: &str = "tramontane_router_worker_up";
pub const PLACEMENT_EPOCH: &str = "tramontane_router_placement_epoch";
pub const REBALANCES_TOTAL: &str = "tramontane_router_rebalances_total";
pub const PAIRS_MOVED_TOTAL: &str = "tramontane_router_expert_pairs_moved_total";
pub const BYTES_LOADED_TOTAL: &str = "tramontane_router_expert_bytes_loaded_total";
pub const HEALS_TOTAL: &str = "tramontane_router_self_heals_total";
pub const REBALANCE_BALANCEDNESS: &str = "tramontane_router_rebalance_balancedness_ratio";

/// From 5 µs to seconds, for the phases of one layer's dispatch.
const PHASE_SECONDS_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The buckets of the dispatch's histograms.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (DISPATCH_LATENCY, STEP_SECONDS_BUCKETS),
    (DISPATCH_PHASE, PHASE_SECONDS_BUCKETS),
];

/// Describes the dispatch's metrics to the installed recorder.
pub fn describe() {
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
        DISPATCH_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of the Forwards' protobuf messages by worker and direction (sent: hidden states and routing; received: the experts' sums)."
    );
    describe_counter!(
        DISPATCH_ERRORS_TOTAL,
        "Failed Forwards by worker and gRPC code."
    );
    describe_gauge!(WORKER_UP, "1 while the worker answers, 0 while it is down.");
    describe_gauge!(
        PLACEMENT_EPOCH,
        "Changes of the router's view of which worker holds which expert since the start."
    );
    describe_counter!(
        REBALANCES_TOTAL,
        "Rebalances of the experts by outcome: moved, unchanged (nothing paid), failed."
    );
    describe_counter!(
        PAIRS_MOVED_TOTAL,
        Unit::Count,
        "(layer, expert) pairs loaded onto workers that did not hold them: rebalances, workers removed or lost."
    );
    describe_counter!(
        BYTES_LOADED_TOTAL,
        Unit::Bytes,
        "Bytes of expert weights workers loaded for changes of the pool."
    );
    describe_counter!(
        HEALS_TOTAL,
        "Workers lost whose experts were moved onto the others (--self-heal)."
    );
    describe_gauge!(
        REBALANCE_BALANCEDNESS,
        "The last rebalance's mean balancedness of the MoE layers under the recent load, before and after (as planned)."
    );
}
