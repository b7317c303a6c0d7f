//! What both ends of the router ↔ worker gRPC link agree on, and the
//! bounds every server of this project keeps (see [`crate::connections`]).

use std::time::Duration;

/// Largest gRPC message accepted or sent, by default: a prefill chunk of
/// 8192 tokens of hidden size 4096 in f32 is 128 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// HTTP/2 streams one client connection may hold open at once; past it
/// the server refuses new streams (REFUSED_STREAM) instead of queueing them.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest HTTP/2 header list (the request's metadata) a server accepts.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;
/// How often an idle connection is pinged, and how long the peer has to
/// answer before the connection is dropped: a peer that vanished without
/// closing (a host that went away) frees its resources.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive of accepted connections.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The gRPC code as its canonical name (a metrics label).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A `host:port` as a URI tonic can connect to (`http://` unless a scheme is given).
pub fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A `host:port` as a URI for a TLS connection (`https://` unless a scheme is given).
pub fn tls_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(uri("https://w:1"), "https://w:1");
        assert_eq!(tls_uri("127.0.0.1:1"), "https://127.0.0.1:1");
    }
}
