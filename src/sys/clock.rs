//! Clocks: the proc connector stamps events with `CLOCK_MONOTONIC` nanoseconds; `/proc`
//! gives process start times on `CLOCK_BOOTTIME`.

/// Reads `clock`; 0 if the kernel refuses (it does not for the clocks used here).
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write; clock_gettime is a vDSO call.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `proc_event.timestamp_ns`
/// (`ktime_get_ns()`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`): how late the kernel may
/// fire its timed sleeps to batch wake-ups (50 µs by default). The bus's flusher sets 1 ns,
/// so that a message's latency deadline is kept to the scheduler's wake-up delay.
pub(crate) fn set_timer_slack_ns(ns: u64) -> std::io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
    super::cvt(r).map(|_| ())
}

/// `CLOCK_BOOTTIME` in nanoseconds: like `CLOCK_MONOTONIC` but counting time suspended; the
/// clock of the process start times in `/proc/<pid>/stat` (field 22, in clock ticks).
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the times in `/proc/<pid>/stat` (100 on every
/// mainstream architecture).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let r = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(r).ok().filter(|&t| t > 0).unwrap_or(100)
}
