//! The async connector on tokio (cargo feature `tokio`), re-exported as
//! [`cnbus::tokio::AsyncConnector`](crate::tokio::AsyncConnector).
//! It reads its socket through `AsyncFd` (no thread of its own); the example is on
//! [`crate::tokio`].

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::ingest::Ingest;
use super::stats::Counters;
use super::{Event, Groups, Incoming, Outbox, Stats, Subscription};
use crate::codec::{CbId, CnMsg};
use crate::error::{Error, Op, Result};
use crate::sys::{ConnectorSocket, Dest, RoomWait};

/// Messages and events parsed but not yet taken, at most (or room for two datagrams' worth,
/// if more); past it the oldest is dropped and counted in [`Stats::channel_full`]. The
/// stream reads no datagram that might not fit: only [`AsyncConnector::request`], which
/// must read on to find its reply, parks messages here while nobody reads the stream.
const QUEUE_CAP: usize = 65536;

/// Datagrams read per readiness before yielding to the runtime.
const BATCH: usize = 64;

/// An async connector: a socket whose messages and events are a `Stream`.
///
/// Build it with [`ConnectorBuilder::build_async`](crate::connector::ConnectorBuilder::build_async).
///
/// Its socket is registered with the runtime it was built in: once that runtime has shut
/// down, the stream yields one [`Event::RecvFailed`] and ends and requests fail with
/// [`Error::Closed`] (sends still work). A request dropped before its reply came (a
/// `timeout` around it, a cancelled task) leaves nothing behind: a reply that comes later
/// goes to the stream as any message.
pub struct AsyncConnector {
    fd: AsyncFd<Arc<ConnectorSocket>>,
    pub(crate) outbox: Outbox,
    groups: Arc<Groups>,
    max_datagram: usize,
    /// How long a send waits for room at a full unicast peer
    /// ([`ConnectorBuilder::send_timeout`](crate::connector::ConnectorBuilder::send_timeout)).
    send_timeout: Duration,
    reader: Mutex<Reader>,
    /// Names the requests' [`Pending`] entries.
    tokens: AtomicU64,
}

impl std::fmt::Debug for AsyncConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncConnector")
            .field("port", &self.port_id())
            .field("queued", &self.reader.lock().queue.len())
            .finish()
    }
}

impl AsyncConnector {
    pub(crate) fn new(
        outbox: Outbox,
        groups: Arc<Groups>,
        ingest: Ingest,
        max_datagram: usize,
        send_timeout: Duration,
    ) -> Result<Self> {
        let fd = crate::sys::asyncfd::register(outbox.socket.clone())
            .map_err(|e| Error::from_io(Op::Poll, e))?;
        Ok(Self {
            fd,
            outbox,
            groups,
            max_datagram,
            send_timeout,
            reader: Mutex::new(Reader {
                per_datagram: items_per_datagram(max_datagram),
                cap: QUEUE_CAP.max(2 * items_per_datagram(max_datagram)),
                ingest,
                buf: BytesMut::with_capacity(max_datagram * 4),
                queue: VecDeque::new(),
                done: false,
                pending: Vec::new(),
                withdrawn: Default::default(),
                stream: None,
            }),
            tokens: AtomicU64::new(0),
        })
    }

    /// The socket's port id.
    pub fn port_id(&self) -> u32 {
        self.outbox.socket.port_id()
    }

    /// Joins multicast `group` while the guard lives (reference counted, as on
    /// [`ConnectorHandle::subscribe`](crate::connector::ConnectorHandle::subscribe)).
    pub fn subscribe(&self, group: u32) -> Result<Subscription> {
        self.groups.subscribe(group)
    }

    /// The next sequence number for `id` (see
    /// [`ConnectorHandle::next_seq`](crate::connector::ConnectorHandle::next_seq)).
    pub fn next_seq(&self, id: CbId) -> u32 {
        self.outbox.next_seq(id)
    }

    /// A snapshot of the counters. Reads the socket's kernel drop counter
    /// ([`Stats::kernel_drops`]).
    pub fn stats(&self) -> Stats {
        self.outbox.stats()
    }

    /// Sends one message in a datagram of its own. A unicast to a peer whose queue is full
    /// waits (asynchronously, never blocking the runtime's thread) for room, at most
    /// [`send_timeout`](crate::connector::ConnectorBuilder::send_timeout): then
    /// [`Error::TimedOut`] (`Op::Send`), counted as a send error.
    pub async fn send(&self, msg: &CnMsg, dest: Dest) -> Result<()> {
        self.send_then(msg, dest, || {}).await
    }

    /// As [`send`](Self::send), calling `before` just before each attempt to hand the
    /// datagram to the kernel.
    async fn send_then(&self, msg: &CnMsg, dest: Dest, mut before: impl FnMut()) -> Result<()> {
        let d = self.outbox.frame(msg, dest)?;
        let mut wait = RoomWait::new(self.send_timeout);
        loop {
            before();
            let r = self.outbox.socket.try_send(&d, dest);
            if !matches!(r, Ok(None)) {
                self.outbox.account(&r, 1);
                return r.map(drop);
            }
            if !room(&mut wait).await {
                return Err(self.timed_out(Op::Send));
            }
        }
    }

    /// Sends `data` on `id` with the next sequence number of `id`, as
    /// [`ConnectorHandle::send_numbered`](crate::connector::ConnectorHandle::send_numbered)
    /// does (the socket's sequence of `dest` and `id`, numbered and sent under the socket's
    /// numbering lock, so in wire order among everything sending on the socket). A unicast
    /// to a peer whose queue is full waits asynchronously, using no number meanwhile, at
    /// most [`send_timeout`](crate::connector::ConnectorBuilder::send_timeout): then
    /// [`Error::TimedOut`] (`Op::Send`), counted as a send error, and no number used.
    /// Returns the seq.
    pub async fn send_numbered(&self, id: CbId, data: impl Into<Bytes>, dest: Dest) -> Result<u32> {
        let mut d = self.outbox.frame_numbered(id, data.into(), dest)?;
        let mut wait = RoomWait::new(self.send_timeout);
        loop {
            if let Some(seq) = self.outbox.try_send_numbered(&mut d, id, dest)? {
                return Ok(seq);
            }
            if !room(&mut wait).await {
                return Err(self.timed_out(Op::Send));
            }
        }
    }

    /// Sends several messages packed into datagrams with one `sendmmsg`, as
    /// [`ConnectorHandle::send_batch`](crate::connector::ConnectorHandle::send_batch) does.
    /// Multicasts and sends to the kernel never wait; a unicast to a user-space peer with a
    /// full queue waits (asynchronously, never blocking the runtime's thread) for room, at
    /// most [`send_timeout`](crate::connector::ConnectorBuilder::send_timeout) each time
    /// (a peer that reads slowly but keeps reading gets the whole batch).
    /// Returns the messages sent: fewer than `msgs` when a send failed or the wait timed
    /// out after some went out (counted as one send error); [`Error::TimedOut`]
    /// (`Op::SendBatch`) when none went out in time. Datagrams are counted in
    /// [`stats`](Self::stats) as they go out, so a `send_batch` dropped while it waits
    /// (a `tokio::time::timeout` around it) leaves the counters right.
    pub async fn send_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<usize> {
        let datagrams = self.outbox.frame_batch(msgs, dest)?;
        let mut wait = RoomWait::new(self.send_timeout);
        let (mut sent, mut msgs_sent) = (0, 0);
        while sent < datagrams.len() {
            let slices: Vec<IoSlice<'_>> = datagrams[sent..]
                .iter()
                .map(|(d, _)| IoSlice::new(d))
                .collect();
            match self.outbox.socket.try_send_batch(&slices, dest) {
                Ok(0) => {
                    drop(slices);
                    if !room(&mut wait).await {
                        if sent == 0 {
                            return Err(self.timed_out(Op::SendBatch));
                        }
                        break;
                    }
                }
                Ok(n) => {
                    let n = n.min(datagrams.len() - sent);
                    msgs_sent += self.outbox.account_batch(&datagrams[sent..sent + n], n);
                    sent += n;
                    wait = RoomWait::new(self.send_timeout);
                }
                // As the synchronous send_batch: an error after some datagrams went out
                // ends the batch with what was sent (the error recurs on a retry).
                Err(_) if sent > 0 => break,
                Err(e) => {
                    self.outbox.account_batch(&datagrams, 0); // counts the error
                    return Err(e);
                }
            }
        }
        if sent < datagrams.len() {
            Counters::add(&self.outbox.counters.send_errors, 1);
        }
        Ok(msgs_sent)
    }

    /// A send that found no room in time: counted as a send error.
    fn timed_out(&self, op: Op) -> Error {
        self.outbox.timed_out(op)
    }

    /// Sends `msg` and waits up to `timeout` for the message with the same id and seq and
    /// `ack + 1` (see [`CnMsg::reply_to`]) from the destination (the kernel, the port, or
    /// any member of the group), as
    /// [`ConnectorHandle::request`](crate::connector::ConnectorHandle::request) does: a
    /// look-alike from another port is no reply and goes to the stream. Takes `&self`:
    /// requests run beside the task that reads the stream (share the connector with
    /// `Arc`), and any number at once. The reply
    /// goes to the request, not to the stream; every other message that arrives meanwhile
    /// stays queued for the stream, in order. A reply that arrives after the timeout goes to
    /// the stream. No reply in time is [`Error::TimedOut`], or, for a request to the
    /// kernel or a group, [`Error::Overrun`] (`Op::Request`) when the kernel dropped
    /// datagrams for the socket's full queue meanwhile (the reply may have been one of
    /// them), as for the synchronous request.
    pub async fn request(&self, msg: &CnMsg, dest: Dest, timeout: Duration) -> Result<Incoming> {
        let token = self.tokens.fetch_add(1, Relaxed);
        self.pend(token, (msg.id, msg.seq, msg.ack.wrapping_add(1)), dest)?;
        let _entry = PendingEntry { conn: self, token };
        // Just before the datagram goes out (after any wait for room at a full peer): a
        // drop of the reply comes after it.
        let mut drops = None;
        let sent = self
            .send_then(msg, dest, || {
                drops = self.outbox.socket.drops().ok().flatten();
            })
            .await;
        if sent.is_err() {
            // Never sent: no reply to expect, late or not.
            self.unpend(token);
        }
        sent?;
        self.await_reply(token, drops, super::reply_port(dest), timeout)
            .await
    }

    /// Sends `data` on `id` as a request numbered as
    /// [`send_numbered`](Self::send_numbered) numbers (the socket's sequence of `dest` and
    /// `id`; ack 0) and waits up to `timeout` for its reply (same id and seq, ack 1), as
    /// [`request`](Self::request) does; see
    /// [`ConnectorHandle::request_numbered`](crate::connector::ConnectorHandle::request_numbered)
    /// for why. A unicast to a full peer waits for room as `send_numbered` does. The
    /// reply's `seq` is the number used.
    pub async fn request_numbered(
        &self,
        id: CbId,
        data: impl Into<Bytes>,
        dest: Dest,
        timeout: Duration,
    ) -> Result<Incoming> {
        let token = self.tokens.fetch_add(1, Relaxed);
        let _entry = PendingEntry { conn: self, token };
        let mut d = self.outbox.frame_numbered(id, data.into(), dest)?;
        let mut drops = None;
        let mut wait = RoomWait::new(self.send_timeout);
        loop {
            let r = self.outbox.try_send_numbered_then(&mut d, id, dest, |seq| {
                self.pend(token, (id, seq, 1), dest)?;
                // Just before the datagram goes out, not before a wait for room.
                drops = self.outbox.socket.drops().ok().flatten();
                Ok(())
            });
            if r?.is_some() {
                break;
            }
            self.unpend(token);
            if !room(&mut wait).await {
                return Err(self.timed_out(Op::Send));
            }
        }
        self.await_reply(token, drops, super::reply_port(dest), timeout)
            .await
    }

    /// Makes the request `token` outstanding: `key` is the reply's (id, seq, ack). Refused
    /// when one outstanding has that key and its reply could be taken for this one's
    /// ([`replies_clash`](super::replies_clash): its reply would go to one of the two, the
    /// other would wait in vain), as the synchronous connector refuses it.
    fn pend(&self, token: u64, key: (CbId, u32, u32), dest: Dest) -> Result<()> {
        let from = super::reply_port(dest);
        let mut r = self.reader.lock();
        if r.pending
            .iter()
            .any(|p| p.key == key && super::replies_clash(p.from, from))
        {
            return Err(Error::InvalidArgument(
                "a request with this id, seq and ack is already outstanding",
            ));
        }
        r.pending.push(Pending {
            token,
            key,
            from,
            reply: None,
            waker: None,
        });
        Ok(())
    }

    /// Withdraws the request `token` (not sent: it has no reply).
    fn unpend(&self, token: u64) {
        self.reader.lock().pending.retain(|p| p.token != token);
    }

    /// Waits for the reply of the request `token` (sent); `drops`: the socket's drop
    /// counter before the send; `from`: the port the reply comes from.
    async fn await_reply(
        &self,
        token: u64,
        drops: Option<u32>,
        from: Option<u32>,
        timeout: Duration,
    ) -> Result<Incoming> {
        let wait = async {
            let mut readable = Box::pin(self.fd.readable());
            std::future::poll_fn(|cx| {
                let mut r = self.reader.lock();
                loop {
                    let Some(i) = r.pending.iter().position(|p| p.token == token) else {
                        return Poll::Ready(Err(Error::Closed));
                    };
                    // Answered: the entry goes with its reply (left behind, its drop
                    // would take it for a request withdrawn without one).
                    if r.pending[i].reply.is_some() {
                        let p = r.pending.swap_remove(i);
                        return Poll::Ready(p.reply.ok_or(Error::Closed));
                    }
                    if r.done {
                        return Poll::Ready(Err(Error::Closed));
                    }
                    match readable.as_mut().poll(cx) {
                        Poll::Pending => {
                            // Under the lock, so no reader can fill the entry in between.
                            if let Some(p) = r.pending.iter_mut().find(|p| p.token == token) {
                                p.waker = Some(cx.waker().clone());
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(mut guard)) => self.read(&mut r, &mut guard, false),
                        Poll::Ready(Err(e)) => self.failed(&mut r, e),
                    }
                    readable.set(self.fd.readable());
                }
            })
            .await
        };
        match ::tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(super::no_reply(&self.outbox.socket, drops, from)),
        }
    }

    /// Reads up to [`BATCH`] datagrams (its caller saw the socket readable): replies to
    /// waiting requests go to them, everything else to the stream's queue; wakes whoever
    /// got something. Clears the readiness once the socket is empty. For the stream
    /// (`for_stream`), it stops before a datagram whose messages might not all fit in the
    /// queue (the socket stays readable: the stream reads on once it has taken them); a
    /// request reads on, since its reply may be behind them.
    fn read(
        &self,
        r: &mut Reader,
        guard: &mut AsyncFdReadyGuard<'_, Arc<ConnectorSocket>>,
        for_stream: bool,
    ) {
        let c = &*self.outbox.counters;
        let Reader {
            per_datagram,
            cap,
            ingest,
            buf,
            queue,
            done,
            pending,
            withdrawn,
            stream,
        } = r;
        let (per_datagram, cap) = (*per_datagram, *cap);
        let mut queued = false;
        for _ in 0..BATCH {
            if for_stream && queue.len() + per_datagram > cap {
                break;
            }
            let mut got_event = false;
            let res = ingest.recv(self.fd.get_ref(), buf, self.max_datagram, c, &mut |e| {
                push(queue, cap, c, Err(e));
                got_event = true;
            });
            queued |= got_event;
            match res {
                Ok(Some((d, meta))) => {
                    // Both closures remember requests: a late one, a group's answered one.
                    let withdrawn = std::cell::RefCell::new(&mut *withdrawn);
                    let is_reply = |m: &super::Delivery<'_>| {
                        let (key, port) = ((m.id(), m.seq(), m.ack()), m.source().port);
                        let Some(p) = pending.iter_mut().find(|p| {
                            p.reply.is_none()
                                && p.key == key
                                && p.from.is_none_or(|from| from == port)
                        }) else {
                            return false;
                        };
                        Counters::add(&c.replies, 1);
                        p.reply = Some(m.to_incoming());
                        // Other members of the group may reply too: their replies carry
                        // this request's seq, not their senders', as a late reply does.
                        if p.from.is_none() {
                            withdrawn.borrow_mut().add(key, None);
                        }
                        if let Some(w) = p.waker.take() {
                            w.wake();
                        }
                        true
                    };
                    let is_late = |m: &super::Delivery<'_>| withdrawn.borrow_mut().is_late_reply(m);
                    let mut delivered = 0;
                    ingest.datagram(c, &d, meta, is_reply, is_late, |item| {
                        delivered += u64::from(item.is_ok());
                        push(queue, cap, c, item.map(|m| m.to_incoming()));
                        queued = true;
                    });
                    Counters::add(&c.delivered, delivered);
                }
                Ok(None) if got_event => {}
                Ok(None) => {
                    guard.clear_ready();
                    break;
                }
                Err(_) => {
                    *done = true; // the RecvFailed event is queued
                    wake_all(pending);
                    queued = true;
                    break;
                }
            }
        }
        if queued {
            if let Some(w) = stream.take() {
                w.wake();
            }
        }
    }

    /// The socket's readiness failed: the stream ends after one [`Event::RecvFailed`].
    fn failed(&self, r: &mut Reader, e: std::io::Error) {
        r.done = true;
        push(
            &mut r.queue,
            r.cap,
            &self.outbox.counters,
            Err(Event::RecvFailed {
                errno: e.raw_os_error(),
            }),
        );
        wake_all(&mut r.pending);
        if let Some(w) = r.stream.take() {
            w.wake();
        }
    }

    /// The next message or event; `None` once the socket has failed. One task at a time
    /// reads the stream (the last one to poll is the one woken); requests may run beside it.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, Event>>> {
        let mut r = self.reader.lock();
        loop {
            if let Some(item) = r.queue.pop_front() {
                return Poll::Ready(Some(item));
            }
            if r.done {
                return Poll::Ready(None);
            }
            match self.fd.poll_read_ready(cx) {
                Poll::Pending => {
                    // Under the lock: a request's task that later reads what is ours
                    // wakes us.
                    if !r.stream.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        r.stream = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(mut guard)) => self.read(&mut r, &mut guard, true),
                Poll::Ready(Err(e)) => self.failed(&mut r, e),
            }
        }
    }

    /// The next message or event; `None` once the socket has failed.
    pub async fn recv(&self) -> Option<Result<Incoming, Event>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// Waits (on tokio's timer) for the next attempt of `wait`: `false` (at once) when its
/// time is up.
async fn room(wait: &mut RoomWait) -> bool {
    match wait.next_pause() {
        Some(pause) => {
            ::tokio::time::sleep(pause).await;
            true
        }
        None => false,
    }
}

/// What the stream and the requests share: the receive side, behind one lock that no
/// `await` holds.
struct Reader {
    /// [`items_per_datagram`] of the connector's `max_datagram`.
    per_datagram: usize,
    /// How many items the queue holds at most: [`QUEUE_CAP`], or two datagrams' worth.
    cap: usize,
    ingest: Ingest,
    buf: BytesMut,
    queue: VecDeque<Result<Incoming, Event>>,
    done: bool,
    /// The requests waiting for their replies.
    pending: Vec<Pending>,
    /// Requests withdrawn without their reply, whose late replies the gap tracker skips,
    /// and group requests answered (other members may reply after the first).
    withdrawn: super::ingest::Withdrawn,
    /// The task reading the stream, woken when a request's task queued something for it.
    stream: Option<Waker>,
}

/// A request waiting for its reply.
struct Pending {
    token: u64,
    /// `(id, seq, ack)` of the reply.
    key: (CbId, u32, u32),
    /// The port the reply must come from (`None`: any member of the group it went to).
    from: Option<u32>,
    reply: Option<Incoming>,
    waker: Option<Waker>,
}

/// Removes a request's [`Pending`] entry when the request ends, however it ends; a reply
/// that came but was not taken (the request timed out meanwhile) goes to the stream.
struct PendingEntry<'a> {
    conn: &'a AsyncConnector,
    token: u64,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        let mut r = self.conn.reader.lock();
        if let Some(i) = r.pending.iter().position(|p| p.token == self.token) {
            let p = r.pending.swap_remove(i);
            match p.reply {
                Some(m) => {
                    let cap = r.cap;
                    push(&mut r.queue, cap, &self.conn.outbox.counters, Ok(m));
                    if let Some(w) = r.stream.take() {
                        w.wake();
                    }
                }
                // Timed out or cancelled: a reply that comes later is late.
                None => r.withdrawn.add(p.key, p.from),
            }
        }
    }
}

fn wake_all(pending: &mut [Pending]) {
    for p in pending {
        if let Some(w) = p.waker.take() {
            w.wake();
        }
    }
}

/// The most items (messages, and a loss or fault event before each, and one at the end)
/// one datagram of at most `max_datagram` bytes can put in the queue.
fn items_per_datagram(max_datagram: usize) -> usize {
    let smallest = crate::codec::NLMSG_HDRLEN + crate::codec::CN_MSG_HDRLEN;
    2 * (max_datagram / smallest) + 2
}

/// Queues `item`, dropping (and counting) the oldest when the queue holds `cap` items.
fn push(
    queue: &mut VecDeque<Result<Incoming, Event>>,
    cap: usize,
    c: &Counters,
    item: Result<Incoming, Event>,
) {
    if queue.len() >= cap {
        queue.pop_front();
        Counters::add(&c.channel_full, 1);
    }
    queue.push_back(item);
}

impl futures_core::Stream for AsyncConnector {
    type Item = Result<Incoming, Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// The stream through a shared reference, so that one task reads it while others send and
/// make requests (`let mut s = &*conn; s.next().await`).
impl futures_core::Stream for &AsyncConnector {
    type Item = Result<Incoming, Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

#[cfg(test)]
mod tests;
