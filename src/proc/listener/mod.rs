//! [`ProcListener`]: subscribing to the proc connector and receiving typed events, with
//! kernel- or user-space filtering, loss accounting and a clean `IGNORE` on drop.

//!
//! Files: the builder and the namespace policy (`builder.rs`), the thread feeding a channel
//! ([`ProcChannel`], `threaded.rs`); the decoder is [`super::ProcDecoder`] (`proc/decoder.rs`).

mod builder;
#[cfg(test)]
pub(super) mod tests;
mod threaded;

pub use builder::{FilterMode, Filtering, ProcListenerBuilder};
pub use threaded::ProcChannel;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::Mutex;

use super::event::{request, EventSet, McastOp};
use crate::codec::{messages_ref, CnHeader, DatagramBuilder, MessageRef};
use crate::error::{DecodeError, Error, Op, Result};
use crate::sys::{
    kernel_at_least, namespace_report, poll_read, ConnectorSocket, Dest, DropCounter, EventFd,
    RecvBatch, RecvMeta,
};

use super::decoder::ProcDecoder;
use super::loss::{
    discard_queue, join_witnessed, settled_enough, witnessed, Loss, LossStats, Pending, Received,
    Settling, MAX_PENDING,
};
use crate::codec::proc::PROC_GROUP;
use crate::connector::Witness;

/// The receive buffer a listener asks for by default: 16 MiB (the kernel doubles it for its
/// bookkeeping). At roughly 1 KiB of kernel memory per queued event that is room for tens of
/// thousands of events while the reader is descheduled.
pub const DEFAULT_RECV_BUFFER: usize = 16 << 20;

/// Default wait for the kernel's ACK to `LISTEN`. The kernel answers synchronously, inside
/// the `sendto`, so the ACK is normally queued before the wait begins.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// The smallest receive queue the probe for kernel-side filtering runs with (see
/// [`ProcListenerBuilder::open`]): its ACK waits in the queue behind the events of every
/// process, and a smaller queue (`recv_buffer(1)`) under a fork storm could drop it on every
/// try, which would look like a kernel without `proc_input`. The listener gets the size it
/// asked for once the probe is answered.
const PROBE_RECV_BUFFER: usize = 1 << 20;

/// Bytes read per datagram (a kernel event datagram is 76 bytes): the largest connector
/// message, as a `Connector` reads by default (so `ProcStream` counts what this counts: each
/// message of a user-space datagram up to this size, one for a longer one, which is
/// counted and skipped).
const RECV_CHUNK: usize = crate::codec::CnMsg::MAX_ENCODED;
/// Datagrams read per system call (`recvmmsg`). The batch's 2 MiB are allocated once; only
/// the pages the kernel writes become resident.
const RECV_BATCH: usize = 32;

const REASON_PID_NS: &str = "this process is outside the initial pid namespace: the kernel \
     ignores LISTEN requests from it, so events arrive only while another process in the \
     initial namespaces listens, and every pid in them is a host pid, not a pid of this namespace";
const REASON_USER_NS: &str = "this process is outside the initial user namespace: the kernel \
     ignores LISTEN requests from it, so events arrive only while another process in the \
     initial namespaces listens, and uids and gids in them are those of the initial namespace";
const REASON_NO_CN_PROC: &str = "the kernel has no proc connector (no cn_proc in \
     /proc/net/connector: it was built without CONFIG_PROC_EVENTS)";
/// `LISTEN` requests sent at most while overflows keep dropping their ACK (a repeated
/// `LISTEN` only replaces the socket's filter on Linux 6.6+, which counts the listener once
/// per socket; before 6.6 each one counts, and one `IGNORE` takes one back).
pub(super) const LISTEN_TRIES: u32 = 3;

/// Whether a request's ACK may have been dropped by an overflow of the receiving socket's
/// queue while it was awaited: taken before the request is sent, asked after the wait.
/// An overrun report is not enough: the kernel reports an overflow once, and then drops
/// everything for the socket without a report until its queue has been read empty, so an
/// ACK that meets a queue still congested from an overflow reported earlier is dropped
/// silently. The kernel's drop counter counts it: a drop since the request was sent means
/// the ACK may be among the drops. One implementation for `ProcListener`, `ProcStream` and
/// `proc::register`.
#[derive(Debug, Clone, Copy)]
pub(super) struct AckWatch {
    overruns: u64,
    drops: Option<u32>,
}

impl AckWatch {
    /// Before the request is sent: the receiver's overruns so far, and the socket's drop
    /// counter.
    pub(super) fn new(sock: &ConnectorSocket, overruns: u64) -> Self {
        Self {
            overruns,
            drops: sock.drops().ok().flatten(),
        }
    }

    /// After a wait that saw no ACK: true when an overrun was reported or the kernel
    /// dropped something for the socket since [`new`](Self::new).
    pub(super) fn ack_may_be_dropped(&self, sock: &ConnectorSocket, overruns: u64) -> bool {
        overruns != self.overruns
            || matches!(
                (self.drops, sock.drops().ok().flatten()),
                (Some(before), Some(now)) if now != before
            )
    }
}
pub(super) const REASON_NO_ACK: &str = "the kernel did not acknowledge LISTEN before the timeout";
const REASON_NO_PROC_INPUT: &str = "kernel-side filtering was required, but this kernel does \
     not understand struct proc_input (Linux 6.6+): use FilterMode::Auto to filter in user \
     space instead";

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    wake: EventFd,
}

/// Stops a [`ProcListener`] or [`ProcChannel`] from another thread (a signal handler thread,
/// for example): its blocked and future `recv` calls return [`Error::Closed`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Requests shutdown and wakes the receiver.
    pub fn shutdown(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        let _ = self.0.wake.wake();
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shutdown(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }
}

/// The receive pipeline, apart from the socket and its buffer.
#[derive(Debug)]
struct Core {
    dec: ProcDecoder,
    pending: Pending,
    /// The `cn_msg.ack` of the ACK being waited for.
    awaiting_ack: Option<u32>,
    /// The error code of that ACK, once it arrived.
    ack_result: Option<u32>,
}

impl Core {
    /// Handles one received datagram. A malformed message is counted and ends the
    /// datagram, as everywhere in cnbus.
    fn datagram(&mut self, d: &[u8], meta: RecvMeta) {
        for m in messages_ref(d) {
            match m {
                Ok(MessageRef::Connector {
                    cn,
                    data,
                    data_offset,
                    ..
                }) => self.message(meta, cn, data, data_offset),
                // Netlink control messages carry no events; a user-space sender's are
                // rejected and counted like its other messages.
                Ok(_) => self.dec.spoofed += u64::from(meta.port != 0),
                Err(e) => self.dec.record_decode_error(meta.port, e),
            }
        }
    }

    fn message(&mut self, meta: RecvMeta, h: CnHeader, data: &[u8], at: usize) {
        let d = self
            .dec
            .decode_parts(meta.port, h.id, h.seq, h.ack, data, at);
        if let Some((ack, err)) = d.ack {
            if self.awaiting_ack == Some(ack) && self.ack_result.is_none() {
                self.ack_result = Some(err);
            }
        }
        for r in d {
            self.pending.push(r);
        }
    }
}

/// A subscription to the proc connector.
///
/// Receives typed [`ProcEvent`](crate::proc::ProcEvent)s, only from the kernel (port 0: user-space senders on group 1
/// are rejected and counted in [`LossStats::spoofed`]), filtered to the chosen
/// [`EventSet`], with losses reported in the stream ([`Received::Lost`]) and in
/// [`stats`](Self::stats). Dropping it sends `IGNORE`, so the kernel's listener count does not
/// leak.
///
/// ```no_run
/// use cnbus::proc::{EventBody, EventSet, ProcListener, Received};
///
/// # fn main() -> cnbus::Result<()> {
/// let mut l = ProcListener::builder()
///     .events(EventSet::EXEC | EventSet::NONZERO_EXIT)
///     .open()?;
/// for r in l.iter() {
///     match r? {
///         Received::Event(ev) => match ev.body {
///             EventBody::Exec { process } => println!("exec {}", process.tgid),
///             EventBody::Exit { process, status, .. } => println!("{} {status}", process.tgid),
///             _ => {}
///         },
///         Received::Lost(loss) => eprintln!("lost: {loss:?}"),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ProcListener {
    sock: ConnectorSocket,
    batch: RecvBatch,
    /// A smaller batch, for a read limited to fewer datagrams than [`RECV_BATCH`].
    small: Option<RecvBatch>,
    core: Core,
    filtering: Filtering,
    shared: Arc<Shared>,
    req_seq: u32,
    ignored: bool,
    warning: Option<&'static str>,
    /// The last read found the socket's queue empty.
    drained: bool,
    /// The socket's kernel drop counter, from its value at open; read after every overrun
    /// and by `stats()`.
    drops: Mutex<DropCounter>,
    /// The witness of user-space multicasts on group 1.
    witness: Option<Witness>,
    /// User-space multicasts on group 1 this socket received.
    foreign: u64,
}

impl ProcListener {
    /// A builder.
    pub fn builder() -> ProcListenerBuilder {
        ProcListenerBuilder::new()
    }

    /// A listener for every event, with the defaults.
    pub fn open() -> Result<ProcListener> {
        ProcListenerBuilder::new().open()
    }

    /// The event set.
    pub fn events(&self) -> EventSet {
        self.core.dec.events
    }

    /// How events are filtered (decided when opening).
    pub fn filtering(&self) -> Filtering {
        self.filtering
    }

    /// The socket's port id. Every request the listener sends to the kernel carries
    /// `cn_msg.ack` = this port id, so its ACKs carry port id + 1.
    pub fn port_id(&self) -> u32 {
        self.sock.port_id()
    }

    /// The receive buffer size the kernel reports (twice what was asked for).
    pub fn recv_buffer(&self) -> Result<usize> {
        self.sock.recv_buffer()
    }

    /// Why events may be missing or carry foreign ids, when the listener was opened outside
    /// the initial namespaces (see [`ProcListenerBuilder::allow_foreign_namespace`]).
    pub fn namespace_warning(&self) -> Option<&'static str> {
        self.warning
    }

    /// A handle that stops this listener from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// The counters so far. Reads the socket's kernel drop counter
    /// ([`LossStats::kernel_drops`]).
    pub fn stats(&self) -> LossStats {
        // This socket's drop counter, then the witness (see `proc::loss::witnessed`).
        let w = witnessed(&self.sock, self.witness.as_ref(), self.foreign, |raw| {
            self.drops.lock().observe(raw)
        });
        LossStats {
            // A failed read (not expected: the socket is ours and open) keeps the last value.
            kernel_drops: w.kernel_drops.or_else(|| self.drops.lock().total()),
            foreign_unaccounted: w.foreign_unaccounted,
            foreign_settled: w.foreign_settled,
            ..self.core.pending.account(self.core.dec.stats())
        }
    }

    /// Updates the drop counter from the socket. A failed read (not expected: the socket is
    /// ours and open) keeps the last value.
    fn read_drops(&self) -> Option<u64> {
        let mut d = self.drops.lock();
        match self.sock.meminfo() {
            Ok(m) => d.observe(m.drops),
            Err(_) => d.total(),
        }
    }

    /// The last decode error of a kernel message, if any (they are counted in
    /// [`LossStats::decode_errors`] and otherwise skipped).
    pub fn last_decode_error(&self) -> Option<DecodeError> {
        self.core.dec.last_decode_error()
    }

    /// Waits for the next event or loss report. Returns [`Error::Closed`] after
    /// [`ShutdownHandle::shutdown`].
    pub fn recv(&mut self) -> Result<Received> {
        loop {
            if let Some(r) = self.recv_timeout(None)? {
                return Ok(r);
            }
        }
    }

    /// Returns what is already received, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Received>> {
        self.recv_timeout(Some(Duration::ZERO))
    }

    /// Waits up to `timeout` (`None`: no limit) for the next event or loss report; `Ok(None)`
    /// when the time ran out.
    pub fn recv_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<Received>> {
        // What is already received, without reading the clock.
        if let Some(r) = self.core.pending.pop() {
            return Ok(Some(r));
        }
        // A timeout too long to add to the clock is no limit (never a panic).
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if let Some(r) = self.core.pending.pop() {
                return Ok(Some(r));
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(Error::Closed);
            }
            // Read first and poll only when the queue is empty: under load, one system call
            // per batch of datagrams. Right after a read found the queue empty, a blocking call polls
            // straight away instead of reading again.
            if (!self.drained || timeout == Some(Duration::ZERO)) && self.fill()? {
                continue;
            }
            let left = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left)
                }
            };
            poll_read(&self.sock, &self.shared.wake, left)?;
            self.drained = false;
        }
    }

    /// An iterator over [`recv`](Self::recv) results; it ends after shutdown.
    pub fn iter(&mut self) -> Iter<'_> {
        Iter { l: self }
    }

    /// Sends `IGNORE` now and returns the final counters (see [`finish`](Self::finish)).
    pub fn close(mut self) -> Result<LossStats> {
        self.send_request(McastOp::Ignore, None)?;
        self.ignored = true;
        Ok(self.finish())
    }

    /// Stops the kernel's events and hands out what had already reached this listener: sends
    /// `IGNORE` (unless sent already), then yields every event and loss report still queued,
    /// in the socket or in the listener, without waiting and whether or not
    /// [`ShutdownHandle::shutdown`] was called. It ends at the first read that finds the
    /// queue empty (user-space multicasts on group 1, which `IGNORE` does not stop, cannot
    /// keep it going: at most `limit` items handed out and datagrams read together; what is
    /// left then counts as [`LossStats::unread`]). Call it after the main loop ended, then
    /// [`finish`](Self::finish): what a tool prints then covers every event that happened
    /// before it stopped, and [`LossStats::unread`] stays 0.
    ///
    /// ```no_run
    /// # use cnbus::proc::{ProcListener, Received};
    /// # fn main() -> cnbus::Result<()> {
    /// let mut events = ProcListener::builder().open()?;
    /// let stop = events.shutdown_handle(); // e.g. moved to a signal-handling thread
    /// # stop.shutdown();
    /// for r in events.iter() {
    ///     // ... until `stop.shutdown()` ends the iteration
    /// #   let _ = r?;
    /// }
    /// for r in events.drain_queued(1 << 20) {
    ///     if let Received::Event(ev) = r {
    ///         println!("{:?}", ev.body);
    ///     }
    /// }
    /// let stats = events.finish();
    /// assert_eq!(stats.unread, 0);
    /// # Ok(()) }
    /// ```
    pub fn drain_queued(&mut self, limit: usize) -> impl Iterator<Item = Received> + '_ {
        if !self.ignored {
            self.ignored = self.send_request(McastOp::Ignore, None).is_ok();
        }
        // Items handed out and datagrams read, together: a datagram that yields nothing (a
        // rejected user-space one) uses up the budget too.
        let mut left = limit;
        std::iter::from_fn(move || loop {
            left = left.checked_sub(1)?;
            if let Some(r) = self.core.pending.pop() {
                return Some(r);
            }
            // An empty queue (or a failed read) ends it. Every datagram read uses up the
            // budget: one is paid for above, the others here.
            match self.fill_max(left + 1) {
                Ok(n) if n > 0 => left -= n - 1,
                _ => return None,
            }
        })
    }

    /// Ends the subscription and returns the final counters: sends `IGNORE` (unless sent
    /// already; the kernel then sends this socket no more events), and reads and discards
    /// what is still queued, undelivered items included ([`LossStats::events`] counts only
    /// what was handed out, [`LossStats::unread`] the events discarded here; use
    /// [`drain_queued`](Self::drain_queued) first to hand them out instead). With the queue read empty, the user-space datagrams the witness
    /// counted are settled ([`LossStats::foreign_settled`]), so the loss figure is exact even
    /// while other processes multicast on group 1. User-space multicasts, which `IGNORE`
    /// does not stop, can keep the queue from being found empty: it tries again, at once and
    /// then after growing pauses, for up to [`SETTLE_TIMEOUT`](super::SETTLE_TIMEOUT); past
    /// it (a flood that leaves no gap), the figure is left a range
    /// ([`LossSource::Bounded`](super::LossSource::Bounded)). Nothing more is received
    /// afterwards.
    pub fn finish(&mut self) -> LossStats {
        self.finish_with(|_| {})
    }

    /// [`finish`](Self::finish), calling `before_read` before each try reads the counters
    /// (tests send a user-space multicast there, as a busy host does at the worst moment).
    fn finish_with(&mut self, mut before_read: impl FnMut(&Self)) -> LossStats {
        if !self.ignored {
            self.ignored = self.send_request(McastOp::Ignore, None).is_ok();
        }
        let mut settling = Settling::new();
        loop {
            self.core.pending.discard();
            // Bounded: a flood of user-space multicasts must not keep one try here.
            let mut n = 0;
            while n < MAX_PENDING {
                match self.fill_max(MAX_PENDING - n) {
                    Ok(k) if k > 0 => n += k,
                    _ => break,
                }
                self.core.pending.discard();
            }
            before_read(self);
            let stats = self.stats();
            if settled_enough(&stats) {
                return stats;
            }
            match settling.retry() {
                Some(pause) if !pause.is_zero() => std::thread::sleep(pause),
                Some(_) => {}
                None => return stats,
            }
        }
    }

    /// Reads one datagram if one is queued. `Ok(false)`: nothing queued.
    fn fill(&mut self) -> Result<bool> {
        self.fill_max(RECV_BATCH).map(|n| n > 0)
    }

    /// Reads the datagrams queued, up to `max` (and [`RECV_BATCH`]) in one system call;
    /// returns how many were read, an overrun report counting as one. `Ok(0)`: nothing
    /// queued.
    fn fill_max(&mut self, max: usize) -> Result<usize> {
        let max = max.min(RECV_BATCH);
        if max == 0 {
            return Ok(0);
        }
        let batch = if max == self.batch.slots() {
            &mut self.batch
        } else {
            // Rare (a nearly spent `drain_queued` budget): a smaller batch of its own.
            if self.small.as_ref().map(RecvBatch::slots) != Some(max) {
                self.small = Some(RecvBatch::new(max, RECV_CHUNK));
            }
            self.small
                .get_or_insert_with(|| RecvBatch::new(max, RECV_CHUNK))
        };
        let r = self.sock.recv_many(batch, true);
        // A short batch means the kernel's last read found the queue empty, or met an
        // error it reports on the next call (which poll reports at once).
        self.drained = matches!(r, Ok(n) if n < max);
        match r {
            Ok(n) => {
                for d in batch.iter() {
                    match d {
                        Ok((bytes, meta)) => {
                            // User-space multicasts on group 1: what the witness counts too.
                            self.foreign += u64::from(meta.port != 0 && meta.group == PROC_GROUP);
                            self.core.datagram(bytes, meta);
                        }
                        // No kernel proc datagram comes near 64 KiB: some user-space sender's.
                        Err(_) => {
                            self.core.dec.spoofed += 1;
                            self.foreign += 1;
                        }
                    }
                }
                Ok(n)
            }
            Err(Error::Overrun { .. }) => {
                self.core.dec.record_overrun();
                let _ = self.read_drops();
                self.core.pending.push(Received::Lost(Loss::Overrun));
                Ok(1)
            }
            Err(e) => Err(e),
        }
    }

    fn send_request(&mut self, op: McastOp, filter: Option<EventSet>) -> Result<u32> {
        let ack = self.sock.port_id();
        let msg = request(op, filter, self.req_seq, ack);
        self.req_seq = self.req_seq.wrapping_add(1);
        let mut d = DatagramBuilder::new(64).with_pid(self.sock.port_id());
        d.push(&msg)?;
        self.sock.send(d.as_bytes(), Dest::Kernel)?;
        Ok(ack.wrapping_add(1))
    }

    /// Sends `LISTEN` and waits for its ACK. `Ok(false)`: no ACK before the timeout. Events
    /// received meanwhile are kept for delivery.
    ///
    /// The ACK travels like an event, so a receive-queue overflow can drop it. When the
    /// socket lost something while no ACK came (an overrun, or a drop the kernel counted:
    /// [`AckWatch`]), the request is sent again, up to [`LISTEN_TRIES`] times.
    fn request_and_wait(&mut self, filter: Option<EventSet>, timeout: Duration) -> Result<bool> {
        for _ in 0..LISTEN_TRIES {
            let watch = AckWatch::new(&self.sock, self.core.dec.overruns);
            if self.request_and_wait_once(filter, timeout)? {
                return Ok(true);
            }
            if !watch.ack_may_be_dropped(&self.sock, self.core.dec.overruns) {
                return Ok(false);
            }
        }
        Ok(false)
    }

    fn request_and_wait_once(
        &mut self,
        filter: Option<EventSet>,
        timeout: Duration,
    ) -> Result<bool> {
        let want = self.send_request(McastOp::Listen, filter)?;
        self.core.awaiting_ack = Some(want);
        self.core.ack_result = None;
        // A timeout too long to add to the clock is no limit (never a panic).
        let deadline = Instant::now().checked_add(timeout);
        let r = loop {
            if let Some(err) = self.core.ack_result {
                break if err == 0 {
                    Ok(true)
                } else {
                    Err(Error::from_io(
                        Op::Request,
                        io::Error::from_raw_os_error(err as i32),
                    ))
                };
            }
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                break Ok(false);
            }
            if let Err(e) = poll_read(&self.sock, &self.shared.wake, left) {
                break Err(e);
            }
        };
        self.core.awaiting_ack = None;
        self.core.ack_result = None;
        r
    }
}

impl Drop for ProcListener {
    fn drop(&mut self) {
        if !self.ignored {
            let _ = self.send_request(McastOp::Ignore, None);
        }
    }
}

/// Iterator returned by [`ProcListener::iter`].
#[derive(Debug)]
pub struct Iter<'a> {
    l: &'a mut ProcListener,
}

impl Iterator for Iter<'_> {
    type Item = Result<Received>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.l.recv() {
            Err(Error::Closed) => None,
            r => Some(r),
        }
    }
}

impl<'a> IntoIterator for &'a mut ProcListener {
    type Item = Result<Received>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}
