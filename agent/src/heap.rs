//! Keeping the heap's peak where the buffers put it.
//!
//! pgpitr moves data through buffers of megabytes (chunks, lz4 frames, packs, WAL segments),
//! often allocated on one thread and freed on another. glibc's malloc raises its mmap threshold
//! each time such a buffer is freed (up to 32 MiB), after which buffers come from per-thread
//! arenas and freed space is not given back: peak RSS then grows well past the bytes in use.
//! Fixing the threshold keeps every buffer of 1 MiB or more in its own mapping, returned to the
//! system when freed (mallopt(3), `M_MMAP_THRESHOLD`).

/// Buffers of at least this many bytes are mapped, and unmapped when freed.
const MMAP_THRESHOLD: i32 = 1 << 20;

/// Call once, first thing in `main`. A no-op outside glibc.
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
