//! What a proc receiver reports: [`Received`] (an event or a loss), [`Loss`], and the
//! counters [`LossStats`]; and how a receiver reads the witness and settles its figure at
//! the end ([`witnessed`], [`Settling`]), one implementation for `ProcListener` (and so
//! `ProcChannel`) and `ProcStream`.

use std::time::{Duration, Instant};

use super::event::ProcEvent;
use crate::connector::Witness;
use crate::sys::ConnectorSocket;

/// How long [`ProcListener::finish`](super::ProcListener::finish) (and `ProcStream::finish`,
/// feature `tokio`) keeps trying to settle the loss figure, that is to find the receive
/// queue empty as it reads the counters, while user-space senders (which `IGNORE` does not
/// stop) keep multicasting on group 1. Past it, under a flood that leaves no gap, the figure
/// stays a range ([`LossSource::Bounded`]).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Tries at once before the first pause: a steady sender leaves gaps between its datagrams.
const SETTLE_AT_ONCE: u32 = 4;
/// The longest pause between two tries (the pauses double from 1 ms): a burst passes.
const SETTLE_MAX_PAUSE: Duration = Duration::from_millis(64);

/// The schedule of the tries to settle a receiver's loss figure at its end: a few at once,
/// then after pauses that double up to [`SETTLE_MAX_PAUSE`], until [`SETTLE_TIMEOUT`] has
/// passed since the first. Each receiver waits in its own way (a sleep, tokio's timer).
#[derive(Debug)]
pub(crate) struct Settling {
    start: Instant,
    tries: u32,
}

impl Settling {
    /// Starts the schedule (the first try is due now).
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            tries: 0,
        }
    }

    /// After a try that did not settle: the pause before the next try, or `None` when the
    /// time is up.
    pub(crate) fn retry(&mut self) -> Option<Duration> {
        self.tries += 1;
        let left = SETTLE_TIMEOUT.checked_sub(self.start.elapsed())?;
        if left.is_zero() {
            return None;
        }
        let pause = match self.tries.checked_sub(SETTLE_AT_ONCE) {
            None => Duration::ZERO,
            Some(n) => Duration::from_millis(1 << n.min(6)).min(SETTLE_MAX_PAUSE),
        };
        Some(pause.min(left))
    }
}

/// Items (events and loss reports) a receiver holds between receive and delivery, at most:
/// only while it waits for an ACK can there be more than a few.
pub(crate) const MAX_PENDING: usize = 1 << 16;

/// What a receiver decoded and has not handed out yet, at most [`MAX_PENDING`] items, with
/// the events it never handed out: those a full queue dropped ([`LossStats::dropped`]) and
/// those its end discarded ([`LossStats::unread`]). One implementation for `ProcListener`
/// (and so `ProcChannel`) and `ProcStream`.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    items: std::collections::VecDeque<Received>,
    dropped: u64,
    unread: u64,
}

impl Pending {
    /// Queues `r`; with the queue full, an event is dropped and counted (a loss report
    /// dropped here loses nothing: its loss stays in the counters).
    pub(crate) fn push(&mut self, r: Received) {
        if self.items.len() >= MAX_PENDING {
            self.dropped += u64::from(matches!(r, Received::Event(_)));
        } else {
            self.items.push_back(r);
        }
    }

    /// The oldest item.
    pub(crate) fn pop(&mut self) -> Option<Received> {
        self.items.pop_front()
    }

    /// Items held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Discards every item held; the events among them count as unread.
    pub(crate) fn discard(&mut self) {
        for r in self.items.drain(..) {
            self.unread += u64::from(matches!(r, Received::Event(_)));
        }
    }

    /// An event taken from the queue that its receiver could not hand out after all (a
    /// `ProcChannel` stopped while its consumer was not taking): unread.
    pub(crate) fn unread(&mut self, r: &Received) {
        self.unread += u64::from(matches!(r, Received::Event(_)));
    }

    /// The decoder's counters `dec` as the receiver's: `events` is what was handed out (not
    /// dropped here, not discarded), with `dropped` and `unread`.
    pub(crate) fn account(&self, dec: LossStats) -> LossStats {
        LossStats {
            events: dec.events - self.dropped - self.unread,
            dropped: self.dropped,
            unread: self.unread,
            ..dec
        }
    }
}

/// Tries of [`join_witnessed`] at most.
const JOIN_TRIES: u32 = 16;

/// Joins a receiving socket to group 1 with the witness counting just before and after
/// (`Witness::around`), again while a user-space multicast on group 1 fell between the two
/// counts: the witness then cannot tell whether the socket was a member for it, and the
/// socket's loss figure could never settle. `leave` takes the socket out of the group (a
/// barrier: no multicast reaches it afterwards) and empties its queue (see
/// [`discard_queue`]; nothing was received from it yet) before the next try. At most
/// [`JOIN_TRIES`] tries, one right after the other (the window is a system call wide):
/// under a flood the last witness is kept, unsettleable, and the figure stays a range.
pub(crate) fn join_witnessed<R>(
    mut join: impl FnMut() -> crate::Result<R>,
    mut leave: impl FnMut(R) -> crate::Result<()>,
) -> crate::Result<(Option<Witness>, R)> {
    let mut tries = 1;
    loop {
        let (w, r) = Witness::around(&mut join)?;
        // `unaccounted` reads the witness's queue: what it counts, nothing else.
        let unsound = w
            .as_ref()
            .is_some_and(|w| w.unaccounted(0).is_some_and(|(_, sound)| !sound));
        if !unsound || tries >= JOIN_TRIES {
            return Ok((w, r));
        }
        leave(r)?;
        tries += 1;
    }
}

/// Reads and discards everything queued on `sock` (a socket that has left group 1 and gets
/// nothing else: it ends).
pub(crate) fn discard_queue(sock: &ConnectorSocket) -> crate::Result<()> {
    let mut buf = bytes::BytesMut::with_capacity(128);
    loop {
        buf.clear();
        match sock.recv_max(&mut buf, 128, true) {
            Ok(Some(_)) | Err(crate::Error::Truncated { .. } | crate::Error::Overrun { .. }) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// True when trying to settle `stats` again can change nothing: settled, no witness, or no
/// user-space datagram among the kernel's drops (`foreign_unaccounted == Some(0)`: the
/// figure is exact already).
pub(crate) fn settled_enough(stats: &LossStats) -> bool {
    stats.foreign_settled || matches!(stats.foreign_unaccounted, None | Some(0))
}

/// What a proc receiver reports of its socket's kernel drops: [`LossStats::kernel_drops`],
/// [`LossStats::foreign_unaccounted`] and [`LossStats::foreign_settled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Witnessed {
    pub kernel_drops: Option<u64>,
    pub foreign_unaccounted: Option<u64>,
    pub foreign_settled: bool,
}

/// Reads a receiving socket's kernel drop counter and what the witness says of it.
/// `received`: the user-space multicasts on group 1 the socket's reader took from its
/// queue, all of them read before this call; `observe` turns the socket's raw drop counter
/// into its owner's count (`DropCounter::observe`).
///
/// The order of [`Witness::read`] makes the figure exact. The kernel delivers one
/// multicast to every member of the group in one pass, holding the netlink table for
/// reading, and a membership change waits for every pass under way: a barrier. So:
/// 1. the drop counter, then a barrier: every user-space datagram the socket received or
///    dropped until then has reached the witness too (it visits the members in list order,
///    so without the barrier the socket may have one the witness has not counted yet, and
///    the loss figure would be one too high);
/// 2. the witness, then a barrier: every datagram the witness counted has reached the
///    socket, queued or dropped (without it, one the witness counted may reach the socket
///    after its queue was found empty, and the figure would be one too low, settled);
/// 3. the socket's queue and drop counter: empty, and no drop since step 1, means every
///    datagram the witness counted was received (`received`) or is in the count of step 1,
///    so exactly `foreign_unaccounted` of them are in the drop counter: settled. Otherwise
///    they may still be waiting in it, and the figure is a range; but `Some(0)` still means
///    that none of the counted drops is a user-space datagram (each one dropped by step 1
///    was counted in step 2 and is not in `received`).
///
/// The barriers are skipped when nothing changed since the last barriered reading (see
/// [`Witness::read`]): the figure is exact at every call, mid-run snapshots included.
pub(crate) fn witnessed(
    sock: &ConnectorSocket,
    witness: Option<&Witness>,
    received: u64,
    observe: impl Fn(Option<u32>) -> Option<u64>,
) -> Witnessed {
    let plain = || Witnessed {
        kernel_drops: sock.meminfo().ok().and_then(|m| observe(m.drops)),
        foreign_unaccounted: None,
        foreign_settled: false,
    };
    let Some(w) = witness else {
        return plain();
    };
    let Some(r) = w.read(sock, received, &observe) else {
        return plain();
    };
    let (foreign_unaccounted, foreign_settled) = match w.unaccounted_in(&r) {
        Some((u, sound)) => (Some(u), sound && r.settled),
        None => (None, false),
    };
    Witnessed {
        kernel_drops: r.drops,
        foreign_unaccounted,
        foreign_settled,
    }
}

/// Events that could not be delivered.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "cause", rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loss {
    /// The socket's receive queue overflowed (`ENOBUFS`): the kernel dropped events, and
    /// goes on dropping them until the queue has been read empty. The exact number is the
    /// kernel's drop counter, in [`LossStats::kernel_drops`] (read at this report and at
    /// every [`stats`](super::ProcListener::stats) call); when gap accounting is on, the part of it
    /// that later events reveal also follows as [`Loss::Gap`] reports, per CPU.
    ///
    /// It carries no count because none is exact here: the kernel reports the overflow
    /// once, when the first datagram meets the full queue, and ahead of the datagrams
    /// queued before it; from then on it drops everything that comes for the socket, room
    /// in the queue or not, until a read finds the queue empty. The drops of this overflow
    /// are therefore not over when it is reported (the counter read here is a lower bound
    /// of them, mixed with the tail of the previous overflow), and the kernel's counter
    /// also counts user-space multicasts on group 1 it dropped. The exact figure of the
    /// events lost is [`LossStats::lost`], from a [`stats`](super::ProcListener::stats)
    /// call made after the queue was read empty, and in the final counters
    /// ([`finish`](super::ProcListener::finish)).
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
    /// Messages on the proc group from user-space senders (port id ≠ 0), rejected: netlink
    /// control messages and malformed ones included.
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
    /// [`ProcListener`](super::ProcListener) and `ProcStream` (feature `tokio`) keep in group 1 with the
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
    /// Events that reached this listener but were never handed out, because
    /// [`ProcListener::finish`](super::ProcListener::finish) (or `close`, or the end of a
    /// [`ProcChannel`](super::ProcChannel)) discarded them: not lost by the kernel, and not in
    /// [`events`](Self::events) either. A tool that stops on a signal keeps this at 0 by
    /// handing them out with [`ProcListener::drain_queued`](super::ProcListener::drain_queued)
    /// first; otherwise it should report them.
    #[cfg_attr(feature = "serde", serde(default))]
    pub unread: u64,
    /// Events a [`ProcChannel`](super::ProcChannel)'s reader put into its channel that the
    /// consumer has not taken yet, as of a mid-run [`ProcChannel::stats`](super::ProcChannel::stats)
    /// (they are not in [`events`](Self::events), which counts what the consumer took). 0 in
    /// final figures (what is left in the channel at the end moves to
    /// [`unread`](Self::unread)) and for every other receiver.
    #[cfg_attr(feature = "serde", serde(default))]
    pub queued: u64,
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
    ///
    /// What is counted is proc-connector messages. A listener to every event (with no
    /// kernel filter: [`Filtering::None`](super::Filtering::None) and
    /// [`Filtering::UserSpace`](super::Filtering::UserSpace)) also receives the kernel's
    /// ACKs to every `LISTEN`/`IGNORE` anyone sends; an ACK that meets a full queue counts
    /// here like an event (and in the per-CPU gaps: the kernel numbers ACKs with the events'
    /// per-CPU sequence). Asking the kernel to leave ACKs out (a filter of every event kind
    /// without `PROC_EVENT_ALL` itself) would not help: a filtered ACK still uses up its
    /// sequence number, so every other listener's request would then show as a gap (seen on
    /// Linux 6.18). With a kernel filter ([`Filtering::Kernel`](super::Filtering::Kernel))
    /// ACKs are filtered and the figure is events only.
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
