//! The HTTP servers of this project (the OpenAI API, the observability
//! routes, the router's and the workers' gRPC): hyper over accepted TCP
//! connections, TLS where configured, each connection held to the
//! [`Limits`] so that slow, silent or idle clients cannot take the
//! process's connections or file descriptors:
//!
//! - a connection must complete a request `header_timeout` after it is
//!   accepted (the TLS handshake, HTTP/2's preface and the first request's
//!   head included), and an HTTP/1.1 request head must complete within
//!   `header_timeout` of its first byte;
//! - a connection with no request in flight for `idle_timeout` is closed
//!   (gracefully: HTTP/2 GOAWAY);
//! - at `max_connections` a new connection takes the place of the one that
//!   has waited longest without a request in flight (one that never sent a
//!   complete request first); with none such it is closed at once.
//!
//! A request is in flight from its complete head until its response body
//! ends: a long generation, streamed or not, is never cut.
//!
//! - [`activity`]: one connection's state and deadlines.
//! - [`tracked`]: the I/O, service and body wrappers that report to it.
//! - [`open_files`]: the file-descriptor budget the limits must fit.

pub mod activity;
pub mod open_files;
pub mod tracked;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::peer::PeerName;
use tokio_rustls::rustls::ServerConfig;

pub use activity::{Activity, Closing, Timeouts};
use tracked::{TrackedIo, TrackedService};

use crate::grpc;

/// Open connections per listener (gauge).
pub const CONNECTIONS_OPEN: &str = "tramontane_connections_open";
/// Connections the server closed, by listener and reason (counter): see
/// [`Closing::label`], and `refused` (at the limit, with none to evict).
pub const CONNECTIONS_CLOSED: &str = "tramontane_connections_closed_total";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service a [`Server`] serves: an axum router, tonic's routes.
pub trait Served<B>:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Served<B> for S where
    S: tower_service::Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + 'static
{
}

/// The body of a served response.
pub trait ResponseBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> ResponseBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

/// How long an idle connection asked to close gracefully may take to do so.
const GRACE: Duration = Duration::from_secs(2);
/// How long the accept loop waits for connections asked to close, when
/// too many still are open, before it refuses the new one.
const CLOSING_WAIT: Duration = Duration::from_secs(1);
/// How long a connection may take to end once the server stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What every connection of one listener is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// For the first complete request after accepting (TLS and HTTP/2
    /// handshakes included), and for each HTTP/1.1 request head.
    pub header_timeout: Duration,
    /// With no request in flight.
    pub idle_timeout: Duration,
    /// Open connections at once.
    pub max_connections: usize,
}

impl Limits {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            header: self.header_timeout,
            idle: self.idle_timeout,
        }
    }
}

/// One listener's server: its name (the metrics label), limits, TLS and
/// protocols.
#[derive(Clone)]
pub struct Server {
    name: &'static str,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    http1: bool,
}

impl Server {
    /// HTTP/1.1 and HTTP/2 (h2c or ALPN) without TLS.
    pub fn new(name: &'static str, limits: Limits) -> Self {
        Self {
            name,
            limits,
            tls: None,
            http1: true,
        }
    }

    /// Over TLS with `config` (None: without).
    pub fn tls(mut self, config: Option<Arc<ServerConfig>>) -> Self {
        self.tls = config.map(TlsAcceptor::from);
        self
    }

    /// HTTP/2 only (gRPC).
    pub fn http2_only(mut self) -> Self {
        self.http1 = false;
        self
    }

    /// Serves `service` on `listener` until `shutdown`; then stops
    /// accepting, asks every connection to close once its requests are
    /// answered, and returns when all have.
    pub async fn serve<S, B>(
        self,
        listener: TcpListener,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()>
    where
        S: Served<B>,
        B: ResponseBody,
    {
        describe();
        let builder = Arc::new(self.builder());
        let open = Arc::new(Open::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let (tcp, _) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little.
                        tracing::warn!(listener = server.name, %error, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !open.admit(server.limits.max_connections).await {
                metrics::counter!(CONNECTIONS_CLOSED, "listener" => server.name, "reason" => "refused")
                    .increment(1);
                continue; // dropping it closes it
            }
            let activity = Arc::new(Activity::new());
            let id = open.add(activity.clone(), server.name);
            let (server, builder, service, open, stop) = (
                server.clone(),
                builder.clone(),
                service.clone(),
                open.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(async move {
                server
                    .connection(tcp, activity, &builder, service, stop)
                    .await;
                open.remove(id, server.name);
            });
        }
        drop(listener);
        drop(stop_rx);
        let _ = stop_tx.send(true);
        stop_tx.closed().await;
        Ok(())
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // HTTP/1.1 heads are timed by Activity, not by hyper.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(grpc::MAX_CONCURRENT_STREAMS)
            .max_header_list_size(grpc::MAX_HEADER_LIST_BYTES)
            .keep_alive_interval(grpc::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(grpc::KEEPALIVE_TIMEOUT);
        if self.http1 {
            builder
        } else {
            builder.http2_only()
        }
    }

    /// Serves one connection until it ends, its limits close it, or the
    /// server stops (then gracefully).
    async fn connection<S, B>(
        &self,
        tcp: TcpStream,
        activity: Arc<Activity>,
        builder: &auto::Builder<TokioExecutor>,
        service: S,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) where
        S: Served<B>,
        B: ResponseBody,
    {
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(grpc::TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let timeouts = self.limits.timeouts();
        let io = TrackedIo::new(tcp, activity.clone());
        let service = TrackedService::new(service, activity.clone());
        let closed = |why: Closing| {
            metrics::counter!(CONNECTIONS_CLOSED, "listener" => self.name, "reason" => why.label())
                .increment(1);
        };
        match &self.tls {
            None => {
                let service = TowerToHyperService::new(service);
                let conn = builder.serve_connection(TokioIo::new(io), service);
                self.drive(conn, &activity, timeouts, &mut stop, closed)
                    .await
            }
            Some(acceptor) => {
                let handshake = tokio::select! {
                    handshake = acceptor.accept(io) => handshake,
                    why = activity.closing(timeouts) => return closed(why),
                    _ = stopped(&mut stop) => return,
                };
                let Ok(tls) = handshake else {
                    return; // a failed handshake: rustls said why to the client
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|der| PeerName::of_certificate(der));
                let service = TowerToHyperService::new(service.with_peer(peer));
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                self.drive(conn, &activity, timeouts, &mut stop, closed)
                    .await
            }
        }
    }

    async fn drive<I, S, B>(
        &self,
        conn: auto::Connection<'_, I, S, TokioExecutor>,
        activity: &Activity,
        timeouts: Timeouts,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        closed: impl Fn(Closing),
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: ResponseBody,
        TokioExecutor: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
    {
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            why = activity.closing(timeouts) => {
                closed(why);
                // An idle connection ends between requests; one that never
                // completed a request, or whose head is late, ends now.
                if why == Closing::Idle || (why == Closing::Evicted && activity.between_requests()) {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GRACE, conn.as_mut()).await;
                }
                return;
            }
            _ = stopped(stop) => {}
        }
        // The server stops (after the router's drain): what is in flight
        // may finish, for a bounded time (a client that stopped reading
        // cannot hold the process).
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(STOP_GRACE, conn).await;
    }
}

fn describe() {
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Open client connections, per listener.");
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Client connections the server closed, per listener and reason: no_request (none complete within the header timeout of connecting), header_timeout (an HTTP/1.1 head), idle, evicted (room for a new one at the limit), refused (at the limit, none to evict)."
    );
}

/// Completes when the server stops.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stop| stop).await;
}

/// What [`Open::make_room`] found.
enum Room {
    /// Under the limit.
    Free,
    /// At the limit, a connection was asked to close.
    Evicted,
    /// At the limit, with none to evict: every connection has a request
    /// in flight.
    None,
    /// Too many asked to close are still open.
    Closing,
}

/// The open connections of one listener.
#[derive(Default)]
struct Open {
    connections: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Notified when a connection closes.
    closed: tokio::sync::Notify,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new connection may open (see [`Open::make_room`]); while
    /// too many connections asked to close are still open, the accept
    /// loop waits for them (new clients wait in the listen backlog), up to
    /// [`CLOSING_WAIT`].
    async fn admit(&self, max: usize) -> bool {
        let deadline = tokio::time::Instant::now() + CLOSING_WAIT;
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            match self.make_room(max) {
                Room::Free | Room::Evicted => return true,
                Room::None => return false,
                Room::Closing => {
                    if tokio::time::timeout_at(deadline, closed).await.is_err() {
                        return false;
                    }
                }
            }
        }
    }

    /// Whether a new connection may open: under `max`, or once the one
    /// that waited longest without a request in flight is asked to close;
    /// not while a quarter of `max` asked to close are still open.
    fn make_room(&self, max: usize) -> Room {
        let connections = self.lock();
        if connections.len() < max {
            return Room::Free;
        }
        if connections.len() >= max + max.div_ceil(4) {
            return Room::Closing;
        }
        let victim = connections
            .values()
            .filter_map(|activity| Some((activity.eviction_rank()?, activity)))
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, activity)| activity.clone());
        drop(connections);
        match victim {
            Some(activity) => {
                activity.evict();
                Room::Evicted
            }
            None => Room::None,
        }
    }

    fn add(&self, activity: Arc<Activity>, name: &'static str) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut connections = self.lock();
        connections.insert(id, activity);
        metrics::gauge!(CONNECTIONS_OPEN, "listener" => name).set(connections.len() as f64);
        id
    }

    fn remove(&self, id: u64, name: &'static str) {
        let mut connections = self.lock();
        connections.remove(&id);
        metrics::gauge!(CONNECTIONS_OPEN, "listener" => name).set(connections.len() as f64);
        drop(connections);
        self.closed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    //! Who makes room at the limit.

    use super::*;

    /// `n` connections, accepted 1 ms apart.
    async fn open_with(n: usize) -> (Open, Vec<Arc<Activity>>) {
        let open = Open::default();
        let mut activities = Vec::new();
        for _ in 0..n {
            tokio::time::advance(Duration::from_millis(1)).await;
            let activity = Arc::new(Activity::new());
            open.add(activity.clone(), "test");
            activities.push(activity);
        }
        (open, activities)
    }

    fn evicted(activity: &Activity) -> bool {
        activity.eviction_rank().is_none() && !activity.between_requests()
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_waiting_connection_without_a_request_makes_room() {
        let (open, a) = open_with(4).await;
        // 0 served a request and is idle; 1 has one in flight; 2 and 3
        // never sent one, 2 for longer.
        a[0].request_started(false);
        a[0].request_ended();
        a[1].request_started(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(open.make_room(5), Room::Free));
        assert!(matches!(open.make_room(4), Room::Evicted));
        assert!(evicted(&a[2]), "the oldest that never sent a request");
        assert!(matches!(open.make_room(4), Room::Evicted));
        assert!(evicted(&a[3]));
        // Then the idle one; never the one with a request in flight.
        assert!(matches!(open.make_room(4), Room::Evicted));
        assert!(a[0].eviction_rank().is_none());
        assert!(a[1].eviction_rank().is_none() && !a[1].between_requests());
        assert!(matches!(open.make_room(4), Room::None));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_waits_while_many_asked_to_close_are_still_open() {
        let (open, _a) = open_with(8).await;
        // 8 open at a limit of 6: the 2 over it (a quarter of 6, rounded
        // up) are closing; no more are evicted until one has closed.
        assert!(matches!(open.make_room(6), Room::Closing));
        assert!(matches!(open.make_room(7), Room::Evicted));
        let open = Arc::new(open);
        let closing = {
            let open = open.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                open.remove(0, "test");
            })
        };
        let started = tokio::time::Instant::now();
        assert!(open.admit(6).await, "admitted once one closed");
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        closing.await.unwrap();
        // Nobody closes: refused after the wait.
        assert!(!open.admit(5).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300) + CLOSING_WAIT);
    }
}
