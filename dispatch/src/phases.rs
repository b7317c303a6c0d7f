//! Where a layer's dispatch spends its time, phase by phase. Each phase goes
//! to the `tramontane_router_dispatch_phase_seconds{phase}` histogram and to
//! running totals, which `bench-forward --workers` reads before and after a
//! row to print a per-layer breakdown.
//!
//! A layer's dispatch is: encode each worker's rows, send the Forwards
//! concurrently and wait for all (`wait`), then decode and combine each
//! answer. Each Forward's round trip splits into the worker's own phases,
//! which its answer reports, and `transport`: the rest of the round trip
//! (both ways over the wire, gRPC framing, the hand-offs between threads).
//!
//! Beside the time, the volume: the tokens each layer dispatched and the
//! bytes of the Forwards' messages each way, which give the bytes on the
//! wire per token and layer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tramontane_proto::v1::WorkerTimings;

/// One phase of a layer's dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The engine thread's time in one layer's dispatch: sending, waiting,
    /// adding the answers (with micro-batches, not the other micro-batches'
    /// work done while this one's experts were out).
    Layer,
    /// Gathering one worker's rows into its request, in the wire dtype.
    Encode,
    /// The engine thread waiting for every Forward of the layer.
    Wait,
    /// One Forward, from its send to its answer, as the router sees it.
    RoundTrip,
    /// The round trip less the worker's own time.
    Transport,
    /// In the worker: validating the request and building the input.
    WorkerDecode,
    /// In the worker: waiting for the compute thread.
    WorkerQueue,
    /// In the worker: the experts.
    WorkerCompute,
    /// In the worker: the output to bytes.
    WorkerEncode,
    /// Reading one answer into a tensor.
    Decode,
    /// Adding one answer's partial sums into the layer's output.
    Combine,
}

impl Phase {
    pub const ALL: [Phase; 11] = [
        Phase::Layer,
        Phase::Encode,
        Phase::Wait,
        Phase::RoundTrip,
        Phase::Transport,
        Phase::WorkerDecode,
        Phase::WorkerQueue,
        Phase::WorkerCompute,
        Phase::WorkerEncode,
        Phase::Decode,
        Phase::Combine,
    ];

    /// The `phase` label.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Layer => "layer",
            Phase::Encode => "encode",
            Phase::Wait => "wait",
            Phase::RoundTrip => "round_trip",
            Phase::Transport => "transport",
            Phase::WorkerDecode => "worker_decode",
            Phase::WorkerQueue => "worker_queue",
            Phase::WorkerCompute => "worker_compute",
            Phase::WorkerEncode => "worker_encode",
            Phase::Decode => "decode",
            Phase::Combine => "combine",
        }
    }
}

/// Running totals per phase (nanoseconds and occurrences) and of the
/// volume dispatched.
#[derive(Debug, Default)]
pub struct DispatchPhases {
    nanos: [AtomicU64; Phase::ALL.len()],
    counts: [AtomicU64; Phase::ALL.len()],
    volume: [AtomicU64; Volume::ALL.len()],
}

/// What a layer's dispatch moves, counted beside its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Volume {
    /// Rows of the layers' inputs (each token once per layer dispatched).
    Tokens,
    /// Bytes of the Forward requests sent (protobuf encoded).
    SentBytes,
    /// Bytes of the Forward answers received (protobuf encoded).
    ReceivedBytes,
}

impl Volume {
    pub const ALL: [Volume; 3] = [Volume::Tokens, Volume::SentBytes, Volume::ReceivedBytes];
}

impl DispatchPhases {
    pub fn record(&self, phase: Phase, elapsed: Duration) {
        metrics::histogram!(crate::metrics::DISPATCH_PHASE, "phase" => phase.name())
            .record(elapsed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos[phase as usize].fetch_add(nanos, Ordering::Relaxed);
        self.counts[phase as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a Forward's round trip and the worker's phases it reported;
    /// the difference is its transport.
    pub fn record_forward(&self, round_trip: Duration, worker: Option<&WorkerTimings>) {
        self.record(Phase::RoundTrip, round_trip);
        let Some(t) = worker else { return };
        let inside = [
            (Phase::WorkerDecode, t.decode_ns),
            (Phase::WorkerQueue, t.queue_ns),
            (Phase::WorkerCompute, t.compute_ns),
            (Phase::WorkerEncode, t.encode_ns),
        ];
        let mut worker_total = Duration::ZERO;
        for (phase, nanos) in inside {
            let d = Duration::from_nanos(nanos);
            worker_total += d;
            self.record(phase, d);
        }
        self.record(Phase::Transport, round_trip.saturating_sub(worker_total));
    }

    /// Adds `amount` to a running volume.
    pub fn add(&self, volume: Volume, amount: u64) {
        self.volume[volume as usize].fetch_add(amount, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> PhaseTotals {
        fn load<const N: usize>(a: &[AtomicU64; N]) -> [u64; N] {
            std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
        }
        PhaseTotals {
            nanos: load(&self.nanos),
            counts: load(&self.counts),
            volume: load(&self.volume),
        }
    }
}

/// A copy of the totals at one moment, or of what was recorded between two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseTotals {
    nanos: [u64; Phase::ALL.len()],
    counts: [u64; Phase::ALL.len()],
    volume: [u64; Volume::ALL.len()],
}

impl PhaseTotals {
    /// What was recorded after `earlier`.
    pub fn since(&self, earlier: &PhaseTotals) -> PhaseTotals {
        PhaseTotals {
            nanos: std::array::from_fn(|i| self.nanos[i].saturating_sub(earlier.nanos[i])),
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
            volume: std::array::from_fn(|i| self.volume[i].saturating_sub(earlier.volume[i])),
        }
    }

    /// Both spans' totals.
    pub fn plus(&self, other: &PhaseTotals) -> PhaseTotals {
        PhaseTotals {
            nanos: std::array::from_fn(|i| self.nanos[i].saturating_add(other.nanos[i])),
            counts: std::array::from_fn(|i| self.counts[i].saturating_add(other.counts[i])),
            volume: std::array::from_fn(|i| self.volume[i].saturating_add(other.volume[i])),
        }
    }

    pub fn total(&self, phase: Phase) -> Duration {
        Duration::from_nanos(self.nanos[phase as usize])
    }

    pub fn count(&self, phase: Phase) -> u64 {
        self.counts[phase as usize]
    }

    pub fn volume(&self, volume: Volume) -> u64 {
        self.volume[volume as usize]
    }

    /// Per layer dispatch, the mean time of each phase in microseconds
    /// (summed over a layer's Forwards for the per-Forward phases), and the
    /// mean Forwards per layer, and the bytes each way per token and layer.
    /// None when no layer was dispatched.
    pub fn per_layer(&self) -> Option<LayerBreakdown> {
        let layers = self.count(Phase::Layer);
        if layers == 0 {
            return None;
        }
        let us = |phase: Phase| self.total(phase).as_secs_f64() * 1e6 / layers as f64;
        let per_token =
            |bytes: Volume| self.volume(bytes) as f64 / self.volume(Volume::Tokens).max(1) as f64;
        Some(LayerBreakdown {
            layers,
            forwards_per_layer: self.count(Phase::RoundTrip) as f64 / layers as f64,
            layer_us: us(Phase::Layer),
            encode_us: us(Phase::Encode),
            wait_us: us(Phase::Wait),
            decode_us: us(Phase::Decode),
            combine_us: us(Phase::Combine),
            round_trip_us: us(Phase::RoundTrip),
            transport_us: us(Phase::Transport),
            worker_decode_us: us(Phase::WorkerDecode),
            worker_queue_us: us(Phase::WorkerQueue),
            worker_compute_us: us(Phase::WorkerCompute),
            worker_encode_us: us(Phase::WorkerEncode),
            sent_bytes_per_token: per_token(Volume::SentBytes),
            received_bytes_per_token: per_token(Volume::ReceivedBytes),
        })
    }
}

/// Mean microseconds per layer dispatch. `layer_us` ≈ encode + wait +
/// decode + combine (plus planning); the per-Forward phases are summed over
/// the layer's Forwards, which run concurrently, so they may add up to more
/// than `wait_us`. The bytes are the Forwards' protobuf messages (gRPC's
/// framing and HTTP/2's headers add a few dozen bytes per message), per
/// token and layer: every byte sent over every token each layer dispatched.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBreakdown {
    pub layers: u64,
    pub forwards_per_layer: f64,
    pub layer_us: f64,
    pub encode_us: f64,
    pub wait_us: f64,
    pub decode_us: f64,
    pub combine_us: f64,
    pub round_trip_us: f64,
    pub transport_us: f64,
    pub worker_decode_us: f64,
    pub worker_queue_us: f64,
    pub worker_compute_us: f64,
    pub worker_encode_us: f64,
    pub sent_bytes_per_token: f64,
    pub received_bytes_per_token: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_splits_into_the_workers_phases_and_transport() {
        let phases = DispatchPhases::default();
        let before = phases.snapshot();
        for _ in 0..2 {
            phases.record(Phase::Layer, Duration::from_micros(500));
            phases.add(Volume::Tokens, 4);
            phases.add(Volume::SentBytes, 4 * 2 * 1024 + 100);
            phases.add(Volume::ReceivedBytes, 4 * 2 * 1024 + 20);
            phases.record(Phase::Encode, Duration::from_micros(10));
            phases.record(Phase::Wait, Duration::from_micros(450));
            for _ in 0..2 {
                phases.record_forward(
                    Duration::from_micros(400),
                    Some(&WorkerTimings {
                        decode_ns: 5_000,
                        queue_ns: 15_000,
                        compute_ns: 250_000,
                        encode_ns: 10_000,
                    }),
                );
            }
        }
        let b = phases.snapshot().since(&before).per_layer().unwrap();
        assert_eq!(b.layers, 2);
        assert_eq!(b.forwards_per_layer, 2.0);
        assert_eq!(b.layer_us, 500.0);
        assert_eq!(b.wait_us, 450.0);
        assert_eq!(b.round_trip_us, 800.0);
        assert_eq!(b.worker_compute_us, 500.0);
        assert_eq!(b.worker_queue_us, 30.0);
        // 400 µs less 280 µs in the worker, twice per layer.
        assert_eq!(b.transport_us, 240.0);
        assert_eq!(b.sent_bytes_per_token, 2048.0 + 25.0);
        assert_eq!(b.received_bytes_per_token, 2048.0 + 5.0);

        // A worker slower than the round trip (clock noise) leaves no negative transport.
        let later = phases.snapshot();
        phases.record(Phase::Layer, Duration::from_micros(1));
        phases.record_forward(
            Duration::from_micros(1),
            Some(&WorkerTimings {
                compute_ns: 9_000,
                ..Default::default()
            }),
        );
        let b = phases.snapshot().since(&later).per_layer().unwrap();
        assert_eq!(b.transport_us, 0.0);
        assert!(DispatchPhases::default().snapshot().per_layer().is_none());
    }
}
