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
//! a real `SeqCst` fence and [`Light::heavy`] a fence too: the pattern stays correct
//! everywhere and is only cheaper where the kernel helps. Under loom both sides are
//! `SeqCst` fences, the symmetric form that the barrier stands for.
//!
//! Should the system call fail *after* registration (`ENOMEM` for its CPU mask, or a
//! seccomp filter installed later returning an errno), [`Light::heavy`] tries
//! [`HEAVY_TRIES`] times with short pauses and then returns the error: the barrier is
//! then not established, and the caller must not go on as if it were (each caller has a
//! path that does not need it: docs/BUS.md, "Memory orderings"). Never an unbounded
//! retry. A real failure also makes every later [`init`] hand out a real fence, so that
//! what is built afterwards never depends on the barrier. An errno that cannot pass on a
//! second try (`EPERM`, `EACCES`, `EINVAL`, `ENOSYS`: see `is_permanent`) is not tried
//! again, and the thread remembers it: its later barriers fail at once with that errno,
//! without the system call.

use std::sync::atomic::{AtomicU8, Ordering};

/// From `<linux/membarrier.h>`.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// 0: not tried yet; 1: registered, [`Light::heavy`] is a membarrier; 2: unavailable,
/// both sides use fences; 3: registered, but a barrier failed since: lights handed out
/// from now on use fences (those handed out before keep the barrier, and may see it
/// fail). Set (`Release`) from 0 once, and from 1 to 3; read with `Acquire`.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Attempts of [`Light::heavy`] before it gives up (50 µs, then 100 µs apart).
pub(crate) const HEAVY_TRIES: u32 = 3;

fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) == 0 }
}

/// Registers the process for expedited private barriers (once; it then holds for the
/// life of the process) and returns the hot side's fence for the caller to keep.
pub(crate) fn init() -> Light {
    let ok = match STATE.load(Ordering::Acquire) {
        1 => true,
        2 | 3 => false,
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
    /// Test hook: whether the light side is only a compiler fence (membarrier registered).
    #[cfg(test)]
    pub(crate) fn compiler_only_for_tests(self) -> bool {
        self.compiler_only
    }

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

impl Light {
    /// The rare side's barrier against this light side: a `SeqCst` fence, then, if this
    /// light side is only a compiler fence, a full barrier on every running thread of the
    /// process (`membarrier`, a system call of a few microseconds).
    ///
    /// Fails if that system call fails [`HEAVY_TRIES`] times, or once with a permanent
    /// errno, and from then on at once on this thread (see the module docs). The
    /// barrier is then *not* established and the caller must not rely on it; it is never
    /// silently weakened. A light side that is a real fence never fails.
    pub(crate) fn heavy(self) -> std::io::Result<()> {
        crate::sync::fence(Ordering::SeqCst);
        if !self.compiler_only {
            return Ok(());
        }
        // This thread's barrier failed for good before: no system call (see `LOST`).
        let lost = lost_here();
        if lost != 0 {
            return Err(std::io::Error::from_raw_os_error(lost));
        }
        let mut n = 0;
        loop {
            let e = match barrier() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            n += 1;
            let permanent = e.raw_os_error().filter(|&errno| is_permanent(errno));
            if n >= HEAVY_TRIES || permanent.is_some() {
                if !injected(&e) {
                    let _ = STATE.compare_exchange(1, 3, Ordering::AcqRel, Ordering::Acquire);
                }
                if let Some(errno) = permanent {
                    set_lost_here(errno);
                }
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_micros(25 << n));
        }
    }
}

/// An errno with which `MEMBARRIER_CMD_PRIVATE_EXPEDITED` fails every time it is tried
/// again on this thread: `EPERM`/`EACCES` (a seccomp filter, which applies to the thread
/// that installed it and the threads it starts later), `EINVAL`/`ENOSYS` (the command is
/// not there). `ENOMEM` (the kernel's CPU mask) and any other errno may pass, and are
/// tried again at the next barrier.
fn is_permanent(errno: i32) -> bool {
    matches!(
        errno,
        libc::EPERM | libc::EACCES | libc::EINVAL | libc::ENOSYS
    )
}

#[cfg(not(cnbus_loom))]
thread_local! {
    /// The errno of this thread's permanent barrier failure ([`is_permanent`]), 0 if
    /// none: its later [`Light::heavy`] calls fail at once with it, without the system
    /// call and its pauses (before, a bus's flusher made three failed calls, about
    /// 150 µs, at each of its sleeps). Per thread, as a seccomp filter is.
    static LOST: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn lost_here() -> i32 {
    #[cfg(not(cnbus_loom))]
    return LOST.get();
    #[cfg(cnbus_loom)]
    0
}

fn set_lost_here(_errno: i32) {
    #[cfg(not(cnbus_loom))]
    LOST.set(_errno);
}

/// One `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (or the failure a test injected).
fn barrier() -> std::io::Result<()> {
    #[cfg(all(test, not(cnbus_loom)))]
    if let Some(errno) = FAIL_HERE.get() {
        CALLS_HERE.with_borrow(|c| c.as_ref().map(|c| c.fetch_add(1, Ordering::Relaxed)));
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True for a failure injected by a test ([`fail_heavy_here`]): it does not switch the
/// process to fences (other tests run in the same process).
fn injected(_e: &std::io::Error) -> bool {
    #[cfg(all(test, not(cnbus_loom)))]
    if FAIL_HERE.get().is_some() {
        return true;
    }
    false
}

#[cfg(all(test, not(cnbus_loom)))]
thread_local! {
    static FAIL_HERE: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
    /// Counts the injected failures' system calls ([`count_calls_here`]).
    static CALLS_HERE: std::cell::RefCell<Option<std::sync::Arc<std::sync::atomic::AtomicU64>>> =
        const { std::cell::RefCell::new(None) };
}

/// Test hook (fault injection): every `membarrier` of [`Light::heavy`] on the calling
/// thread fails with `errno` from now on (as under a seccomp filter installed after the
/// registration); `None` lifts it, and forgets the thread's permanent failure (`LOST`).
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) fn fail_heavy_here(errno: Option<i32>) {
    FAIL_HERE.set(errno);
    if errno.is_none() {
        LOST.set(0);
    }
}

/// Test hook: counts in `calls` each system call that [`fail_heavy_here`] makes fail on
/// the calling thread.
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) fn count_calls_here(calls: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    CALLS_HERE.set(Some(calls));
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
            light.heavy().unwrap();
            let rare_saw = a.load(Ordering::Relaxed);
            let hot_saw = hot.join().unwrap();
            assert!(rare_saw || hot_saw, "neither side saw the other");
        }
    }

    /// A failing barrier is retried `HEAVY_TRIES` times, then reported (never retried
    /// without end); a light side that is a real fence needs no barrier and never fails.
    #[test]
    fn a_failing_barrier_is_reported_after_bounded_tries() {
        let light = init();
        fail_heavy_here(Some(libc::EPERM));
        let r = light.heavy();
        let fenced = Light {
            compiler_only: false,
        }
        .heavy();
        fail_heavy_here(None);
        if light.compiler_only {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPERM));
        }
        fenced.unwrap();
        light.heavy().unwrap();
    }
}
