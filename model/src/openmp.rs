//! libtorch's own OpenMP team, for the kernels of [`tramontane_kernels`].
//! libtorch's CPU ops run on OpenMP threads that keep spinning for a while
//! after each op; a second thread pool would fight them for the same cores
//! (on 2 cores it halves the kernels' speed). Running the kernels' bodies as
//! OpenMP parallel regions reuses those very threads: the libgomp that
//! libtorch loaded is looked up at run time (`GOMP_parallel`, the entry
//! point GCC compiles `#pragma omp parallel` to), so nothing is linked
//! beside libtorch. Without it the kernels run on the calling thread.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use tramontane_kernels::Parallel;

type Body = unsafe extern "C" fn(*mut c_void);
type GompParallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
type OmpQuery = unsafe extern "C" fn() -> c_int;

/// libgomp's entry points, found in the running process.
pub struct OpenMpTeam {
    parallel: GompParallel,
    thread_num: OmpQuery,
    num_threads: OmpQuery,
}

impl OpenMpTeam {
    /// The team of the libgomp libtorch loaded, if it did.
    pub fn get() -> Option<&'static Self> {
        static TEAM: OnceLock<Option<OpenMpTeam>> = OnceLock::new();
        TEAM.get_or_init(|| {
            // SAFETY: dlsym on the process's global scope; each symbol, when
            // present, has the C signature libgomp documents.
            unsafe {
                let find = |name: &std::ffi::CStr| libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
                let (parallel, thread_num, num_threads) = (
                    find(c"GOMP_parallel"),
                    find(c"omp_get_thread_num"),
                    find(c"omp_get_num_threads"),
                );
                if parallel.is_null() || thread_num.is_null() || num_threads.is_null() {
                    return None;
                }
                Some(Self {
                    parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                    thread_num: std::mem::transmute::<*mut c_void, OmpQuery>(thread_num),
                    num_threads: std::mem::transmute::<*mut c_void, OmpQuery>(num_threads),
                })
            }
        })
        .as_ref()
    }
}

/// What a parallel region's threads share: the body, the team, and whether
/// a body panicked (a panic must not unwind through libgomp's C frames).
struct Region<'a> {
    body: &'a (dyn Fn(usize, usize) + Sync),
    team: &'a OpenMpTeam,
    panicked: std::sync::atomic::AtomicBool,
}

unsafe extern "C" fn run_region(data: *mut c_void) {
    // SAFETY: `data` is the `Region` `run` passed, alive until GOMP_parallel returns.
    let region = unsafe { &*data.cast::<Region<'_>>() };
    // SAFETY: called inside the parallel region.
    let (thread, threads) = unsafe { ((region.team.thread_num)(), (region.team.num_threads)()) };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (region.body)(thread.max(0) as usize, threads.max(1) as usize)
    }));
    if ran.is_err() {
        region
            .panicked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Parallel for OpenMpTeam {
    fn threads(&self) -> usize {
        tch::get_num_threads().max(1) as usize
    }

    fn run(&self, body: &(dyn Fn(usize, usize) + Sync)) {
        let threads = self.threads();
        if threads == 1 {
            return body(0, 1);
        }
        let region = Region {
            body,
            team: self,
            panicked: false.into(),
        };
        // SAFETY: `run_region` reads `region` only until GOMP_parallel
        // returns, which is after every thread of the region has finished.
        unsafe {
            (self.parallel)(
                run_region,
                (&region as *const Region<'_>).cast_mut().cast(),
                threads as c_uint,
                0,
            )
        };
        if region.panicked.into_inner() {
            panic!("a kernel thread panicked");
        }
    }
}
