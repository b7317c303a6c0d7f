//! The thread team a kernel runs on. A kernel calls [`Parallel::run`] once
//! with a body that takes `(thread, threads)` and does its share; the team
//! runs the body on every thread and returns when all are done. In a process
//! that links libtorch the team should be libtorch's own OpenMP team (see
//! `tramontane-model`'s `openmp`): a second pool would fight libtorch's
//! spinning threads for the same cores.

/// A team of threads that runs one body on each and waits for all.
pub trait Parallel: Sync {
    /// Threads a body will run on.
    fn threads(&self) -> usize;
    /// Runs `body(thread, threads)` on every thread of the team, `thread` in
    /// `0..threads`, and returns when all have returned.
    fn run(&self, body: &(dyn Fn(usize, usize) + Sync));
}

/// The calling thread alone.
pub struct Serial;

impl Parallel for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, body: &(dyn Fn(usize, usize) + Sync)) {
        body(0, 1);
    }
}

/// Scoped std threads, started per call: for tests and benches outside a
/// libtorch process.
pub struct Scoped(pub usize);

impl Parallel for Scoped {
    fn threads(&self) -> usize {
        self.0.max(1)
    }
    fn run(&self, body: &(dyn Fn(usize, usize) + Sync)) {
        let threads = self.threads();
        std::thread::scope(|scope| {
            for thread in 1..threads {
                scope.spawn(move || body(thread, threads));
            }
            body(0, threads);
        });
    }
}

/// The share of `0..units` thread `thread` of `threads` takes: contiguous,
/// sizes differing by at most one unit.
pub fn share(units: usize, thread: usize, threads: usize) -> std::ops::Range<usize> {
    let threads = threads.max(1);
    let base = units / threads;
    let extra = units % threads;
    let start = thread * base + thread.min(extra);
    let len = base + usize::from(thread < extra);
    start..(start + len).min(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_unit_once() {
        for units in 0..40 {
            for threads in 1..6 {
                let mut next = 0;
                for thread in 0..threads {
                    let range = share(units, thread, threads);
                    assert_eq!(range.start, next, "units {units} threads {threads}");
                    assert!(range.len() <= units / threads + 1);
                    next = range.end;
                }
                assert_eq!(next, units);
            }
        }
    }
}
