//! [`ProcListener`]: subscribing to the proc connector and receiving typed events, with
//! kernel- or user-space filtering, loss accounting and a clean `IGNORE` on drop.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam::channel::{self, Receiver, SendTimeoutError, Sender};
use parking_lot::Mutex;

use super::event::{request, EventBody, EventSet, McastOp, ProcEvent};
use super::seq::{CpuSeqTracker, SeqCheck};
use crate::codec::{messages_ref, CbId, CnHeader, DatagramBuilder, MessageRef};
use crate::error::{DecodeError, Error, Op, Result};
use crate::sys::{
    kernel_at_least, namespace_report, poll_read, ConnectorSocket, Dest, DropCounter, EventFd,
    RecvMeta,
};

/// The receive buffer a listener asks for by default: 16 MiB (the kernel doubles it for its
/// bookkeeping). At roughly 1 KiB of kernel memory per queued event that is room for tens of
/// thousands of events while the reader is descheduled.
pub const DEFAULT_RECV_BUFFER: usize = 16 << 20;

/// Default wait for the kernel's ACK to `LISTEN`. The kernel answers synchronously, inside
/// the `sendto`, so the ACK is normally queued before the wait begins.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// The multicast group of the proc connector.
const PROC_GROUP: u32 = 1;
/// Bytes read per `recv` (a kernel event datagram is 76 bytes).
const RECV_CHUNK: usize = 64 << 10;
/// Events held between receive and delivery (only while waiting for an ACK can there be more
/// than a few).
const MAX_PENDING: usize = 1 << 16;

const REASON_PID_NS: &str = "this process is outside the initial pid namespace: the kernel \
     ignores LISTEN requests from it, so events arrive only while another process in the \
     initial namespaces listens, and every pid in them is a host pid, not a pid of this namespace";
const REASON_USER_NS: &str = "this process is outside the initial user namespace: the kernel \
     ignores LISTEN requests from it, so events arrive only while another process in the \
     initial namespaces listens, and uids and gids in them are those of the initial namespace";
const REASON_NO_CN_PROC: &str = "the kernel has no proc connector (no cn_proc in \
     /proc/net/connector: it was built without CONFIG_PROC_EVENTS)";
pub(super) const REASON_NO_ACK: &str = "the kernel did not acknowledge LISTEN before the timeout";
const REASON_NO_PROC_INPUT: &str = "kernel-side filtering was required, but this kernel does \
     not understand struct proc_input (Linux 6.6+): use FilterMode::Auto to filter in user \
     space instead";

/// Where the listener's event set is applied.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FilterMode {
    /// In the kernel when it can (Linux 6.6+ `proc_input`, detected at run time), else in
    /// user space.
    #[default]
    Auto,
    /// In the kernel; opening fails on kernels without `proc_input`.
    Kernel,
    /// In user space: the kernel sends everything and the listener drops what was not asked
    /// for. Costs more CPU, but keeps exact gap accounting.
    UserSpace,
}

/// How the listener ended up filtering.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Subscribed to every event: nothing to filter.
    None,
    /// The kernel filters; sequence-gap accounting is disabled.
    Kernel,
    /// The kernel sends everything and the listener filters.
    UserSpace,
}

/// Events that could not be delivered.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "cause", rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loss {
    /// The socket's receive queue overflowed (`ENOBUFS`): the kernel dropped events, and
    /// goes on dropping them until the queue has been read empty. The exact number is the
    /// kernel's drop counter, in [`LossStats::kernel_drops`] (read at this report and at
    /// every [`stats`](ProcListener::stats) call); when gap accounting is on, the part of it
    /// that later events reveal also follows as [`Loss::Gap`] reports, per CPU.
    Overrun,
    /// `count` events of CPU `cpu` never arrived (a per-CPU sequence gap).
    Gap {
        /// The CPU whose sequence jumped.
        cpu: u32,
        /// Events lost.
        count: u32,
    },
}

/// What a listener receives: an event, or a report of lost events at that point in the
/// stream.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Received {
    /// An event that matched the listener's event set.
    Event(ProcEvent),
    /// Events were lost here.
    Lost(Loss),
}

/// Counters of a listener: what it delivered, what was lost, what it rejected.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LossStats {
    /// Events delivered.
    pub events: u64,
    /// `ENOBUFS` reports (receive-queue overflows; each covers one or more lost events).
    pub overruns: u64,
    /// Events lost according to per-CPU sequence gaps: exact when `Some`. `None` when gap
    /// accounting is disabled (the kernel filters, so gaps are expected).
    pub seq_lost: Option<u64>,
    /// `(cpu, lost)` for each CPU with gaps.
    pub lost_per_cpu: Vec<(u32, u64)>,
    /// Sequence numbers that went backwards (duplicates or a restarted counter).
    pub seq_backwards: u64,
    /// Messages on the proc group from user-space senders (port id ≠ 0), rejected.
    pub spoofed: u64,
    /// Kernel messages that did not decode.
    pub decode_errors: u64,
    /// Events the kernel sent that the user-space filter dropped.
    pub filtered: u64,
    /// Events dropped by the listener itself because its internal queue was full.
    pub dropped: u64,
    /// Datagrams the kernel dropped for this listener's socket because its receive queue was
    /// full, since the socket was opened: the socket's `sk_drops` counter
    /// ([`ConnectorSocket::drops`](crate::sys::ConnectorSocket::drops)), read after every
    /// overrun and by every `stats()` call. One proc event is one datagram, and the kernel
    /// counts only what it actually sent to this socket (a kernel-side filter applies before
    /// it), so this is exactly the number of events this socket lost, including those at the
    /// end of a run that no later sequence number reveals. `None` when the kernel does not
    /// report it, or for a receive path that does not own its socket (see
    /// [`ProcRegistration::stats`](super::ProcRegistration::stats)).
    ///
    /// The kernel cannot tell a user-space multicast on group 1 from an event: such a
    /// datagram dropped while the queue was full counts here too (had it arrived, it would
    /// have been rejected as [`spoofed`](Self::spoofed)); see
    /// [`foreign_unaccounted`](Self::foreign_unaccounted).
    pub kernel_drops: Option<u64>,
    /// User-space datagrams multicast on group 1 while this socket was a member that it did
    /// not receive (so the kernel may have counted them in
    /// [`kernel_drops`](Self::kernel_drops)): counted by a witness socket that
    /// [`ProcListener`] and [`ProcStream`](super::ProcStream) keep in group 1 with the
    /// kernel's events switched off (`IGNORE`), so that it receives exactly the user-space
    /// multicasts. `Some(0)`: no user-space datagram can be in `kernel_drops`, which then
    /// counts lost events exactly. `None`: no witness (kernels before 6.6; a witness that
    /// could not be read; a [`ProcRegistration`](super::ProcRegistration) before its
    /// connector's dispatcher found the queue empty, or after a drop since it last did): the
    /// kernel's figure is then exact only where the per-CPU gaps account for all of it.
    pub foreign_unaccounted: Option<u64>,
    /// True when this socket's receive queue was empty as the counters were read (after the
    /// witness): none of the [`foreign_unaccounted`](Self::foreign_unaccounted) datagrams
    /// can still be waiting in it, so all of them are in
    /// [`kernel_drops`](Self::kernel_drops), and the difference is exactly the lost events.
    pub foreign_settled: bool,
}

/// How [`LossStats::lost`] knows its figure.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossSource {
    /// The kernel's drop counter of the socket ([`LossStats::kernel_drops`]): exact, in every
    /// filter mode, the end of the run included.
    KernelCounter,
    /// Per-CPU sequence gaps, with no overrun reported: exact (nothing was dropped for a full
    /// queue; a gap then means the kernel failed to build a message).
    SequenceNumbers,
    /// No drop counter and no overrun, with a kernel filter: nothing was lost.
    NoOverrun,
    /// Not exact, but bounded: the kernel's drop counter exceeds the sequence gaps, and
    /// user-space senders multicast on group 1 during the run ([`LossStats::spoofed`] > 0).
    /// The kernel counts their datagrams dropped for a full queue alike, so the lost
    /// events are between [`LossStats::lost_at_least`] (the gaps) and
    /// [`LossStats::lost_at_most`] (the counter).
    Bounded,
    /// Overruns happened and this receive path has no drop counter: the sequence gaps, if
    /// tracked, miss the events lost at the end of each CPU's stream, so
    /// [`LossStats::lost_at_least`] is only a lower bound.
    Unknown,
}

impl LossStats {
    /// The number of lost events when it is exact, `None` when it is not known exactly (see
    /// [`lost_source`](Self::lost_source), [`lost_at_least`](Self::lost_at_least) and
    /// [`lost_at_most`](Self::lost_at_most)).
    ///
    /// With the kernel's drop counter (every listener that owns its socket, on Linux 4.13+)
    /// it is that counter, whatever the filter mode: a loss at the end of a run, which no
    /// later sequence number reveals, is included. The counter counts user-space multicasts
    /// on group 1 dropped with the events too; those are taken out when the witness knows
    /// them ([`foreign_unaccounted`](Self::foreign_unaccounted),
    /// [`foreign_settled`](Self::foreign_settled)), and otherwise the figure is not exact.
    /// Where per-CPU gaps are tracked too and exceed it (the kernel failed to build a
    /// message, which it does not count as a drop), the larger figure is taken. Events the
    /// listener itself dropped ([`dropped`](Self::dropped)) are added.
    pub fn lost(&self) -> Option<u64> {
        match self.lost_source() {
            LossSource::Bounded | LossSource::Unknown => None,
            _ => Some(self.lost_at_least()),
        }
    }

    /// A lower bound of the lost events, equal to [`lost`](Self::lost) when that is `Some`.
    pub fn lost_at_least(&self) -> u64 {
        let gaps = self.seq_lost.unwrap_or(0);
        let events = match (self.kernel_drops, self.foreign_unaccounted) {
            // At most `u` of the counted drops were user-space datagrams.
            (Some(k), Some(u)) => k.saturating_sub(u),
            (Some(k), None) if self.lost_source() == LossSource::KernelCounter => k,
            _ => 0,
        };
        events.max(gaps) + self.dropped
    }

    /// An upper bound of the lost events, when one is known (with the kernel's drop
    /// counter, or when the figure is exact).
    pub fn lost_at_most(&self) -> Option<u64> {
        if self.lost_source() == LossSource::KernelCounter {
            return self.lost();
        }
        match self.kernel_drops {
            Some(k) => Some(k.max(self.seq_lost.unwrap_or(0)) + self.dropped),
            None => self.lost(),
        }
    }

    /// Where the figure of [`lost`](Self::lost) comes from, and whether it is exact.
    pub fn lost_source(&self) -> LossSource {
        match (self.kernel_drops, self.seq_lost) {
            (Some(k), g) => {
                let clean = match self.foreign_unaccounted {
                    Some(u) => u == 0 || self.foreign_settled,
                    // Without a witness, user-space datagrams the socket never saw may be
                    // in the count (a spoofer's datagrams that met a full queue).
                    None => false,
                };
                if clean || k <= g.unwrap_or(0) {
                    LossSource::KernelCounter
                } else {
                    LossSource::Bounded
                }
            }
            _ if self.overruns > 0 => LossSource::Unknown,
            (None, Some(_)) => LossSource::SequenceNumbers,
            (None, None) => LossSource::NoOverrun,
        }
    }
}

/// The witness of user-space multicasts on group 1: a socket in group 1 that sent
/// `IGNORE` before joining, so the kernel sends it none of its events (its filter applies
/// before delivery) while user-space multicasts, which no filter stops, all reach it. What it
/// receives and drops is every user-space datagram on group 1; the receiving socket got some
/// of them, and the rest may be in its kernel drop counter.
///
/// Reading order makes the count sound: the witness is read first, then the receiving
/// socket's counter and queue. A user-space datagram sent in between is in neither count,
/// or waits in the receiving queue (not empty: not settled), or was dropped from a full
/// queue (again not empty). The owner must be the only reader of the receiving socket.
#[derive(Debug)]
pub(crate) struct Witness {
    sock: ConnectorSocket,
    drops: Mutex<DropCounter>,
    /// User-space datagrams received.
    seen: Mutex<u64>,
    /// The count just before the receiving socket joined.
    base: u64,
    /// No user-space datagram reached the witness while the receiving socket joined (else
    /// it cannot tell whether the receiving socket was a member for it: never settled).
    sound: bool,
}

impl Witness {
    /// Opens a witness and runs `join` (the receiving socket joining group 1) between two
    /// of its counts. No witness (`None`) on kernels before 6.6, which count a socket's first
    /// `IGNORE` as a listener leaving (it would lower the kernel's listener count), or when
    /// the witness cannot be set up; `join`'s error is returned as is.
    pub(crate) fn around<R>(join: impl FnOnce() -> Result<R>) -> Result<(Option<Self>, R)> {
        let Some(mut w) = Self::open() else {
            return join().map(|r| (None, r));
        };
        let before = w.total();
        let r = join()?;
        let after = w.total();
        Ok(match (before, after) {
            (Some(b), Some(a)) => {
                w.base = b;
                w.sound = a == b;
                (Some(w), r)
            }
            _ => (None, r),
        })
    }

    /// A witness for a receive path that takes its own baselines (with [`count`](Self::count))
    /// at moments its socket's queue is empty (the connector's dispatcher).
    #[cfg(not(cnbus_loom))]
    pub(crate) fn standalone() -> Option<Self> {
        Self::open()
    }

    /// The user-space datagrams on group 1 it received or dropped since it was opened.
    #[cfg(not(cnbus_loom))]
    pub(crate) fn count(&self) -> Option<u64> {
        self.total()
    }

    fn open() -> Option<Self> {
        if !kernel_at_least(6, 6) {
            return None;
        }
        let sock = ConnectorSocket::open().ok()?;
        sock.set_recv_buffer(1 << 20, true).ok()?;
        let mut d = DatagramBuilder::new(64).with_pid(sock.port_id());
        d.push(&request(McastOp::Ignore, None, 0, sock.port_id()))
            .ok()?;
        sock.send(d.as_bytes(), Dest::Kernel).ok()?;
        sock.join(PROC_GROUP).ok()?;
        let drops = Mutex::new(DropCounter::baseline(&sock).ok()?);
        Some(Self {
            sock,
            drops,
            seen: Mutex::new(0),
            base: 0,
            sound: false,
        })
    }

    /// Reads everything queued; returns the user-space datagrams seen plus those it lost,
    /// or `None` if it cannot tell.
    fn total(&self) -> Option<u64> {
        let mut buf = BytesMut::with_capacity(128);
        loop {
            buf.clear();
            match self.sock.recv_max(&mut buf, 128, true) {
                Ok(Some(meta)) if meta.port != 0 => *self.seen.lock() += 1,
                Ok(Some(_)) => {}
                // No kernel proc datagram comes near 128 bytes: a user-space one.
                Err(Error::Truncated { .. }) => *self.seen.lock() += 1,
                // What it dropped is in its drop counter.
                Err(Error::Overrun { .. }) => {}
                Ok(None) => break,
                Err(_) => return None,
            }
        }
        let lost = self.drops.lock().update(&self.sock).ok().flatten()?;
        Some(*self.seen.lock() + lost)
    }

    /// The user-space datagrams on group 1 since the receiving socket joined that it did
    /// not receive (`received`: the ones it did), and whether that count can settle. Read
    /// it before the receiving socket's counter and queue.
    pub(crate) fn unaccounted(&self, received: u64) -> Option<(u64, bool)> {
        let since = self.total()?.checked_sub(self.base)?;
        Some((since.saturating_sub(received), self.sound))
    }
}

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

/// Configures and opens a [`ProcListener`].
#[derive(Debug, Clone)]
pub struct ProcListenerBuilder {
    events: EventSet,
    recv_buffer: usize,
    mode: FilterMode,
    ack_timeout: Duration,
    acks: bool,
    allow_foreign_ns: bool,
}

impl Default for ProcListenerBuilder {
    fn default() -> Self {
        Self {
            events: EventSet::ALL,
            recv_buffer: DEFAULT_RECV_BUFFER,
            mode: FilterMode::Auto,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            acks: false,
            allow_foreign_ns: false,
        }
    }
}

impl ProcListenerBuilder {
    /// A builder for every event, a [`DEFAULT_RECV_BUFFER`] buffer and automatic filtering.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events to receive (default [`EventSet::ALL`]).
    pub fn events(mut self, events: EventSet) -> Self {
        self.events = events;
        self
    }

    /// The receive buffer to ask for, in bytes (default [`DEFAULT_RECV_BUFFER`]). Set with
    /// `SO_RCVBUFFORCE` when permitted (root), which ignores `net.core.rmem_max`; else with
    /// `SO_RCVBUF`, capped by it.
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.recv_buffer = bytes;
        self
    }

    /// Where to filter (default [`FilterMode::Auto`]).
    pub fn filter_mode(mut self, mode: FilterMode) -> Self {
        self.mode = mode;
        self
    }

    /// How long to wait for the kernel's ACK to `LISTEN` (default [`DEFAULT_ACK_TIMEOUT`]).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Also deliver the kernel's ACKs (to this and other sockets' requests) as events of kind
    /// [`Ack`](super::EventKind::Ack). The kernel sends ACKs only to sockets subscribed to
    /// every event, and the listener follows that rule in user space too. Default off.
    pub fn include_acks(mut self, on: bool) -> Self {
        self.acks = on;
        self
    }

    /// Outside the initial pid or user namespace the kernel ignores `LISTEN`, and opening
    /// fails with [`Error::ProcConnector`] saying so. With this on, the listener opens anyway
    /// (it then hears events only while another process listens, and they carry host ids)
    /// and [`ProcListener::namespace_warning`] says why.
    pub fn allow_foreign_namespace(mut self, on: bool) -> Self {
        self.allow_foreign_ns = on;
        self
    }

    /// Opens the socket, joins the proc group, and subscribes.
    ///
    /// Filtering is chosen at run time. For a strict subset of events with
    /// [`FilterMode::Auto`] or [`FilterMode::Kernel`] on a kernel whose release is 6.6 or
    /// later, the listener first sends the 8-byte `proc_input` `LISTEN` for *all* events: a
    /// kernel that understands `proc_input` acknowledges it (and an older one ignores it
    /// silently), so the ACK proves support. It then sends the real filter, without waiting:
    /// the kernel never sends an ACK to a filtered socket. Without that proof (an older
    /// kernel, or no ACK), `Auto` falls back to the classic 4-byte `LISTEN` and filters in
    /// user space with the kernel's own rules ([`EventSet::matches`]).
    pub fn open(self) -> Result<ProcListener> {
        let events = EventSet::from_bits_truncate(self.events.bits());
        if events.is_empty() {
            return Err(Error::InvalidArgument("the event set is empty"));
        }
        let ns = namespace_report();
        if ns.initial_net == Some(false) {
            return Err(Error::NoKernelConnector { op: Op::Send });
        }
        let foreign = if ns.initial_pid == Some(false) {
            Some(REASON_PID_NS)
        } else if ns.initial_user == Some(false) {
            Some(REASON_USER_NS)
        } else {
            None
        };
        if let (Some(reason), false) = (foreign, self.allow_foreign_ns) {
            return Err(Error::ProcConnector { reason });
        }
        let sock = ConnectorSocket::open()?;
        let drops = Mutex::new(DropCounter::baseline(&sock)?);
        sock.set_recv_buffer(self.recv_buffer, true)?;
        // The witness counts the user-space multicasts on group 1 from this socket's join.
        let (witness, ()) = if foreign.is_none() {
            Witness::around(|| sock.join(PROC_GROUP))?
        } else {
            (None, sock.join(PROC_GROUP)?)
        };
        let want_filter = !events.is_all();
        let mut l = ProcListener {
            sock,
            buf: BytesMut::with_capacity(RECV_CHUNK),
            core: Core {
                dec: ProcDecoder::new(events, true).with_acks(self.acks),
                pending: VecDeque::new(),
                dropped: 0,
                awaiting_ack: None,
                ack_result: None,
            },
            filtering: if want_filter {
                Filtering::UserSpace
            } else {
                Filtering::None
            },
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                wake: EventFd::new()?,
            }),
            req_seq: 0,
            ignored: false,
            warning: foreign,
            drained: false,
            drops,
            witness,
            foreign: 0,
            discarded: 0,
        };
        if foreign.is_some() {
            // The kernel drops the request; sending it costs nothing and keeps Drop simple.
            l.send_request(McastOp::Listen, None)?;
            return Ok(l);
        }
        let try_kernel = want_filter
            && match self.mode {
                FilterMode::UserSpace => false,
                FilterMode::Kernel => true,
                FilterMode::Auto => kernel_at_least(6, 6),
            };
        if try_kernel {
            if l.request_and_wait(Some(EventSet::ALL), self.ack_timeout)? {
                l.send_request(McastOp::Listen, Some(events))?;
                l.filtering = Filtering::Kernel;
                l.core.dec.seq = None;
                return Ok(l);
            }
            if self.mode == FilterMode::Kernel {
                return Err(Error::ProcConnector {
                    reason: REASON_NO_PROC_INPUT,
                });
            }
        }
        if !l.request_and_wait(None, self.ack_timeout)? {
            let has_cn_proc = std::fs::read_to_string("/proc/net/connector")
                .map(|s| s.lines().any(|l| l.starts_with("cn_proc")))
                .unwrap_or(true);
            return Err(Error::ProcConnector {
                reason: if has_cn_proc {
                    REASON_NO_ACK
                } else {
                    REASON_NO_CN_PROC
                },
            });
        }
        Ok(l)
    }
}

/// The decoding half of a listener, for any receive path: checks the sender, decodes,
/// tracks per-CPU sequence gaps, applies the event set with the kernel's rules, and counts.
///
/// [`ProcListener`] uses it on its own socket. A callback registered for [`CbId::PROC`] on a
/// [`Connector`](crate::connector::Connector) can use it the same way (the connector's
/// `Event::Overrun` then goes to [`record_overrun`](Self::record_overrun), and `LISTEN` /
/// `IGNORE` are sent with [`request`](super::request)):
///
/// ```no_run
/// use cnbus::connector::Connector;
/// use cnbus::proc::{EventSet, ProcDecoder, Received};
/// use cnbus::CbId;
///
/// # fn main() -> cnbus::Result<()> {
/// let bus = Connector::builder().spawn()?;
/// let _group = bus.subscribe(1)?;
/// let mut dec = ProcDecoder::new(EventSet::ALL, true);
/// let _reg = bus.register(CbId::PROC, move |r| {
///     for item in dec.decode(r.source.port, &r.msg) {
///         match item {
///             Received::Event(ev) => println!("{:?}", ev.body),
///             Received::Lost(loss) => eprintln!("lost {loss:?}"),
///         }
///     }
/// });
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ProcDecoder {
    events: EventSet,
    acks: bool,
    seq: Option<CpuSeqTracker>,
    delivered: u64,
    overruns: u64,
    spoofed: u64,
    decode_errors: u64,
    filtered: u64,
    last_decode_error: Option<DecodeError>,
}

/// What [`ProcDecoder::decode`] made of one message. Iterating yields the loss report (if
/// any) and then the event (if it passed the filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decoded {
    /// Events lost just before this message: a per-CPU sequence gap.
    pub lost: Option<Loss>,
    /// The event, when it came from the kernel and passed the event set.
    pub event: Option<ProcEvent>,
    /// A kernel ACK carried by this message, delivered or not: `(cn_msg.ack, err)`.
    pub ack: Option<(u32, u32)>,
}

impl IntoIterator for Decoded {
    type Item = Received;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<Received>, 2>>;

    fn into_iter(self) -> Self::IntoIter {
        [
            self.lost.map(Received::Lost),
            self.event.map(Received::Event),
        ]
        .into_iter()
        .flatten()
    }
}

impl ProcDecoder {
    /// A decoder delivering `events` (ACKs only with [`EventSet::ALL`] and
    /// [`with_acks`](Self::with_acks)). `track_gaps`: count per-CPU sequence gaps as lost
    /// events; turn it off when the kernel filters what this socket receives, since the
    /// filtered events leave gaps too.
    pub fn new(events: EventSet, track_gaps: bool) -> Self {
        Self {
            events,
            acks: false,
            seq: track_gaps.then(CpuSeqTracker::new),
            delivered: 0,
            overruns: 0,
            spoofed: 0,
            decode_errors: 0,
            filtered: 0,
            last_decode_error: None,
        }
    }

    /// Also deliver ACKs as events (when the event set is [`EventSet::ALL`], as the kernel).
    pub fn with_acks(mut self, on: bool) -> Self {
        self.acks = on;
        self
    }

    /// The event set.
    pub fn events(&self) -> EventSet {
        self.events
    }

    /// Decodes one connector message received from port id `port`. Messages not from the
    /// kernel (port ≠ 0) are counted as spoofed; messages for other ids are ignored; data
    /// that does not decode is counted.
    pub fn decode(&mut self, port: u32, msg: &crate::codec::CnMsg) -> Decoded {
        self.decode_parts(port, msg.id, msg.seq, msg.ack, &msg.data, 0)
    }

    /// Records an `ENOBUFS` (receive-queue overflow) seen by the receive path.
    pub fn record_overrun(&mut self) {
        self.overruns += 1;
    }

    /// Records a malformed datagram from port id `port` (counted as spoofed when a
    /// user-space port sent it).
    pub fn record_decode_error(&mut self, port: u32, e: DecodeError) {
        if port != 0 {
            self.spoofed += 1;
        } else {
            self.decode_errors += 1;
            self.last_decode_error = Some(e);
        }
    }

    /// The counters. `dropped` is always 0 here (the decoder queues nothing).
    pub fn stats(&self) -> LossStats {
        let seq = self.seq.as_ref();
        LossStats {
            events: self.delivered,
            overruns: self.overruns,
            seq_lost: seq.map(CpuSeqTracker::lost),
            lost_per_cpu: seq.map(CpuSeqTracker::lost_per_cpu).unwrap_or_default(),
            seq_backwards: seq.map(CpuSeqTracker::backwards).unwrap_or(0),
            spoofed: self.spoofed,
            decode_errors: self.decode_errors,
            filtered: self.filtered,
            dropped: 0,
            kernel_drops: None,
            foreign_unaccounted: None,
            foreign_settled: false,
        }
    }

    /// The last decode error of a kernel message.
    pub fn last_decode_error(&self) -> Option<DecodeError> {
        self.last_decode_error
    }

    fn decode_parts(
        &mut self,
        port: u32,
        id: CbId,
        seq: u32,
        ack: u32,
        data: &[u8],
        at: usize,
    ) -> Decoded {
        let mut out = Decoded::default();
        if port != 0 {
            // Only the kernel sends from port 0: a user-space process multicasting on the
            // proc group.
            self.spoofed += 1;
            return out;
        }
        if id != CbId::PROC {
            return out;
        }
        let mut ev = match ProcEvent::parse_at(data, at) {
            Ok(ev) => ev,
            Err(e) => {
                self.record_decode_error(port, e);
                return out;
            }
        };
        ev.seq = seq;
        ev.ack = ack;
        if let Some(t) = &mut self.seq {
            if let SeqCheck::Gap(count) = t.observe(ev.cpu, ev.seq) {
                out.lost = Some(Loss::Gap { cpu: ev.cpu, count });
            }
        }
        if let EventBody::Ack { err } = ev.body {
            out.ack = Some((ack, err));
            if !self.acks || !self.events.matches(&ev) {
                return out;
            }
        } else if !self.events.matches(&ev) {
            self.filtered += 1;
            return out;
        }
        self.delivered += 1;
        out.event = Some(ev);
        out
    }
}

/// The receive pipeline, apart from the socket and its buffer.
#[derive(Debug)]
struct Core {
    dec: ProcDecoder,
    pending: VecDeque<Received>,
    dropped: u64,
    /// The `cn_msg.ack` of the ACK being waited for.
    awaiting_ack: Option<u32>,
    /// The error code of that ACK, once it arrived.
    ack_result: Option<u32>,
}

impl Core {
    fn push(&mut self, r: Received) {
        if self.pending.len() >= MAX_PENDING {
            self.dropped += 1;
        } else {
            self.pending.push_back(r);
        }
    }

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
                Ok(_) => {} // netlink control messages carry no events
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
            self.push(r);
        }
    }
}

/// A subscription to the proc connector.
///
/// Receives typed [`ProcEvent`]s, only from the kernel (port 0: user-space senders on group 1
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
    buf: BytesMut,
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
    /// Events decoded but discarded by `finish` (never handed out).
    discarded: u64,
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
        // The witness first, then this socket (see `Witness`).
        let foreign = self
            .witness
            .as_ref()
            .and_then(|w| w.unaccounted(self.foreign));
        let (kernel_drops, empty) = self.read_drops();
        let dec = self.core.dec.stats();
        LossStats {
            events: dec.events - self.discarded,
            dropped: self.core.dropped,
            kernel_drops,
            foreign_unaccounted: foreign.map(|f| f.0),
            foreign_settled: foreign.is_some_and(|f| f.1) && empty,
            ..dec
        }
    }

    /// Updates the drop counter from the socket, and says whether its receive queue is
    /// empty. A failed read (not expected: the socket is ours and open) keeps the last value
    /// and says "not empty".
    fn read_drops(&self) -> (Option<u64>, bool) {
        let mut d = self.drops.lock();
        match self.sock.meminfo() {
            Ok(m) => (d.observe(m.drops), m.rmem_alloc == 0),
            Err(_) => (d.total(), false),
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
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.core.pending.pop_front() {
                return Ok(Some(r));
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(Error::Closed);
            }
            // Read first and poll only when the queue is empty: under load, one system call
            // per datagram. Right after a read found the queue empty, a blocking call polls
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

    /// Ends the subscription and returns the final counters: sends `IGNORE` (unless sent
    /// already; the kernel then sends this socket no more events), and reads and discards
    /// what is still queued, undelivered items included ([`LossStats::events`] counts only
    /// what was handed out). With the queue read empty, the user-space datagrams the witness
    /// counted are settled ([`LossStats::foreign_settled`]), so the loss figure is exact even
    /// while other processes multicast on group 1. Nothing more is received afterwards.
    pub fn finish(&mut self) -> LossStats {
        if !self.ignored {
            self.ignored = self.send_request(McastOp::Ignore, None).is_ok();
        }
        let mut stats = self.stats();
        // User-space multicasts still arrive after IGNORE: a few tries to find the queue
        // empty as the counters are read.
        for _ in 0..4 {
            self.discard_pending();
            // Bounded: a flood of user-space multicasts (which IGNORE does not stop) must
            // not keep it here.
            let mut n = 0;
            while n < MAX_PENDING && matches!(self.fill(), Ok(true)) {
                self.discard_pending();
                n += 1;
            }
            stats = self.stats();
            if stats.foreign_settled || stats.foreign_unaccounted.is_none() {
                break;
            }
        }
        stats
    }

    fn discard_pending(&mut self) {
        for r in self.core.pending.drain(..) {
            self.discarded += u64::from(matches!(r, Received::Event(_)));
        }
    }

    /// Moves the listener to a reader thread that forwards what it receives into a bounded
    /// channel of `capacity` items. When the consumer falls behind, the reader waits, the
    /// socket's queue fills, and the kernel's drops are reported as losses like any other.
    pub fn into_channel(self, capacity: usize) -> Result<ProcChannel> {
        let shutdown = self.shutdown_handle();
        let filtering = self.filtering;
        let stats = Arc::new(Mutex::new(self.stats()));
        let (tx, rx) = channel::bounded(capacity.max(1));
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("cnbus-proc".into())
            .spawn(move || reader(self, tx, st))
            .map_err(|e| Error::from_io(Op::Spawn, e))?;
        Ok(ProcChannel {
            rx,
            shutdown,
            stats,
            filtering,
            thread: Some(thread),
        })
    }

    /// Reads one datagram if one is queued. `Ok(false)`: nothing queued.
    fn fill(&mut self) -> Result<bool> {
        self.buf.clear();
        self.buf.reserve(RECV_CHUNK);
        let r = self.sock.recv(&mut self.buf, true);
        self.drained = matches!(r, Ok(None));
        match r {
            Ok(Some(meta)) => {
                // User-space multicasts on group 1: what the witness counts too.
                self.foreign += u64::from(meta.port != 0 && meta.group == PROC_GROUP);
                self.core.datagram(&self.buf[..meta.len], meta);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(Error::Overrun { .. }) => {
                self.core.dec.record_overrun();
                let _ = self.read_drops();
                self.core.push(Received::Lost(Loss::Overrun));
                Ok(true)
            }
            // No kernel proc datagram comes near 64 KiB: some user-space sender's.
            Err(Error::Truncated { .. }) => {
                self.core.dec.spoofed += 1;
                self.foreign += 1;
                Ok(true)
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
    /// The ACK travels like an event, so a receive-queue overflow can drop it. When an
    /// overrun was seen and no ACK came, the request is sent again (a repeated `LISTEN` only
    /// replaces the socket's filter; the kernel counts the listener once), up to 3 times.
    fn request_and_wait(&mut self, filter: Option<EventSet>, timeout: Duration) -> Result<bool> {
        for _ in 0..3 {
            let overruns = self.core.dec.overruns;
            if self.request_and_wait_once(filter, timeout)? {
                return Ok(true);
            }
            if self.core.dec.overruns == overruns {
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
        let deadline = Instant::now() + timeout;
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Ok(false);
            }
            if let Err(e) = poll_read(&self.sock, &self.shared.wake, Some(left)) {
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

fn reader(mut l: ProcListener, tx: Sender<Result<Received>>, stats: Arc<Mutex<LossStats>>) {
    let mut since = 0u32;
    'run: loop {
        let item = match l.recv_timeout(Some(Duration::from_millis(200))) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                *stats.lock() = l.stats();
                continue;
            }
            Err(Error::Closed) => break,
            Err(e) => Err(e),
        };
        let fatal = item.is_err();
        since += 1;
        if fatal || since >= 64 || matches!(item, Ok(Received::Lost(_))) {
            *stats.lock() = l.stats();
            since = 0;
        }
        let mut item = item;
        loop {
            match tx.send_timeout(item, Duration::from_millis(100)) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(back)) => {
                    if l.shared.stop.load(Ordering::Relaxed) {
                        break 'run;
                    }
                    item = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => break 'run,
            }
        }
        if fatal {
            break;
        }
    }
    // IGNORE, and the queue read empty: the final, settled figures.
    *stats.lock() = l.finish();
}

/// A [`ProcListener`] running on its own thread, feeding a bounded channel (see
/// [`ProcListener::into_channel`]). Dropping it stops the thread, which sends `IGNORE`.
#[derive(Debug)]
pub struct ProcChannel {
    rx: Receiver<Result<Received>>,
    shutdown: ShutdownHandle,
    stats: Arc<Mutex<LossStats>>,
    filtering: Filtering,
    thread: Option<JoinHandle<()>>,
}

impl ProcChannel {
    /// The channel, for `select!` and friends. A fatal receive error arrives as an `Err`
    /// item, after which the channel disconnects.
    pub fn receiver(&self) -> &Receiver<Result<Received>> {
        &self.rx
    }

    /// Waits for the next item; [`Error::Closed`] once the reader has stopped.
    pub fn recv(&self) -> Result<Received> {
        self.rx.recv().map_err(|_| Error::Closed)?
    }

    /// Waits up to `timeout`; `Ok(None)` when it ran out.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r.map(Some),
            Err(channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(channel::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// How events are filtered.
    pub fn filtering(&self) -> Filtering {
        self.filtering
    }

    /// The reader's counters, as of its last update (every 64 items, every loss, and every
    /// 200 ms of quiet).
    pub fn stats(&self) -> LossStats {
        self.stats.lock().clone()
    }

    /// A handle that stops the reader.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the reader (which sends `IGNORE` and reads the queue empty, see
    /// [`ProcListener::finish`]) and returns the final counters.
    pub fn close(mut self) -> LossStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProcChannel {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CnMsg;

    /// `lost()` is `Some` only when the figure is exact, in every combination of sources.
    #[test]
    fn lost_is_exact_only_when_it_is() {
        let base = LossStats {
            overruns: 1,
            ..LossStats::default()
        };
        // No drop counter: gaps miss the tail after an overrun; without an overrun they
        // are exact; with a kernel filter and no overrun nothing was lost.
        let gaps = LossStats {
            seq_lost: Some(5),
            ..base.clone()
        };
        assert_eq!(
            (gaps.lost(), gaps.lost_source()),
            (None, LossSource::Unknown)
        );
        assert_eq!(gaps.lost_at_least(), 5);
        let quiet = LossStats {
            overruns: 0,
            ..gaps.clone()
        };
        assert_eq!(quiet.lost(), Some(5));
        let filtered = LossStats::default();
        assert_eq!(
            (filtered.lost(), filtered.lost_source()),
            (Some(0), LossSource::NoOverrun)
        );
        // The kernel counter with a witness that saw no user-space datagram: exact, the
        // tail included (9 > 5 gaps), in every filter mode.
        let k = LossStats {
            kernel_drops: Some(9),
            foreign_unaccounted: Some(0),
            ..gaps.clone()
        };
        assert_eq!(
            (k.lost(), k.lost_source()),
            (Some(9), LossSource::KernelCounter)
        );
        let kf = LossStats {
            seq_lost: None,
            ..k.clone()
        };
        assert_eq!(kf.lost(), Some(9));
        // User-space datagrams may be in the count: a range until they are settled...
        let unsettled = LossStats {
            foreign_unaccounted: Some(3),
            ..k.clone()
        };
        assert_eq!(unsettled.lost(), None);
        assert_eq!(unsettled.lost_source(), LossSource::Bounded);
        assert_eq!(
            (unsettled.lost_at_least(), unsettled.lost_at_most()),
            (6, Some(9))
        );
        // ...then exact, without them.
        let settled = LossStats {
            foreign_settled: true,
            ..unsettled.clone()
        };
        assert_eq!(settled.lost(), Some(6));
        assert_eq!(settled.lost_at_most(), Some(6));
        // No witness: exact only where the gaps account for the whole counter.
        let blind = LossStats {
            foreign_unaccounted: None,
            ..k.clone()
        };
        assert_eq!((blind.lost(), blind.lost_at_least()), (None, 5));
        let covered = LossStats {
            kernel_drops: Some(5),
            ..blind.clone()
        };
        assert_eq!(covered.lost(), Some(5));
        // The listener's own drops are added.
        let own = LossStats { dropped: 2, ..k };
        assert_eq!(own.lost(), Some(11));
    }

    fn msg(what: u32, cpu: u32, seq: u32, body: &[u32]) -> CnMsg {
        let mut d = Vec::new();
        d.extend_from_slice(&what.to_ne_bytes());
        d.extend_from_slice(&cpu.to_ne_bytes());
        d.extend_from_slice(&7u64.to_ne_bytes());
        for w in body {
            d.extend_from_slice(&w.to_ne_bytes());
        }
        d.resize(40, 0);
        CnMsg::new(CbId::PROC, d).with_seq(seq, 0)
    }

    #[test]
    fn decoder_checks_sender_gaps_filter_and_acks() {
        let mut dec = ProcDecoder::new(EventSet::NONZERO_EXIT, true);
        // Spoofed: counted, nothing delivered, not part of the sequence.
        assert_eq!(
            dec.decode(77, &msg(1, 0, 500, &[1, 1, 2, 2])),
            Decoded::default()
        );
        assert!(dec.decode(0, &msg(1, 0, 10, &[1, 1, 2, 2])).event.is_none());
        // A zero exit is filtered; a non-zero one after a gap of 2 is delivered after the
        // loss report.
        assert!(dec
            .decode(0, &msg(0x8000_0000, 0, 11, &[5, 5, 0, 17]))
            .event
            .is_none());
        let items: Vec<Received> = dec
            .decode(0, &msg(0x8000_0000, 0, 14, &[6, 6, 0x100, 17]))
            .into_iter()
            .collect();
        assert!(matches!(
            items[..],
            [
                Received::Lost(Loss::Gap { cpu: 0, count: 2 }),
                Received::Event(_)
            ]
        ));
        // ACKs are reported for matching but not delivered to a filtered set.
        let mut ack = msg(0, 1, 3, &[0]);
        ack.ack = 42;
        let d = dec.decode(0, &ack);
        assert_eq!(d.ack, Some((42, 0)));
        assert!(d.event.is_none());
        // Garbage from the kernel is counted as a decode error.
        let mut bad = msg(3, 0, 15, &[]);
        bad.data = bad.data.slice(..8);
        assert_eq!(dec.decode(0, &bad), Decoded::default());
        let s = dec.stats();
        assert_eq!(
            (s.events, s.spoofed, s.filtered, s.decode_errors, s.seq_lost),
            (1, 1, 2, 1, Some(2))
        );
        assert!(dec.last_decode_error().is_some());
        // Without gap tracking, no gap is reported and the count is unknown after an overrun.
        let mut k = ProcDecoder::new(EventSet::ALL, false).with_acks(true);
        k.decode(0, &msg(1, 0, 1, &[1, 1, 2, 2]));
        let d = k.decode(0, &msg(1, 0, 9, &[1, 1, 3, 3]));
        assert!(d.lost.is_none() && d.event.is_some());
        assert!(k.decode(0, &ack).event.is_some(), "ACKs delivered with ALL");
        k.record_overrun();
        assert_eq!(k.stats().lost(), None);
    }
}
