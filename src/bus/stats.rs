//! Counters and the [`BusStats`] snapshot: one list of fields, from which the macro below
//! makes both the public snapshot and its atomic counters (durations in nanoseconds).
//!
//! Accepted inserts are counted per ring (written by its writer only, before the message
//! is published) and summed when a snapshot is taken; everything else is counted on slow
//! paths or by the drains, with `Release` additions. A snapshot is not an atomic cut, but
//! it loads what was finished before what was accepted, so that it never shows more
//! finished than accepted (`Counters::snapshot`).

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

macro_rules! bus_stats {
    ($(#[$sm:meta])* pub struct $name:ident { $($(#[$m:meta])* pub $f:ident: $t:ident,)* }) => {
        $(#[$sm])*
        pub struct $name {
            $($(#[$m])* pub $f: $t,)*
            /// Send failures by errno.
            pub send_errors: SendErrors,
        }

        /// The atomic counters behind [`BusStats`], one per field.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub $f: AtomicU64,)*
            /// `ENOBUFS`, `EPERM`/`EACCES`, `ECONNREFUSED`, any other errno, the last errno.
            errors: [AtomicU64; 5],
        }

        impl Counters {
            fn load(&self) -> $name {
                let e = self.errors.each_ref().map(|c| c.load(Relaxed));
                $name {
                    $($f: bus_stats!(@$t self.$f.load(Relaxed)),)*
                    send_errors: SendErrors {
                        enobufs: e[0],
                        eperm: e[1],
                        econnrefused: e[2],
                        other: e[3],
                        last_errno: e[4] as i32,
                    },
                }
            }
        }
    };
    (@u64 $e:expr) => { $e };
    (@Duration $e:expr) => { Duration::from_nanos($e) };
}

impl Counters {
    /// Release: what was done before counting (a drain's Acquire of the ring's tail,
    /// after the writer counted the message in) happens-before a snapshot that sees the
    /// count (`finished`).
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Release);
    }

    pub(crate) fn max(c: &AtomicU64, v: u64) {
        c.fetch_max(v, Relaxed);
    }

    pub(crate) fn send_error(&self, errno: i32) {
        let i = match errno {
            libc::ENOBUFS => 0,
            libc::EPERM | libc::EACCES => 1,
            libc::ECONNREFUSED => 2,
            _ => 3,
        };
        Self::add(&self.errors[i], 1);
        self.errors[4].store(errno as u64, Relaxed);
    }

    pub(crate) fn flush_done(&self, ns: u64) {
        Self::add(&self.flushes, 1);
        // The total, until `snapshot` divides it.
        Self::add(&self.flush_latency_mean, ns);
        Self::max(&self.flush_latency_max, ns);
        self.flush_latency_last.store(ns, Relaxed);
    }

    /// Messages sent and messages failed so far: what a snapshot loads first (see
    /// [`snapshot`](Self::snapshot)).
    pub(crate) fn finished(&self) -> (u64, u64) {
        let f = (
            self.sent_messages.load(Acquire),
            self.failed_messages.load(Acquire),
        );
        // Before the loads of what was accepted.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        f
    }

    /// The snapshot, given the messages sent and failed ([`finished`](Self::finished)),
    /// loaded before everything else, and then the messages the live rings have taken
    /// (`inserted` counts only the forgotten rings' and the direct sends). A message is
    /// counted in when accepted, before it can be finished (a drain takes only published
    /// messages; a direct send counts itself in before its send is counted), so every
    /// finished message is in `inserted` too, and `queued` is the difference: each
    /// snapshot has `inserted == sent + failed + queued`.
    pub(crate) fn snapshot(&self, (sent, failed): (u64, u64), pushed: u64) -> BusStats {
        let mut s = self.load();
        s.inserted += pushed;
        (s.sent_messages, s.failed_messages) = (sent, failed);
        s.queued = s.inserted.saturating_sub(sent + failed);
        let total = s.flush_latency_mean.as_nanos() as u64;
        s.flush_latency_mean = Duration::from_nanos(total.checked_div(s.flushes).unwrap_or(0));
        s
    }
}

/// Send failures by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendErrors {
    /// `ENOBUFS`: the kernel could not allocate or queue the datagram on the sender.
    pub enobufs: u64,
    /// `EPERM` / `EACCES`: sending to a group or to the kernel needs `CAP_NET_ADMIN`.
    pub eperm: u64,
    /// `ECONNREFUSED`: no socket has the destination port id (or, for the kernel, the
    /// process is in another network namespace).
    pub econnrefused: u64,
    /// Any other errno.
    pub other: u64,
    /// The errno of the most recent failure, 0 if none.
    pub last_errno: i32,
}

impl SendErrors {
    /// All failed send attempts (retries included).
    pub fn total(&self) -> u64 {
        self.enobufs + self.eperm + self.econnrefused + self.other
    }
}

bus_stats! {
/// A snapshot of a bus's counters ([`Bus::stats`](super::Bus::stats)).
///
/// Accounting identity, in every snapshot: `inserted == sent_messages + failed_messages +
/// queued` (`queued` is 0 once the bus is flushed); every message offered to the bus is
/// either in `inserted` or in one of the `rejected_*` counters. A snapshot taken while
/// the bus runs is not an atomic cut of the other counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Messages the bus accepted (queued, or sent directly on the caller's thread).
    pub inserted: u64,
    /// Of `inserted`, messages sent directly by the caller because its ring was full
    /// ([`FullPolicy::SendDirect`](super::FullPolicy::SendDirect)), or because its
    /// shard's lock could not be taken from another thread (`barrier_failures`).
    pub direct: u64,
    /// Messages handed back because the ring was full ([`InsertError::Full`](super::InsertError::Full)),
    /// or, for a rejecting insert, because its shard's lock stayed with another thread
    /// (a failed barrier, also counted in `barrier_failures`) or it came during thread
    /// teardown while other shards held messages.
    pub rejected_full: u64,
    /// Messages handed back after a blocking insert timed out.
    pub rejected_timeout: u64,
    /// Messages handed back because the bus's flusher is gone.
    pub rejected_closed: u64,
    /// Messages handed back because they can never fit in a datagram.
    pub rejected_too_large: u64,
    /// Inserts that found their ring full and waited (blocking policy) or sent directly.
    pub blocked: u64,
    /// Sends that found a [`Dest::Port`](crate::sys::Dest::Port) receiver's queue full and
    /// waited for room (at most [`send_timeout`](super::BusBuilder::send_timeout) each).
    pub full_receiver_waits: u64,
    /// Panics caught in the flusher or in a drain (bugs in cnbus). The messages a
    /// panicking drain had taken and not sent are in `failed_messages`; the panic is
    /// returned once as [`Error::Panicked`](crate::Error::Panicked) by
    /// [`Bus::flush`](super::Bus::flush) or [`Bus::close`](super::Bus::close).
    pub panics: u64,
    /// Messages handed to the kernel (queued and direct).
    pub sent_messages: u64,
    /// Datagrams handed to the kernel.
    pub sent_datagrams: u64,
    /// Send system calls made (`sendmmsg`, by the drains and direct sends),
    /// failed ones included.
    pub syscalls: u64,
    /// Accepted messages that could not be sent (their datagram failed after retries).
    pub failed_messages: u64,
    /// Datagrams that could not be sent.
    pub failed_datagrams: u64,
    /// Accepted messages not sent or counted as failed yet (queued in a ring, or being
    /// sent): `inserted - sent_messages - failed_messages`, in every snapshot.
    pub queued: u64,
    /// Largest drain (messages taken at once from a ring), or `capacity` once an insert
    /// found its ring full.
    pub high_water: u64,
    /// Longest time from a ring's oldest-message stamp to the drain that took it.
    pub max_queue_delay: Duration,
    /// Times the flusher thread woke up from a sleep.
    pub flusher_wakeups: u64,
    /// Drains done by writers on their own thread
    /// ([`BusBuilder::assist`](super::BusBuilder::assist)).
    pub assisted_drains: u64,
    /// Messages those drains took (sent or counted as failed).
    pub assisted_messages: u64,
    /// Completed [`Bus::flush`](super::Bus::flush) calls.
    pub flushes: u64,
    /// Longest `flush()`.
    pub flush_latency_max: Duration,
    /// Most recent `flush()`.
    pub flush_latency_last: Duration,
    /// Mean `flush()` duration.
    pub flush_latency_mean: Duration,
    /// `(destination, id)` sequences the socket's numbering forgot because it was full (see
    /// [`BusBuilder::numbered_ids`](super::BusBuilder::numbered_ids)); shared by
    /// everything sending on the socket. A forgotten one starts again at 1, which receivers
    /// count as `reordered`, not as loss.
    pub numbering_evictions: u64,
    /// Messages handed back because their idx is the kernel's
    /// ([`InsertError::KernelOwned`](super::InsertError::KernelOwned)).
    pub rejected_kernel_owned: u64,
    /// Messages a [`FullPolicy::SendDirect`](super::FullPolicy::SendDirect) insert could
    /// not send on the caller's thread, handed back as
    /// [`InsertError::Send`](super::InsertError::Send) (their errno is in `send_errors`).
    pub rejected_send: u64,
    /// `membarrier(2)` barriers that failed after the process registered for them (each
    /// after a few tries; docs/BUS.md, "Memory orderings"): a flusher that then slept at
    /// most its latency aim, a close that then left a racing `Producer`'s push to that
    /// producer (returned as [`Error::Io`](crate::Error::Io) with
    /// [`Op::Membarrier`](crate::Op::Membarrier)), an insert whose shard's lock stayed
    /// with another thread, sent on the caller's thread instead (counted in `direct`;
    /// the error returned by the next `flush`). One per barrier needed and not
    /// established, also once a thread's barrier failed for good and is no longer
    /// attempted (`EPERM` and the like: the flusher then counts one per sleep).
    pub barrier_failures: u64,
}
}

impl BusStats {
    /// All rejected messages, whatever the reason.
    pub fn rejected(&self) -> u64 {
        self.rejected_full
            + self.rejected_timeout
            + self.rejected_closed
            + self.rejected_too_large
            + self.rejected_kernel_owned
            + self.rejected_send
    }

    /// Average messages per datagram sent (0 when nothing was sent).
    pub fn avg_msgs_per_datagram(&self) -> f64 {
        per(self.sent_messages, self.sent_datagrams)
    }

    /// Average messages per send system call (0 when none was made).
    pub fn avg_msgs_per_syscall(&self) -> f64 {
        per(self.sent_messages, self.syscalls)
    }
}

/// `n / d`, 0 when `d` is 0.
fn per(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}
