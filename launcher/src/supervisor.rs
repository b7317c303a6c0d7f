//! Keeps `serve`'s workers running: a worker that exits (killed, crashed,
//! out of memory) is started again on the same address, so the router,
//! which keeps probing it, takes it back once it answers `Info` with the
//! same model. Restarts back off while they keep failing.

use std::time::Duration;

use tokio::time::Instant;

use crate::{WorkerCommand, WorkerProcess, spawn_worker_at};

/// Workers started again after they exited, by worker index.
pub const RESTARTS_TOTAL: &str = "tramontane_serve_worker_restarts_total";

/// The wait before the first restart; it doubles up to [`MAX_BACKOFF`]
/// while the worker fails again soon after each start.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before it exited starts again after
/// [`FIRST_BACKOFF`].
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// The wait before the next start, after one that failed (or exited) after
/// `ran`.
pub fn next_backoff(previous: Duration, ran: Duration) -> Duration {
    if ran >= HEALTHY_AFTER {
        FIRST_BACKOFF
    } else {
        (previous * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
    }
}

/// Runs until dropped (abort the task): waits for worker `index` to exit
/// and starts it again on its address. Dropping it kills the worker.
pub async fn supervise(index: usize, command: WorkerCommand, mut worker: WorkerProcess) {
    metrics::describe_counter!(
        RESTARTS_TOTAL,
        "Workers that `serve` started again after they exited, by worker index"
    );
    let addr = worker.addr.clone();
    let mut backoff = Duration::ZERO;
    let mut started = Instant::now();
    loop {
        let status = worker.child.wait().await;
        backoff = next_backoff(backoff, started.elapsed());
        tracing::warn!(
            "worker {index} at {addr} exited ({}); starting it again in {backoff:?}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        );
        loop {
            tokio::time::sleep(backoff).await;
            started = Instant::now();
            match spawn_worker_at(&command, &addr).await {
                Ok(again) => {
                    worker = again;
                    metrics::counter!(RESTARTS_TOTAL, "worker" => index.to_string()).increment(1);
                    tracing::info!(
                        "worker {index} started again (pid {}) at {addr}",
                        worker.child.id().unwrap_or_default()
                    );
                    break;
                }
                Err(error) => {
                    backoff = next_backoff(backoff, started.elapsed());
                    tracing::warn!(
                        "worker {index} did not start again at {addr}: {error}; next try in {backoff:?}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_healthy_run() {
        let quick = Duration::from_secs(1);
        let mut backoff = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..10 {
            backoff = next_backoff(backoff, quick);
            seen.push(backoff);
        }
        assert_eq!(seen[0], FIRST_BACKOFF);
        assert_eq!(seen[1], FIRST_BACKOFF * 2);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        assert_eq!(next_backoff(MAX_BACKOFF, HEALTHY_AFTER), FIRST_BACKOFF);
    }
}
