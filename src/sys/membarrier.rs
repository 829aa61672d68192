//! An asymmetric memory barrier: `membarrier(2)` with `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
//!
//! Dekker's pattern made asymmetric: a hot thread stores one flag and then loads another
//! with only a compiler fence between them ([`Light::fence`]), which on its own lets the
//! CPU satisfy the load before the store is visible; a rare thread stores the other flag,
//! calls [`heavy`], then loads the first. `heavy` makes every thread of the process that
//! is running at that moment execute a full memory barrier (the kernel interrupts their
//! CPUs) before it returns, and a thread that is not running passes one when it is
//! scheduled. So either the hot thread's store is visible to the rare thread's load, or
//! the hot thread's load comes after its barrier and sees the rare thread's store: one
//! side always sees the other, as with a full fence on both sides, while the hot side
//! executes no fence at all.
//!
//! Where registration fails (kernels before 4.14, a seccomp filter), [`Light::fence`] is
//! a real `SeqCst` fence and [`heavy`] a fence too: the pattern stays correct everywhere
//! and is only cheaper where the kernel helps. Under loom both sides are `SeqCst` fences,
//! the symmetric form that the barrier stands for.

use std::sync::atomic::{AtomicU8, Ordering};

/// From `<linux/membarrier.h>`.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// 0: not tried yet; 1: registered, [`heavy`] is a membarrier; 2: unavailable, both sides
/// use fences. Set once (`Release`), read with `Acquire`.
static STATE: AtomicU8 = AtomicU8::new(0);

fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) == 0 }
}

/// Registers the process for expedited private barriers (once; it then holds for the
/// life of the process) and returns the hot side's fence for the caller to keep.
pub(crate) fn init() -> Light {
    let ok = match STATE.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            let ok = !cfg!(cnbus_loom)
                && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
                && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
            // Release: a thread that loads 1 also sees the registration done. The first
            // result stands (a thread under a seccomp filter of its own may fail where
            // another succeeded), so that every `Light` handed out agrees with `heavy`.
            let mine = if ok { 1 } else { 2 };
            match STATE.compare_exchange(0, mine, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => ok,
                Err(first) => first == 1,
            }
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
    /// Orders the caller's earlier stores before its later loads, as seen by a thread that
    /// runs [`heavy`] between its own store and load.
    #[inline(always)]
    pub(crate) fn fence(self) {
        if self.compiler_only {
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        } else {
            crate::sync::fence(Ordering::SeqCst);
        }
    }
}

/// The rare side's barrier: a `SeqCst` fence, then (when registered) a full barrier on
/// every running thread of the process, a system call of a few microseconds.
///
/// Fails only if the system call fails after registration succeeded, which the kernel
/// does not do (its errors are for an unregistered process). The barrier is then *not*
/// established and the caller must not rely on it (the bus's flusher then sleeps with a
/// timeout rather than trusting its last look); it is never silently weakened.
pub(crate) fn heavy() -> std::io::Result<()> {
    crate::sync::fence(Ordering::SeqCst);
    if STATE.load(Ordering::Acquire) == 1 && !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(test, not(cnbus_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Dekker with [`Light::fence`] on one side and `heavy` on the other: in every round at
    /// least one side sees the other's flag.
    #[test]
    fn one_side_always_sees_the_other() {
        let light = init();
        assert!(
            light.compiler_only || std::env::var_os("CI").is_none(),
            "membarrier(2) is expected on the kernels cnbus supports (4.14+)"
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
