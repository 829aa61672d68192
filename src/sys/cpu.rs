//! CPU number and affinity.

use std::io;

use super::cvt;

/// The CPU the calling thread is running on (`sched_getcpu`, a vDSO call on x86-64 and
/// arm64: no system call). `None` when the kernel cannot say.
#[inline]
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only returns a value.
    let r = unsafe { libc::sched_getcpu() };
    usize::try_from(r).ok()
}

/// Number of CPUs the process may run on (at least 1).
pub fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Configured CPUs of the machine, the upper bound of [`current_cpu`] + 1.
#[allow(dead_code)] // used by the batching bus
pub(crate) fn configured_cpus() -> usize {
    // SAFETY: sysconf only reads a configuration value.
    let r = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(r).unwrap_or(1).max(1)
}

/// Runs `thread` under `SCHED_FIFO` at `priority` (1..=99, `pthread_setschedparam`): it
/// then runs the moment it wakes, ahead of every normal (`SCHED_OTHER`) thread. Needs
/// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least `priority` (else `EPERM`), and a
/// real-time budget in the thread's cgroup.
pub(crate) fn set_realtime(thread: libc::pthread_t, priority: u8) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: the caller holds `thread`'s JoinHandle, so it is a live or joinable thread;
    // `p` is a valid sched_param for the call to read.
    let r = unsafe { libc::pthread_setschedparam(thread, libc::SCHED_FIFO, &p) };
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The scheduling policy and priority of `thread` (`pthread_getschedparam`).
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) fn sched_of(thread: libc::pthread_t) -> io::Result<(i32, i32)> {
    let mut policy = 0;
    let mut p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `thread` is live (the caller holds its JoinHandle); both out-pointers are
    // valid for the call to write.
    let r = unsafe { libc::pthread_getschedparam(thread, &mut policy, &mut p) };
    match r {
        0 => Ok((policy, p.sched_priority)),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Pins the calling thread to `cpu` (`sched_setaffinity`). Used by tests and benchmarks that
/// move threads between CPUs on purpose.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE was checked above, so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its size; pid 0 = this thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}
