//! Giving the C heap's free memory back to the system once the weights are
//! loaded. Loading makes and drops a temporary for every matrix (a copy in
//! another dtype, a stacked gate/up, int8 quantization's f32 working
//! copies), and glibc keeps what was freed in its heap: without this a
//! worker holding its experts in int8 was resident at more than in bf16
//! (the `bench` model, all experts: 2,497 MiB against 1,990 MiB, for 674
//! and 1,344 MiB of weights).

/// Returns the heap's free pages to the system (glibc's `malloc_trim`;
/// elsewhere nothing).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap, under its lock.
    unsafe {
        libc::malloc_trim(0);
    }
}
