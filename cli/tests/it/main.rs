//! The integration tests, in one binary: the real `tramontane` binary and
//! the processes it starts (workers, routers, `serve`) on loopback ports,
//! real clients (tonic, plain HTTP, the `openai` Python package), the
//! reference numerics of HF transformers, a real Prometheus. Tests of one
//! library alone live beside it, in its crate.

mod support;

mod admission;
mod bad_input;
mod connections;
mod dependencies;
mod families;
mod faults;
mod guarded;
mod harness;
mod helm;
mod hf_parity;
mod hosts;
mod image;
mod observability;
mod openai_api;
mod placement;
mod plan;
mod pool;
mod prometheus;
mod quantized;
mod routers;
mod serve;
mod sharded;
mod tls;
mod traces;
mod worker_holds;
mod worker_input;
