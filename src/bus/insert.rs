//! The insert path: [`Insert`], the two writers of a [`Ring`] (a per-CPU shard's, shared
//! under its lock by the threads of that CPU, and a [`Producer`]'s own), the checks, and
//! the [`FullPolicy`] when the ring is full. Which shard a thread uses, and why its order
//! survives migration: docs/BUS.md, "Design" step 2 and "Ordering".

use std::cell::RefCell;
use std::sync::atomic::{fence, Ordering::*};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::codec::{CbId, CnMsg};
use crate::sys;

use super::ring::{self, Entry, Ring, Tail};
use super::stats::Counters;
use super::{Bus, FullPolicy, Inner, InsertError};

/// Inserting into a bus: implemented by `&Bus` (the per-CPU shards) and by [`Producer`]
/// (a ring of its own), so that one generic body serves both.
///
/// ```no_run
/// use cnbus::bus::{Bus, Insert};
/// use cnbus::codec::CbId;
/// # fn main() -> cnbus::Result<()> {
/// fn publish(to: &mut impl Insert, n: u32) {
///     for i in 0..n {
///         to.insert(CbId::new(0x4000_0001, 1), &i.to_ne_bytes()).expect("accepted");
///     }
/// }
/// let bus = Bus::builder(cnbus::sys::Dest::Group(24)).build()?;
/// publish(&mut &bus, 10);
/// publish(&mut bus.producer(), 10);
/// bus.flush()?;
/// # Ok(()) }
/// ```
pub trait Insert {
    /// Queues a message with id `id`, ack 0, the next seq of `id` (assigned when it is
    /// sent: 1, 2, 3, ... per id and destination per socket, in wire order) and a copy of
    /// `data`, applying `policy` if the queue is full. On rejection the message comes back
    /// as a [`CnMsg`] in the [`InsertError`], and the rejection is counted.
    fn insert_with(
        &mut self,
        id: CbId,
        data: &[u8],
        policy: FullPolicy,
    ) -> Result<(), InsertError<CnMsg>>;

    /// Queues a prebuilt message (its seq, ack and flags are kept) with `policy`.
    fn insert_msg(&mut self, msg: CnMsg, policy: FullPolicy) -> Result<(), InsertError<CnMsg>>;

    /// The bus's default policy ([`BusBuilder::on_full`](super::BusBuilder::on_full)).
    fn policy(&self) -> FullPolicy;

    /// [`insert_with`](Self::insert_with) the bus's default policy.
    #[inline]
    fn insert(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        let p = self.policy();
        self.insert_with(id, data, p)
    }

    /// [`insert_with`](Self::insert_with) [`FullPolicy::Reject`].
    #[inline]
    fn try_insert(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        self.insert_with(id, data, FullPolicy::Reject)
    }

    /// Waits for space at most `timeout` ([`FullPolicy::BlockFor`]), or without limit.
    #[inline]
    fn insert_blocking(
        &mut self,
        id: CbId,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), InsertError<CnMsg>> {
        self.insert_with(
            id,
            data,
            timeout.map_or(FullPolicy::Block, FullPolicy::BlockFor),
        )
    }

    /// Sends on the caller's thread when the queue is full ([`FullPolicy::SendDirect`]).
    #[inline]
    fn insert_or_send(&mut self, id: CbId, data: &[u8]) -> Result<(), InsertError<CnMsg>> {
        self.insert_with(id, data, FullPolicy::SendDirect)
    }
}

impl Insert for &Bus {
    #[inline(always)]
    fn insert_with(&mut self, id: CbId, d: &[u8], p: FullPolicy) -> Result<(), InsertError<CnMsg>> {
        insert(
            &mut Shards::new(&self.inner, p),
            Entry::Slice { id, data: d },
            p,
        )
    }
    #[inline]
    fn insert_msg(&mut self, msg: CnMsg, p: FullPolicy) -> Result<(), InsertError<CnMsg>> {
        insert(&mut Shards::new(&self.inner, p), Entry::Msg(msg), p)
    }
    #[inline(always)]
    fn policy(&self) -> FullPolicy {
        self.inner.cfg.policy
    }
}

/// Where an insert puts its message.
pub(crate) trait Queue {
    /// The bus.
    fn inner(&self) -> &Arc<Inner>;
    /// One attempt to queue `e`; false when full. `help`: the caller may drain (it holds no
    /// bus lock, and may wait for a send: not a rejecting insert); else, at the watermark of
    /// an assisted ring, it asks the flusher to (`Inner::after_push`).
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool;
    /// The ring that holds the caller's unsent messages and takes its next one; `None`
    /// when unknown (a shard writer's thread-local state is gone: drain every ring).
    fn own(&self) -> Option<&Ring>;
    /// After a successful push, holding no bus lock: sends what the caller's own ring
    /// holds if the bus was closed meanwhile (see `Producer`). Shards need nothing: a
    /// `Bus::insert` borrows the bus, which a close takes by value.
    fn send_own_if_closed(&mut self) {}
    /// The last failed push failed because the ring could not be taken without blocking
    /// (see [`unproven`]), not because it was full.
    fn refused(&self) -> bool {
        false
    }
}

/// A thread's shard of one bus: where its unsent messages are.
struct Mine {
    /// The bus, to forget the entry once it is gone.
    bus: Weak<Inner>,
    /// The bus's identity (`Inner::id`: one compare, where the `Weak` needs two).
    id: u64,
    shard: usize,
    /// The ring's position after this thread's last message there.
    end: usize,
}

/// A thread's state for [`Bus::insert`]: its holder for the shards' locks (owned here,
/// so that it is given up only when nothing of this thread can insert with it any more)
/// and an entry per bus it inserted into.
struct Local {
    me: sys::HolderSlot,
    buses: Vec<Mine>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        me: sys::HolderSlot::new(),
        buses: Vec::new(),
    });
}

/// The per-CPU shards, as seen by a thread calling [`Bus::insert`](super::Bus::insert):
/// the bus, and whether the insert rejects rather than blocks ([`FullPolicy::Reject`]).
pub(crate) struct Shards<'a>(pub &'a Arc<Inner>, bool);

thread_local! {
    /// This thread's last failed push into a shard was refused, not full (see
    /// [`Queue::refused`]); read and cleared by `on_full`. Without a destructor: there
    /// during thread teardown too.
    static REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl<'a> Shards<'a> {
    /// For an insert into `inner` with `policy`.
    #[inline(always)]
    pub(crate) fn new(inner: &'a Arc<Inner>, policy: FullPolicy) -> Self {
        Self(inner, matches!(policy, FullPolicy::Reject))
    }

    /// A rejecting insert's shard lock stayed with another thread (`err`, counted): the
    /// push is refused, not sent on this thread (which could block; see [`unproven`]).
    #[cold]
    fn refuse_unproven(&self, err: std::io::Error) -> bool {
        self.0.barrier_failed(err);
        let _ = REFUSED.try_with(|r| r.set(true));
        false
    }
    /// This thread's entry for the bus (its index in `buses`) and the shard to push into:
    /// the one it last used while that ring still holds one of its messages, else the
    /// shard of the CPU it runs on.
    #[inline(always)]
    fn choose(&self, v: &[Mine]) -> (Option<usize>, usize) {
        let i = self.0;
        let at = v.iter().position(|m| m.id == i.id);
        match at.and_then(|p| v.get(p)) {
            Some(m)
                if i.shards
                    .get(m.shard)
                    .is_some_and(|s| !s.ring.probe.released(m.end)) =>
            {
                (at, m.shard)
            }
            _ => (at, sys::current_cpu().unwrap_or(0) % i.shards.len()),
        }
    }

    /// Pushes into `shard` as the thread holding `me` (if any): the messages held after
    /// the push and the new end position (`None`: full). An error when the shard's lock
    /// stays with another thread (see [`unproven`]).
    #[inline(always)]
    fn push_into(
        &self,
        shard: usize,
        e: &Entry<'_>,
        me: Option<&'static sys::Holder>,
    ) -> std::io::Result<Option<(u64, usize)>> {
        let i = self.0;
        let Some(sh) = i.shards.get(shard) else {
            return Ok(None);
        };
        let mut t = sh.tail.lock(me, i.light)?;
        let n = sh
            .ring
            .push(&mut t, e, i.pid, i.cfg.capacity, || i.now_ns());
        Ok(n.map(|n| (n, t.writer.position())))
    }

    /// Pushes and records where: (shard, messages held). Into the shard this thread used
    /// last if that shard's lock is biased to it (staying there keeps its order, and
    /// another thread that needs the shard takes the bias away); else as
    /// [`choose`](Self::choose) says. `None`: full; an error: as for
    /// [`push_into`](Self::push_into), with whether this thread may still have messages
    /// queued (in that shard).
    #[inline(always)]
    fn push_mine(
        &self,
        l: &mut Local,
        e: &Entry<'_>,
    ) -> Result<Option<(usize, u64)>, (std::io::Error, bool)> {
        let (i, me) = (self.0, l.me.get());
        let v = &mut l.buses;
        // The fast path: no position check, no CPU number, no read-modify-write.
        if let Some(m) = v.first_mut().filter(|m| m.id == i.id) {
            if let Some(sh) = i.shards.get(m.shard) {
                if let Some(mut t) = sh.tail.try_biased(me, i.light) {
                    let n = sh
                        .ring
                        .push(&mut t, e, i.pid, i.cfg.capacity, || i.now_ns());
                    let Some(n) = n else { return Ok(None) };
                    m.end = t.writer.position();
                    return Ok(Some((m.shard, n)));
                }
            }
        }
        let (at, shard) = self.choose(v);
        let (n, end) = match self.push_into(shard, e, Some(me)) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(err) => {
                // `choose` keeps us on the shard that still holds one of our messages.
                let queued = at.and_then(|p| v.get(p)).is_some_and(|m| {
                    m.shard == shard
                        && i.shards
                            .get(shard)
                            .is_some_and(|s| !s.ring.probe.released(m.end))
                });
                return Err((err, queued));
            }
        };
        match at.and_then(|p| v.get_mut(p)) {
            Some(m) => (m.shard, m.end) = (shard, end),
            None => {
                // A new bus for this thread: forget the buses that are gone.
                v.retain(|m| m.bus.strong_count() > 0);
                let (bus, id) = (Arc::downgrade(i), i.id);
                v.push(Mine {
                    bus,
                    id,
                    shard,
                    end,
                });
            }
        }
        // The bus used last goes first, where the fast path looks.
        let last = v.len() - 1;
        v.swap(0, at.unwrap_or(last).min(last));
        Ok(Some((shard, n)))
    }
}

impl Queue for Shards<'_> {
    #[inline(always)]
    fn inner(&self) -> &Arc<Inner> {
        self.0
    }

    #[inline(always)]
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool {
        let i = self.0;
        let r = LOCAL.try_with(|l| Some(self.push_mine(&mut *l.try_borrow_mut().ok()?, e)));
        let (shard, n) = match r {
            Ok(Some(Ok(Some(r)))) => r,
            Ok(Some(Ok(None))) => return false,
            // A `try_insert` does not block: no drain, no direct send.
            Ok(Some(Err((err, _)))) if self.1 => return self.refuse_unproven(err),
            Ok(Some(Err((err, queued)))) => return unproven(i, e, err, queued, help),
            _ => {
                // No thread-local state (thread teardown: a thread-local's destructor
                // inserting after ours was destroyed). Shard 0 keeps this thread's order
                // among such messages, but its earlier ones may still be queued in another
                // shard: a flush first sends them. A blocked insert retries under
                // `space_lock` (`help` false), where no drain may run; its first attempt
                // flushed already. A rejecting insert may not wait for a flush (the send
                // lock, a full receiver): it is refused while another shard holds
                // messages, which may be its earlier ones.
                if self.1 {
                    if i.shards.iter().skip(1).any(|s| s.ring.pending()) {
                        let _ = REFUSED.try_with(|r| r.set(true));
                        return false;
                    }
                } else if help {
                    i.drain_everything();
                }
                match self.push_into(0, e, None) {
                    Ok(Some((n, _))) => (0, n),
                    Ok(None) => return false,
                    Err(err) if self.1 => return self.refuse_unproven(err),
                    Err(err) => {
                        // Unknown where our messages are: out for sure once no ring holds any.
                        let queued = i.rings.lock().iter().any(|r| r.pending());
                        return unproven(i, e, err, queued && !help, help);
                    }
                }
            }
        };
        // The handshake with the flusher as for a `Producer` (docs/BUS.md, "Memory
        // orderings").
        if let Some(s) = i.shards.get(shard) {
            i.after_push(&s.ring, n, i.bell.state_after_publish(i.light), help);
        }
        true
    }

    fn own(&self) -> Option<&Ring> {
        let i = self.0;
        let shard = LOCAL.try_with(|l| Some(self.choose(&l.try_borrow().ok()?.buses).1));
        Some(&i.shards.get(shard.ok().flatten()?)?.ring)
    }

    fn refused(&self) -> bool {
        REFUSED.try_with(|r| r.replace(false)).unwrap_or(false)
    }
}

/// A hot-path producer's own ring into a [`Bus`]: the fastest way to insert.
///
/// [`Bus::insert`](super::Bus::insert) pushes into a per-CPU shard's ring under that
/// shard's lock; a `Producer` owns a ring of the same kind, so an insert is a copy and a
/// store, with no lock, no fence and no thread-local look-up. The bus's drains (this
/// producer at the [watermark](super::BusBuilder::watermark), the flusher at the latency
/// deadline, [`Bus::flush`], shutdown) send it like a shard's ring.
/// Insert through the [`Insert`] trait.
///
/// * **Order**: messages inserted through one `Producer` are sent in insertion order,
///   from whichever thread it is used (it is `Send`; inserts take `&mut self`).
/// * **Bounds**: [`BusBuilder::capacity`](super::BusBuilder::capacity) messages and
///   [`capacity_bytes`](Self::capacity_bytes) bytes, as a shard; when it is full the
///   [`FullPolicy`] applies as for a shard, and every rejection is counted.
/// * **Lifetime**: a `Producer` is owned (`'static`): it can live in a worker thread or a
///   thread-local. It keeps the bus's socket open; once the bus is closed or dropped, its
///   inserts are handed back as [`InsertError::Closed`]. Dropping it keeps its queued
///   messages, which the flusher, [`Bus::flush`] and shutdown send.
pub struct Producer {
    inner: Arc<Inner>,
    ring: Arc<Ring>,
    tail: Tail,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("ring_bytes", &self.tail.writer.size())
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A new ring, or `None` when its memory cannot be allocated.
    pub(crate) fn new(inner: &Arc<Inner>) -> Option<Self> {
        let (ring, tail) = Ring::new(inner.ring_bytes)?;
        // In a forked child its inserts are refused: the rings' lock is not taken (another
        // thread of the parent may have held it at the fork).
        if !inner.fork.forked_cold() {
            inner.add_ring(Arc::clone(&ring));
        }
        Some(Self {
            inner: Arc::clone(inner),
            ring,
            tail,
        })
    }

    /// Messages of this producer not sent yet (queued or being sent).
    pub fn queued(&self) -> u64 {
        self.ring.queued()
    }

    /// Bytes this producer's ring holds; a message takes [`CnMsg::encoded_len`] of them.
    pub fn capacity_bytes(&self) -> usize {
        self.tail.writer.size()
    }
}

impl Insert for Producer {
    #[inline]
    fn insert_with(&mut self, id: CbId, d: &[u8], p: FullPolicy) -> Result<(), InsertError<CnMsg>> {
        insert(self, Entry::Slice { id, data: d }, p)
    }
    fn insert_msg(&mut self, msg: CnMsg, p: FullPolicy) -> Result<(), InsertError<CnMsg>> {
        insert(self, Entry::Msg(msg), p)
    }
    fn policy(&self) -> FullPolicy {
        self.inner.cfg.policy
    }
}

impl Queue for Producer {
    #[inline(always)]
    fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    #[inline(always)]
    fn try_push(&mut self, e: &Entry<'_>, help: bool) -> bool {
        let i = &*self.inner;
        let Some(n) = self
            .ring
            .push(&mut self.tail, e, i.pid, i.cfg.capacity, || i.now_ns())
        else {
            return false;
        };
        // The light fence of the handshake (and of a close, see below).
        i.after_push(&self.ring, n, i.bell.state_after_publish(i.light), help);
        true
    }

    fn own(&self) -> Option<&Ring> {
        Some(&self.ring)
    }

    /// The bus was closed while we pushed (a `Producer` outlives its `Bus`): the light
    /// fence after our push pairs with the heavy barrier before the closing drain
    /// (`Bus::stop`), so either that drain saw our message or we see `dead` here and
    /// send it ourselves. Not under
    /// `space_lock`, which the drain takes to notify waiters.
    #[inline(always)]
    fn send_own_if_closed(&mut self) {
        if self.inner.dead.load(Relaxed) {
            self.inner.drain(&self.ring, true);
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The flusher sends what is left and then forgets the ring.
        self.ring.retired.store(true, Release);
        // Unless the bus is closed: a close whose barrier failed may have missed our last
        // push, which we did not see `dead` after. This fence pairs with the SeqCst fence
        // that the close made after storing `dead` and before its drain: either that drain
        // saw our push, or we see `dead` here and send it (docs/BUS.md, "Memory
        // orderings"). Nothing to send after a close with the barrier.
        // (Not in a forked child: the parent's producer sends it.)
        fence(SeqCst);
        if self.inner.dead.load(Relaxed) && !self.inner.fork.forked_cold() {
            self.inner.drain(&self.ring, true);
        }
    }
}

/// Checks `e`, queues it, and applies `policy` if the queue is full.
#[inline(always)]
pub(crate) fn insert<Q: Queue>(
    q: &mut Q,
    e: Entry<'_>,
    policy: FullPolicy,
) -> Result<(), InsertError<CnMsg>> {
    let inner = q.inner();
    let (len, limit) = (e.encoded_len(), inner.cfg.datagram_size);
    let (id, .., data) = e.fields();
    if len > limit || data.len() > CnMsg::MAX_DATA {
        return Err(refuse(inner, e, |msg| InsertError::TooLarge {
            msg,
            len,
            limit,
        }));
    }
    if inner.cfg.refuse_kernel_ids && id.is_kernel_owned() {
        return Err(refuse(inner, e, InsertError::KernelOwned));
    }
    // A copy of the bus in a forked child is closed (see `Bus::flush`).
    if inner.dead.load(Relaxed) || inner.fork.forked() {
        return Err(refuse(inner, e, InsertError::Closed));
    }
    // A rejecting insert never waits for a send: where a send may wait for a full
    // receiver (`Inner::sends_wait`) it does not drain, but asks the flusher at the
    // watermark of an assisted ring. Elsewhere it helps as any insert (`Inner::help`
    // does not wait for the drain right nor for a send lock it finds held).
    if !q.try_push(&e, policy != FullPolicy::Reject || !inner.sends_wait()) {
        return on_full(q, e, policy);
    }
    q.send_own_if_closed();
    Ok(())
}

/// Counts a refusal in its `rejected_*` counter and hands the message back in it.
#[cold]
fn refuse(
    inner: &Inner,
    e: Entry<'_>,
    err: impl FnOnce(CnMsg) -> InsertError<CnMsg>,
) -> InsertError<CnMsg> {
    let (err, st) = (err(e.into_msg()), &inner.stats);
    let c = match &err {
        InsertError::Full(_) => &st.rejected_full,
        InsertError::Timeout(_) => &st.rejected_timeout,
        InsertError::Closed(_) => &st.rejected_closed,
        InsertError::TooLarge { .. } => &st.rejected_too_large,
        InsertError::KernelOwned(_) => &st.rejected_kernel_owned,
        InsertError::Send { .. } => &st.rejected_send,
    };
    Counters::add(c, 1);
    err
}

#[cold]
fn on_full<Q: Queue>(
    q: &mut Q,
    e: Entry<'_>,
    policy: FullPolicy,
) -> Result<(), InsertError<CnMsg>> {
    let inner = Arc::clone(q.inner());
    if !q.refused() {
        Counters::max(&inner.stats.high_water, inner.cfg.capacity as u64);
    }
    if policy != FullPolicy::Reject {
        Counters::add(&inner.stats.blocked, 1);
    }
    match policy {
        FullPolicy::Reject => {
            inner.ask_drain();
            Err(refuse(&inner, e, InsertError::Full))
        }
        FullPolicy::Block => block(q, &inner, e, None),
        // A timeout past what `Instant` can represent is no timeout.
        FullPolicy::BlockFor(t) => block(q, &inner, e, Instant::now().checked_add(t)),
        FullPolicy::SendDirect => {
            // Our queued messages are all in our own ring: once a drain of it that we
            // waited for returns, they are sent (unknown ring: a flush covers them).
            match q.own() {
                Some(r) => drop(inner.drain(r, true)),
                None => inner.drain_everything(),
            }
            send_direct(&inner, e)
        }
    }
}

fn block<Q: Queue>(
    q: &mut Q,
    inner: &Inner,
    e: Entry<'_>,
    deadline: Option<Instant>,
) -> Result<(), InsertError<CnMsg>> {
    // With assisted draining, first try to make the space ourselves.
    let helped = inner.cfg.assist && q.own().is_some_and(|r| inner.help(r).is_some());
    if !helped || !q.try_push(&e, true) {
        loop {
            let mut g = inner.space_lock.lock();
            inner.space_waiters.fetch_add(1, SeqCst);
            // A drain that frees space either sees the waiter (and notifies under
            // `space_lock`, which we hold until we wait) or freed it before our retry
            // below looks: this fence pairs with the drain's (`space_freed`).
            fence(SeqCst);
            // After the increment, so that the flusher either sees the waiter when it
            // decides how to sleep, or is unparked.
            inner.wake();
            // No helping here: we hold `space_lock`, which a drain takes to notify.
            let pushed = q.try_push(&e, false);
            let dead = !pushed && inner.dead.load(SeqCst);
            let timed_out = match deadline {
                _ if pushed || dead => false,
                Some(d) => inner.space_cv.wait_until(&mut g, d).timed_out(),
                None => {
                    inner.space_cv.wait(&mut g);
                    false
                }
            };
            inner.space_waiters.fetch_sub(1, SeqCst);
            drop(g);
            if pushed || (timed_out && q.try_push(&e, true)) {
                break;
            }
            if dead || timed_out {
                let err = if dead {
                    InsertError::Closed
                } else {
                    InsertError::Timeout
                };
                return Err(refuse(inner, e, err));
            }
        }
    }
    q.send_own_if_closed();
    Ok(())
}

/// The shard's lock stayed with another thread (the barrier of the revocation failed:
/// `err`, counted and kept for `flush`): the message goes out on the caller's thread,
/// after the caller's messages still `queued`, and is accepted (sent, or counted as
/// failed, as a drain would). With `help` false (a blocked insert under `space_lock`, where
/// no drain may run) and messages queued: not pushed, the insert waits for the flusher to
/// drain them (they are pending and it has a waiter) and tries again. A rejecting insert
/// never comes here: it may not block (`Shards::refuse_unproven`).
#[cold]
fn unproven(i: &Inner, e: &Entry<'_>, err: std::io::Error, queued: bool, help: bool) -> bool {
    i.barrier_failed(err);
    if queued {
        if !help {
            return false;
        }
        i.drain_everything();
    }
    if let Some(error) = send_one(i, e) {
        // Counted in before it is counted as failed (`Counters::snapshot`).
        Counters::add(&i.stats.inserted, 1);
        Counters::add(&i.stats.failed_datagrams, 1);
        Counters::add(&i.stats.failed_messages, 1);
        i.record_error(error);
    }
    true
}

/// Sends `e` on the caller's thread in a datagram of its own (the caller has made sure
/// none of its earlier messages is still queued), as a drain sends.
fn send_direct(inner: &Inner, e: Entry<'_>) -> Result<(), InsertError<CnMsg>> {
    match send_one(inner, &e) {
        None => Ok(()),
        Some(error) => Err(refuse(inner, e, |msg| InsertError::Send { msg, error })),
    }
}

/// [`send_direct`]'s send: counted in `direct` and `inserted` once sent; the error if not.
fn send_one(inner: &Inner, e: &Entry<'_>) -> Option<crate::Error> {
    let mut buf = vec![0u8; e.encoded_len()];
    // Fits: sized for it, and the data length was checked on entry.
    let _ = e.encode_into(inner.pid, &mut buf);
    let mut failed = None;
    {
        // Under the send lock, so that a numbered message gets the next number of its id
        // and goes on the wire in that order.
        let mut seqs = inner.sock.numbering().lock();
        if let (Entry::Slice { id, .. }, Some(h)) = (e, crate::codec::array_mut(&mut buf)) {
            ring::stamp(h, seqs.next_to(inner.dest, *id));
        }
        inner.send_datagrams(
            1,
            |_| [&buf, &[]],
            |_| 1,
            |_, _, err| match err {
                // Counted in before it is counted as sent (`Counters::snapshot`).
                None => {
                    Counters::add(&inner.stats.direct, 1);
                    Counters::add(&inner.stats.inserted, 1);
                }
                err => failed = failed.take().or(err),
            },
        );
    }
    failed
}
