//! # tramontane-infra
//!
//! Service infrastructure the router and the expert workers share (and
//! nothing of the model): a worker's span continues the router's trace, both
//! render Prometheus metrics the same way, and they agree on gRPC limits.
//!
//! # Layout
//!
//! - [`trace_context`]: W3C `traceparent` in gRPC metadata, router to worker.
//! - [`metrics`]: the process-wide Prometheus recorder, shared bucket lists, RSS.
//! - [`connections`]: the HTTP and gRPC servers, each connection held to
//!   header and idle timeouts and a per-listener limit; the open-file budget.
//! - [`grpc`]: gRPC code names (metrics labels), message size limits, the
//!   servers' connection bounds, addresses.
//! - [`error`]: an error and its causes as one message, for clients and logs.
//! - [`tls`]: certificates, keys and CAs read once, as tonic and rustls configurations.
//! - [`certs`]: a CA and per-node certificates for a cluster (rcgen).

#![forbid(unsafe_code)]

pub mod certs;
pub mod connections;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod peer;
pub mod tls;
pub mod trace_context;
