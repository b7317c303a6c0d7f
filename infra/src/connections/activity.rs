//! What one connection is doing, and so when it must close: a connection
//! that has sent no complete request `header_timeout` after it was accepted
//! (a TLS handshake, the HTTP/2 preface or a request head that never ends);
//! an HTTP/1.1 connection whose next request head has been arriving for
//! `header_timeout`; a connection with no request in flight for
//! `idle_timeout`. While a request is in flight (until its response body
//! ends) nothing closes it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a connection is closed before its client closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// No complete request within the header timeout of being accepted.
    NoRequest,
    /// An HTTP/1.1 request head still incomplete after the header timeout.
    SlowHead,
    /// No request in flight for the idle timeout.
    Idle,
    /// Closed to make room for a new connection at the limit.
    Evicted,
}

impl Closing {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Closing::NoRequest => "no_request",
            Closing::SlowHead => "header_timeout",
            Closing::Idle => "idle",
            Closing::Evicted => "evicted",
        }
    }
}

/// The timeouts a connection is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

#[derive(Debug)]
struct State {
    /// Requests received so far.
    requests: u64,
    in_flight: usize,
    /// Since when no request is in flight (accepted, or the last one ended).
    waiting_since: Instant,
    /// When the first byte after the last request arrived, while none is
    /// in flight: an HTTP/1.1 head under way.
    head_started: Option<Instant>,
    http2: bool,
}

/// One connection's activity, shared by its I/O (bytes read), its service
/// (requests and their response bodies) and the task that closes it.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    state: Mutex<State>,
    evicted: AtomicBool,
    changed: Notify,
}

impl Activity {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            accepted: now,
            state: Mutex::new(State {
                requests: 0,
                in_flight: 0,
                waiting_since: now,
                head_started: None,
                http2: false,
            }),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // No code panics while holding it; a poisoned lock's state is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived from the client.
    pub fn read(&self) {
        let mut state = self.state();
        if state.requests > 0 && state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A request was received (its head is complete); it is in flight until
    /// [`Activity::request_ended`].
    pub fn request_started(&self, http2: bool) {
        let mut state = self.state();
        state.requests += 1;
        state.in_flight += 1;
        state.head_started = None;
        state.http2 = http2;
        drop(state);
        self.changed.notify_one();
    }

    /// A request's response was delivered or abandoned.
    pub fn request_ended(&self) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.waiting_since = Instant::now();
            state.head_started = None;
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Asks the connection to close (see [`Closing::Evicted`]).
    pub fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// When, at this moment, the connection is due to close and why; None
    /// while a request is in flight.
    pub fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Closing)> {
        let state = self.state();
        if state.in_flight > 0 {
            None
        } else if state.requests == 0 {
            Some((self.accepted + timeouts.header, Closing::NoRequest))
        } else if let (false, Some(started)) = (state.http2, state.head_started) {
            Some((started + timeouts.header, Closing::SlowHead))
        } else {
            Some((state.waiting_since + timeouts.idle, Closing::Idle))
        }
    }

    /// Since when the connection has been waiting for a request, when it
    /// could be evicted: one without a request in flight. Connections that
    /// never completed a request come first (the oldest first), then idle
    /// ones.
    pub fn eviction_rank(&self) -> Option<(bool, Instant)> {
        if self.evicted.load(Ordering::Relaxed) {
            return None; // already on its way out
        }
        let state = self.state();
        (state.in_flight == 0).then_some((state.requests > 0, state.waiting_since))
    }

    /// Whether it has served a request and has none in flight: it can end
    /// gracefully, between requests.
    pub fn between_requests(&self) -> bool {
        let state = self.state();
        state.requests > 0 && state.in_flight == 0
    }

    /// Completes when the connection must close, with the reason.
    pub async fn closing(&self, timeouts: Timeouts) -> Closing {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.evicted.load(Ordering::Relaxed) {
                return Closing::Evicted;
            }
            match self.deadline(timeouts) {
                None => changed.await,
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    //! The deadlines as the time goes on (tokio's paused clock).

    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_closes_at_the_header_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        activity.read(); // bytes of a first head: no difference
        assert_eq!(activity.closing(TIMEOUTS).await, Closing::NoRequest);
        assert_eq!(start.elapsed(), TIMEOUTS.header);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_closes_a_connection_with_a_request_in_flight() {
        let activity = std::sync::Arc::new(Activity::new());
        activity.request_started(false);
        let start = Instant::now();
        let ending = {
            let activity = activity.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                activity.request_ended();
            })
        };
        assert_eq!(activity.closing(TIMEOUTS).await, Closing::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(3600) + TIMEOUTS.idle);
        ending.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_head_after_a_request_has_the_header_timeout() {
        let activity = Activity::new();
        activity.request_started(false);
        activity.request_ended();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let head = Instant::now();
        activity.read();
        activity.read();
        assert_eq!(activity.closing(TIMEOUTS).await, Closing::SlowHead);
        assert_eq!(head.elapsed(), TIMEOUTS.header);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_bytes_between_requests_do_not_shorten_the_idle_timeout() {
        let activity = Activity::new();
        activity.request_started(true);
        activity.request_ended();
        let idle = Instant::now();
        activity.read(); // a ping
        assert_eq!(activity.closing(TIMEOUTS).await, Closing::Idle);
        assert_eq!(idle.elapsed(), TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_closes_at_once() {
        let activity = Activity::new();
        activity.evict();
        assert_eq!(activity.closing(TIMEOUTS).await, Closing::Evicted);
        assert_eq!(activity.eviction_rank(), None, "evicted once");
        let activity = Activity::new();
        assert_eq!(
            activity.eviction_rank().map(|(served, _)| served),
            Some(false)
        );
        activity.request_started(false);
        assert_eq!(activity.eviction_rank(), None, "a request in flight");
        activity.request_ended();
        assert!(activity.between_requests());
        assert_eq!(
            activity.eviction_rank().map(|(served, _)| served),
            Some(true)
        );
    }
}
