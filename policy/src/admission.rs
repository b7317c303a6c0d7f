//! Admission: which waiting requests join the running batch. Requests wait
//! in arrival order, at most `max_waiting` of them (beyond, they are
//! refused); they are admitted first come first served while the batch has
//! room (`max_running`) and their KV reservation (prompt + max_tokens) fits,
//! so an admitted sequence never runs out of cache. A request that does not
//! fit holds back those behind it. The reservation is freed when the
//! sequence leaves.
//!
//! One state machine for the router's engine and the planner's simulation:
//! they admit the same requests in the same order.

use std::collections::VecDeque;

use crate::scheduler::SchedulerConfig;

/// KV cache tokens reserved by admitted sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    capacity: usize,
    used: usize,
}

impl KvBudget {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, used: 0 }
    }

    /// Reserves `tokens` if they fit.
    pub fn try_reserve(&mut self, tokens: usize) -> bool {
        if self.used + tokens <= self.capacity {
            self.used += tokens;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, tokens: usize) {
        self.used = self.used.saturating_sub(tokens);
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What admission needs to know of a request.
pub trait Reservation {
    /// KV cache tokens the sequence may fill: reserved while it runs.
    fn kv_tokens(&self) -> usize;
}

/// The waiting queue and the KV reservations of the running batch.
#[derive(Debug)]
pub struct Admission<R> {
    config: SchedulerConfig,
    waiting: VecDeque<R>,
    kv: KvBudget,
}

impl<R: Reservation> Admission<R> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            kv: KvBudget::new(config.max_kv_tokens),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues `request` behind the others, or hands it back when
    /// `max_waiting` requests already wait.
    pub fn enqueue(&mut self, request: R) -> Result<(), R> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(request);
        }
        self.waiting.push_back(request);
        Ok(())
    }

    /// The requests that join a batch of `running` sequences now, in arrival
    /// order, with their KV reserved.
    pub fn admit(&mut self, running: usize) -> Vec<R> {
        let mut admitted = Vec::new();
        while running + admitted.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if !self.kv.try_reserve(front.kv_tokens()) {
                break;
            }
            admitted.extend(self.waiting.pop_front());
        }
        admitted
    }

    /// An admitted request left the batch: its reservation is freed.
    pub fn release(&mut self, request: &R) {
        self.kv.release(request.kv_tokens());
    }

    /// Keeps the waiting requests `keep` accepts (in order); returns how many left.
    pub fn retain_waiting(&mut self, keep: impl FnMut(&R) -> bool) -> usize {
        let before = self.waiting.len();
        self.waiting.retain(keep);
        before - self.waiting.len()
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// KV cache tokens reserved by admitted requests.
    pub fn kv_used(&self) -> usize {
        self.kv.used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A request of `.1` KV tokens, named `.0`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Job(usize, usize);

    impl Reservation for Job {
        fn kv_tokens(&self) -> usize {
            self.1
        }
    }

    fn config(max_running: usize, max_kv_tokens: usize, max_waiting: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_running,
            max_kv_tokens,
            max_waiting,
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn kv_budget_refuses_what_does_not_fit() {
        let mut kv = KvBudget::new(100);
        assert!(kv.try_reserve(60));
        assert!(!kv.try_reserve(41));
        kv.release(60);
        assert!(kv.try_reserve(100));
        assert_eq!(kv.used(), 100);
    }

    #[test]
    fn first_come_first_served_while_the_batch_and_the_cache_have_room() {
        let mut admission = Admission::new(config(3, 100, 8));
        for job in [Job(0, 40), Job(1, 40), Job(2, 40), Job(3, 10)] {
            admission.enqueue(job).unwrap();
        }
        // Job 2 does not fit beside 0 and 1, and holds back job 3 that would.
        assert_eq!(admission.admit(0), [Job(0, 40), Job(1, 40)]);
        assert_eq!((admission.waiting(), admission.kv_used()), (2, 80));
        assert_eq!(admission.admit(2), []);
        admission.release(&Job(0, 40));
        // Room for two more tokens-wise, but the batch holds three at most.
        assert_eq!(admission.admit(1), [Job(2, 40), Job(3, 10)]);
        assert_eq!(admission.kv_used(), 90);
        assert_eq!(admission.admit(3), []);
    }

    #[test]
    fn a_full_queue_hands_the_request_back() {
        let mut admission = Admission::new(config(1, 100, 2));
        admission.enqueue(Job(0, 1)).unwrap();
        admission.enqueue(Job(1, 1)).unwrap();
        assert_eq!(admission.enqueue(Job(2, 1)), Err(Job(2, 1)));
        assert_eq!(admission.admit(0), [Job(0, 1)]);
        admission.enqueue(Job(2, 1)).unwrap();
        assert_eq!(admission.retain_waiting(|j| j.0 != 1), 1);
        assert_eq!(admission.admit(0), [Job(2, 1)]);
        assert_eq!(admission.waiting(), 0);
    }

    proptest! {
        /// Over any sequence of arrivals, admissions and departures: the
        /// reservations never exceed the cache, the batch never exceeds
        /// max_running, requests are admitted in arrival order, and the
        /// reserved tokens are exactly those of the running requests.
        #[test]
        fn reservations_match_the_running_batch(
            ops in proptest::collection::vec((0u8..3, 1usize..60), 1..200),
            max_running in 1usize..6,
            max_waiting in 1usize..6,
        ) {
            let mut admission = Admission::new(config(max_running, 100, max_waiting));
            let mut running: Vec<Job> = Vec::new();
            let (mut next, mut last_admitted) = (0usize, None);
            for (op, size) in ops {
                match op {
                    0 => {
                        let waiting = admission.waiting();
                        let accepted = admission.enqueue(Job(next, size)).is_ok();
                        prop_assert_eq!(accepted, waiting < max_waiting);
                        next += 1;
                    }
                    1 => {
                        for job in admission.admit(running.len()) {
                            prop_assert!(last_admitted < Some(job.0));
                            last_admitted = Some(job.0);
                            running.push(job);
                        }
                    }
                    _ => {
                        if !running.is_empty() {
                            let job = running.remove(size % running.len());
                            admission.release(&job);
                        }
                    }
                }
                prop_assert!(running.len() <= max_running);
                prop_assert_eq!(admission.kv_used(), running.iter().map(|j| j.1).sum::<usize>());
                prop_assert!(admission.kv_used() <= 100);
            }
        }
    }
}
