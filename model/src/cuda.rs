//! libtorch's CUDA half (`libtorch_cuda.so`), loaded when a CUDA device is
//! asked for. The binaries link it, but nothing calls into it by name, so
//! the linker's `--as-needed` drops it, and libtorch then sees no CUDA
//! device at all. Loading it registers its CUDA hooks, as `import torch`
//! does in Python. A CPU-only libtorch has no such library.

use std::sync::OnceLock;

/// Loads `libtorch_cuda.so` once (found through the binary's rpath to
/// torch's lib folder); false when there is none to load.
pub fn load() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        // SAFETY: a NUL-terminated name; the handle is kept for the life of
        // the process (never closed), as a linked library would be.
        let handle = unsafe {
            libc::dlopen(
                c"libtorch_cuda.so".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        !handle.is_null()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loading_twice_is_harmless_and_the_device_count_is_readable_after() {
        let first = super::load();
        assert_eq!(super::load(), first);
        // With or without a GPU, libtorch answers after the load.
        let count = tch::Cuda::device_count();
        assert!(count >= 0);
        if !first {
            assert_eq!(count, 0, "no CUDA half, no CUDA device");
        }
    }
}
