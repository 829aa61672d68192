//! An async connector on tokio (cargo feature `tokio`).
//!
//! [`AsyncConnector`] reads its socket through [`tokio::io::unix::AsyncFd`]: no thread of
//! its own, no thread per stream. It is a [`futures_core::Stream`] of
//! `Result<Received, Event>`: `Ok` for each message, `Err` for each loss or fault the
//! synchronous dispatcher would report as an [`Event`] (overrun, sequence gap, malformed
//! message, truncation). Events do not end the stream; a failing socket does, after one
//! [`Event::RecvFailed`].
//!
//! ```no_run
//! # async fn demo() -> cnbus::Result<()> {
//! use futures_util::StreamExt;
//! use cnbus::connector::Connector;
//!
//! let mut bus = Connector::builder().build_async()?;
//! let _group = bus.subscribe(20)?;
//! while let Some(item) = bus.next().await {
//!     match item {
//!         Ok(m) => println!("[{}] [{}.{}] {} bytes", m.msg.id, m.msg.seq, m.msg.ack, m.msg.data.len()),
//!         Err(event) => eprintln!("{event}"),
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::tokio::io::unix::AsyncFd;
use bytes::{Bytes, BytesMut};

use crate::codec::{CbId, CnMsg};
use crate::connector::ingest::Ingest;
use crate::connector::stats::Counters;
use crate::connector::{Event, Groups, Outbox, Received, Stats, Subscription};
use crate::error::{Error, Op, Result};
use crate::sys::{ConnectorSocket, Dest};

/// Messages parsed but not yet taken, at most; past it the oldest is dropped and counted in
/// [`Stats::channel_full`]. Only [`AsyncConnector::request`] parks messages here beyond one
/// datagram's worth.
const QUEUE_CAP: usize = 65536;

/// Datagrams read per readiness before yielding to the runtime.
const BATCH: usize = 64;

/// An async connector: a socket whose messages and events are a `Stream`.
///
/// Build it with [`ConnectorBuilder::build_async`](crate::connector::ConnectorBuilder::build_async).
pub struct AsyncConnector {
    fd: AsyncFd<Arc<ConnectorSocket>>,
    outbox: Outbox,
    groups: Arc<Groups>,
    ingest: Ingest,
    buf: BytesMut,
    max_datagram: usize,
    queue: VecDeque<Result<Received, Event>>,
    done: bool,
}

impl std::fmt::Debug for AsyncConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncConnector")
            .field("port", &self.port_id())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl AsyncConnector {
    pub(crate) fn new(
        outbox: Outbox,
        groups: Arc<Groups>,
        ingest: Ingest,
        max_datagram: usize,
    ) -> Result<Self> {
        let fd = crate::sys::asyncfd::register(outbox.socket.clone())
            .map_err(|e| Error::from_io(Op::Poll, e))?;
        Ok(Self {
            fd,
            outbox,
            groups,
            ingest,
            buf: BytesMut::with_capacity(max_datagram * 4),
            max_datagram,
            queue: VecDeque::new(),
            done: false,
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
    /// waits (asynchronously) for room instead of blocking the runtime.
    pub async fn send(&self, msg: &CnMsg, dest: Dest) -> Result<()> {
        let d = self.outbox.frame(msg, dest)?;
        loop {
            let r = self.outbox.socket.try_send(&d, dest);
            match r {
                Ok(Some(_)) => {
                    self.outbox.account(&r, 1);
                    return Ok(());
                }
                // The peer's queue is full; netlink offers no readiness for that, so poll
                // gently rather than spin.
                Ok(None) => ::tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => {
                    self.outbox.account(&Err::<(), _>(Error::Closed), 1);
                    return Err(e);
                }
            }
        }
    }

    /// Sends `data` on `id` with the next sequence number of `id`, as
    /// [`ConnectorHandle::send_numbered`](crate::connector::ConnectorHandle::send_numbered)
    /// does (the socket's sequence of `dest` and `id`, numbered and sent under the socket's
    /// numbering lock, so in wire order
    /// among everything sending on the socket). A unicast to a peer whose queue is full
    /// waits asynchronously, using no number meanwhile. Returns the seq.
    pub async fn send_numbered(&self, id: CbId, data: impl Into<Bytes>, dest: Dest) -> Result<u32> {
        let mut d = self.outbox.frame_numbered(id, data.into(), dest)?;
        loop {
            if let Some(seq) = self.outbox.try_send_numbered(&mut d, id, dest)? {
                return Ok(seq);
            }
            ::tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends several messages packed into datagrams with one `sendmmsg`, as
    /// [`ConnectorHandle::send_batch`](crate::connector::ConnectorHandle::send_batch) does.
    /// Multicasts and sends to the kernel never wait; a unicast to a user-space peer with a
    /// full queue can block the calling thread until it has room.
    pub async fn send_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<usize> {
        self.outbox.send_batch(msgs, dest)
    }

    /// Sends `msg` and waits up to `timeout` for the message with the same id and seq and
    /// `ack + 1`. Messages that arrive meanwhile stay queued for the stream, in order.
    pub async fn request(
        &mut self,
        msg: &CnMsg,
        dest: Dest,
        timeout: Duration,
    ) -> Result<Received> {
        let (id, seq, ack) = (msg.id, msg.seq, msg.ack.wrapping_add(1));
        self.send(msg, dest).await?;
        let parked = self.queue.len();
        let wait = async {
            loop {
                // Only look at what arrives after the messages already queued.
                let mut i = parked;
                while i < self.queue.len() {
                    if let Some(Ok(m)) = self.queue.get(i) {
                        if m.msg.id == id && m.msg.seq == seq && m.msg.ack == ack {
                            let Some(Ok(m)) = self.queue.remove(i) else {
                                unreachable!()
                            };
                            Counters::add(&self.outbox.counters.replies, 1);
                            return Ok(m);
                        }
                    }
                    i += 1;
                }
                let before = self.queue.len();
                std::future::poll_fn(|cx| self.fill(cx, before)).await?;
            }
        };
        match ::tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::TimedOut { op: Op::Request }),
        }
    }

    /// Reads datagrams until the queue grows past `len`. `Err` when the socket failed.
    fn fill(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<Result<()>> {
        let Self {
            fd,
            outbox,
            ingest,
            buf,
            max_datagram,
            queue,
            done,
            ..
        } = self;
        if *done {
            return Poll::Ready(Err(Error::Closed));
        }
        let c = &*outbox.counters;
        loop {
            let mut guard = match ready!(fd.poll_read_ready(cx)) {
                Ok(g) => g,
                Err(e) => {
                    *done = true;
                    push(
                        queue,
                        c,
                        Err(Event::RecvFailed {
                            errno: e.raw_os_error(),
                        }),
                    );
                    return Poll::Ready(Ok(()));
                }
            };
            for _ in 0..BATCH {
                let before = queue.len();
                let r = ingest.recv(fd.get_ref(), buf, *max_datagram, c, &mut |e| {
                    push(queue, c, Err(e))
                });
                let got_event = queue.len() != before;
                match r {
                    Ok(Some((d, meta))) => ingest.datagram(c, d, meta, |item| push(queue, c, item)),
                    Ok(None) if got_event => {}
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(_) => {
                        *done = true; // the RecvFailed event is queued
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            if queue.len() > len {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// The next message or event; `None` once the socket has failed.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Received, Event>>> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Poll::Ready(Some(item));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if ready!(self.fill(cx, 0)).is_err() {
                return Poll::Ready(None);
            }
        }
    }

    /// The next message or event; `None` once the socket has failed.
    pub async fn recv(&mut self) -> Option<Result<Received, Event>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// Queues `item`, dropping (and counting) the oldest when the queue is full.
fn push(
    queue: &mut VecDeque<Result<Received, Event>>,
    c: &Counters,
    item: Result<Received, Event>,
) {
    if queue.len() >= QUEUE_CAP {
        queue.pop_front();
        Counters::add(&c.channel_full, 1);
    }
    queue.push_back(item);
}

impl futures_core::Stream for AsyncConnector {
    type Item = Result<Received, Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Typed proc events as a `Stream` (feature `tokio`): an [`AsyncConnector`] of its own,
/// joined to group 1 after `LISTEN`, decoded by a [`ProcDecoder`](crate::proc::ProcDecoder).
///
/// Items are [`proc::Received`](crate::proc::Received): events in the chosen set, and loss
/// reports in stream order (an overrun as it happens, the per-CPU gaps when the next
/// events arrive; the exact total, tail included, is in [`stats`](Self::stats)). The event
/// set is applied in user space with the kernel's rules, so gap accounting stays valid.
/// Dropping the stream sends `IGNORE`.
///
/// ```no_run
/// # async fn demo() -> cnbus::Result<()> {
/// use futures_util::StreamExt;
/// use cnbus::proc::{EventSet, Received};
/// use cnbus::tokio::ProcStream;
///
/// let mut events = ProcStream::open(EventSet::EXEC | EventSet::EXIT).await?;
/// while let Some(r) = events.next().await {
///     if let Received::Event(ev) = r {
///         println!("{:?}", ev.body);
///     }
/// }
/// # Ok(()) }
/// ```
pub struct ProcStream {
    conn: AsyncConnector,
    decoder: crate::proc::ProcDecoder,
    pending: VecDeque<crate::proc::Received>,
    /// Counts the user-space multicasts on group 1 (see `LossStats::foreign_unaccounted`),
    /// with this socket's count of them when it joined.
    witness: Option<(crate::proc::Witness, u64)>,
    _group: Subscription,
}

impl std::fmt::Debug for ProcStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcStream")
            .field("events", &self.decoder.events())
            .field("port", &self.conn.port_id())
            .finish()
    }
}

impl ProcStream {
    /// Opens a socket (16 MiB receive buffer), joins group 1, sends `LISTEN` and waits for
    /// the kernel's ACK.
    pub async fn open(events: crate::proc::EventSet) -> Result<Self> {
        use crate::proc::{request, McastOp, DEFAULT_ACK_TIMEOUT, DEFAULT_RECV_BUFFER};
        let conn = crate::connector::Connector::builder()
            .recv_buffer(DEFAULT_RECV_BUFFER)
            .build_async()?;
        let foreign = &conn.outbox.counters.proc_group_foreign;
        let base = foreign.load(std::sync::atomic::Ordering::Relaxed);
        let (witness, group) = crate::proc::Witness::around(|| conn.subscribe(1))?;
        let token = crate::proc::ack_token(conn.port_id(), conn.next_seq(CbId::PROC));
        conn.send(&request(McastOp::Listen, None, 0, token), Dest::Kernel)
            .await?;
        let mut stream = Self {
            conn,
            decoder: crate::proc::ProcDecoder::new(events, true),
            pending: VecDeque::new(),
            witness: witness.map(|w| (w, base)),
            _group: group,
        };
        let ack = async {
            loop {
                match stream.conn.recv().await {
                    None => return Err(Error::Closed),
                    Some(item) => {
                        if let Some((ack, err)) = stream.take(item) {
                            if ack == token.wrapping_add(1) {
                                return Ok(err);
                            }
                        }
                    }
                }
            }
        };
        match ::tokio::time::timeout(DEFAULT_ACK_TIMEOUT, ack).await {
            Ok(Ok(0)) => Ok(stream),
            Ok(Ok(errno)) => Err(Error::from_io(
                Op::Request,
                std::io::Error::from_raw_os_error(errno as i32),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::ProcConnector {
                reason: "the kernel did not acknowledge LISTEN before the timeout",
            }),
        }
    }

    /// Feeds one connector item to the decoder, queueing what it yields; returns the ACK
    /// it carried, if any.
    fn take(&mut self, item: Result<Received, Event>) -> Option<(u32, u32)> {
        use crate::proc::{Loss, Received as P};
        match item {
            Ok(m) if m.msg.id == CbId::PROC => {
                let d = self.decoder.decode(m.source.port, &m.msg);
                self.pending.extend(d);
                d.ack
            }
            Ok(m) => {
                // Another id on group 1 (a user-space sender): not a proc event.
                let _ = self.decoder.decode(m.source.port, &m.msg);
                None
            }
            Err(Event::Overrun) => {
                self.decoder.record_overrun();
                self.pending.push_back(P::Lost(Loss::Overrun));
                None
            }
            Err(Event::Decode { port, error }) => {
                self.decoder.record_decode_error(port, error);
                None
            }
            Err(_) => None,
        }
    }

    /// Loss and event counters. The socket is this stream's alone and joined to group 1
    /// only, so its kernel drop counter ([`LossStats::kernel_drops`](crate::proc::LossStats::kernel_drops))
    /// counts the proc events it lost, the end of a run included, plus any user-space
    /// multicasts on group 1 dropped with them, which a witness socket accounts for
    /// ([`LossStats::lost`](crate::proc::LossStats::lost) says when the figure is exact).
    pub fn stats(&self) -> crate::proc::LossStats {
        let c = &self.conn.outbox.counters;
        // The witness first, then the socket (see `proc::Witness`); this stream is the
        // socket's only reader.
        let foreign = self.witness.as_ref().and_then(|(w, base)| {
            let got = c
                .proc_group_foreign
                .load(std::sync::atomic::Ordering::Relaxed);
            w.unaccounted(got - base)
        });
        let empty = c.read_drops(&self.conn.outbox.socket);
        crate::proc::LossStats {
            kernel_drops: c.snapshot().kernel_drops,
            foreign_unaccounted: foreign.map(|f| f.0),
            foreign_settled: foreign.is_some_and(|f| f.1) && empty,
            ..self.decoder.stats()
        }
    }
}

impl Drop for ProcStream {
    fn drop(&mut self) {
        use crate::proc::{request, McastOp};
        let token = self.conn.next_seq(CbId::PROC);
        // Messages to the kernel never wait, so a non-blocking send is enough here.
        if let Ok(d) = self
            .conn
            .outbox
            .frame(&request(McastOp::Ignore, None, 0, token), Dest::Kernel)
        {
            let _ = self.conn.outbox.socket.try_send(&d, Dest::Kernel);
        }
    }
}

impl futures_core::Stream for ProcStream {
    type Item = crate::proc::Received;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(r));
            }
            match ready!(this.conn.poll_recv(cx)) {
                None => return Poll::Ready(None),
                Some(item) => {
                    this.take(item);
                }
            }
        }
    }
}
