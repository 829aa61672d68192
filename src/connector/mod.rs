//! The connector: many independent users of one `NETLINK_CONNECTOR` socket, each addressed
//! by a callback id `{idx, val}`, as the kernel's connector does it, in user space.
//!
//! A [`Connector`] owns a socket and a dispatcher thread. The thread reads datagrams, splits
//! them into messages and hands each to the callbacks registered for its id in the
//! [`Registry`]. Around that:
//!
//! - [`ConnectorHandle::register`] / [`ConnectorHandle::channel`]: push or pull delivery,
//!   both returning a [`Registration`] guard that unregisters on drop;
//! - [`ConnectorHandle::subscribe`]: reference-counted multicast group membership;
//! - [`ConnectorHandle::send`], [`ConnectorHandle::send_batch`] and
//!   [`ConnectorHandle::request`]: to the kernel, a port or a group; replies matched by the
//!   connector convention (same id and seq, `ack + 1`);
//! - loss accounting: `ENOBUFS` overruns and per-`(port, group, idx, val)` sequence gaps are
//!   counted in [`Stats`] and reported as [`Event`]s.
//!
//! ```no_run
//! use std::time::Duration;
//! use cnbus::connector::Connector;
//! use cnbus::{CbId, CnMsg};
//! use cnbus::sys::Dest;
//!
//! # fn main() -> cnbus::Result<()> {
//! let conn = Connector::builder().spawn()?;
//! let id = CbId::new(0x1000, 1);
//! let _group = conn.subscribe(20)?;
//! let _reg = conn.register(id, |m| println!("[{}] [{}.{}] {:?}", m.id(), m.seq(), m.ack(), m.data()));
//! conn.send_numbered(id, &b"hello"[..], Dest::Group(20))?;
//! std::thread::sleep(Duration::from_millis(100));
//! println!("{:?}", conn.stats());
//! # Ok(()) }
//! ```

#[cfg(feature = "tokio")]
mod async_connector;
mod builder;
mod delivery;
mod dispatch;
mod groups;
pub(crate) mod ingest;
pub(crate) mod outbox;
mod registry;
pub(crate) mod stats;
mod witness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use parking_lot::Mutex;

pub use crate::seq::{
    SeqSource, SeqTracker, SeqVerdict, DEFAULT_NUMBERED_IDS, DEFAULT_TRACKED_STREAMS,
};
#[cfg(feature = "tokio")]
pub use async_connector::AsyncConnector;
use builder::Config;
pub use builder::ConnectorBuilder;
pub use delivery::{Delivery, Incoming, Source};
pub use groups::Subscription;
pub use registry::{DispatchOutcome, Match, Registration, Registry, Snapshot};
pub use stats::Stats;

use crate::codec::{CbId, CnMsg};
use crate::error::{DecodeError, Error, Op, Result};
use crate::sys::{ConnectorSocket, Dest, EventFd};
pub(crate) use groups::Groups;
pub(crate) use outbox::Outbox;
use stats::Counters;
pub(crate) use witness::Witness;

/// Something the dispatcher noticed that is not a message: every loss and every fault is
/// reported here (and counted in [`Stats`]), never swallowed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The receive queue overflowed (`ENOBUFS`): the kernel dropped datagrams for this
    /// socket, and goes on dropping until the queue has been read empty. How many:
    /// [`Stats::kernel_drops`] (the kernel's count, read at this event and by every
    /// [`stats`](ConnectorHandle::stats) call), and per stream of a numbered peer the
    /// sequence gaps ([`Event::Lost`]).
    Overrun,
    /// `count` messages from `port` on `id` were lost (a sequence gap).
    Lost {
        /// Sender's port id.
        port: u32,
        /// The stream's id.
        id: CbId,
        /// Messages missing before the one just received.
        count: u32,
    },
    /// A malformed message; the rest of its datagram was dropped.
    Decode {
        /// Sender's port id.
        port: u32,
        /// What was wrong, and where.
        error: DecodeError,
    },
    /// A datagram longer than the receive buffer was dropped.
    Truncated {
        /// Its real length.
        len: usize,
        /// The receive buffer's size.
        capacity: usize,
    },
    /// A callback registered for `id` panicked; the panic was caught.
    CallbackPanic {
        /// The id of the message being delivered.
        id: CbId,
        /// The panic message.
        message: String,
    },
    /// A netlink `NLMSG_ERROR` arrived.
    NetlinkError {
        /// Sender's port id.
        port: u32,
        /// The error code (negative errno).
        error: i32,
    },
    /// The receive call failed in an unexpected way; the dispatcher backs off and retries.
    RecvFailed {
        /// The errno, if any.
        errno: Option<i32>,
    },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Overrun => f.write_str("receive queue overflowed (ENOBUFS): messages dropped"),
            Event::Lost { port, id, count } => {
                write!(
                    f,
                    "{count} messages of {id} from port {port} lost (sequence gap)"
                )
            }
            Event::Decode { port, error } => write!(f, "from port {port}: {error}"),
            Event::Truncated { len, capacity } => {
                write!(
                    f,
                    "datagram of {len} bytes dropped: over the {capacity}-byte limit"
                )
            }
            Event::CallbackPanic { id, message } => {
                write!(f, "callback for {id} panicked: {message}")
            }
            Event::NetlinkError { port, error } => {
                write!(f, "NLMSG_ERROR {error} from port {port}")
            }
            Event::RecvFailed { errno } => write!(f, "recv failed (errno {errno:?})"),
        }
    }
}

impl std::error::Error for Event {}

type EventFn = dyn Fn(&Event) + Send + Sync;

type ReplyKey = (CbId, u32, u32);

/// An outstanding request: its reply's id, seq and ack, and the one port the reply may
/// come from (`None`: anyone, for a request multicast to a group).
type PendKey = (ReplyKey, Option<u32>);

/// Whether replies to two requests with one reply key, expected from `a` and from `b`
/// ([`reply_port`]), could be taken for each other: unless they come from two known,
/// different ports (a port's sequence numbers its requests apart from another port's, so
/// numbered requests to two servers often share a key), the two cannot both be
/// outstanding.
pub(crate) fn replies_clash(a: Option<u32>, b: Option<u32>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// The port a reply to a request sent to `dest` must come from: the kernel's (0) or the
/// addressed port's; any member's for a group.
pub(crate) fn reply_port(dest: Dest) -> Option<u32> {
    match dest {
        Dest::Kernel => Some(0),
        Dest::Port(p) => Some(p),
        Dest::Group(_) => None,
    }
}

pub(crate) struct Inner {
    socket: Arc<ConnectorSocket>,
    registry: Registry,
    groups: Arc<Groups>,
    counters: Arc<Counters>,
    /// Signalled to make the dispatcher look at `shutdown`.
    wake: EventFd,
    /// Set once by `Connector::shutdown` (Release) before `wake`; the dispatcher reads it
    /// (Acquire) after every wake-up.
    shutdown: AtomicBool,
    /// Requests awaiting a reply, by (id, seq, expected ack) and the port it must come
    /// from; no two whose replies [clash](replies_clash).
    pending: Mutex<HashMap<PendKey, Sender<Incoming>>>,
    /// `pending.len()`, readable without the lock so the dispatcher skips the map when no
    /// request is outstanding. Updated under the `pending` lock. A stale 0 would skip the
    /// map, but cannot be read for a reply: the count is stored before the request is
    /// sent, and the kernel's queue locks order that send before the reply's receipt
    /// (see docs/ARCHITECTURE.md, memory orderings). Every store is Release (all are made
    /// under the `pending` lock, so each comes after every earlier withdrawal): a
    /// dispatcher that reads the count (Acquire) and skips the lock still sees the
    /// withdrawn requests recorded in `late` before it, whichever store it reads.
    pending_count: AtomicUsize,
    /// Requests withdrawn without their reply, whose late replies the gap tracker skips,
    /// and group requests answered (other members may reply after the first); added to
    /// under the `pending` lock ([`withdraw`](Self::withdraw)).
    late: Mutex<ingest::Withdrawn>,
    /// `late.len()`, readable without the lock.
    late_count: AtomicUsize,
    /// `late.generation()`, readable without the lock.
    late_generation: AtomicU64,
    outbox: Outbox,
    on_event: Option<Arc<EventFn>>,
    config: Config,
    /// Users of the proc connector on this socket (`proc::register`): the first sends
    /// `LISTEN`, the last `IGNORE` (the kernel keeps one filter per socket, and `IGNORE`
    /// stops every proc event for the socket).
    proc_listeners: Mutex<u32>,
    /// What proc registrations run at each overrun ([`ConnectorHandle::on_overrun`]): a
    /// registry of its own, so that the notice (an empty message of id
    /// [`CbId::PROC`] from no one) reaches no registration of the connector's.
    overrun_watchers: Registry,
    /// The socket may carry datagrams other than proc events: it was handed in, or a group
    /// other than 1 was subscribed. Its kernel drop counter then is not a count of proc events.
    other_traffic: AtomicBool,
    /// The dispatcher thread, set by itself before it runs any callback: a request made on
    /// it would wait for a reply only it could read.
    dispatcher: std::sync::OnceLock<std::thread::ThreadId>,
    /// The process that started the dispatcher: in a child forked from it, the thread does
    /// not exist (see [`Connector`]).
    born: crate::sys::ForkStamp,
}

impl Inner {
    /// True in a process forked from the one that started the dispatcher.
    fn forked(&self) -> bool {
        self.born.forked_cold()
    }
}

impl Inner {
    /// Remembers the request whose reply has `key` and comes from `from` (`None`: any
    /// port) in `late`, with its count and generation. Called under the `pending` lock,
    /// before the count of requests is stored.
    fn withdraw(&self, key: (CbId, u32, u32), from: Option<u32>) {
        let mut w = self.late.lock();
        w.add(key, from);
        self.late_count.store(w.len(), Ordering::Relaxed);
        self.late_generation
            .store(w.generation(), Ordering::Relaxed);
    }

    fn event(&self, e: Event) {
        if e == Event::Overrun {
            let notice = Incoming {
                msg: CnMsg::new(CbId::PROC, Bytes::new()),
                source: Source { port: 0, group: 0 },
            };
            self.overrun_watchers.dispatch(&notice.as_delivery());
        }
        if let Some(f) = &self.on_event {
            call_event_handler(&**f, &e, &self.counters);
        }
    }
}

/// Makes `registry` count each callback panic in [`Stats::callback_panics`] and report it
/// to the event handler as [`Event::CallbackPanic`].
fn report_panics(registry: &Registry, counters: &Arc<Counters>, on_event: &Option<Arc<EventFn>>) {
    let (counters, on_event) = (counters.clone(), on_event.clone());
    registry.on_panic(move |id, message| {
        Counters::add(&counters.callback_panics, 1);
        if let Some(f) = &on_event {
            let e = Event::CallbackPanic {
                id,
                message: message.to_string(),
            };
            call_event_handler(&**f, &e, &counters);
        }
    });
}

/// Runs the user's event handler on the dispatcher thread; a panic in it is caught and
/// counted in [`Stats::callback_panics`] (and not reported as an event, which would run
/// the handler again), so the dispatcher goes on.
fn call_event_handler(f: &EventFn, e: &Event, counters: &Counters) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(e))) {
        registry::caught(p);
        Counters::add(&counters.callback_panics, 1);
    }
}

/// Why a request's reply did not come in time: [`Error::Overrun`] when the socket's kernel
/// drop counter moved since `before` (read just before the request was sent), since the
/// reply may have been one of the datagrams the kernel dropped for a full queue; else
/// [`Error::TimedOut`]. `from` is the port the reply comes from ([`reply_port`]): a reply
/// unicast by a user-space peer (a port other than 0) is never one of those drops (the
/// peer's send waits for room, or fails on its side without counting here), so for it
/// the counter says nothing and the error is `TimedOut`.
pub(crate) fn no_reply(socket: &ConnectorSocket, before: Option<u32>, from: Option<u32>) -> Error {
    let droppable = from.is_none_or(|port| port == 0);
    match (before, socket.drops().ok().flatten()) {
        (Some(b), Some(now)) if droppable && now != b => Error::Overrun { op: Op::Request },
        _ => Error::TimedOut { op: Op::Request },
    }
}

/// A connector: a socket, a registry and the dispatcher thread that feeds it.
///
/// All operations are on [`ConnectorHandle`], which `Connector` dereferences to; a handle can
/// be cloned into callbacks and other threads. Dropping the `Connector` (or calling
/// [`shutdown`](Connector::shutdown)) stops and joins the dispatcher; handles stay usable
/// for sending.
///
/// After `fork(2)`, the child has the socket (the same port, shared with the parent) but not
/// the dispatcher thread: in the child, a `Connector` can send, its callbacks never run,
/// [`request`](ConnectorHandle::request) fails with [`Error::Closed`] (the parent's
/// dispatcher reads the replies), and dropping it leaves the parent's dispatcher alone.
/// Open a new connector in the child to receive there.
pub struct Connector {
    handle: ConnectorHandle,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("port", &self.handle.port_id())
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Connector {
    /// A builder with the defaults.
    pub fn builder() -> ConnectorBuilder {
        ConnectorBuilder::new()
    }

    /// A clonable handle for callbacks and other threads.
    pub fn handle(&self) -> ConnectorHandle {
        self.handle.clone()
    }

    /// Stops the dispatcher: wakes it through its eventfd (the socket is not touched) and
    /// joins it. Returns promptly; a callback running at that moment is waited for, and no
    /// callback starts after it (the messages still queued are not delivered). Called (or
    /// the `Connector` dropped) inside a callback, it cannot wait for the dispatcher, whose
    /// thread it runs on: the callback in progress finishes and no other starts.
    /// Outstanding requests fail with [`Error::Closed`].
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(t) = self.thread.take() else { return };
        let inner = &self.handle.inner;
        if inner.forked() {
            // The thread is the parent's: nothing to stop or join here (joining it panics),
            // and the shared eventfd and flag are not this process's to touch.
            std::mem::forget(t);
            return;
        }
        // Release: pairs with the dispatcher's Acquire load after its wake-up.
        inner.shutdown.store(true, Ordering::Release);
        if inner.wake.wake().is_ok() && t.thread().id() != std::thread::current().id() {
            let _ = t.join();
        }
        let mut p = inner.pending.lock();
        p.clear();
        inner.pending_count.store(0, Ordering::Release);
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for Connector {
    type Target = ConnectorHandle;
    fn deref(&self) -> &ConnectorHandle {
        &self.handle
    }
}

/// The operations of a [`Connector`]; cheap to clone.
#[derive(Clone)]
pub struct ConnectorHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnectorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorHandle")
            .field("port", &self.port_id())
            .finish()
    }
}

impl ConnectorHandle {
    /// The socket's port id (where unicasts to this connector go).
    pub fn port_id(&self) -> u32 {
        self.inner.socket.port_id()
    }

    /// The underlying socket.
    pub fn socket(&self) -> &Arc<ConnectorSocket> {
        &self.inner.socket
    }

    /// The registry the dispatcher feeds.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Calls `callback` on the dispatcher thread for every message `key` matches, until the
    /// returned guard is dropped. The callback gets a [`Delivery`], a view of the message in
    /// the datagram it arrived in; [`Delivery::to_incoming`] makes the owned message for a
    /// callback that keeps it. See [`Registry::register`].
    pub fn register<F>(&self, key: impl Into<Match>, callback: F) -> Registration
    where
        F: FnMut(&Delivery<'_>) + Send + 'static,
    {
        self.inner.registry.register(key, callback)
    }

    /// Pull-style delivery: messages `key` matches go into a bounded channel of `capacity`
    /// (at least 1) that the caller reads on its own thread. A message that finds the
    /// channel full is not delivered and is counted in [`Stats::channel_full`]. Memory for
    /// up to [`EAGER_CHANNEL`](Self::EAGER_CHANNEL) messages is taken at once; a larger
    /// channel grows as it fills (any `capacity` is fine, `usize::MAX` means unbounded).
    pub fn channel(
        &self,
        key: impl Into<Match>,
        capacity: usize,
    ) -> (Registration, Receiver<Incoming>) {
        let capacity = capacity.max(1);
        let counters = self.inner.counters.clone();
        if capacity <= Self::EAGER_CHANNEL {
            let (tx, rx) = channel::bounded(capacity);
            let reg = self.register(key, move |m| {
                if let Err(TrySendError::Full(_)) = tx.try_send(m.to_incoming()) {
                    Counters::add(&counters.channel_full, 1);
                }
            });
            return (reg, rx);
        }
        // A list channel, bounded here: this callback is its only sender, so what it sees
        // queued can only shrink before its send.
        let (tx, rx) = channel::unbounded();
        let reg = self.register(key, move |m| {
            if tx.len() >= capacity {
                Counters::add(&counters.channel_full, 1);
            } else {
                let _ = tx.send(m.to_incoming());
            }
        });
        (reg, rx)
    }

    /// The largest [`channel`](Self::channel) capacity allocated in full at once.
    pub const EAGER_CHANNEL: usize = 1 << 16;

    /// Joins multicast `group` (1..=32) for as long as the returned guard lives. Several
    /// subscriptions to one group share the socket's single membership.
    pub fn subscribe(&self, group: u32) -> Result<Subscription> {
        if group != 1 {
            self.inner.other_traffic.store(true, Ordering::Relaxed);
        }
        self.inner.groups.subscribe(group)
    }

    /// Counts one more user of the proc connector on this socket; the first one runs
    /// `listen` (which sends `LISTEN`), under the lock that also serialises the last user's
    /// `IGNORE`, so the two cannot cross. `Ok(true)` when this was the first. On error the
    /// count is unchanged.
    pub(crate) fn proc_listen(&self, listen: impl FnOnce() -> Result<()>) -> Result<bool> {
        let mut n = self.inner.proc_listeners.lock();
        let first = *n == 0;
        if first {
            listen()?;
        }
        *n += 1;
        Ok(first)
    }

    /// Counts one user of the proc connector less; the last one runs `ignore` (which sends
    /// `IGNORE`).
    pub(crate) fn proc_unlisten(&self, ignore: impl FnOnce()) {
        let mut n = self.inner.proc_listeners.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            ignore();
        }
    }

    /// Calls `f` on the dispatcher thread at each overrun of the socket (each
    /// [`Event::Overrun`], just before the event handler gets it, at that point of the
    /// stream), until the returned guard is dropped, with the unregistering rules of
    /// [`Registration`]. For proc registrations, whose callback reports the overrun.
    pub(crate) fn on_overrun(&self, mut f: impl FnMut() + Send + 'static) -> Registration {
        self.inner
            .overrun_watchers
            .register(CbId::PROC, move |_: &Delivery<'_>| f())
    }

    /// True while the socket has carried nothing but the proc group (it was opened by the
    /// connector and no other group was ever subscribed): its kernel drop counter then
    /// counts proc events only.
    pub(crate) fn proc_only(&self) -> bool {
        !self.inner.other_traffic.load(Ordering::Relaxed)
    }

    /// A baseline slot for a proc registration's loss figures, filled when the dispatcher
    /// next finds the queue empty (see `stats::Settled`); `None` without a witness.
    pub(crate) fn proc_baseline(&self) -> Option<Arc<Mutex<Option<stats::Settled>>>> {
        self.inner.counters.proc_baseline()
    }

    /// The last settled snapshot of the proc witness.
    pub(crate) fn proc_settled(&self) -> Option<stats::Settled> {
        self.inner.counters.proc_settled()
    }

    /// How many live subscriptions `group` has.
    pub fn subscribers(&self, group: u32) -> u32 {
        self.inner.groups.count(group)
    }

    /// Takes the next number of `id`'s sequence that belongs to no destination (numbers run
    /// from 1; the socket's, so shared with everything sending through it): for requests
    /// (see [`request`](Self::request)) and for messages you build yourself. It is apart
    /// from the per-destination sequences of [`send_numbered`](Self::send_numbered) and of
    /// the bus, so do not mix the two for one id and destination; and sending its numbers
    /// in order is up to the caller. For numbered traffic, `send_numbered` numbers and
    /// sends in one step.
    pub fn next_seq(&self, id: CbId) -> u32 {
        self.inner.outbox.next_seq(id)
    }

    /// Sends one message, in a datagram of its own, as it is (seq and ack untouched).
    ///
    /// Multicasting on a kernel-owned id (idx 1..=10) or a group below 12 is refused with
    /// [`Error::KernelOwned`] unless the builder allowed it, because netlink also hands
    /// every multicast to the kernel's handler for that idx.
    ///
    /// A unicast to a peer whose queue is full waits for room, as netlink does; on the
    /// dispatcher thread (from a callback), at most `ConnectorBuilder::send_timeout`
    /// (then [`Error::TimedOut`]), so that a peer that never reads cannot stall every
    /// delivery. The same holds for [`send_numbered`](Self::send_numbered) and
    /// [`send_batch`](Self::send_batch).
    pub fn send(&self, msg: &CnMsg, dest: Dest) -> Result<()> {
        match self.dispatcher_send_timeout() {
            Some(t) => self.inner.outbox.send_within(msg, dest, t),
            None => self.inner.outbox.send(msg, dest),
        }
    }

    /// On the dispatcher thread, how long a send may wait for room at a full peer.
    fn dispatcher_send_timeout(&self) -> Option<Duration> {
        (self.inner.dispatcher.get() == Some(&std::thread::current().id()))
            .then_some(self.inner.config.send_timeout)
    }

    /// Sends `data` on `id` with the next number of `id`'s sequence to `dest`, so receivers
    /// can count gaps. Returns the seq used.
    ///
    /// The sequence is the socket's, one per destination and id, shared with every
    /// [`Bus`](crate::bus::Bus) sending to `dest` through this socket: a receiver keeps one
    /// baseline per sender port, group and id, which is what one such sequence reaches.
    /// The number is taken and the datagram handed to the kernel under the socket's
    /// numbering lock, so numbers reach the wire in order, whichever thread, bus or
    /// connector sends on the socket. A unicast to a peer whose queue is full waits for
    /// room outside that lock (polling every millisecond at most), using no number
    /// meanwhile. A message the policy refuses uses no number; a failed send uses one (see
    /// `docs/RELIABILITY.md`).
    pub fn send_numbered(&self, id: CbId, data: impl Into<Bytes>, dest: Dest) -> Result<u32> {
        let outbox = &self.inner.outbox;
        let mut d = outbox.frame_numbered(id, data.into(), dest)?;
        let mut wait =
            crate::sys::RoomWait::new(self.dispatcher_send_timeout().unwrap_or(Duration::MAX));
        loop {
            if let Some(seq) = outbox.try_send_numbered(&mut d, id, dest)? {
                return Ok(seq);
            }
            if !wait.sleep() {
                return Err(outbox.timed_out(Op::Send));
            }
        }
    }

    /// Sends several messages to one destination, packing as many as fit into each
    /// datagram (up to the builder's `max_datagram`) and sending the datagrams with
    /// `sendmmsg`. For the kernel, which reads only the first message of a datagram, each
    /// message goes in a datagram of its own. Returns the number of messages sent; on an
    /// error after some were sent, that count (the rest were not sent).
    pub fn send_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<usize> {
        match self.dispatcher_send_timeout() {
            Some(t) => self.inner.outbox.send_batch_within(msgs, dest, t),
            None => self.inner.outbox.send_batch(msgs, dest),
        }
    }

    /// Sends `msg` and waits up to `timeout` for its reply: a message with the same id and
    /// seq and `ack == msg.ack + 1`, from the destination: the kernel (port 0) for
    /// [`Dest::Kernel`], port `p` for [`Dest::Port(p)`](Dest::Port), any member for a
    /// [`Dest::Group`]. The reply goes to the caller, not to registered callbacks; a
    /// message that looks like the reply but comes from another port is not taken for it
    /// (it goes to the callbacks as any message does), so no other process can answer in
    /// the destination's name. Choose a seq that is unique among outstanding requests (for
    /// example [`next_seq`](Self::next_seq)); two with one id, seq and ack may be
    /// outstanding only when their replies come from two different ports (requests to two
    /// ports, not to a group): else the second is refused ([`Error::InvalidArgument`]). Or let
    /// [`request_numbered`](Self::request_numbered) number it as the receiver's gap
    /// tracker expects.
    ///
    /// No reply in time is [`Error::TimedOut`], or, for a request to the kernel or a group,
    /// [`Error::Overrun`] (`Op::Request`) when the kernel dropped datagrams for this
    /// socket's full receive queue meanwhile (its drop counter, [`Stats::kernel_drops`],
    /// moved between the send and the deadline): the reply may have been one of them, so
    /// waiting longer or a slow peer is not the likely cause. A request to a user-space
    /// port is always `TimedOut`: the reply a peer unicasts is never dropped for a full
    /// queue (the peer's send waits for room, and a peer that gives up, as a callback's
    /// send does after `send_timeout`, counts a send error there, not a drop here).
    ///
    /// The dispatcher thread reads the reply: a callback that blocks holds it up, and a
    /// reply queued behind it past the deadline is a timeout like any other.
    ///
    /// Made on the dispatcher thread (from a callback or the event handler), it fails at
    /// once with [`Error::WouldDeadlock`]: that thread is the one that would read the reply.
    ///
    /// The kernel's proc connector does not follow this convention (its ACK does not echo
    /// the seq); use [`crate::proc`] for it.
    pub fn request(&self, msg: &CnMsg, dest: Dest, timeout: Duration) -> Result<Incoming> {
        self.may_request()?;
        let key = ((msg.id, msg.seq, msg.ack.wrapping_add(1)), reply_port(dest));
        let rx = self.pend(key)?;
        // Just before the datagram goes out (after any wait for room at a full peer): a
        // drop of the reply comes after it.
        let mut drops = None;
        let sent = self
            .inner
            .outbox
            .send_within_then(msg, dest, Duration::MAX, || {
                drops = self.inner.socket.drops().ok().flatten();
            });
        if let Err(e) = sent {
            self.unpend(key);
            return Err(e);
        }
        self.await_reply(key, &rx, drops, timeout)
    }

    /// Sends `data` on `id` as a request numbered as
    /// [`send_numbered`](Self::send_numbered) numbers (the next number of the socket's
    /// sequence of `dest` and `id`, taken and sent under the numbering lock; ack 0) and
    /// waits up to `timeout` for its reply (same id and seq, ack 1), as
    /// [`request`](Self::request) does. The receiver's gap tracker sees one sequence from
    /// this socket, requests and numbered messages alike, however many destinations the
    /// id is used with: requests numbered with [`next_seq`](Self::next_seq), whose
    /// sequence belongs to no destination, look like losses to a server that gets only
    /// some of them. The reply's `seq` is the number used.
    pub fn request_numbered(
        &self,
        id: CbId,
        data: impl Into<Bytes>,
        dest: Dest,
        timeout: Duration,
    ) -> Result<Incoming> {
        self.may_request()?;
        let outbox = &self.inner.outbox;
        let mut d = outbox.frame_numbered(id, data.into(), dest)?;
        let mut drops = None;
        let mut wait = crate::sys::RoomWait::new(Duration::MAX);
        loop {
            let mut pended = None;
            let r = outbox.try_send_numbered_then(&mut d, id, dest, |seq| {
                let key = ((id, seq, 1), reply_port(dest));
                pended = Some((key, self.pend(key)?));
                // Just before the datagram goes out, not before a wait for room.
                drops = self.inner.socket.drops().ok().flatten();
                Ok(())
            });
            match (r, pended) {
                (Ok(Some(_)), Some((key, rx))) => {
                    return self.await_reply(key, &rx, drops, timeout)
                }
                (Ok(None), pended) => {
                    if let Some((key, _)) = pended {
                        self.unpend(key);
                    }
                    if !wait.sleep() {
                        return Err(outbox.timed_out(Op::Send));
                    }
                }
                (r, pended) => {
                    if let Some((key, _)) = pended {
                        self.unpend(key);
                    }
                    r?;
                    return Err(Error::Closed); // not reached: sent means pended
                }
            }
        }
    }

    /// Refuses a request on the dispatcher thread, or in a forked child.
    fn may_request(&self) -> Result<()> {
        if self.dispatcher_send_timeout().is_some() {
            return Err(Error::WouldDeadlock { op: Op::Request });
        }
        if self.inner.forked() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Makes the request `key` (id, seq and the reply's ack; the port the reply comes
    /// from) outstanding: the dispatcher hands its reply to the returned channel. Refused
    /// when the reply of one outstanding could be taken for it ([`replies_clash`]).
    fn pend(&self, key: PendKey) -> Result<Receiver<Incoming>> {
        let (tx, rx) = channel::bounded(1);
        let mut p = self.inner.pending.lock();
        if self.inner.shutdown.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if p.keys()
            .any(|(k, from)| *k == key.0 && replies_clash(*from, key.1))
        {
            return Err(Error::InvalidArgument(
                "a request with this id, seq and ack is already outstanding",
            ));
        }
        p.insert(key, tx);
        self.inner.pending_count.store(p.len(), Ordering::Release);
        Ok(rx)
    }

    fn unpend(&self, key: PendKey) {
        let mut p = self.inner.pending.lock();
        p.remove(&key);
        self.inner.pending_count.store(p.len(), Ordering::Release);
    }

    /// Waits for the reply of the request `key` (sent), then withdraws it. `drops`: the
    /// socket's drop counter before the send.
    fn await_reply(
        &self,
        key: PendKey,
        rx: &Receiver<Incoming>,
        drops: Option<u32>,
        timeout: Duration,
    ) -> Result<Incoming> {
        let r = rx.recv_timeout(timeout);
        let late = {
            let mut p = self.inner.pending.lock();
            p.remove(&key);
            // The dispatcher hands a reply over under this lock: one that came just after
            // the deadline is in the channel now, not lost. If none is, a reply that comes
            // later is remembered as late (under the lock, so before it can be read),
            // before the count of requests is stored: a dispatcher that reads this count,
            // or any later one (every store is Release, under this lock), without the lock
            // (Acquire) sees the late request too.
            let late = rx.try_recv();
            if matches!(r, Err(channel::RecvTimeoutError::Timeout)) && late.is_err() {
                self.inner.withdraw(key.0, key.1);
            }
            self.inner.pending_count.store(p.len(), Ordering::Release);
            late
        };
        match r {
            Ok(m) => Ok(m),
            Err(channel::RecvTimeoutError::Timeout) => match late {
                Ok(m) => Ok(m),
                Err(_) => Err(no_reply(&self.inner.socket, drops, key.1)),
            },
            Err(channel::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// A snapshot of the counters. Reads the socket's kernel drop counter
    /// ([`Stats::kernel_drops`]).
    pub fn stats(&self) -> Stats {
        self.inner.outbox.stats()
    }
}

pub use crate::codec::FIRST_USER_GROUP;
