//! An asymmetric memory barrier: `membarrier(2)` with `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
//!
//! The pattern (Dekker's, made asymmetric): a hot thread writes a flag and then reads
//! another with only a *compiler* fence between them, which on its own lets the CPU let the
//! read pass the write; a rare thread writes the other flag, calls [`heavy`], then reads
//! the first. `heavy` makes every thread of the process that is running at that moment
//! execute a full memory barrier (the kernel interrupts their CPUs) before it returns, and
//! threads that are not running pass one when they are scheduled. So either the hot
//! thread's write is visible to the rare thread's read, or the hot thread's read comes
//! after its barrier and sees the rare thread's write: one of the two always sees the
//! other, as with two full fences, while the hot side pays no fence at all.
//!
//! [`Light`] is the hot side's fence: a compiler fence when [`heavy`] is available, and a
//! real `SeqCst` fence otherwise (registration can fail on kernels before 4.14 or under a
//! seccomp filter), so the pattern stays correct everywhere and is only faster where the
//! kernel helps.

use std::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};

/// From `<linux/membarrier.h>`.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// 0: not tried yet; 1: registered, [`heavy`] is a membarrier; 2: unavailable, both sides
/// use fences.
static STATE: AtomicU8 = AtomicU8::new(0);

fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) == 0 }
}

/// Registers the process for expedited private barriers (once), and returns the hot
/// side's fence for the caller to keep: a compiler fence if registration succeeded (it
/// then holds for the life of the process), a full fence otherwise.
pub(crate) fn init() -> Light {
    let ok = match STATE.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            let ok = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
                && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
            // Release: a thread that reads 1 also sees the registration done.
            STATE.store(if ok { 1 } else { 2 }, Ordering::Release);
            ok
        }
    };
    Light { compiler_only: ok }
}

/// The hot side's fence; see the module docs. Obtained from [`init`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Light {
    compiler_only: bool,
}

impl Light {
    /// Orders the caller's earlier stores before its later loads, as seen by a thread
    /// that runs [`heavy`].
    #[inline(always)]
    pub(crate) fn fence(self) {
        if self.compiler_only {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }
}

/// The rare side's barrier: a full fence on every running thread of the process (a
/// system call of a few microseconds), or a `SeqCst` fence when membarrier is unavailable
/// (the hot side then fences too).
///
/// Fails only if the system call fails after registration succeeded, which the kernel
/// does not do (EINVAL/EPERM come only without registration). The barrier is then *not*
/// established: the caller must not rely on it (the bus's flusher then sleeps with a
/// timeout instead of trusting its last look at the lanes), never silently weaken it.
pub(crate) fn heavy() -> std::io::Result<()> {
    fence(Ordering::SeqCst);
    if STATE.load(Ordering::Acquire) == 1 && !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// The Dekker pattern with [`Light::fence`] on one side and `heavy` on the other: in every
    /// round at least one side sees the other's flag.
    #[test]
    fn one_side_always_sees_the_other() {
        let light = init();
        assert!(
            light.compiler_only,
            "membarrier is available on the kernels cnbus supports (4.14+)"
        );
        for _ in 0..2000 {
            let a = Arc::new(AtomicBool::new(false));
            let b = Arc::new(AtomicBool::new(false));
            let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
            let hot = std::thread::spawn(move || {
                a2.store(true, Ordering::Relaxed);
                light.fence();
                b2.load(Ordering::Relaxed)
            });
            b.store(true, Ordering::Relaxed);
            heavy().unwrap();
            let rare_saw = a.load(Ordering::Relaxed);
            let hot_saw = hot.join().unwrap();
            assert!(rare_saw || hot_saw, "neither side saw the other");
        }
    }
}
