//! The process's life as the bus sees it: fork detection (a `pthread_atfork` child
//! handler counts the forks, so that a bus copied into a child process, which has none of
//! the parent's other threads (not its flusher, nor a thread holding or biasing a shard's
//! lock), can tell with one load that it is a copy and refuse to be used rather than hang
//! or send the parent's messages again), and a hook at `exit()`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Once;

/// Forks this process's line went through since the handler was registered: incremented
/// in each child, before `fork` returns there.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// The child handler: one atomic add (async-signal-safe, no allocation, no lock).
extern "C" fn in_child() {
    FORKS.fetch_add(1, Relaxed);
}

/// Which process made something: compare later with [`forked`](Self::forked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForkStamp {
    forks: u64,
    pid: u32,
}

impl ForkStamp {
    /// The calling process, now (registers the handler at the first call).
    pub(crate) fn now() -> Self {
        static REGISTER: Once = Once::new();
        REGISTER.call_once(|| {
            // SAFETY: `in_child` is a `'static` function that only adds to an atomic, which
            // is allowed in a forked child of a multi-threaded process. (On failure,
            // `ENOMEM`, the pid comparison of `forked_cold` still detects the child.)
            let _ = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        });
        Self {
            forks: FORKS.load(Relaxed),
            pid: std::process::id(),
        }
    }

    /// True in a child forked since the stamp (one load: for hot paths).
    #[inline(always)]
    pub(crate) fn forked(&self) -> bool {
        FORKS.load(Relaxed) != self.forks
    }

    /// [`forked`](Self::forked), or another process id (a `getpid`: for cold paths).
    pub(crate) fn forked_cold(&self) -> bool {
        self.forked() || std::process::id() != self.pid
    }

    /// `m` locked; in a child forked since the stamp only if it is free (`None` when held:
    /// the thread that held it at the fork does not exist there, so it would never be
    /// released).
    pub(crate) fn lock<'a, T>(
        &self,
        m: &'a parking_lot::Mutex<T>,
    ) -> Option<parking_lot::MutexGuard<'a, T>> {
        if self.forked_cold() {
            m.try_lock()
        } else {
            Some(m.lock())
        }
    }
}

/// Has `f` run at `exit()` (`atexit(3)`: after `main` returns, or at
/// `std::process::exit`, neither of which drops what a static or a stack holds). False
/// when it could not be registered.
pub(crate) fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a `'static` function taking nothing; `atexit` only stores it and
    // calls it once at exit, on the exiting thread.
    unsafe { libc::atexit(f) == 0 }
}

#[cfg(all(test, not(cnbus_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_not_forked_in_its_own_process() {
        let s = ForkStamp::now();
        assert!(!s.forked() && !s.forked_cold());
    }
}
