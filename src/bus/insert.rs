//! The insert path above the queue: size and liveness checks, then the [`FullPolicy`] when
//! the queue is full. Shared by [`Bus`](super::Bus) (per-CPU shards, see [`Shards`]) and
//! [`Producer`](super::Producer) (its own lane), which differ only in the [`Queue`] below.

use std::sync::atomic::{fence, Ordering::*};
use std::time::Instant;

use crate::codec::CnMsg;

use super::drain;
use super::shard::Entry;
use super::stats::Counters;
use super::{FullPolicy, Inner, InsertError};

/// Where an insert puts its message.
pub(crate) trait Queue<'a> {
    /// The bus.
    fn inner(&self) -> &'a Inner;
    /// One attempt to queue `e`; false when full. `help`: the caller may drain (it holds no
    /// bus lock).
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool;
    /// Drains the caller's queue on this thread if no one else is draining it; true if it
    /// did.
    fn help_own(&mut self) -> bool;
    /// Waits until none of the caller's messages is queued or being sent; false when the
    /// bus is closed.
    fn settle_own(&mut self) -> bool;
}

/// The per-CPU shards, as seen by a thread calling [`Bus::insert`](super::Bus::insert).
#[derive(Clone, Copy)]
pub(crate) struct Shards<'a>(pub &'a Inner);

impl<'a> Queue<'a> for Shards<'a> {
    #[inline(always)]
    fn inner(&self) -> &'a Inner {
        self.0
    }

    #[inline(always)]
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool {
        self.0.try_push(e, help)
    }

    fn help_own(&mut self) -> bool {
        self.0.help(self.0.own_shard())
    }

    fn settle_own(&mut self) -> bool {
        // Our queued messages can be in any drainer's hands: a flush covers them all.
        !self.0.has_own_pending() || self.0.wait_flushed()
    }
}

/// Checks `e`, queues it, and applies `policy` if the queue is full.
#[inline(always)]
pub(crate) fn insert<'a, Q: Queue<'a>>(
    q: &mut Q,
    e: Entry<'_>,
    policy: FullPolicy,
) -> Result<(), InsertError<CnMsg>> {
    let inner = q.inner();
    let len = e.encoded_len();
    if len > inner.cfg.datagram_size || e.data_len() > CnMsg::MAX_DATA {
        return Err(too_large(inner, e, len));
    }
    if inner.cfg.refuse_kernel_ids && e.id().is_kernel_owned() {
        return Err(kernel_owned(inner, e));
    }
    if inner.dead.load(Relaxed) {
        Counters::add(&inner.stats.rejected_closed, 1);
        return Err(InsertError::Closed(e.into_msg()));
    }
    if q.try_push(&e, true) {
        return Ok(());
    }
    on_full(q, e, policy).map_err(|err| err.map(Entry::into_msg))
}

#[cold]
fn kernel_owned(inner: &Inner, e: Entry<'_>) -> InsertError<CnMsg> {
    Counters::add(&inner.stats.rejected_kernel_owned, 1);
    InsertError::KernelOwned(e.into_msg())
}

#[cold]
fn too_large(inner: &Inner, e: Entry<'_>, len: usize) -> InsertError<CnMsg> {
    Counters::add(&inner.stats.rejected_too_large, 1);
    InsertError::TooLarge {
        msg: e.into_msg(),
        len,
        limit: inner.cfg.datagram_size,
    }
}

#[cold]
fn on_full<'a, 'e, Q: Queue<'a>>(
    q: &mut Q,
    e: Entry<'e>,
    policy: FullPolicy,
) -> Result<(), InsertError<Entry<'e>>> {
    let inner = q.inner();
    let st = &inner.stats;
    Counters::max(&st.high_water, inner.cfg.capacity as u64);
    match policy {
        FullPolicy::Reject => {
            Counters::add(&st.rejected_full, 1);
            inner.wake();
            Err(InsertError::Full(e))
        }
        FullPolicy::Block => {
            Counters::add(&st.blocked, 1);
            block(q, e, None)
        }
        FullPolicy::BlockFor(t) => {
            Counters::add(&st.blocked, 1);
            // A timeout past what `Instant` can represent is no timeout.
            block(q, e, Instant::now().checked_add(t))
        }
        FullPolicy::SendDirect => {
            Counters::add(&st.blocked, 1);
            if !q.settle_own() {
                Counters::add(&st.rejected_closed, 1);
                return Err(InsertError::Closed(e));
            }
            send_direct(inner, e)
        }
    }
}

fn block<'a, 'e, Q: Queue<'a>>(
    q: &mut Q,
    e: Entry<'e>,
    deadline: Option<Instant>,
) -> Result<(), InsertError<Entry<'e>>> {
    let inner = q.inner();
    // With assisted draining, first try to make the space ourselves.
    if inner.cfg.assist && q.help_own() && q.try_push(&e, true) {
        return Ok(());
    }
    loop {
        let mut g = inner.space_lock.lock();
        inner.space_waiters.fetch_add(1, SeqCst);
        // A drainer that frees space either sees the waiter (and notifies under
        // `space_lock`, which we hold until we wait) or freed it before our retry below
        // looks. A shard's retry takes the shard lock, which orders it; a lane's retry is
        // a plain Acquire load of the ring's head, so this fence pairs with the drainer's
        // (`space_freed`).
        fence(SeqCst);
        // After the increment, so that the flusher either sees the waiter when it decides
        // how to sleep, or is unparked.
        inner.wake();
        // No helping here: we hold `space_lock`, which a drainer takes to notify.
        if q.try_push(&e, false) {
            inner.space_waiters.fetch_sub(1, SeqCst);
            return Ok(());
        }
        if inner.dead.load(SeqCst) {
            inner.space_waiters.fetch_sub(1, SeqCst);
            Counters::add(&inner.stats.rejected_closed, 1);
            return Err(InsertError::Closed(e));
        }
        let timed_out = match deadline {
            Some(d) => inner.space_cv.wait_until(&mut g, d).timed_out(),
            None => {
                inner.space_cv.wait(&mut g);
                false
            }
        };
        inner.space_waiters.fetch_sub(1, SeqCst);
        drop(g);
        if timed_out {
            if q.try_push(&e, true) {
                return Ok(());
            }
            Counters::add(&inner.stats.rejected_timeout, 1);
            return Err(InsertError::Timeout(e));
        }
    }
}

/// Sends `e` on the caller's thread in a datagram of its own (the caller has made sure
/// none of its earlier messages is still queued).
fn send_direct<'e>(inner: &Inner, e: Entry<'e>) -> Result<(), InsertError<Entry<'e>>> {
    let st = &inner.stats;
    let mut buf = vec![0u8; e.encoded_len()];
    // Fits: sized for it, and the data length was checked on entry.
    let _ = e.encode_into(inner.pid, crate::codec::NLMSG_DONE, &mut buf);
    // Under the send lock, so that a numbered message gets the next number of its id and
    // goes on the wire in that order.
    let mut seqs = inner.seqs().lock();
    if let (Entry::Slice { id, .. }, Some(m)) = (&e, crate::codec::array_mut::<28>(&mut buf)) {
        drain::write_seq(m, seqs.next_to(inner.dest, *id));
    }
    // Without blocking; a full unicast receiver is waited for as by the drainers.
    let unicast = matches!(inner.dest, crate::sys::Dest::Port(_));
    let mut room = drain::RoomWait::new();
    let sent = loop {
        Counters::add(&st.syscalls, 1);
        match inner.sock.try_send(&buf, inner.dest) {
            Ok(Some(_)) => {
                if unicast {
                    room.done(inner);
                }
                break Ok(());
            }
            Ok(None) if unicast && room.wait(inner) => {}
            Ok(None) => break Err(drain::receiver_full(crate::Op::Send)),
            Err(e) => break Err(e),
        }
    };
    drop(seqs);
    match sent {
        Ok(()) => {
            Counters::add(&st.direct, 1);
            Counters::add(&st.sent_messages, 1);
            Counters::add(&st.sent_datagrams, 1);
            Ok(())
        }
        Err(error) => {
            st.send_error(error.errno().unwrap_or(libc::EIO));
            Err(InsertError::Send { msg: e, error })
        }
    }
}
