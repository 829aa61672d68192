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
use std::time::{Duration, Instant};

use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::ingest::Ingest;
use super::stats::Counters;
use super::{Event, Groups, Incoming, Outbox, Stats, Subscription};
use crate::codec::{CbId, CnMsg};
use crate::error::{Error, Op, Result};
use crate::sys::{ConnectorSocket, Dest};

/// Messages parsed but not yet taken, at most; past it the oldest is dropped and counted in
/// [`Stats::channel_full`]. Only [`AsyncConnector::request`] parks messages here beyond one
/// datagram's worth.
const QUEUE_CAP: usize = 65536;

/// Datagrams read per readiness before yielding to the runtime.
const BATCH: usize = 64;

/// Longest pause between two attempts to send to a unicast peer whose queue is full.
const MAX_ROOM_PAUSE: Duration = Duration::from_millis(1);

/// An async connector: a socket whose messages and events are a `Stream`.
///
/// Build it with [`ConnectorBuilder::build_async`](crate::connector::ConnectorBuilder::build_async).
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
                ingest,
                buf: BytesMut::with_capacity(max_datagram * 4),
                queue: VecDeque::new(),
                done: false,
                pending: Vec::new(),
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
        let d = self.outbox.frame(msg, dest)?;
        let wait = RoomWait::new(self.send_timeout);
        loop {
            let r = self.outbox.socket.try_send(&d, dest);
            if !matches!(r, Ok(None)) {
                self.outbox.account(&r, 1);
                return r.map(drop);
            }
            if !wait.pause().await {
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
        let wait = RoomWait::new(self.send_timeout);
        loop {
            if let Some(seq) = self.outbox.try_send_numbered(&mut d, id, dest)? {
                return Ok(seq);
            }
            if !wait.pause().await {
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
                    if !wait.pause().await {
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
        Counters::add(&self.outbox.counters.send_errors, 1);
        Error::TimedOut { op }
    }

    /// Sends `msg` and waits up to `timeout` for the message with the same id and seq and
    /// `ack + 1` (see [`CnMsg::reply_to`]). Takes `&self`: requests run beside the task that
    /// reads the stream (share the connector with `Arc`), and any number at once. The reply
    /// goes to the request, not to the stream; every other message that arrives meanwhile
    /// stays queued for the stream, in order. A reply that arrives after the timeout goes to
    /// the stream.
    pub async fn request(&self, msg: &CnMsg, dest: Dest, timeout: Duration) -> Result<Incoming> {
        let token = self.tokens.fetch_add(1, Relaxed);
        self.reader.lock().pending.push(Pending {
            token,
            key: (msg.id, msg.seq, msg.ack.wrapping_add(1)),
            reply: None,
            waker: None,
        });
        let _entry = PendingEntry { conn: self, token };
        self.send(msg, dest).await?;
        let wait = async {
            let mut readable = Box::pin(self.fd.readable());
            std::future::poll_fn(|cx| {
                let mut r = self.reader.lock();
                loop {
                    let Some(p) = r.pending.iter_mut().find(|p| p.token == token) else {
                        return Poll::Ready(Err(Error::Closed));
                    };
                    if let Some(m) = p.reply.take() {
                        return Poll::Ready(Ok(m));
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
                        Poll::Ready(Ok(mut guard)) => self.read(&mut r, &mut guard),
                        Poll::Ready(Err(e)) => self.failed(&mut r, e),
                    }
                    readable.set(self.fd.readable());
                }
            })
            .await
        };
        match ::tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::TimedOut { op: Op::Request }),
        }
    }

    /// Reads up to [`BATCH`] datagrams (its caller saw the socket readable): replies to
    /// waiting requests go to them, everything else to the stream's queue; wakes whoever
    /// got something. Clears the readiness once the socket is empty.
    fn read(&self, r: &mut Reader, guard: &mut AsyncFdReadyGuard<'_, Arc<ConnectorSocket>>) {
        let c = &*self.outbox.counters;
        let Reader {
            ingest,
            buf,
            queue,
            done,
            pending,
            stream,
        } = r;
        let mut queued = false;
        for _ in 0..BATCH {
            let mut got_event = false;
            let res = ingest.recv(self.fd.get_ref(), buf, self.max_datagram, c, &mut |e| {
                push(queue, c, Err(e));
                got_event = true;
            });
            queued |= got_event;
            match res {
                Ok(Some((d, meta))) => ingest.datagram(c, d, meta, |item| {
                    if let Ok(m) = &item {
                        let key = (m.msg.id, m.msg.seq, m.msg.ack);
                        if let Some(p) = pending
                            .iter_mut()
                            .find(|p| p.reply.is_none() && p.key == key)
                        {
                            Counters::add(&c.replies, 1);
                            p.reply = item.ok();
                            if let Some(w) = p.waker.take() {
                                w.wake();
                            }
                            return;
                        }
                    }
                    push(queue, c, item);
                    queued = true;
                }),
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
                Poll::Ready(Ok(mut guard)) => self.read(&mut r, &mut guard),
                Poll::Ready(Err(e)) => self.failed(&mut r, e),
            }
        }
    }

    /// The next message or event; `None` once the socket has failed.
    pub async fn recv(&self) -> Option<Result<Incoming, Event>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// A send's wait for room at a unicast peer whose queue is full. Netlink offers no
/// readiness for that (a sender's writability is its own send buffer's, which is why the
/// socket is registered for read readiness only), so the send tries again after a pause of
/// at most [`MAX_ROOM_PAUSE`], on tokio's timer, until the timeout has passed since the
/// first attempt.
struct RoomWait {
    /// `None`: a timeout too long to represent, waits without end.
    deadline: Option<Instant>,
}

impl RoomWait {
    fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now().checked_add(timeout),
        }
    }

    /// Sleeps before the next attempt; `false` (at once) when the time is up.
    async fn pause(&self) -> bool {
        let pause = match self.deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(MAX_ROOM_PAUSE),
            None => MAX_ROOM_PAUSE,
        };
        if pause.is_zero() {
            return false;
        }
        ::tokio::time::sleep(pause).await;
        true
    }
}

/// What the stream and the requests share: the receive side, behind one lock that no
/// `await` holds.
struct Reader {
    ingest: Ingest,
    buf: BytesMut,
    queue: VecDeque<Result<Incoming, Event>>,
    done: bool,
    /// The requests waiting for their replies.
    pending: Vec<Pending>,
    /// The task reading the stream, woken when a request's task queued something for it.
    stream: Option<Waker>,
}

/// A request waiting for its reply.
struct Pending {
    token: u64,
    /// `(id, seq, ack)` of the reply.
    key: (CbId, u32, u32),
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
            if let Some(m) = r.pending.swap_remove(i).reply {
                push(&mut r.queue, &self.conn.outbox.counters, Ok(m));
                if let Some(w) = r.stream.take() {
                    w.wake();
                }
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

/// Queues `item`, dropping (and counting) the oldest when the queue is full.
fn push(
    queue: &mut VecDeque<Result<Incoming, Event>>,
    c: &Counters,
    item: Result<Incoming, Event>,
) {
    if queue.len() >= QUEUE_CAP {
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
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;

    use crate::codec::{messages, CbId, CnMsg, Message};
    use crate::connector::Connector;
    use crate::error::{Error, Op};
    use crate::sys::{ConnectorSocket, Dest};

    /// Runs `f` on a one-thread runtime on a thread of its own and returns its result, or
    /// panics with `hung` when it has not finished after two minutes (a watchdog for a
    /// future that never completes, not a timing assertion).
    fn on_runtime<T: Send + 'static>(
        hung: &str,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = ::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = done_tx.send(rt.block_on(f));
        });
        done_rx.recv_timeout(Duration::from_secs(120)).expect(hung)
    }

    /// A peer that never reads: a socket with the smallest receive buffer.
    fn stalled_peer() -> ConnectorSocket {
        let rx = ConnectorSocket::open().unwrap();
        rx.set_recv_buffer(4096, false).unwrap();
        rx
    }

    /// Reads everything queued at `rx` and counts the messages on `id`.
    fn drain(rx: &ConnectorSocket, id: CbId) -> usize {
        let mut got = 0;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(1 << 17);
            match rx.recv(&mut buf, true).unwrap() {
                Some(_) => {
                    for m in messages(buf.split().freeze()) {
                        if let Ok(Message::Connector(c)) = m {
                            got += usize::from(c.msg.id == id);
                        }
                    }
                }
                None => return got,
            }
        }
    }

    /// Every async send to a unicast peer that never reads gives up after the connector's
    /// `send_timeout`, counted as a send error; a batch reports what went out, and a
    /// numbered send that gave up used no number. (Before, each waited forever: the
    /// watchdog fired.)
    #[test]
    fn sends_to_a_peer_that_never_reads_give_up_after_send_timeout() {
        on_runtime("an async send to a stalled peer never returned", async {
            const N: usize = 600;
            let rx = stalled_peer();
            let dest = Dest::Port(rx.port_id());
            let tx = Connector::builder()
                .send_timeout(Duration::from_millis(50))
                .build_async()
                .unwrap();
            let id = CbId::new(0x5a19, tx.port_id());
            let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
            let sent = match tx.send_batch(&msgs, dest).await {
                Ok(k) => k,
                Err(Error::TimedOut { op: Op::SendBatch }) => 0,
                Err(e) => panic!("{e}"),
            };
            assert!(sent < N, "{sent}");
            let s = tx.stats();
            assert_eq!((s.sent_messages, s.send_errors), (sent as u64, 1), "{s:?}");

            let e = tx.send(&msgs[0], dest).await.unwrap_err();
            assert!(matches!(e, Error::TimedOut { op: Op::Send }), "{e}");
            let e = tx.send_numbered(id, vec![1u8], dest).await.unwrap_err();
            assert!(matches!(e, Error::TimedOut { op: Op::Send }), "{e}");
            assert_eq!(tx.stats().send_errors, 3);

            assert_eq!(drain(&rx, id), sent);
            assert_eq!(tx.send_numbered(id, vec![2u8], dest).await.unwrap(), 1);
        });
    }

    /// A `send_batch` dropped while it waits for room (a timeout around it) has counted
    /// what went out: the peer received exactly `sent_messages`. (Before, the batch was
    /// counted only at its end, so a dropped one counted nothing.)
    #[test]
    fn a_send_batch_dropped_while_waiting_counted_what_went_out() {
        on_runtime("the timeout around send_batch never fired", async {
            const N: usize = 600;
            let rx = stalled_peer();
            let dest = Dest::Port(rx.port_id());
            let tx = Connector::builder()
                .send_timeout(Duration::from_secs(3600))
                .build_async()
                .unwrap();
            let id = CbId::new(0x5a1a, tx.port_id());
            let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
            let r = ::tokio::time::timeout(Duration::from_millis(50), tx.send_batch(&msgs, dest));
            assert!(
                r.await.is_err(),
                "the batch cannot fit a stalled 4 KiB queue"
            );
            let got = drain(&rx, id);
            assert!(got > 0 && got < N, "{got}");
            assert_eq!(tx.stats().sent_messages, got as u64);
        });
    }

    /// A batch to a unicast peer whose queue fills up waits without blocking the runtime:
    /// on a one-thread runtime, the task emptying the peer's queue still runs. (Before,
    /// `send_batch` made a blocking `sendmmsg`, which held the runtime's only thread: the
    /// reader never ran and the test hung until the watchdog.)
    #[test]
    fn send_batch_to_a_full_peer_does_not_block_the_runtime() {
        const N: usize = 600;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = ::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let got = rt.block_on(async {
                let rx = ConnectorSocket::open().unwrap();
                rx.set_recv_buffer(4096, false).unwrap();
                let dest = Dest::Port(rx.port_id());
                let tx = Connector::builder().build_async().unwrap();
                let id = CbId::new(0x5a17, tx.port_id());
                let reader = ::tokio::spawn(async move {
                    let mut got = 0;
                    let mut buf = BytesMut::new();
                    while got < N {
                        buf.reserve(1 << 17);
                        match rx.recv(&mut buf, true).unwrap() {
                            Some(_) => {
                                for m in messages(buf.split().freeze()) {
                                    if let Ok(Message::Connector(c)) = m {
                                        got += usize::from(c.msg.id == id);
                                    }
                                }
                            }
                            None => ::tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    got
                });
                let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
                assert_eq!(tx.send_batch(&msgs, dest).await.unwrap(), N);
                reader.await.unwrap()
            });
            let _ = done_tx.send(got);
        });
        // A watchdog, not a timing assertion: the send blocked forever before the fix.
        let got = done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("send_batch blocked the runtime's thread");
        assert_eq!(got, N);
    }

    /// A request runs beside the task reading the stream (both through `&self`): the reply
    /// goes to the request, the other message to the stream. (Before, `request` took
    /// `&mut self`: this test did not compile.)
    #[test]
    fn request_runs_beside_the_stream() {
        let rt = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = Connector::builder().spawn().unwrap();
            let id = CbId::new(0x5a18, server.port_id());
            let h = server.handle();
            let _svc = server.register(id, move |m| {
                // First a message that is not the reply, then the reply.
                let other = CnMsg::new(id, &b"other"[..]).with_seq(m.msg.seq, 0);
                h.send(&other, Dest::Port(m.source.port)).unwrap();
                h.send(
                    &CnMsg::reply_to(&m.msg, &b"pong"[..]),
                    Dest::Port(m.source.port),
                )
                .unwrap();
            });
            let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
            let reader = conn.clone();
            let stream = ::tokio::spawn(async move {
                loop {
                    match reader.recv().await {
                        Some(Ok(m)) if m.msg.id == id => return m,
                        Some(_) => {}
                        None => panic!("the stream ended"),
                    }
                }
            });
            ::tokio::task::yield_now().await; // the stream's task is waiting on the socket
            let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 41);
            let reply = conn
                .request(&req, Dest::Port(server.port_id()), Duration::from_secs(30))
                .await
                .unwrap();
            assert!(reply.msg.is_reply_to(&req));
            assert_eq!(&reply.msg.data[..], b"pong");
            let other = stream.await.unwrap();
            assert_eq!(&other.msg.data[..], b"other");
            assert_eq!(conn.stats().replies, 1);
        });
    }
}
