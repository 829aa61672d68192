//! Sending: `sendmmsg` with bounded retries, the bounded wait for room at a full unicast
//! receiver, and the containment of panics, for every drain ([`Ring`](super::ring::Ring))
//! and direct send.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{fence, Ordering::*};
use std::time::Duration;

use super::stats::Counters;
use super::Inner;
use crate::sys::ConnectorSocket;

/// How often a transient send error (`ENOBUFS`, `EAGAIN`, `EINTR`, `ENOMEM`) is retried
/// before the datagram is counted as failed.
const TRANSIENT_RETRIES: u32 = 2;

/// A send's wait for room at a full unicast receiver ([`Dest::Port`](crate::sys::Dest)):
/// the bus sends with `MSG_DONTWAIT` and, when the receiver's queue is full, waits as
/// every sender does ([`sys::RoomWait`](crate::sys)) for at most
/// [`BusBuilder::send_timeout`](super::BusBuilder::send_timeout), never past the shutdown
/// deadline. A wait that times out marks the bus's receiver as stalled: later sends do not
/// wait for it until one of them gets a datagram through.
/// Why it sleeps rather than `poll`s: docs/BUS.md, "Flush, shutdown, errors".
pub(crate) struct RoomWait(Option<crate::sys::RoomWait>);

impl RoomWait {
    pub(crate) fn new() -> Self {
        Self(None)
    }

    /// The receiver was full: sleeps before the next attempt and returns true, or returns
    /// false when the send must give up (timeout, shutdown deadline, stalled receiver).
    pub(crate) fn wait(&mut self, inner: &Inner) -> bool {
        if inner.stalled.load(Relaxed) {
            return false;
        }
        let first = self.0.is_none();
        let w = self
            .0
            .get_or_insert_with(|| crate::sys::RoomWait::new(inner.cfg.send_timeout));
        if let Some(stop) = inner.stop_deadline() {
            w.end_by(stop);
        }
        if !w.sleep() {
            inner.stalled.store(true, Relaxed);
            return false;
        }
        if first {
            Counters::add(&inner.stats.full_receiver_waits, 1);
        }
        true
    }

    /// A datagram got through: the receiver takes datagrams again.
    pub(crate) fn done(&mut self, inner: &Inner) {
        if self.0.take().is_some() || inner.stalled.load(Relaxed) {
            inner.stalled.store(false, Relaxed);
        }
    }
}

impl Inner {
    /// Runs `f`; if it panics, the panic is caught, counted ([`BusStats::panics`]) and kept
    /// as [`Error::Panicked`](crate::Error::Panicked) for `flush`/`close`, and `None` is
    /// returned. Wraps every drain, so that a bug cannot make taken messages vanish
    /// uncounted, nor kill the flusher.
    ///
    /// [`BusStats::panics`]: super::BusStats::panics
    pub(crate) fn contain<R>(&self, thread: &'static str, f: impl FnOnce() -> R) -> Option<R> {
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(p) => {
                self.panicked(thread, &*p);
                None
            }
        }
    }

    /// Counts and keeps a caught panic (it takes the place of a pending send error: a
    /// panic is a bug and must be seen).
    pub(crate) fn panicked(&self, thread: &'static str, payload: &(dyn std::any::Any + Send)) {
        Counters::add(&self.stats.panics, 1);
        let message = payload
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(a panic without a message)".to_string());
        let mut l = self.last_error.lock();
        if !matches!(*l, Some(crate::Error::Panicked { .. })) {
            *l = Some(crate::Error::Panicked { thread, message });
        }
    }

    /// Drains every ring on the calling thread (waiting for each drain right), for `flush`
    /// and shutdown, then forgets the retired producers' rings it emptied (the flusher may
    /// not make a pass for a long time).
    pub(crate) fn drain_everything(&self) {
        let rings: Vec<_> = self.rings.lock().clone();
        for r in &rings {
            self.drain(r, true);
        }
        self.prune_rings();
    }

    /// Space was freed in a ring: wakes blocked inserters (the SeqCst fence pairs
    /// with their SeqCst increment of `space_waiters` before their retry: either we see
    /// the waiter, or its retry sees the space).
    pub(crate) fn space_freed(&self) {
        fence(SeqCst);
        if self.space_waiters.load(SeqCst) > 0 {
            let _g = self.space_lock.lock();
            self.space_cv.notify_all();
        }
    }

    /// Sends the `count` datagrams `datagram(0..count)` (each in one or two pieces,
    /// [`ConnectorSocket::try_send_pieces`](crate::sys::ConnectorSocket); datagram `i`
    /// holds `msgs(i)` messages), `max_batch` (at most 64) per `sendmmsg`, retrying
    /// transient errors a bounded number of times and waiting a bounded time for room at a
    /// full unicast receiver ([`RoomWait`]). Tells
    /// `done(messages, datagrams, error)` of each batch sent (`None`: counted here, after
    /// the call) and of each datagram given up on (its error). The caller holds the send
    /// lock.
    pub(crate) fn send_datagrams<'a>(
        &self,
        count: usize,
        datagram: impl Fn(usize) -> [&'a [u8]; 2],
        msgs: impl Fn(usize) -> u64,
        mut done: impl FnMut(u64, u64, Option<crate::Error>),
    ) {
        let st = &self.stats;
        let max_batch = self.cfg.max_batch.clamp(1, ConnectorSocket::SENDMMSG_MAX);
        let unicast = self.sends_wait();
        let mut room = RoomWait::new();
        // What a datagram that a full unicast receiver did not take in time fails with.
        let full = || {
            let eagain = std::io::Error::from_raw_os_error(libc::EAGAIN);
            crate::Error::from_io(crate::Op::SendBatch, eagain)
        };
        let mut off = 0;
        let mut tries = 0;
        while off < count {
            Counters::add(&st.syscalls, 1);
            let n = max_batch.min(count - off);
            #[cfg(test)]
            if self.cfg.panic_at
                == Some(super::flusher::PanicAt::Syscall(st.syscalls.load(Relaxed)))
            {
                panic!("test hook: a drainer panics");
            }
            // Never blocks: a full unicast receiver is waited for below, boundedly.
            let pieces = |i| datagram(off + i);
            let (err, retry) = match self.sock.try_send_pieces(n, pieces, self.dest) {
                Ok(k) if k > 0 => {
                    let n: u64 = (off..off + k).map(&msgs).sum();
                    // First: a direct send counts itself in there, before it is counted
                    // as sent (`Counters::snapshot`).
                    done(n, k as u64, None);
                    Counters::add(&st.sent_datagrams, k as u64);
                    Counters::add(&st.sent_messages, n);
                    (off, tries) = (off + k, 0);
                    if unicast {
                        room.done(self);
                    }
                    continue;
                }
                Ok(_) if unicast && room.wait(self) => continue,
                // The receiver took nothing in time: no further retry.
                Ok(_) if unicast => (full(), false),
                Ok(_) => (full(), true),
                Err(e) => (e, true),
            };
            let errno = err.errno().unwrap_or(libc::EIO);
            st.send_error(errno);
            let transient = matches!(
                errno,
                libc::ENOBUFS | libc::EAGAIN | libc::EINTR | libc::ENOMEM
            );
            if retry && transient && tries < TRANSIENT_RETRIES {
                tries += 1;
                std::thread::sleep(Duration::from_micros(50 << tries));
                continue;
            }
            // Give up on this datagram: its numbers are used up, so a receiver counts its
            // messages as lost.
            done(msgs(off), 1, Some(err));
            (off, tries) = (off + 1, 0);
        }
    }
}
