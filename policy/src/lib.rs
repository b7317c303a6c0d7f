//! # tramontane-policy
//!
//! The decisions of serving that need no tensor: the router takes them on
//! every step, and the capacity planner (which never links libtorch)
//! simulates them with the very same code.
//!
//! # Layout
//!
//! - [`placement`]: which worker holds which expert (default or file, replicas);
//!   [`held_experts`]: what one worker holds (`--experts 0,2,5-7`, or its
//!   share of a placement file).
//! - [`scheduler`]: the scheduler's limits and the plan of one step (decodes,
//!   then prompt chunks under the token budget).
//! - [`admission`]: the waiting queue and the KV reservations: which requests
//!   join the running batch; [`kv_blocks`]: the cache's unit of allocation.
//! - [`dispatch_plan`]: which live worker computes each routed (token, expert)
//!   pair of a layer.
//! - [`eplb`]: expert replication and placement (DeepSeek's EPLB), for the
//!   planner offline and the router's rebalancing while serving.
//! - [`rebalance`]: while serving, the placement to switch to for the
//!   recent load, and what each worker loads and drops.
//! - [`membership`]: workers joining and leaving the pool while it serves.
//! - [`routing_trace`]: `--record-routing`, the experts every token chose.

#![forbid(unsafe_code)]

pub mod admission;
pub mod dispatch_plan;
pub mod eplb;
pub mod held_experts;
pub mod kv_blocks;
pub mod membership;
pub mod placement;
pub mod rebalance;
pub mod routing_trace;
pub mod scheduler;
mod torch_order;
