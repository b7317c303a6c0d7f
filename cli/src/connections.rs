//! The flags that bound the servers' connections (see the README's
//! "Connections"), as [`Limits`], fitted into the open-file limit.

use std::time::Duration;

use clap::Args;
use tramontane_infra::connections::Limits;
use tramontane_infra::connections::open_files::OpenFiles;

/// A timeout in whole seconds, at least 1.
fn seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".into()),
        Ok(s) => Ok(Duration::from_secs(s)),
        Err(e) => Err(format!("seconds expected: {e}")),
    }
}

/// A connection limit, at least 1.
fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("a count expected: {e}")),
    }
}

/// The router's listeners: the HTTP API (and --metrics-listen), and gRPC.
#[derive(Debug, Args)]
pub struct RouterConnectionArgs {
    /// Seconds an HTTP client has to send a request's head, and after
    /// connecting to send a whole first request (TLS handshake included).
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub http_header_timeout: Duration,
    /// Seconds an HTTP connection with no request in flight stays open.
    #[arg(long, default_value = "60", value_parser = seconds)]
    pub http_idle_timeout: Duration,
    /// Open connections per HTTP listener. At the limit a new connection
    /// takes the place of the one that has waited longest without a
    /// request in flight, or is closed at once when every one has one.
    #[arg(long, default_value = "1024", value_parser = count)]
    pub max_connections: usize,
    #[command(flatten)]
    pub grpc: GrpcConnectionArgs,
}

/// A gRPC listener: the router's public one, or a worker's.
#[derive(Debug, Args)]
pub struct GrpcConnectionArgs {
    /// Seconds a gRPC client has, after connecting, to send its first
    /// request (TLS handshake and HTTP/2 preface included).
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub grpc_handshake_timeout: Duration,
    /// Seconds a gRPC connection with no call in flight stays open (closed
    /// with GOAWAY; a router's health probes keep its links to workers busy).
    #[arg(long, default_value = "600", value_parser = seconds)]
    pub grpc_idle_timeout: Duration,
    /// Open gRPC connections. At the limit a new connection takes the place
    /// of the one that has waited longest without a call in flight. A
    /// worker needs one per router (and its Prometheus).
    #[arg(long, default_value = "256", value_parser = count)]
    pub grpc_max_connections: usize,
}

impl GrpcConnectionArgs {
    fn limits(&self, max_connections: usize) -> Limits {
        Limits {
            header_timeout: self.grpc_handshake_timeout,
            idle_timeout: self.grpc_idle_timeout,
            max_connections,
        }
    }

    /// A worker's limits, fitted into the open-file limit (raised first).
    pub fn worker_limits(&self) -> Limits {
        let mut limits = [("--grpc-max-connections", self.grpc_max_connections)];
        if let Some(files) = OpenFiles::raise() {
            files.fit(&mut limits);
        }
        self.limits(limits[0].1)
    }
}

/// What the router's HTTP listeners and its gRPC listener are held to.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    pub http: Limits,
    pub grpc: Limits,
}

impl RouterConnectionArgs {
    /// The limits, fitted into the open-file limit (raised first) with
    /// `http_listeners` HTTP listeners (1, or 2 with --metrics-listen).
    pub fn limits(&self, http_listeners: usize) -> RouterLimits {
        let mut limits = [
            ("--max-connections", self.max_connections * http_listeners),
            ("--grpc-max-connections", self.grpc.grpc_max_connections),
        ];
        if let Some(files) = OpenFiles::raise() {
            files.fit(&mut limits);
        }
        RouterLimits {
            http: Limits {
                header_timeout: self.http_header_timeout,
                idle_timeout: self.http_idle_timeout,
                max_connections: (limits[0].1 / http_listeners).max(1),
            },
            grpc: self.grpc.limits(limits[1].1),
        }
    }
}
