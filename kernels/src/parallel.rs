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

/// Runs `body` over `0..units` on every thread of `team`, in chunks of
/// `chunk` units taken in order from a shared counter: a thread that is
/// faster, or was not descheduled, takes more chunks instead of waiting at
/// the end for the other (a static split waits for the slowest share, and
/// on a shared machine one core is often slower for a while). Within a
/// chunk, units run in order. A team of one thread takes the whole range
/// at once.
pub fn for_each_chunk(
    team: &dyn Parallel,
    units: usize,
    chunk: usize,
    body: &(dyn Fn(std::ops::Range<usize>) + Sync),
) {
    let chunk = chunk.max(1);
    if team.threads() == 1 || units <= chunk {
        return body(0..units);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    team.run(&|_, _| {
        loop {
            let start = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
            if start >= units {
                break;
            }
            body(start..(start + chunk).min(units));
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn chunks_cover_every_unit_once() {
        for units in 0..40 {
            for threads in 1..5 {
                for chunk in [1, 3, 7, 50] {
                    let seen = Mutex::new(vec![0u32; units]);
                    for_each_chunk(&Scoped(threads), units, chunk, &|range| {
                        assert!(threads == 1 || range.len() <= chunk);
                        let mut seen = seen.lock().unwrap();
                        for unit in range {
                            seen[unit] += 1;
                        }
                    });
                    let seen = seen.into_inner().unwrap();
                    assert!(
                        seen.iter().all(|&n| n == 1),
                        "units {units} threads {threads} chunk {chunk}: {seen:?}"
                    );
                }
            }
        }
    }
}
