//! A discrete-event simulation of serving: the router's scheduler (the same
//! [`Admission`] and `plan_step` the engine runs), and for every step the
//! dense part on the router, then per MoE layer the dispatch to the workers
//! (the same `plan_dispatch`, with the tokens' experts drawn from a routing
//! trace), each worker's round trip and expert FFNs, the layer ending when
//! the slowest worker answers. Costs come from a device [`Profile`].
//!
//! A dense layer costs router time (its MLP is in the profile's dense
//! step) and dispatches nothing. A shared expert costs router time the
//! same way, for every token of its layer; it is counted beside the round
//! trip of its layer, not overlapped with it: an upper bound until the
//! router overlaps them.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tramontane_policy::admission::{Admission, Reservation};
use tramontane_policy::dispatch_plan::{RoutedPair, plan_dispatch};
use tramontane_policy::kv_blocks::BLOCK_SIZE;
use tramontane_policy::placement::Placement;
use tramontane_policy::scheduler::SchedulerConfig;

use crate::profile::Profile;
use crate::routing::TokenRouting;
use crate::workload::{Arrivals, Workload};

/// What is simulated: the cluster's costs and how it routes.
pub struct Cluster<'a> {
    pub profile: &'a Profile,
    pub placement: &'a Placement,
    pub routing: &'a TokenRouting,
    pub scheduler: SchedulerConfig,
    /// Bytes of one hidden-state element on the wire (the router's --wire-dtype).
    pub wire_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Linear interpolation between order statistics (numpy's default), so
    /// predictions compare with the load generator's figures. NaN when empty.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self {
                mean: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
            };
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = q * (values.len() - 1) as f64;
            let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
            values[low] + (rank - low as f64) * (values[high] - values[low])
        };
        Self {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// The simulated figures, in seconds and per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub completed: usize,
    /// Requests refused because the waiting queue was full.
    pub refused: usize,
    /// From the first arrival to the last completion.
    pub seconds: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft: Percentiles,
    pub itl: Percentiles,
    pub e2e: Percentiles,
    pub steps: usize,
    pub mean_batch_sequences: f64,
    /// Most sequences running at once, and the KV tokens they reserved.
    pub peak_running: usize,
    pub peak_kv_tokens: usize,
    /// Sequences preempted (and recomputed later) because the cache ran out.
    pub preemptions: usize,
    /// Prompt tokens found in the prefix cache, of those admitted.
    pub prefix_cache_hit_rate: f64,
    /// Per worker, the fraction of the time it computed or served a round trip.
    pub worker_busy: Vec<f64>,
}

struct Request {
    arrival: f64,
    prompt: usize,
    output: usize,
    /// Its first tokens that are the prefix every request shares.
    shared: usize,
}

/// A request from its arrival on: waiting, running, or preempted and
/// waiting again (it then recomputes its prompt and what it had generated).
struct Sequence {
    request: Request,
    /// Positions in the cache.
    cached: usize,
    generated: usize,
    last_token: f64,
    reserved_blocks: usize,
}

impl Sequence {
    fn new(request: Request) -> Self {
        Self {
            request,
            cached: 0,
            generated: 0,
            last_token: 0.0,
            reserved_blocks: 0,
        }
    }

    /// Tokens known: the prompt and every generated token.
    fn context(&self) -> usize {
        self.request.prompt + self.generated
    }
}

impl Reservation for Sequence {
    fn kv_tokens(&self) -> usize {
        self.context()
    }

    fn cached(&self) -> usize {
        self.cached
    }

    fn generated(&self) -> usize {
        self.generated
    }

    fn reserved_blocks(&mut self) -> &mut usize {
        &mut self.reserved_blocks
    }

    fn preempt(&mut self) {
        self.cached = 0;
    }
}

impl Cluster<'_> {
    /// Seconds of one step over `slices` of (new tokens, cached tokens), and
    /// each worker's busy seconds added to `busy`.
    fn step_seconds(&self, slices: &[(usize, usize)], rng: &mut impl Rng, busy: &mut [f64]) -> f64 {
        let profile = self.profile;
        let tokens: usize = slices.iter().map(|s| s.0).sum();
        let mut seconds = profile.dense_seconds(slices.iter().copied());
        let hidden = profile.model.hidden_size;
        let mut pairs = Vec::with_capacity(tokens * self.routing.max_top_k());
        let mut experts = Vec::with_capacity(self.routing.max_top_k());
        let mut worker_seconds = vec![0.0; self.placement.workers];
        for layer in self.routing.moe_layers() {
            pairs.clear();
            for token in 0..tokens {
                experts.clear();
                self.routing.draw(layer, rng, &mut experts);
                pairs.extend(experts.iter().map(|&expert| RoutedPair {
                    token,
                    expert,
                    weight: 0.0,
                }));
            }
            let shares = plan_dispatch(layer, &pairs, self.placement, &|_| true)
                .expect("the placement covers every expert");
            worker_seconds.iter_mut().for_each(|s| *s = 0.0);
            for share in &shares {
                // Hidden rows there, outputs back.
                let bytes = 2 * share.tokens.len() * hidden * self.wire_bytes;
                let compute: f64 = share
                    .experts
                    .values()
                    .map(|(rows, _)| profile.expert_seconds(rows.len()))
                    .sum();
                worker_seconds[share.worker] = profile.dispatch_seconds(bytes) + compute;
                busy[share.worker] += worker_seconds[share.worker];
            }
            // On a shared host the costs are those of every lane busy;
            // fewer workers at once run faster, down to `alone_factor`.
            let busy_share = match profile.shared_lanes {
                Some(lanes) if lanes > 1 => {
                    shares.len().min(lanes).saturating_sub(1) as f64 / (lanes - 1) as f64
                }
                _ => 1.0,
            };
            let speed = profile.alone_factor + (1.0 - profile.alone_factor) * busy_share;
            seconds += speed * makespan(&worker_seconds, profile.shared_lanes);
        }
        seconds
    }

    pub fn simulate(&self, workload: &Workload) -> Prediction {
        let mut rng = ChaCha8Rng::seed_from_u64(workload.seed);
        let next_request = |rng: &mut ChaCha8Rng, arrival: f64| {
            let prompt = workload.prompt.sample(rng);
            Request {
                arrival,
                prompt,
                output: workload.output.sample(rng),
                shared: (prompt as f64 * workload.prefix_share) as usize,
            }
        };
        // Arrivals not yet submitted, in time order.
        let mut arrivals: VecDeque<Request> = VecDeque::new();
        let mut issued = 0;
        match workload.arrivals {
            Arrivals::Rate(rate) => {
                let mut t = 0.0;
                for _ in 0..workload.requests {
                    arrivals.push_back(next_request(&mut rng, t));
                    t += -(1.0 - rng.random::<f64>()).ln() / rate;
                }
                issued = workload.requests;
            }
            Arrivals::Concurrency(clients) => {
                while issued < clients.min(workload.requests) {
                    arrivals.push_back(next_request(&mut rng, 0.0));
                    issued += 1;
                }
            }
        }
        let config = self.scheduler;
        let mut admission: Admission<Sequence> = Admission::new(config);
        let mut running: Vec<Sequence> = Vec::new();
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut refused, mut steps, mut batch_sum, mut output_tokens) = (0, 0, 0usize, 0usize);
        let (mut finished, mut peak_running, mut peak_kv_tokens) = (0, 0, 0);
        let mut preemptions = 0;
        // The shared prefix's positions in cached blocks, and the prompt
        // tokens looked up in the cache and found there.
        let (mut cached_prefix, mut queried, mut hits) = (0usize, 0usize, 0usize);
        let mut busy = vec![0.0; self.placement.workers];
        let mut now = 0.0f64;
        loop {
            while arrivals.front().is_some_and(|r| r.arrival <= now) {
                let request = arrivals.pop_front().expect("front exists");
                if admission.enqueue(Sequence::new(request)).is_err() {
                    refused += 1;
                }
            }
            if running.is_empty() && admission.waiting() == 0 {
                match arrivals.front() {
                    Some(r) => {
                        now = r.arrival;
                        continue;
                    }
                    None => break,
                }
            }
            for mut s in admission.admit(running.len()) {
                // As the engine does: the longest cached prefix, all but
                // the last token's block at most.
                if config.prefix_caching {
                    let context = s.context();
                    let hit = cached_prefix.min(s.request.shared).min(context - 1);
                    s.cached = hit / BLOCK_SIZE * BLOCK_SIZE;
                    queried += context;
                    hits += s.cached;
                }
                running.push(s);
            }
            peak_running = peak_running.max(running.len());
            if running.is_empty() {
                // Cannot happen for validated workloads: nothing could ever run.
                break;
            }
            let (plan, preempted) = admission.plan_with_room(&mut running, |_| 0);
            preemptions += preempted;
            peak_kv_tokens = peak_kv_tokens.max(admission.kv_used());
            if plan.is_empty() {
                break;
            }
            let slices: Vec<(usize, usize)> = plan
                .iter()
                .map(|s| (s.tokens, running[s.sequence].cached))
                .collect();
            now += self.step_seconds(&slices, &mut rng, &mut busy);
            steps += 1;
            batch_sum += plan.len();
            for slice in &plan {
                let s = &mut running[slice.sequence];
                s.cached += slice.tokens;
                let computed = s.cached.min(s.request.shared) / BLOCK_SIZE * BLOCK_SIZE;
                cached_prefix = cached_prefix.max(computed);
                if s.cached < s.context() {
                    continue; // more prompt next step
                }
                if s.generated == 0 {
                    ttft.push(now - s.request.arrival);
                } else {
                    itl.push(now - s.last_token);
                }
                s.generated += 1;
                s.last_token = now;
            }
            // Finished sequences leave; the others keep their order (FCFS prefill).
            running.retain_mut(|s| {
                if s.generated < s.request.output {
                    return true;
                }
                admission.release(s);
                e2e.push(now - s.request.arrival);
                output_tokens += s.generated;
                finished += 1;
                false
            });
            if let Arrivals::Concurrency(_) = workload.arrivals {
                // Each finished client sends its next request.
                for _ in 0..finished {
                    if issued < workload.requests {
                        arrivals.push_back(next_request(&mut rng, now));
                        issued += 1;
                    }
                }
            }
            finished = 0;
        }
        let completed = e2e.len();
        let seconds = now;
        Prediction {
            completed,
            refused,
            seconds,
            requests_per_s: completed as f64 / seconds,
            output_tokens_per_s: output_tokens as f64 / seconds,
            ttft: Percentiles::of(ttft),
            itl: Percentiles::of(itl),
            e2e: Percentiles::of(e2e),
            steps,
            mean_batch_sequences: batch_sum as f64 / steps.max(1) as f64,
            peak_running,
            peak_kv_tokens,
            preemptions,
            prefix_cache_hit_rate: if queried == 0 {
                0.0
            } else {
                hits as f64 / queried as f64
            },
            worker_busy: busy.iter().map(|b| b / seconds).collect(),
        }
    }
}

/// When the last of `jobs` ends, on `lanes` parallel lanes (longest first,
/// each to the least busy lane), or each on its own device.
fn makespan(jobs: &[f64], lanes: Option<usize>) -> f64 {
    let longest = jobs.iter().copied().fold(0.0, f64::max);
    let Some(lanes) = lanes.filter(|&l| l < jobs.len()) else {
        return longest;
    };
    let mut sorted = jobs.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut load = vec![0.0f64; lanes.max(1)];
    for job in sorted {
        let lane = load
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("at least one lane");
        *lane += job;
    }
    load.into_iter().fold(longest, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let p = Percentiles::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(p.p50, 2.5);
        assert!((p.p90 - 3.7).abs() < 1e-12);
        assert_eq!(p.mean, 2.5);
        assert!(Percentiles::of(vec![]).p50.is_nan());
    }

    use crate::model::SizedModel;
    use crate::test_fixtures::{self, shape, with_dense_layers};
    use crate::workload::Lengths;

    /// A step costs `dense` seconds; an expert `per_row` per row it computes.
    fn profile(dense: f64, per_row: f64) -> Profile {
        test_fixtures::profile(&shape(2, 4, 2), dense, 0.0, per_row)
    }

    fn workload(arrivals: Arrivals, prompt: usize, output: usize, requests: usize) -> Workload {
        Workload {
            arrivals,
            prompt: Lengths::Fixed(prompt),
            output: Lengths::Fixed(output),
            requests,
            seed: 7,
            prefix_share: 0.0,
        }
    }

    /// `workload` on 2 layers × 4 experts round robin over `workers`, with
    /// uniform routing, steps of `step_seconds` and the scheduler's limits.
    fn simulate_uniform(
        step_seconds: f64,
        workers: usize,
        scheduler: SchedulerConfig,
        workload: &Workload,
    ) -> Prediction {
        let profile = profile(step_seconds, 0.0);
        let placement = Placement::round_robin(&[4; 2], workers).unwrap();
        let routing = TokenRouting::uniform(&shape(2, 4, 2));
        let cluster = Cluster {
            profile: &profile,
            placement: &placement,
            routing: &routing,
            scheduler,
            wire_bytes: 4,
        };
        cluster.simulate(workload)
    }

    #[test]
    fn a_cache_too_small_for_every_client_preempts_and_still_completes_all() {
        let scheduler = SchedulerConfig {
            max_kv_tokens: 256,
            ..SchedulerConfig::default()
        };
        // Four clients of 32 + 64 tokens: each fits alone (6 blocks of 16), all
        // four (24 blocks) do not fit in 16.
        let p = simulate_uniform(
            0.01,
            2,
            scheduler,
            &workload(Arrivals::Concurrency(4), 32, 64, 8),
        );
        assert_eq!((p.completed, p.refused), (8, 0));
        assert!(p.preemptions > 0, "{p:?}");
        assert!(p.peak_kv_tokens <= 256);
        assert_eq!(p.output_tokens_per_s * p.seconds, 8.0 * 64.0);
    }

    #[test]
    fn a_shared_prefix_is_prefilled_once_with_prefix_caching() {
        // Prompts of 100 tokens, 64% of them (64 tokens, 4 blocks) shared.
        let mut shared = workload(Arrivals::Concurrency(1), 100, 10, 4);
        shared.prefix_share = 0.64;
        // Experts cost per row: a prefill of fewer tokens is shorter.
        let profile = profile(0.01, 1e-3);
        let placement = Placement::round_robin(&[4; 2], 2).unwrap();
        let routing = TokenRouting::uniform(&shape(2, 4, 2));
        let run = |prefix_caching| {
            let cluster = Cluster {
                profile: &profile,
                placement: &placement,
                routing: &routing,
                scheduler: SchedulerConfig {
                    prefix_caching,
                    ..SchedulerConfig::default()
                },
                wire_bytes: 4,
            };
            cluster.simulate(&shared)
        };
        let (cached, plain) = (run(true), run(false));
        // The first request computes the prefix; the three after it find
        // its 64 tokens: 192 of 400 prompt tokens.
        assert!((cached.prefix_cache_hit_rate - 192.0 / 400.0).abs() < 1e-12);
        assert_eq!(plain.prefix_cache_hit_rate, 0.0);
        assert_eq!((cached.completed, cached.steps), (4, plain.steps));
        // The first request's prefill is the same; the others' are shorter.
        assert!(cached.ttft.p50 < plain.ttft.p50, "{cached:?} {plain:?}");
        assert!(cached.seconds < plain.seconds);
    }

    #[test]
    fn one_client_at_a_time_gives_the_step_arithmetic() {
        let profile = profile(0.01, 0.0);
        let placement = Placement::round_robin(&[4; 2], 2).unwrap();
        let routing = TokenRouting::uniform(&shape(2, 4, 2));
        let cluster = Cluster {
            profile: &profile,
            placement: &placement,
            routing: &routing,
            scheduler: SchedulerConfig::default(),
            wire_bytes: 4,
        };
        // One prefill step gives the first token, nine decode steps the rest.
        let p = cluster.simulate(&workload(Arrivals::Concurrency(1), 100, 10, 3));
        assert_eq!((p.completed, p.steps, p.refused), (3, 30, 0));
        assert!((p.seconds - 0.3).abs() < 1e-9, "{}", p.seconds);
        assert!((p.output_tokens_per_s - 100.0).abs() < 1e-6);
        assert!((p.ttft.p99 - 0.01).abs() < 1e-9 && (p.itl.p50 - 0.01).abs() < 1e-9);
        // The cache holds the prompt and 9 generated tokens (the tenth is
        // never fed back), in whole blocks of 16: 7 blocks.
        assert_eq!(p.peak_kv_tokens, 112);
        assert_eq!(p.preemptions, 0);
        // A prompt over the step budget is prefilled in two chunks.
        let p = cluster.simulate(&workload(Arrivals::Concurrency(1), 1000, 2, 1));
        assert!((p.ttft.p50 - 0.02).abs() < 1e-9, "{:?}", p.ttft);
        // Eight clients share each step: eight times the throughput.
        let p = cluster.simulate(&workload(Arrivals::Concurrency(8), 10, 10, 16));
        assert!(
            (p.output_tokens_per_s - 800.0).abs() < 1e-6,
            "{}",
            p.output_tokens_per_s
        );
        assert_eq!(p.peak_running, 8);
        // An open loop slower than the service: each request alone.
        let p = cluster.simulate(&workload(Arrivals::Rate(0.001), 100, 10, 5));
        assert_eq!(p.completed, 5);
        assert!((p.e2e.p50 - 0.1).abs() < 1e-9 && p.mean_batch_sequences == 1.0);
    }

    #[test]
    fn a_full_queue_refuses_requests() {
        let scheduler = SchedulerConfig {
            max_running: 1,
            max_waiting: 2,
            ..SchedulerConfig::default()
        };
        let p = simulate_uniform(
            1.0,
            1,
            scheduler,
            &workload(Arrivals::Rate(1000.0), 10, 10, 10),
        );
        assert!(p.refused > 0 && p.completed + p.refused == 10, "{p:?}");
    }

    #[test]
    fn hot_experts_on_one_worker_slow_every_layer() {
        // Experts 0 and 2 take every token: e mod 2 puts both on worker 0.
        let dir = tempfile::tempdir().unwrap();
        let path = test_fixtures::trace(dir.path(), "m", 2, 4, &[0, 2, 2, 0, 0, 2]);
        let profile = profile(0.0, 1e-3);
        let routing = TokenRouting::from_trace(&path, &shape(2, 4, 2), Some("m")).unwrap();
        let run = |placement: &Placement| {
            let cluster = Cluster {
                profile: &profile,
                placement,
                routing: &routing,
                scheduler: SchedulerConfig::default(),
                wire_bytes: 4,
            };
            cluster.simulate(&workload(Arrivals::Concurrency(4), 16, 8, 8))
        };
        let together = run(&Placement::round_robin(&[4; 2], 2).unwrap());
        let apart = run(&Placement {
            workers: 2,
            experts: vec![vec![vec![0], vec![0], vec![1], vec![1]]; 2],
        });
        // Apart, each worker computes one expert's rows at a time, in parallel.
        let gain = apart.output_tokens_per_s / together.output_tokens_per_s;
        assert!((gain - 2.0).abs() < 1e-9, "{gain}");
        assert!(together.worker_busy[1] == 0.0 && apart.worker_busy[1] > 0.0);
    }

    #[test]
    fn dense_layers_cost_the_dense_step_and_dispatch_nothing() {
        // Four decoder layers, 0 and 2 dense, against the two MoE layers
        // alone: the same draws, the same dispatch, the same time.
        let run = |model: &SizedModel| {
            let profile = test_fixtures::profile(model, 0.01, 1e-3, 1e-4);
            let placement = Placement::round_robin(&model.spec.experts_per_layer(), 2).unwrap();
            let routing = TokenRouting::uniform(model);
            let cluster = Cluster {
                profile: &profile,
                placement: &placement,
                routing: &routing,
                scheduler: SchedulerConfig::default(),
                wire_bytes: 4,
            };
            cluster.simulate(&workload(Arrivals::Concurrency(2), 16, 4, 4))
        };
        let with_dense = run(&with_dense_layers(4, 4, 2, &[0, 2], 24));
        let moe_only = run(&shape(2, 4, 2));
        assert_eq!(with_dense, moe_only);
        // Each step: the dense part, then two layers of at least one call.
        assert!(with_dense.seconds >= with_dense.steps as f64 * (0.01 + 2.0 * 1.1e-3));
    }

    #[test]
    fn makespan_packs_jobs_onto_lanes() {
        assert_eq!(makespan(&[3.0, 1.0, 2.0], None), 3.0);
        assert_eq!(makespan(&[3.0, 1.0, 2.0], Some(2)), 3.0);
        assert_eq!(makespan(&[2.0, 2.0, 2.0, 2.0], Some(2)), 4.0);
        assert_eq!(makespan(&[2.0, 2.0], Some(4)), 2.0);
    }
}
