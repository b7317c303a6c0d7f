//! Admission: which waiting requests join the running batch, and how the
//! KV cache is shared out. Requests wait in arrival order, at most
//! `max_waiting` of them (beyond, they are refused); they are admitted first
//! come first served while the batch has room (`max_running`) and the cache
//! blocks of their first step fit. A request that does not fit holds back
//! those behind it.
//!
//! A running sequence's reservation grows by whole blocks
//! ([`crate::kv_blocks`]) as it generates, instead of holding its whole
//! `max_tokens` from the start. When a step's growth does not fit, the
//! caller preempts its newest sequences (their blocks are freed) and
//! [`Admission::requeue`]s them ahead of every waiting request, to be
//! recomputed when they fit again, as vLLM does. A sequence's reservation
//! is freed when it leaves.
//!
//! With prefix caching, sequences hold some blocks together: each
//! reservation counts a shared block, and the budget takes the blocks
//! counted more than once back off ([`KvBudget::set_shared`], from the KV
//! pool's own count), so a request is charged only for the blocks it still
//! needs, and a shared block stays charged while any holder holds it.
//!
//! One state machine for the router's engine and the planner's simulation:
//! they admit, grow and preempt the same requests in the same order.

use std::collections::VecDeque;

use crate::kv_blocks::blocks_for;
use crate::scheduler::{SchedulerConfig, Slice, plan_step};

/// KV cache blocks reserved by admitted sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    capacity: usize,
    /// The reservations' sum.
    reserved: usize,
    /// Blocks counted in more than one reservation, counted once too many
    /// each time: held together through the prefix cache.
    shared: usize,
}

impl KvBudget {
    /// A budget of `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            reserved: 0,
            shared: 0,
        }
    }

    /// Reserves `blocks` if they fit.
    pub fn try_reserve(&mut self, blocks: usize) -> bool {
        self.try_reserve_sharing(blocks, 0)
    }

    /// Reserves `blocks`, of which `shared` are held already by other
    /// reservations, if the rest fit.
    pub fn try_reserve_sharing(&mut self, blocks: usize, shared: usize) -> bool {
        let shared = shared.min(blocks);
        if self.used() + blocks - shared <= self.capacity {
            self.reserved += blocks;
            self.shared += shared;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, blocks: usize) {
        self.reserved = self.reserved.saturating_sub(blocks);
    }

    /// How many reserved blocks are counted more than once now (the KV
    /// pool's holdings summed per sequence, less the blocks held).
    pub fn set_shared(&mut self, shared: usize) {
        self.shared = shared;
    }

    /// Blocks reserved, each counted once.
    pub fn used(&self) -> usize {
        self.reserved.saturating_sub(self.shared)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What admission needs to know of a request, waiting or running.
pub trait Reservation {
    /// Positions the sequence's cache holds after its first step once
    /// admitted: its prompt, and for a preempted sequence the tokens it had
    /// generated too.
    fn kv_tokens(&self) -> usize;
    /// Positions its cache holds now.
    fn cached(&self) -> usize;
    /// Tokens it has generated.
    fn generated(&self) -> usize;
    /// Tokens it still has to prefill (0: it decodes one token per step):
    /// what it holds beyond its cache, the prompt and, after a preemption,
    /// the tokens it had generated; the last generated token alone is a
    /// decode.
    fn prompt_left(&self) -> usize {
        match self.kv_tokens() - self.cached() {
            1 if self.generated() > 0 => 0,
            left => left,
        }
    }
    /// The blocks reserved for it (0 while it waits).
    fn reserved_blocks(&mut self) -> &mut usize;
    /// It is preempted: it gives up its cache and will recompute every
    /// token it holds when it runs again.
    fn preempt(&mut self);
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
            kv: KvBudget::new(blocks_for(config.max_kv_tokens)),
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

    /// A preempted sequence goes back ahead of every waiting request (even
    /// past `max_waiting`: it was accepted already).
    fn requeue(&mut self, request: R) {
        self.waiting.push_front(request);
    }

    /// The blocks a request reserves when it is admitted.
    fn admission_blocks(request: &R) -> usize {
        blocks_for(request.kv_tokens())
    }

    /// The requests that join a batch of `running` sequences now, in arrival
    /// order, each with the blocks of its first step reserved.
    pub fn admit(&mut self, running: usize) -> Vec<R> {
        self.admit_while(running, |_, _| true, |_| 0)
    }

    /// [`Admission::admit`], stopping at the first waiting request that
    /// `ready` (given it and those admitted before it in this call) holds
    /// back: it keeps its place, and those behind it wait with it. A
    /// request is charged for its blocks less `shared`'s count of them that
    /// running sequences hold already (its prefix in the cache).
    pub fn admit_while(
        &mut self,
        running: usize,
        ready: impl Fn(&R, &[R]) -> bool,
        shared: impl Fn(&R) -> usize,
    ) -> Vec<R> {
        let mut admitted = Vec::new();
        while running + admitted.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if !ready(front, &admitted) {
                break;
            }
            let blocks = Self::admission_blocks(front);
            if !self.kv.try_reserve_sharing(blocks, shared(front)) {
                break;
            }
            if let Some(mut request) = self.waiting.pop_front() {
                *request.reserved_blocks() = blocks;
                admitted.push(request);
            }
        }
        admitted
    }

    /// Plans the next step of `running` (oldest first) and grows their
    /// reservations by the blocks the step's new positions need. When that
    /// does not fit, the newest sequence is preempted and requeued, and the
    /// step planned again. Returns the plan and how many were preempted.
    /// The oldest sequence alone always fits when its whole reservation
    /// (prompt + max_tokens) is within the cache, which callers check
    /// before a request is accepted. `shared`: the blocks the sequences'
    /// reservations count more than once (see [`KvBudget::set_shared`]),
    /// asked again after each preemption.
    pub fn plan_with_room(
        &mut self,
        running: &mut Vec<R>,
        shared: impl Fn(&[R]) -> usize,
    ) -> (Vec<Slice>, usize) {
        let mut preempted = 0;
        loop {
            self.kv.set_shared(shared(running));
            let pending: Vec<usize> = running.iter().map(R::prompt_left).collect();
            let plan = plan_step(&pending, self.config.max_batch_tokens);
            let mut needs: Vec<usize> = Vec::with_capacity(plan.len());
            for slice in &plan {
                let sequence = &mut running[slice.sequence];
                let positions = sequence.cached() + slice.tokens;
                let reserved = *sequence.reserved_blocks();
                needs.push(blocks_for(positions).saturating_sub(reserved));
            }
            if self.kv.try_reserve(needs.iter().sum()) {
                for (slice, need) in plan.iter().zip(needs) {
                    *running[slice.sequence].reserved_blocks() += need;
                }
                return (plan, preempted);
            }
            let Some(mut newest) = running.pop() else {
                return (Vec::new(), preempted);
            };
            self.release(&mut newest);
            newest.preempt();
            self.requeue(newest);
            preempted += 1;
        }
    }

    /// A sequence left the batch (finished, gone or preempted): the blocks
    /// reserved for it are freed.
    pub fn release(&mut self, request: &mut R) {
        self.kv.release(std::mem::take(request.reserved_blocks()));
    }

    /// See [`KvBudget::set_shared`].
    pub fn set_shared_blocks(&mut self, shared: usize) {
        self.kv.set_shared(shared);
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

    /// KV cache blocks reserved by admitted requests, each counted once.
    pub fn kv_used_blocks(&self) -> usize {
        self.kv.used()
    }

    /// KV cache positions reserved by admitted requests (whole blocks).
    pub fn kv_used(&self) -> usize {
        self.kv.used() * crate::kv_blocks::BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_blocks::BLOCK_SIZE;
    use proptest::prelude::*;

    /// A request named `id` whose first step fills `blocks` KV blocks (the
    /// last one in part); once running it decodes from `cached` positions.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Job {
        id: usize,
        blocks: usize,
        reserved: usize,
        cached: usize,
    }

    fn job(id: usize, blocks: usize) -> Job {
        Job {
            id,
            blocks,
            reserved: 0,
            cached: 0,
        }
    }

    impl Reservation for Job {
        fn kv_tokens(&self) -> usize {
            (self.blocks * BLOCK_SIZE).saturating_sub(BLOCK_SIZE / 2)
        }
        fn cached(&self) -> usize {
            self.cached
        }
        fn generated(&self) -> usize {
            self.cached.saturating_sub(self.kv_tokens())
        }
        // Past its first step it decodes (its cache then outgrows kv_tokens).
        fn prompt_left(&self) -> usize {
            if self.cached == 0 {
                self.kv_tokens()
            } else {
                0
            }
        }
        fn reserved_blocks(&mut self) -> &mut usize {
            &mut self.reserved
        }
        fn preempt(&mut self) {
            self.cached = 0;
        }
    }

    fn ids(jobs: &[Job]) -> Vec<usize> {
        jobs.iter().map(|j| j.id).collect()
    }

    /// A cache of `max_kv_blocks` blocks.
    fn config(max_running: usize, max_kv_blocks: usize, max_waiting: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_running,
            max_kv_tokens: max_kv_blocks * BLOCK_SIZE,
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
    fn blocks_held_together_are_charged_once_while_any_holder_holds_them() {
        let mut kv = KvBudget::new(10);
        assert!(kv.try_reserve(6));
        assert!(!kv.try_reserve(6));
        // 4 of the next 6 are the first's (a cached prefix).
        assert!(kv.try_reserve_sharing(6, 4));
        assert_eq!(kv.used(), 8);
        assert!(!kv.try_reserve_sharing(6, 3));
        // The first leaves; the second still holds the 4, now counted once.
        kv.release(6);
        kv.set_shared(0);
        assert_eq!(kv.used(), 6);
        assert!(kv.try_reserve_sharing(8, 4));
        assert_eq!(kv.used(), 10);
    }

    #[test]
    fn first_come_first_served_while_the_batch_and_the_cache_have_room() {
        let mut admission = Admission::new(config(3, 100, 8));
        for j in [job(0, 40), job(1, 40), job(2, 40), job(3, 10)] {
            admission.enqueue(j).unwrap();
        }
        // Job 2 does not fit beside 0 and 1, and holds back job 3 that would.
        let mut running = admission.admit(0);
        assert_eq!(ids(&running), [0, 1]);
        assert_eq!(running[0].reserved, 40);
        assert_eq!((admission.waiting(), admission.kv_used_blocks()), (2, 80));
        assert_eq!(admission.kv_used(), 80 * BLOCK_SIZE);
        assert!(admission.admit(2).is_empty());
        admission.release(&mut running[0]);
        assert_eq!(running[0].reserved, 0);
        // Room for two more block-wise, but the batch holds three at most.
        assert_eq!(ids(&admission.admit(1)), [2, 3]);
        assert_eq!(admission.kv_used_blocks(), 90);
        assert!(admission.admit(3).is_empty());
    }

    #[test]
    fn a_step_that_does_not_fit_preempts_the_newest_which_then_goes_first() {
        // 10 blocks; two sequences of 5 blocks each, both full to the last
        // position of their last block.
        let mut admission = Admission::new(config(4, 10, 1));
        admission.enqueue(job(0, 5)).unwrap();
        let mut running = admission.admit(0);
        admission.enqueue(job(1, 5)).unwrap();
        running.extend(admission.admit(1));
        assert_eq!(admission.kv_used_blocks(), 10);
        for j in &mut running {
            j.cached = 5 * BLOCK_SIZE;
        }
        admission.enqueue(job(2, 1)).unwrap();
        // Both decode into a sixth block: only one can.
        let (plan, preempted) = admission.plan_with_room(&mut running, |_| 0);
        assert_eq!((plan.len(), preempted), (1, 1));
        assert_eq!(ids(&running), [0]);
        assert_eq!(running[0].reserved, 6);
        assert_eq!(admission.kv_used_blocks(), 6);
        // Job 1 waits ahead of job 2, past max_waiting, to recompute; job 2
        // would fit but waits behind it.
        assert_eq!(admission.waiting(), 2);
        assert!(admission.admit(1).is_empty());
        admission.release(&mut running[0]);
        let back = admission.admit(0);
        assert_eq!(ids(&back), [1, 2]);
        assert_eq!((back[0].cached, back[0].reserved), (0, 5));
    }

    #[test]
    fn a_step_within_the_reserved_blocks_takes_no_more() {
        let mut admission = Admission::new(config(4, 10, 4));
        admission.enqueue(job(0, 2)).unwrap();
        let mut running = admission.admit(0);
        running[0].cached = 2 * BLOCK_SIZE - 2;
        let (plan, preempted) = admission.plan_with_room(&mut running, |_| 0);
        assert_eq!((plan.len(), preempted), (1, 0));
        assert_eq!(admission.kv_used_blocks(), 2);
    }

    #[test]
    fn a_full_queue_hands_the_request_back() {
        let mut admission = Admission::new(config(1, 100, 2));
        admission.enqueue(job(0, 1)).unwrap();
        admission.enqueue(job(1, 1)).unwrap();
        assert_eq!(admission.enqueue(job(2, 1)), Err(job(2, 1)));
        assert_eq!(ids(&admission.admit(0)), [0]);
        admission.enqueue(job(2, 1)).unwrap();
        assert_eq!(admission.retain_waiting(|j| j.id != 1), 1);
        assert_eq!(ids(&admission.admit(0)), [2]);
        assert_eq!(admission.waiting(), 0);
    }

    proptest! {
        /// Over any sequence of arrivals, admissions, steps and departures:
        /// the reservations never exceed the cache, the batch never exceeds
        /// max_running, new requests are admitted in arrival order, and the
        /// reserved blocks are exactly those of the running requests, each
        /// holding at least what its cache needs.
        #[test]
        fn reservations_match_the_running_batch(
            ops in proptest::collection::vec((0u8..4, 1usize..30), 1..200),
            max_running in 1usize..6,
            max_waiting in 1usize..6,
        ) {
            let mut admission = Admission::new(config(max_running, 100, max_waiting));
            let mut running: Vec<Job> = Vec::new();
            let (mut next, mut last_admitted) = (0usize, None::<usize>);
            let mut ever_admitted = std::collections::HashSet::new();
            for (op, size) in ops {
                match op {
                    0 => {
                        let waiting = admission.waiting();
                        let accepted = admission.enqueue(job(next, size)).is_ok();
                        prop_assert_eq!(accepted, waiting < max_waiting);
                        next += 1;
                    }
                    1 => {
                        for j in admission.admit(running.len()) {
                            // First admissions in arrival order (a preempted
                            // request comes back later, before newer ones).
                            if ever_admitted.insert(j.id) {
                                prop_assert!(last_admitted.is_none_or(|l| l < j.id));
                                last_admitted = Some(j.id);
                            }
                            running.push(j);
                        }
                    }
                    2 => {
                        let (plan, _) = admission.plan_with_room(&mut running, |_| 0);
                        for slice in plan {
                            let j = &mut running[slice.sequence];
                            j.cached += slice.tokens;
                            prop_assert!(j.reserved * BLOCK_SIZE >= j.cached);
                        }
                    }
                    _ => {
                        if !running.is_empty() {
                            let index = size % running.len();
                            admission.release(&mut running[index]);
                            running.remove(index);
                        }
                    }
                }
                prop_assert!(running.len() <= max_running);
                prop_assert_eq!(
                    admission.kv_used_blocks(),
                    running.iter().map(|j| j.reserved).sum::<usize>()
                );
                prop_assert!(admission.kv_used_blocks() <= 100);
            }
        }
    }
}
