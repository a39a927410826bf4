//! Graceful stop, as schedulers expect it (Slurm and Kubernetes send SIGTERM before they kill):
//! the first SIGINT or SIGTERM asks the training loop to finish its step, write a checkpoint
//! and exit with `STOPPED_EXIT_CODE`; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a run stopped by a signal after saving (BSD's EX_TEMPFAIL: "try again",
/// which `--resume` does).
pub const STOPPED_EXIT_CODE: u8 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: an atomic swap, write(2) and _exit(2).
    if REQUESTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(128 + signal) };
    }
    let note = b"\nstop requested: finishing this step and writing a checkpoint (signal again to exit at once)\n";
    unsafe { libc::write(2, note.as_ptr().cast(), note.len()) };
}

/// Route SIGINT and SIGTERM to the graceful stop (from here on, for this process).
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            // Interrupted reads and writes restart rather than fail.
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn stop_requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error a run stopped by a signal ends with: its checkpoint is written.
#[derive(Debug)]
pub struct Stopped {
    pub step: usize,
    pub output_dir: std::path::PathBuf,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by a signal at step {} with a checkpoint; continue with --resume {}", self.step, self.output_dir.display())
    }
}

impl std::error::Error for Stopped {}
