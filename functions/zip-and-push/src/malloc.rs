//! glibc malloc settings that keep the peak RSS flat with the upload size.
//!
//! The body streams through buffers of a few hundred KiB (hyper's read buffers, split into
//! frames). glibc serves allocations above `M_MMAP_THRESHOLD` (128 KiB) with `mmap` and returns
//! them on free — but its *dynamic* threshold rises to the size of every mmapped chunk freed, after
//! which those buffers come from the heaps of per-thread arenas that fragment and keep freed memory
//! (measured with the default settings: 50.7 MiB at 200 MiB, 87.6 MiB at 2 GiB; with these: 50.1 and 61.0). Setting the threshold explicitly turns the
//! dynamic adjustment off, and two arenas bound the heaps the worker and blocking threads spread
//! over (`docs/benchmarks.md` has the before/after figures). A different allocator would also do;
//! these two settings need no new dependency.

/// Apply the settings. Call it first in `main`, before any other thread exists (before the tokio
/// runtime is built); elsewhere it does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    // SAFETY: `mallopt` only changes allocator parameters; `main` calls this before any other thread
    // exists, with documented parameters and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Not glibc: nothing to tune.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
