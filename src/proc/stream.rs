//! Typed proc events as an async `Stream` (cargo feature `tokio`), re-exported as
//! [`cnbus::tokio::ProcStream`](crate::tokio::ProcStream).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use crate::codec::CbId;
use crate::connector::{AsyncConnector, Event, Incoming, Subscription};
use crate::error::{Error, Op, Result};
use crate::sys::Dest;

/// Typed proc events as a `Stream` (feature `tokio`): an [`AsyncConnector`] of its own,
/// joined to group 1 after `LISTEN`, decoded by a [`ProcDecoder`](super::ProcDecoder).
///
/// Items are [`proc::Received`](super::Received): events in the chosen set, and loss
/// reports in stream order (an overrun as it happens, the per-CPU gaps when the next
/// events arrive; the exact total, tail included, is in [`stats`](Self::stats)). The event
/// set is applied in user space with the kernel's rules, so gap accounting stays valid.
/// Dropping the stream sends `IGNORE`.
///
/// ```no_run
/// # async fn demo() -> cnbus::Result<()> {
/// use futures_util::StreamExt;
/// use cnbus::proc::{EventSet, Received};
/// use cnbus::proc::ProcStream;
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
    decoder: super::ProcDecoder,
    pending: VecDeque<super::Received>,
    /// Counts the user-space multicasts on group 1 (see `LossStats::foreign_unaccounted`),
    /// with this socket's count of them when it joined.
    witness: Option<(crate::connector::Witness, u64)>,
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
    pub async fn open(events: super::EventSet) -> Result<Self> {
        use super::{request, McastOp, DEFAULT_ACK_TIMEOUT, DEFAULT_RECV_BUFFER};
        // Connected to the kernel: a stranger's unicasts cannot fill its queue and count
        // in its drop counter as lost events.
        let sock = crate::sys::ConnectorSocket::open()?;
        sock.connect_kernel()?;
        let conn = crate::connector::Connector::builder()
            .socket(sock)
            .recv_buffer(DEFAULT_RECV_BUFFER)
            .build_async()?;
        let foreign = &conn.outbox.counters.proc_group_foreign;
        let base = foreign.load(std::sync::atomic::Ordering::Relaxed);
        let (witness, group) = crate::connector::Witness::around(|| conn.subscribe(1))?;
        let token = super::ack_token(conn.port_id(), conn.next_seq(CbId::PROC));
        conn.send(&request(McastOp::Listen, None, 0, token), Dest::Kernel)
            .await?;
        let mut stream = Self {
            conn,
            decoder: super::ProcDecoder::new(events, true),
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
    fn take(&mut self, item: Result<Incoming, Event>) -> Option<(u32, u32)> {
        use super::{Loss, Received as P};
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
    /// only, so its kernel drop counter ([`LossStats::kernel_drops`](super::LossStats::kernel_drops))
    /// counts the proc events it lost, the end of a run included, plus any user-space
    /// multicasts on group 1 dropped with them, which a witness socket accounts for
    /// ([`LossStats::lost`](super::LossStats::lost) says when the figure is exact).
    pub fn stats(&self) -> super::LossStats {
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
        super::LossStats {
            kernel_drops: c.snapshot().kernel_drops,
            foreign_unaccounted: foreign.map(|f| f.0),
            foreign_settled: foreign.is_some_and(|f| f.1) && empty,
            ..self.decoder.stats()
        }
    }
}

impl Drop for ProcStream {
    fn drop(&mut self) {
        use super::{request, McastOp};
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
    type Item = super::Received;

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
