//! Typed proc events as an async `Stream` (cargo feature `tokio`), re-exported as
//! [`cnbus::tokio::ProcStream`](crate::tokio::ProcStream).

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
    /// Decoded and not handed out yet (bounded), with the events dropped or discarded.
    pending: super::loss::Pending,
    /// Counts the user-space multicasts on group 1 (see `LossStats::foreign_unaccounted`),
    /// with this socket's count of them when it joined.
    witness: Option<(crate::connector::Witness, u64)>,
    /// `IGNORE` was sent ([`finish`](Self::finish)).
    ignored: bool,
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
    /// the kernel's ACK. The ACK travels like an event, so an overflow of the queue can drop
    /// it: when the socket lost something while no ACK came (an overrun, or a drop the
    /// kernel counted), `LISTEN` is sent again, up to 3 times, as
    /// [`ProcListener`](super::ProcListener) does.
    pub async fn open(events: super::EventSet) -> Result<Self> {
        Self::open_with(events, |_, _| {}).await
    }

    /// [`open`](Self::open), calling `before_listen(socket, attempt)` before each `LISTEN`
    /// is sent (tests overflow the queue there).
    async fn open_with(
        events: super::EventSet,
        mut before_listen: impl FnMut(&crate::sys::ConnectorSocket, u32),
    ) -> Result<Self> {
        use super::listener::{AckWatch, LISTEN_TRIES, REASON_NO_ACK};
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
        // The connector reads nothing before the stream is polled: `discard_queue` may read
        // the socket directly, and `base` stays this socket's count.
        let (witness, group) = super::loss::join_witnessed(
            || conn.subscribe(1),
            |group| {
                drop(group);
                let socket = &conn.outbox.socket;
                super::loss::discard_queue(socket)?;
                // Out of the group and emptied, the socket is as new: so is its baseline.
                conn.outbox.counters.drops_baseline(socket);
                Ok(())
            },
        )?;
        let mut stream = Self {
            conn,
            decoder: super::ProcDecoder::new(events, true),
            pending: super::loss::Pending::default(),
            witness: witness.map(|w| (w, base)),
            ignored: false,
            _group: group,
        };
        for attempt in 0..LISTEN_TRIES {
            before_listen(&stream.conn.outbox.socket, attempt);
            let token = super::ack_token(stream.conn.port_id(), stream.conn.next_seq(CbId::PROC));
            let watch = AckWatch::new(&stream.conn.outbox.socket, stream.decoder.overruns);
            stream
                .conn
                .send(&request(McastOp::Listen, None, 0, token), Dest::Kernel)
                .await?;
            match ::tokio::time::timeout(DEFAULT_ACK_TIMEOUT, stream.ack(token)).await {
                Ok(Ok(0)) => return Ok(stream),
                Ok(Ok(errno)) => {
                    return Err(Error::from_io(
                        Op::Request,
                        std::io::Error::from_raw_os_error(errno as i32),
                    ))
                }
                Ok(Err(e)) => return Err(e),
                // The ACK may have been dropped with an overflow: ask again.
                Err(_)
                    if watch.ack_may_be_dropped(
                        &stream.conn.outbox.socket,
                        stream.decoder.overruns,
                    ) => {}
                Err(_) => break,
            }
        }
        Err(Error::ProcConnector {
            reason: REASON_NO_ACK,
        })
    }

    /// Reads (keeping what it decodes) until the kernel's ACK to the request sent with
    /// `token`; its error code.
    async fn ack(&mut self, token: u32) -> Result<u32> {
        loop {
            match self.conn.recv().await {
                None => return Err(Error::Closed),
                Some(item) => {
                    if let Some((ack, err)) = self.take(item) {
                        if ack == token.wrapping_add(1) {
                            return Ok(err);
                        }
                    }
                }
            }
        }
    }

    /// Feeds one connector item to the decoder, queueing what it yields; returns the ACK
    /// it carried, if any.
    fn take(&mut self, item: Result<Incoming, Event>) -> Option<(u32, u32)> {
        use super::{Loss, Received as P};
        match item {
            Ok(m) if m.msg.id == CbId::PROC => {
                let d = self.decoder.decode(m.source.port, &m.msg);
                for r in d {
                    self.pending.push(r);
                }
                d.ack
            }
            Ok(m) => {
                // Another id on group 1 (a user-space sender): not a proc event.
                let _ = self.decoder.decode(m.source.port, &m.msg);
                None
            }
            Err(Event::Overrun) => {
                self.decoder.record_overrun();
                self.pending.push(P::Lost(Loss::Overrun));
                None
            }
            Err(Event::Decode { port, error }) => {
                self.decoder.record_decode_error(port, error);
                None
            }
            // Everything a user-space port sends on group 1 is rejected and counted, as
            // `ProcListener` does: its `NLMSG_ERROR`, and a datagram too long for the
            // buffer (no kernel proc datagram comes near 64 KiB).
            Err(Event::NetlinkError { port, .. }) => {
                self.decoder.spoofed += u64::from(port != 0);
                None
            }
            Err(Event::Truncated { .. }) => {
                self.decoder.spoofed += 1;
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
        // The socket's drop counter, then the witness (see `proc::loss::witnessed`); this
        // stream is the socket's only reader.
        let (witness, got) = match &self.witness {
            Some((w, base)) => {
                let got = c
                    .proc_group_foreign
                    .load(std::sync::atomic::Ordering::Relaxed);
                (Some(w), got - base)
            }
            None => (None, 0),
        };
        let w = super::loss::witnessed(&self.conn.outbox.socket, witness, got, |raw| {
            c.observe_drops(raw)
        });
        let mut dec = self.decoder.stats();
        // A user-space sender's `NLMSG_NOOP` and `NLMSG_OVERRUN` on group 1, which the
        // connector reports in no event: rejected and counted, as `ProcListener` does.
        dec.spoofed += c
            .proc_group_control
            .load(std::sync::atomic::Ordering::Relaxed);
        super::LossStats {
            kernel_drops: w.kernel_drops.or_else(|| c.snapshot().kernel_drops),
            foreign_unaccounted: w.foreign_unaccounted,
            foreign_settled: w.foreign_settled,
            ..self.pending.account(dec)
        }
    }

    /// Ends the subscription and returns the final counters, as
    /// [`ProcListener::finish`](super::ProcListener::finish) does: sends `IGNORE` (the kernel
    /// then sends this socket no more events), reads and discards what is still queued
    /// (counted in [`LossStats::unread`](super::LossStats::unread)), and tries for up to
    /// [`SETTLE_TIMEOUT`](super::SETTLE_TIMEOUT) to find the queue empty as the counters are
    /// read, so that the user-space multicasts among the kernel's drops are settled and the
    /// loss figure is exact; past it the figure is left a range. The pauses between tries
    /// are on tokio's timer. The kernel sends the stream no more events afterwards.
    pub async fn finish(&mut self) -> super::LossStats {
        self.finish_with(|| {}).await
    }

    /// [`finish`](Self::finish), calling `before_read` before each try reads the counters
    /// (tests send a user-space multicast there, as a busy host does at the worst moment).
    async fn finish_with(&mut self, mut before_read: impl FnMut()) -> super::LossStats {
        use super::loss::{settled_enough, Settling};
        if !self.ignored {
            self.ignored = self.send_ignore();
        }
        let mut settling = Settling::new();
        loop {
            self.discard_queued().await;
            before_read();
            let stats = self.stats();
            if settled_enough(&stats) {
                return stats;
            }
            match settling.retry() {
                Some(pause) if !pause.is_zero() => ::tokio::time::sleep(pause).await,
                Some(_) => ::tokio::task::yield_now().await,
                None => return stats,
            }
        }
    }

    /// Reads everything queued, without waiting, and discards it (events count as
    /// `unread`). Bounded, as `ProcListener::finish` is: a flood of user-space multicasts
    /// must not keep it here.
    async fn discard_queued(&mut self) {
        std::future::poll_fn(|cx| {
            for _ in 0..super::loss::MAX_PENDING {
                self.pending.discard();
                match self.conn.poll_recv(cx) {
                    Poll::Ready(Some(item)) => {
                        self.take(item);
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            self.pending.discard();
            Poll::Ready(())
        })
        .await
    }

    /// Sends `IGNORE` without waiting (messages to the kernel never wait); true when sent.
    fn send_ignore(&self) -> bool {
        use super::{request, McastOp};
        let token = self.conn.next_seq(CbId::PROC);
        self.conn
            .outbox
            .frame(&request(McastOp::Ignore, None, 0, token), Dest::Kernel)
            .and_then(|d| self.conn.outbox.socket.try_send(&d, Dest::Kernel))
            .is_ok()
    }
}

impl Drop for ProcStream {
    fn drop(&mut self) {
        if !self.ignored {
            self.send_ignore();
        }
    }
}

impl futures_core::Stream for ProcStream {
    type Item = super::Received;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::listener::tests::{overflow_with_spoofs, spoofed, spoofing};
    use crate::proc::{EventSet, LossSource};
    use crate::sys::ConnectorSocket;

    /// A stream of every event for `test`; `None` (the test is skipped, and says so) where
    /// the proc connector cannot be reached; under CI that is a failure.
    async fn open_all(test: &str) -> Option<ProcStream> {
        match ProcStream::open(EventSet::ALL).await {
            Ok(s) => Some(s),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("{test}: the proc connector is required under CI: {e}")
            }
            Err(e) => {
                eprintln!("{test}: SKIPPED, proc connector not reachable: {e}");
                None
            }
        }
    }

    /// Regression: what a user-space sender put on group 1 that the connector reports as
    /// an event rather than a message, a netlink `NLMSG_ERROR` or a datagram too long for
    /// the buffer, was skipped uncounted by the stream, where `ProcListener` counts it in
    /// `spoofed` (everything a user-space port sends there is rejected and counted). The
    /// kernel's own `NLMSG_ERROR` (port 0) is not spoofed. (User-space `NLMSG_NOOP` and
    /// `NLMSG_OVERRUN` are counted by the connector only, in `Stats::control`.)
    #[tokio::test]
    async fn user_space_errors_and_oversized_datagrams_are_counted_as_spoofed() {
        let test = "stream::user_space_errors_and_oversized_datagrams_are_counted_as_spoofed";
        let Some(mut s) = open_all(test).await else {
            return;
        };
        // The stream is not polled: its decoder sees only what is handed to it here. Events
        // that came before `LISTEN`'s ACK (a busy host forks meanwhile) are already pending.
        let before = s.stats().spoofed;
        let queued = s.pending.len();
        for port in [4242, 0] {
            assert_eq!(s.take(Err(Event::NetlinkError { port, error: -5 })), None);
        }
        let long = Event::Truncated {
            len: 70_000,
            capacity: 65_572,
        };
        assert_eq!(s.take(Err(long)), None);
        let st = s.stats();
        assert_eq!(st.spoofed - before, 2, "{test}: {st:?}");
        assert_eq!(s.pending.len(), queued, "{test}: nothing was queued");
    }

    /// Regression: a user-space sender's netlink `NLMSG_NOOP` and `NLMSG_OVERRUN` on group 1
    /// were counted by the stream's connector only (`Stats::control`), where `ProcListener`
    /// counts them in `spoofed` with everything else a user-space port sends there
    /// (`proc::listener::tests::control_messages_from_user_space_are_counted_as_spoofed`);
    /// and a sender's `NLMSG_OVERRUN` is no overflow of the stream's queue. A spoofer of our
    /// own multicasts one datagram: `NOOP`, `OVERRUN`, a spoofed proc event. Every other
    /// user-space datagram on group 1 (a busy host's noise, other tests' spoofers) is one
    /// spoofed message, like the datagrams the connector counts in `proc_group_foreign`: so
    /// the spoofed count grows by the datagrams plus our two control messages (it grew by the
    /// datagrams alone before).
    #[tokio::test]
    // The lock serializes whole tests, each on a runtime of its own: no task waits for it.
    #[allow(clippy::await_holding_lock)]
    async fn control_messages_from_user_space_are_counted_as_spoofed() {
        use crate::codec::NlHeader;
        use std::sync::atomic::Ordering::Relaxed;
        let test = "stream::control_messages_from_user_space_are_counted_as_spoofed";
        let _one = spoofing();
        let Some(mut s) = open_all(test).await else {
            return;
        };
        let datagrams = |s: &ProcStream| s.conn.outbox.counters.proc_group_foreign.load(Relaxed);
        s.discard_queued().await;
        let (before, foreign) = (s.stats(), datagrams(&s));
        let spoofer = ConnectorSocket::open().unwrap();
        let mut d = Vec::new();
        for ty in [crate::codec::NLMSG_NOOP, crate::codec::NLMSG_OVERRUN] {
            NlHeader {
                len: 16,
                ty,
                pid: spoofer.port_id(),
                ..Default::default()
            }
            .emit(&mut d);
        }
        d.extend_from_slice(&spoofed(&spoofer));
        spoofer.send(&d, Dest::Group(1)).unwrap();
        // Read until our datagram was counted (the queue is read as the stream would).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let extra = |s: &ProcStream| {
            let spoofed = s.stats().spoofed - before.spoofed;
            spoofed as i64 - (datagrams(s) - foreign) as i64
        };
        while extra(&s) < 2 && std::time::Instant::now() < deadline {
            s.discard_queued().await;
            ::tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let st = s.stats();
        // (More only if another sender put several messages in a datagram meanwhile.)
        assert!(extra(&s) >= 2, "{test}: {before:?} -> {st:?}");
        assert_eq!(st.overruns, before.overruns, "{test}: {st:?}");
    }

    /// Regression: the stream held what it decoded without bound (while `open` waited for
    /// the ACK, a fork storm's events piled up), where `ProcListener` holds at most
    /// `MAX_PENDING` items and counts the events it drops past it in `LossStats::dropped`.
    /// Both now keep one bounded queue (`proc::loss::Pending`). The stream is not polled:
    /// it holds what is handed to it here, and what came before the ACK.
    #[tokio::test]
    async fn a_full_pending_queue_drops_and_counts_events() {
        use crate::connector::{Incoming, Source};
        use crate::proc::listener::tests::msg;
        let test = "stream::a_full_pending_queue_drops_and_counts_events";
        let Some(mut s) = open_all(test).await else {
            return;
        };
        let before = s.stats();
        let kernel = Source { port: 0, group: 1 };
        // Forks on a CPU number no real CPU has (no gap with the host's events).
        let n = crate::proc::loss::MAX_PENDING as u32 + 100;
        for seq in 0..n {
            let m = msg(1, 8000, seq, &[1, 1, 2, 2]);
            assert_eq!(
                s.take(Ok(Incoming {
                    msg: m,
                    source: kernel
                })),
                None
            );
        }
        let st = s.stats();
        assert_eq!(s.pending.len(), crate::proc::loss::MAX_PENDING, "{test}");
        assert!(st.dropped >= 100, "{test}: {st:?}");
        assert_eq!(
            st.events + st.dropped,
            before.events + before.dropped + u64::from(n),
            "{test}: {st:?}"
        );
        assert!(st.lost_at_least() >= st.dropped, "{test}: {st:?}");
    }

    /// Regression: `ProcStream::open` sent `LISTEN` once, and failed ("the kernel did not
    /// acknowledge LISTEN") when an overflow of its queue dropped the ACK, where
    /// `ProcListener` asks again after an overrun, up to 3 times. Here a spoofer of our own
    /// overflows the stream's queue (made small) before the first `LISTEN`: the socket is
    /// congested, so the kernel drops its ACK; the second `LISTEN` (the queue back to its
    /// size) must be acknowledged.
    #[tokio::test]
    // The lock serializes whole tests, each on a runtime of its own: no task waits for it.
    #[allow(clippy::await_holding_lock)]
    async fn a_listen_ack_dropped_by_an_overflow_is_asked_for_again() {
        let test = "stream::a_listen_ack_dropped_by_an_overflow_is_asked_for_again";
        let _one = spoofing();
        if open_all(test).await.is_none() {
            return;
        }
        let spoofer = ConnectorSocket::open().unwrap();
        let d = spoofed(&spoofer);
        let mut tries = 0;
        let s = ProcStream::open_with(EventSet::ALL, |sock, attempt| {
            tries = attempt + 1;
            if attempt == 0 {
                sock.set_recv_buffer(64 << 10, true).unwrap();
                overflow_with_spoofs(sock, &spoofer, &d);
            } else {
                sock.set_recv_buffer(crate::proc::DEFAULT_RECV_BUFFER, true)
                    .unwrap();
            }
        })
        .await;
        let s = s.unwrap_or_else(|e| panic!("{test}: after {tries} LISTEN: {e}"));
        let st = s.stats();
        assert!(tries >= 2, "{test}: the first ACK was not dropped: {st:?}");
        assert!(st.overruns >= 1, "{test}: {st:?}");
    }

    /// Regression: `LISTEN` was asked again only when a new overrun was reported while its
    /// ACK was awaited. But the kernel reports an overflow once, and then drops everything
    /// for the socket, silently, until its queue has been read empty: an ACK that meets a
    /// queue still congested from an overflow already reported (a flood that kept the queue
    /// from emptying through the previous try's wait) is dropped without a report, and
    /// `open` failed ("the kernel did not acknowledge LISTEN"). Now a drop counted by the
    /// kernel while the ACK was awaited asks again too (`AckWatch`, shared with
    /// `ProcListener`). Here a spoofer of our own overflows the stream's queue (made small)
    /// and the overflow report is read at once, before the first `LISTEN`; the queue gets its
    /// size back, but stays congested until read empty, and the ACK is dropped without a
    /// report.
    #[tokio::test]
    // The lock serializes whole tests, each on a runtime of its own: no task waits for it.
    #[allow(clippy::await_holding_lock)]
    async fn a_listen_ack_dropped_without_an_overrun_report_is_asked_for_again() {
        let test = "stream::a_listen_ack_dropped_without_an_overrun_report_is_asked_for_again";
        let _one = spoofing();
        if open_all(test).await.is_none() {
            return;
        }
        let spoofer = ConnectorSocket::open().unwrap();
        let d = spoofed(&spoofer);
        let mut tries = 0;
        let s = ProcStream::open_with(EventSet::ALL, |sock, attempt| {
            tries = attempt + 1;
            if attempt == 0 {
                sock.set_recv_buffer(64 << 10, true).unwrap();
                overflow_with_spoofs(sock, &spoofer, &d);
                // The overflow's one report, read as an earlier try's wait would have.
                let mut buf = bytes::BytesMut::with_capacity(256);
                assert!(
                    matches!(sock.recv(&mut buf, true), Err(Error::Overrun { .. })),
                    "{test}: the overflow is reported first"
                );
                // Room again, but congested until the queue has been read empty: no other
                // sender's burst overflows it afresh (with a report) meanwhile.
                sock.set_recv_buffer(crate::proc::DEFAULT_RECV_BUFFER, true)
                    .unwrap();
            } else {
                sock.set_recv_buffer(crate::proc::DEFAULT_RECV_BUFFER, true)
                    .unwrap();
            }
        })
        .await;
        let s = s.unwrap_or_else(|e| panic!("{test}: after {tries} LISTEN: {e}"));
        let st = s.stats();
        assert!(tries >= 2, "{test}: the first ACK was not dropped: {st:?}");
    }

    /// `ProcStream::finish` settles as `ProcListener::finish` does (the same
    /// `proc::loss::Settling` and `witnessed`): a spoofer socket of our own overflows the
    /// stream's queue (made small here), so that user-space datagrams are among the kernel's
    /// drops, and multicasts on group 1 right before each of the first six tries reads the
    /// counters. The seventh must settle the figure, exact. (Before, the stream had no
    /// `finish` at all: its figure settled only if a `stats()` call found the queue empty.)
    #[tokio::test]
    // The lock serializes whole tests, each on a runtime of its own: no task waits for it.
    #[allow(clippy::await_holding_lock)]
    async fn finish_settles_after_user_space_multicasts_spoil_its_first_tries() {
        let test = "stream::finish_settles_after_user_space_multicasts_spoil_its_first_tries";
        let _one = spoofing();
        let Some(mut s) = open_all(test).await else {
            return;
        };
        if s.witness.is_none() {
            eprintln!("{test}: SKIPPED, no witness on this kernel (before 6.6)");
            return;
        }
        s.conn
            .outbox
            .socket
            .set_recv_buffer(64 << 10, true)
            .unwrap();
        let spoofer = ConnectorSocket::open().unwrap();
        let d = spoofed(&spoofer);
        overflow_with_spoofs(&s.conn.outbox.socket, &spoofer, &d);
        let mut spoiled = 0;
        let stats = s
            .finish_with(|| {
                if spoiled < 6 {
                    spoofer.send(&d, Dest::Group(1)).unwrap();
                    spoiled += 1;
                }
            })
            .await;
        let foreign = stats.foreign_unaccounted.unwrap();
        assert!(foreign > 0, "no user-space datagram dropped: {stats:?}");
        assert!(stats.foreign_settled, "not settled: {stats:?}");
        assert_eq!(spoiled, 6, "{stats:?}");
        let lost = stats.lost().expect("exact once settled");
        assert_eq!(lost, stats.kernel_drops.unwrap() - foreign, "{stats:?}");
        assert_eq!(stats.lost_source(), LossSource::KernelCounter);
    }
}
