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

/// Runs `body(unit)` for every unit of `0..units` on the threads of `team`,
/// which take the units in order from a shared counter: a thread that is
/// faster, or was not descheduled, takes more units instead of waiting at
/// the end for the other (a static split waits for the slowest share, and
/// on a shared machine one core is often slower for a while). A team of one
/// thread, or a single unit, runs on the calling thread.
pub fn for_each_unit(team: &dyn Parallel, units: usize, body: &(dyn Fn(usize) + Sync)) {
    if team.threads() == 1 || units <= 1 {
        return (0..units).for_each(body);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    team.run(&|_, _| {
        loop {
            let unit = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if unit >= units {
                break;
            }
            body(unit);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn every_unit_runs_once() {
        for units in 0..40 {
            for threads in 1..5 {
                let seen = Mutex::new(vec![0u32; units]);
                for_each_unit(&Scoped(threads), units, &|unit| {
                    seen.lock().unwrap()[unit] += 1;
                });
                let seen = seen.into_inner().unwrap();
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "units {units} threads {threads}: {seen:?}"
                );
            }
        }
    }
}
