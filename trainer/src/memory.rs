//! Process memory: the allocator policy the binary sets, and peak resident memory as the
//! trainer reports it.

/// `mi_option_purge_delay` in mimalloc 2's option enum (libmimalloc-sys is pinned to match).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped (`true`) instead of returning it to the OS: a training step frees
/// and reallocates the same large buffers every step, and each fresh page costs a fault and a
/// zeroing pass. Memory held stays at the step's peak, which the next step needs anyway. Setup
/// (a dense base loaded for QLoRA, file contents) runs with `false`, so its buffers go back.
pub fn retain_freed_memory(retain: bool) {
    // Safety: sets a process-wide allocator option; mimalloc reads it when memory is freed.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, if retain { -1 } else { 0 }) };
}

/// Return the free pages every thread's heap still holds to the OS now.
pub fn collect_freed_memory() {
    // Safety: collections of mimalloc's own free pages; each thread collects its own heap.
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(true) });
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// The process's peak resident memory since start or the last `reset_peak_rss`, in MB
/// (Linux `VmHWM`; None elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Start a new peak-RSS window (Linux: `clear_refs` 5); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
