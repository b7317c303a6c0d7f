//! # tramontane-dispatch
//!
//! The router's client of its expert workers: [`RemoteExperts`] is the
//! model's `Experts` seam over gRPC. For every MoE layer it plans the routed
//! tokens over the live replicas of their experts, sends each worker its
//! share (one Forward per worker, all at once, on a runtime the engine
//! thread drives), checks the answers and adds them back, failing over when
//! a worker fails. The router and the measurements (`tramontane-measure`)
//! both use it; it knows nothing of the public APIs.
//!
//! # Layout
//!
//! - [`remote`]: [`RemoteExperts`], a layer's dispatch from its start to its
//!   finish.
//! - [`workers`]: the workers by index ([`WorkerLink`]), added while serving.
//! - [`placement_view`]: who holds what, by epoch; switches between steps.
//! - [`pool`]: the expert pool while serving: rebalances (load, switch, drop).
//! - [`combine`]: the host side without tensors: routed pairs, answers
//!   added back, stranded tokens.
//! - [`forward`]: one Forward, its deadline, its retry, its answer checked.
//! - [`data_path`]: the runtime and connections the Forwards use.
//! - [`micro_batches`]: into how many micro-batches a step splits.
//! - [`cluster`]: connect and check workers at start, probe them after.
//! - [`phases`]: where a layer's dispatch spends its time;
//!   [`expert_load`]: tokens per expert and worker.
//! - [`error`]: what goes wrong, typed ([`error::DispatchError`]).
//! - [`metrics`]: the dispatch's Prometheus metrics.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod combine;
pub mod data_path;
pub mod error;
pub mod expert_load;
pub mod forward;
pub mod metrics;
pub mod micro_batches;
pub mod phases;
pub mod placement_view;
pub mod pool;
pub mod remote;
pub mod workers;

pub use micro_batches::MicroBatches;
pub use remote::RemoteExperts;
pub use workers::{WorkerLink, Workers};
