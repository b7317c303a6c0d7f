//! Whether the router serves, for `/health` and grpc.health.v1 alike:
//! every expert has a live worker, the engine thread runs, and the router
//! is not draining for shutdown. New requests are refused while draining.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Why the router does not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Shutting down: in-flight requests finish, new ones are refused.
    Draining,
    /// The engine thread is gone; the process stops.
    EngineStopped,
    /// Some expert has no live worker.
    ExpertsUncovered,
}

impl NotReady {
    pub fn message(self) -> &'static str {
        match self {
            NotReady::Draining => "not ready: shutting down",
            NotReady::EngineStopped => "not ready: the engine has stopped",
            NotReady::ExpertsUncovered => "not ready: some expert has no live worker",
        }
    }
}

pub struct Readiness {
    experts_covered: AtomicBool,
    engine_stopped: AtomicBool,
    draining: AtomicBool,
    reporter: HealthReporter,
    /// The gRPC services whose health is reported (besides the server's, "").
    services: Vec<&'static str>,
}

impl Readiness {
    pub fn new(reporter: HealthReporter, services: Vec<&'static str>) -> Arc<Self> {
        Arc::new(Self {
            experts_covered: AtomicBool::new(true),
            engine_stopped: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            reporter,
            services,
        })
    }

    /// Serving, or why not (draining first, then a stopped engine).
    pub fn state(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::SeqCst) {
            Err(NotReady::Draining)
        } else if self.engine_stopped.load(Ordering::SeqCst) {
            Err(NotReady::EngineStopped)
        } else if !self.experts_covered.load(Ordering::SeqCst) {
            Err(NotReady::ExpertsUncovered)
        } else {
            Ok(())
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_experts_covered(self: &Arc<Self>, covered: bool) {
        self.experts_covered.store(covered, Ordering::SeqCst);
        self.publish();
    }

    pub fn set_engine_stopped(self: &Arc<Self>) {
        self.engine_stopped.store(true, Ordering::SeqCst);
        self.publish();
    }

    pub fn set_draining(self: &Arc<Self>) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish();
    }

    /// Tells grpc.health.v1 the state as it is when the task runs, so the
    /// last of several quick changes wins.
    fn publish(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let status = match this.state() {
                Ok(()) => ServingStatus::Serving,
                Err(why) => {
                    tracing::warn!("{}", why.message());
                    ServingStatus::NotServing
                }
            };
            this.reporter.set_service_status("", status).await;
            for service in &this.services {
                this.reporter.set_service_status(*service, status).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_outranks_a_stopped_engine_which_outranks_missing_experts() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        let readiness = Readiness::new(reporter, vec![]);
        assert_eq!(readiness.state(), Ok(()));
        readiness.set_experts_covered(false);
        assert_eq!(readiness.state(), Err(NotReady::ExpertsUncovered));
        readiness.set_experts_covered(true);
        assert_eq!(readiness.state(), Ok(()));
        readiness.set_experts_covered(false);
        readiness.set_engine_stopped();
        assert_eq!(readiness.state(), Err(NotReady::EngineStopped));
        readiness.set_experts_covered(true);
        assert_eq!(readiness.state(), Err(NotReady::EngineStopped));
        readiness.set_draining();
        assert!(readiness.is_draining());
        assert_eq!(readiness.state(), Err(NotReady::Draining));
    }
}
