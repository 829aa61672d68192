//! The async connector on tokio (cargo feature `tokio`), re-exported as
//! [`cnbus::tokio::AsyncConnector`](crate::tokio::AsyncConnector).
//! It reads its socket through `AsyncFd` (no thread of its own); the example is on
//! [`crate::tokio`].

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::tokio::io::unix::AsyncFd;
use bytes::{Bytes, BytesMut};

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

/// An async connector: a socket whose messages and events are a `Stream`.
///
/// Build it with [`ConnectorBuilder::build_async`](crate::connector::ConnectorBuilder::build_async).
pub struct AsyncConnector {
    fd: AsyncFd<Arc<ConnectorSocket>>,
    pub(crate) outbox: Outbox,
    groups: Arc<Groups>,
    ingest: Ingest,
    buf: BytesMut,
    max_datagram: usize,
    queue: VecDeque<Result<Incoming, Event>>,
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
    /// full queue waits (asynchronously, never blocking the runtime's thread) for room.
    /// Returns the messages sent (fewer than `msgs` when a send failed after some went out,
    /// counted as a send error).
    pub async fn send_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<usize> {
        let datagrams = self.outbox.frame_batch(msgs, dest)?;
        let mut sent = 0;
        while sent < datagrams.len() {
            let slices: Vec<IoSlice<'_>> = datagrams[sent..]
                .iter()
                .map(|(d, _)| IoSlice::new(d))
                .collect();
            match self.outbox.socket.try_send_batch(&slices, dest) {
                Ok(0) => {
                    drop(slices);
                    // The peer's queue is full; netlink offers no readiness for that.
                    ::tokio::time::sleep(Duration::from_millis(1)).await
                }
                Ok(n) => sent += n,
                // As the synchronous send_batch: an error after some datagrams went out
                // ends the batch with what was sent (the error recurs on a retry).
                Err(_) if sent > 0 => break,
                Err(e) => {
                    self.outbox.account_batch(&datagrams, sent); // counts the error
                    return Err(e);
                }
            }
        }
        Ok(self.outbox.account_batch(&datagrams, sent))
    }

    /// Sends `msg` and waits up to `timeout` for the message with the same id and seq and
    /// `ack + 1`. Messages that arrive meanwhile stay queued for the stream, in order.
    pub async fn request(
        &mut self,
        msg: &CnMsg,
        dest: Dest,
        timeout: Duration,
    ) -> Result<Incoming> {
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
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, Event>>> {
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
    pub async fn recv(&mut self) -> Option<Result<Incoming, Event>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;

    use crate::codec::{messages, CbId, CnMsg, Message};
    use crate::connector::Connector;
    use crate::sys::{ConnectorSocket, Dest};

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
}
