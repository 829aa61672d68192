//! The system layer: every system call and every `unsafe` block of cnbus lives here.
//!
//! As in `mio` and `socket2`, the rest of the crate sees safe, typed wrappers. Each `unsafe`
//! block carries a `// SAFETY:` comment saying why it is sound.

#[cfg(feature = "tokio")]
pub mod asyncfd;
mod clock;
mod cpu;
pub(crate) mod membarrier;
mod meminfo;
mod ns;
mod process;
mod recv;
pub(crate) mod ring;
mod send;
mod signal;
mod socket;
mod spin;
mod wake;

pub(crate) use clock::set_timer_slack_ns;
pub use clock::{boottime_ns, clock_ticks_per_sec, monotonic_ns, realtime_ns};
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) use cpu::sched_of;
pub(crate) use cpu::{configured_cpus, set_realtime};
pub use cpu::{current_cpu, num_cpus, pin_current_thread};
pub use meminfo::{DropCounter, MemInfo};
pub use ns::{kernel_at_least, namespace_report, proc_is_initial_pid_ns, NamespaceReport};
#[cfg_attr(cnbus_loom, allow(unused_imports))] // used by proc, not built under loom
pub(crate) use ns::{ns_inode_of, PID_INIT_INO};
pub(crate) use process::{at_exit, register_once, ForkSafe, ForkStamp};
#[cfg(test)]
pub(crate) use process::{become_nobody_without_realtime, in_forked_child, thread_count};
pub use recv::{RecvBatch, RecvMeta};
pub(crate) use send::RoomWait;
#[cfg(test)]
pub(crate) use send::SENDMMSG_CALLS;
pub use signal::TermSignals;
pub use socket::{ConnectorSocket, Dest, NETLINK_CONNECTOR};
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) use spin::{hold_spare, BIAS_AFTER};
pub(crate) use spin::{BiasedLock, Holder, HolderSlot};
pub use wake::{poll_read, poll_write, poll_write_timeout, EventFd, Readiness};

use std::io;

/// `Err(last_os_error)` when a libc return value is negative.
pub(crate) fn cvt<T: PartialOrd + Default>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
