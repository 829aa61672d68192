//! The process's life as the bus sees it: fork detection (a `pthread_atfork` child
//! handler counts the forks, so that a bus copied into a child process, which has none of
//! the parent's other threads (not its flusher, nor a thread holding or biasing a shard's
//! lock), can tell with one load that it is a copy and refuse to be used rather than hang
//! or send the parent's messages again), process-wide locks that a forked child can
//! always take ([`ForkSafe`]), and a hook at `exit()`.

use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};

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
        register();
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

/// Registers the fork handler ([`register_once`]: never waiting, and in place when this
/// returns, unless `pthread_atfork` failed, when the pid comparison of
/// [`ForkStamp::forked_cold`] still tells a child).
fn register() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    register_once(&REGISTERED, || at_fork_child(in_child));
}

/// Has `f` run in the child of every later `fork` (`pthread_atfork`'s child handler).
/// False when it could not be registered (`ENOMEM`).
fn at_fork_child(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a `'static` function taking nothing; the handlers given to this
    // crate's callers only add to an atomic, which is allowed in a forked child of a
    // multi-threaded process.
    unsafe { libc::pthread_atfork(None, None, Some(f)) == 0 }
}

/// Runs `register` (the registration of a process-wide hook, inherited by forked
/// children) unless one succeeded already (`done`); returns only once a registration is
/// in place, or failed here. Never waits for another thread (as a `Once` would: in a
/// child forked while another thread was registering, that thread does not exist and
/// the wait would never end). A thread that finds another one registering registers
/// too, rather than go on before the hook is in place (a fork in that window would be
/// missed: its stamp taken, its child without the handler); so does the first user in a
/// child forked during a registration. The cost: the few threads of that window register
/// the hook more than once (each fork handler adds to `FORKS`, which only needs to
/// change; the exit hook's second run finds nothing left to send).
pub(crate) fn register_once(done: &AtomicBool, register: impl FnOnce() -> bool) {
    // Acquire: a thread that sees `done` sees the registration in place.
    if !done.load(Acquire) && register() {
        done.store(true, Release);
    }
}

/// The calling process as one word, for [`ForkSafe`]: its pid (22 bits: `pid_max` is at
/// most 2^22) and its line's fork count (40 bits, so that a pid reused down the line
/// still differs), shifted by 2 to leave room for a state.
fn process_key() -> u64 {
    register();
    let pid = u64::from(std::process::id()) & ((1 << 22) - 1);
    let forks = FORKS.load(Relaxed) & ((1 << 40) - 1);
    (pid << 42) | (forks << 2)
}

/// [`ForkSafe::decision`] states (the low 2 bits).
const DECIDING: u64 = 0;
const FIRST: u64 = 1;
const FRESH: u64 = 2;

/// A process-wide value behind a lock that a forked child can always take: the bus's
/// list of buses, the shard locks' spare holders. The child of a multi-threaded process
/// has only the thread that forked: a lock another thread held at the fork stays held
/// there for good, and the value it guarded may be half-changed. So the first thread of
/// each process (told by [`process_key`]) to use it decides once, while the process's
/// other threads wait for the decision (a `try_lock` away): if the lock is free, no
/// thread held it at the fork (none of this process can have taken it since), and the
/// process goes on with it; else the process gets a fresh `make()` of its own (leaked)
/// and the parent's value is abandoned. For values a child may start afresh only.
///
/// [`ForkStamp::lock`] is the other case: a lock of one bus, whose copy in a child is
/// closed, so a held lock there means "do without" (`None`), not a fresh value.
pub(crate) struct ForkSafe<T: 'static> {
    first: parking_lot::Mutex<T>,
    /// The process key of the process whose threads use the lock, with `FIRST` or
    /// `FRESH`; `DECIDING` while one of its threads finds out; 0 before any use.
    decision: AtomicU64,
    /// The lock of a process that found `first` held (`FRESH`), leaked.
    fresh: AtomicPtr<parking_lot::Mutex<T>>,
    make: fn() -> T,
}

impl<T> ForkSafe<T> {
    /// `value`, and `make` for the fresh value of a child that finds the lock held.
    pub(crate) const fn new(value: T, make: fn() -> T) -> Self {
        Self {
            first: parking_lot::Mutex::new(value),
            decision: AtomicU64::new(0),
            fresh: AtomicPtr::new(std::ptr::null_mut()),
            make,
        }
    }

    /// The lock of this process, locked (see the type's docs).
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, T> {
        self.lock_in(process_key())
    }

    fn lock_in(&self, me: u64) -> parking_lot::MutexGuard<'_, T> {
        let mut spins = 0;
        loop {
            let d = self.decision.load(Acquire);
            if d == 0 {
                // Never used, here or in an ancestor: `first` is free.
                if (self.decision)
                    .compare_exchange(0, me | FIRST, AcqRel, Acquire)
                    .is_ok()
                {
                    return self.first.lock();
                }
                continue;
            }
            if d & !3 == me {
                match d & 3 {
                    FIRST => return self.first.lock(),
                    FRESH => {
                        // Stored (Release) before the decision that we loaded (Acquire).
                        let fresh = self.fresh.load(Acquire);
                        // SAFETY: `fresh` is a leaked `Box`, never freed, stored before
                        // `FRESH` was.
                        return unsafe { &*fresh }.lock();
                    }
                    // Another thread of this process is deciding: a `try_lock` away.
                    _ => {
                        // (Not `crate::sync::spin_wait`: never a loom model's.)
                        if spins < 100 {
                            spins += 1;
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                        continue;
                    }
                }
            }
            // The first use in this (forked) process: decide, once.
            if (self.decision)
                .compare_exchange(d, me | DECIDING, AcqRel, Acquire)
                .is_err()
            {
                continue;
            }
            // Held now means held at the fork: this process's other threads wait for
            // the decision rather than take it.
            if let Some(g) = self.first.try_lock() {
                self.decision.store(me | FIRST, Release);
                return g;
            }
            let fresh: &'static parking_lot::Mutex<T> =
                Box::leak(Box::new(parking_lot::Mutex::new((self.make)())));
            self.fresh
                .store(std::ptr::from_ref(fresh).cast_mut(), Release);
            self.decision.store(me | FRESH, Release);
            return fresh.lock();
        }
    }

    /// Test hook: the process's own lock, held (as by a thread that is inside it when
    /// another thread forks).
    #[cfg(test)]
    pub(crate) fn hold(&self) -> parking_lot::MutexGuard<'_, T> {
        self.lock()
    }
}

/// Test hook: runs `child` in a forked child of this (multi-threaded) test process, which
/// exits with its return value (`_exit`, without the parent's exit handlers; 99 if it
/// panicked: a panic in a forked child must not pass for success). The child's exit
/// code, or `None` when it had not exited after `limit` (it is then killed): a hang
/// detector, not a timing.
#[cfg(test)]
pub(crate) fn in_forked_child(
    child: impl FnOnce() -> i32,
    limit: std::time::Duration,
) -> Option<i32> {
    // SAFETY: the child runs `child` (the test's own code, using what a fork leaves: the
    // calling thread and glibc's malloc) and ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: ends the child at once, running none of the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let start = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child without blocking; `status` is valid for writes.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            assert!(libc::WIFEXITED(status), "child status {status:#x}");
            return Some(libc::WEXITSTATUS(status));
        }
        if start.elapsed() > limit {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Test hook, for a forked child only: the calling process gives up root for `nobody`
/// (uid and gid 65534: every capability dropped, `CAP_SYS_NICE` among them) with an
/// `RLIMIT_RTPRIO` of 0, so that it may not use `SCHED_FIFO`.
#[cfg(test)]
pub(crate) fn become_nobody_without_realtime() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on the calling process; `zero` is valid for reads.
    let r = unsafe {
        if libc::setrlimit(libc::RLIMIT_RTPRIO, &zero) != 0
            || libc::setresgid(65534, 65534, 65534) != 0
            || libc::setresuid(65534, 65534, 65534) != 0
        {
            -1
        } else {
            0
        }
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Test hook: the calling process's threads (`/proc/self/task`).
#[cfg(test)]
pub(crate) fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
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

    /// A thread that finds the fork handler being registered by another thread takes a
    /// stamp and forks before that registration ends: the child must still be told from
    /// the parent by the hot path (its count changed); and such a child, whose copy of
    /// the registration never ended, must have the handler for its own children. Before
    /// the fix the thread went on without a handler (the child's count was the stamp's:
    /// bit 0), and the child never registered one (bit 1).
    #[test]
    fn a_registration_in_progress_elsewhere_does_not_leave_a_fork_unseen() {
        static DONE: AtomicBool = AtomicBool::new(false);
        static COUNT: AtomicU64 = AtomicU64::new(0);
        extern "C" fn bump() {
            COUNT.fetch_add(1, Relaxed);
        }
        let (reached, go) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                register_once(&DONE, || {
                    reached.wait();
                    go.wait();
                    at_fork_child(bump)
                })
            });
            // The other thread is registering.
            reached.wait();
            register_once(&DONE, || at_fork_child(bump));
            let stamp = COUNT.load(Relaxed);
            let limit = std::time::Duration::from_secs(60);
            let code = in_forked_child(
                || {
                    let mut code = i32::from(COUNT.load(Relaxed) == stamp);
                    // Its own first use registers what the fork cut short.
                    register_once(&DONE, || at_fork_child(bump));
                    let mine = COUNT.load(Relaxed);
                    let grandchild =
                        in_forked_child(|| i32::from(COUNT.load(Relaxed) == mine), limit);
                    code |= i32::from(grandchild != Some(0)) << 1;
                    code
                },
                limit,
            );
            go.wait();
            assert_eq!(code, Some(0), "None: the child hung (killed)");
        });
    }

    /// A `ForkSafe` whose lock a thread holds when another forks: the child gets a fresh
    /// value at once (before: such a lock was a plain mutex, and the child's first use
    /// waited for good); its own threads share it; a lock free at the fork is the
    /// parent's value, taken over.
    #[test]
    fn a_forked_child_takes_a_fork_safe_lock_held_at_the_fork() {
        static HELD: ForkSafe<Vec<u32>> = ForkSafe::new(Vec::new(), Vec::new);
        static FREE: ForkSafe<Vec<u32>> = ForkSafe::new(Vec::new(), Vec::new);
        HELD.lock().push(1);
        FREE.lock().push(2);
        let (held, go) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                let _g = HELD.hold();
                held.wait();
                go.wait();
            });
            held.wait();
            let code = in_forked_child(
                || {
                    let mut code = 0;
                    // A thread of the child's own uses it at the same time.
                    let t = std::thread::spawn(|| HELD.lock().push(4));
                    HELD.lock().push(3);
                    code |= i32::from(t.join().is_err());
                    let mut v = HELD.lock().clone();
                    v.sort_unstable();
                    code |= i32::from(v != [3, 4]) << 1;
                    code |= i32::from(*FREE.lock() != [2]) << 2;
                    code
                },
                std::time::Duration::from_secs(60),
            );
            go.wait();
            assert_eq!(code, Some(0), "None: the child hung (killed)");
        });
        assert_eq!(*HELD.lock(), [1], "the parent's value is the parent's");
    }
}
