//! Counters of a connector.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::Witness;
use crate::sys::{ConnectorSocket, DropCounter};

/// What the receive path saw at a moment its socket's queue was empty, for the proc
/// registrations' loss figures: the witness's count of user-space multicasts on group 1,
/// the socket's kernel drop count, and the user-space multicasts on group 1 it received.
/// Between two such snapshots, the user-space multicasts the socket did not receive were
/// all dropped (none can be waiting in an empty queue), so the proc events dropped are the
/// drops less those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    pub witness: u64,
    pub drops: u64,
    pub foreign: u64,
}

/// The proc registrations' witness and the last settled snapshot.
#[derive(Debug)]
struct ProcWitness {
    witness: Witness,
    last: Option<Settled>,
    /// Baselines of new registrations, filled by the next snapshot.
    waiting: Vec<Weak<Mutex<Option<Settled>>>>,
}

/// Live counters. Each is a monotonic event count written by one thread (the dispatcher)
/// or by many (senders); snapshots use `Relaxed` loads because each counter is independent
/// and no other memory is published through them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub datagrams: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    pub dispatched: AtomicU64,
    pub delivered: AtomicU64,
    pub unmatched: AtomicU64,
    pub shutdown_discards: AtomicU64,
    pub decode_errors: AtomicU64,
    pub truncated: AtomicU64,
    pub overruns: AtomicU64,
    pub lost: AtomicU64,
    pub reordered: AtomicU64,
    pub callback_panics: AtomicU64,
    pub channel_full: AtomicU64,
    pub replies: AtomicU64,
    pub control: AtomicU64,
    pub sent_messages: AtomicU64,
    pub sent_datagrams: AtomicU64,
    pub send_errors: AtomicU64,
    pub tracker_evictions: AtomicU64,
    /// The socket's kernel drop counter since the connector started (`None` until the
    /// baseline is taken, or when the kernel does not report drops).
    drops: Mutex<Option<DropCounter>>,
    /// User-space multicasts on group 1 received (and datagrams cut for length, whose
    /// sender is unknown): what a proc witness counts too (`proc::Witness`). Not in `Stats`.
    pub proc_group_foreign: AtomicU64,
    /// `NLMSG_NOOP` and `NLMSG_OVERRUN` messages from user-space senders on group 1, which
    /// no [`Event`](super::Event) reports: `ProcStream` counts them as spoofed, as
    /// `ProcListener` does. Not in `Stats` (they are in `control`).
    pub proc_group_control: AtomicU64,
    /// `proc_witness` is set (checked without the lock on every empty read).
    has_proc_witness: AtomicBool,
    proc_witness: Mutex<Option<ProcWitness>>,
}

impl Counters {
    #[inline]
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes the baseline of `socket`'s kernel drop counter: drops before it (a socket handed
    /// over may have some) are not this connector's.
    pub(crate) fn drops_baseline(&self, socket: &ConnectorSocket) {
        *self.drops.lock() = DropCounter::baseline(socket).ok();
    }

    /// Reads `socket`'s kernel drop counter into [`Stats::kernel_drops`]. Called after every
    /// overrun and by every `stats()`. Returns whether the socket's receive queue was empty
    /// (false when the read failed, which is not expected on an open socket: the last value
    /// is kept).
    pub(crate) fn read_drops(&self, socket: &ConnectorSocket) -> bool {
        let Ok(m) = socket.meminfo() else {
            return false;
        };
        self.observe_drops(m.drops);
        m.rmem_alloc == 0
    }

    /// Adds a value of the socket's raw kernel drop counter ([`MemInfo::drops`](crate::sys::MemInfo::drops));
    /// returns the total since the baseline (`None` without one).
    pub(crate) fn observe_drops(&self, raw: Option<u32>) -> Option<u64> {
        self.drops.lock().as_mut().and_then(|d| d.observe(raw))
    }

    /// Attaches the proc registrations' witness (once; `None` when there can be none, see
    /// `proc::Witness`) and returns a baseline slot that the next settled snapshot fills.
    pub(crate) fn proc_baseline(&self) -> Option<Arc<Mutex<Option<Settled>>>> {
        let mut g = self.proc_witness.lock();
        if g.is_none() {
            *g = Some(ProcWitness {
                witness: Witness::standalone()?,
                last: None,
                waiting: Vec::new(),
            });
            self.has_proc_witness.store(true, Ordering::Release);
        }
        let slot = Arc::new(Mutex::new(None));
        g.as_mut()?.waiting.push(Arc::downgrade(&slot));
        Some(slot)
    }

    /// The last settled snapshot.
    pub(crate) fn proc_settled(&self) -> Option<Settled> {
        self.proc_witness.lock().as_ref()?.last
    }

    /// Called by the receive path (its only reader) each time it finds `socket`'s queue
    /// empty: with a proc witness attached, takes a settled snapshot, exact: the socket's
    /// drop counter, the witness and the queue are read in the order of `Witness::read`
    /// (with membership barriers whenever a user-space multicast or a drop came since its
    /// last barriered reading), so a multicast under way cannot make it one off.
    pub(crate) fn on_drained(&self, socket: &ConnectorSocket) {
        if !self.has_proc_witness.load(Ordering::Acquire) {
            return;
        }
        let mut g = self.proc_witness.lock();
        let Some(pw) = g.as_mut() else { return };
        // Only this thread adds to it, and it is not reading now.
        let foreign = self.proc_group_foreign.load(Ordering::Relaxed);
        let Some(r) = pw
            .witness
            .read(socket, foreign, |raw| self.observe_drops(raw))
        else {
            return;
        };
        let (true, Some(drops)) = (r.settled, r.drops) else {
            return;
        };
        let s = Settled {
            witness: r.witness,
            drops,
            foreign,
        };
        pw.last = Some(s);
        for slot in pw.waiting.drain(..) {
            if let Some(slot) = slot.upgrade() {
                *slot.lock() = Some(s);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            datagrams: g(&self.datagrams),
            messages: g(&self.messages),
            bytes: g(&self.bytes),
            dispatched: g(&self.dispatched),
            delivered: g(&self.delivered),
            unmatched: g(&self.unmatched),
            shutdown_discards: g(&self.shutdown_discards),
            decode_errors: g(&self.decode_errors),
            truncated: g(&self.truncated),
            overruns: g(&self.overruns),
            lost: g(&self.lost),
            reordered: g(&self.reordered),
            callback_panics: g(&self.callback_panics),
            channel_full: g(&self.channel_full),
            replies: g(&self.replies),
            control: g(&self.control),
            sent_messages: g(&self.sent_messages),
            sent_datagrams: g(&self.sent_datagrams),
            send_errors: g(&self.send_errors),
            // Filled in from the socket by `Outbox::stats`.
            numbering_evictions: 0,
            tracker_evictions: g(&self.tracker_evictions),
            kernel_drops: self.drops.lock().as_ref().and_then(DropCounter::total),
        }
    }
}

/// A snapshot of a connector's counters.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Datagrams received.
    pub datagrams: u64,
    /// Connector messages decoded from them. Each lands in exactly one of `replies`,
    /// `delivered`, `unmatched` and `shutdown_discards`: once the receive path has finished
    /// the datagram it is reading (between datagrams; after `shutdown`),
    /// `messages == replies + delivered + unmatched + shutdown_discards`.
    pub messages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Callback invocations that completed (one message may reach several callbacks; a
    /// panicked one is in `callback_panics`). Always 0 for the async connector, which has
    /// no callbacks: see `delivered`.
    pub dispatched: u64,
    /// Messages handed to at least one callback, which completed or panicked (the async
    /// connector: messages queued for its stream): one per message, however many
    /// callbacks it reached. A message a full pull channel then refused, or the async
    /// stream's full queue dropped, is counted here and in `channel_full`.
    pub delivered: u64,
    /// Messages no registration matched (and no request awaited).
    pub unmatched: u64,
    /// Messages read but neither delivered nor looked up because the connector was shutting
    /// down: the rest of the datagram being delivered when `shutdown` (or the drop of the
    /// last `Connector`) began. (Datagrams still queued then are not read, so in no count.)
    pub shutdown_discards: u64,
    /// Malformed messages (each ends its datagram; see `codec::messages`).
    pub decode_errors: u64,
    /// Datagrams longer than the receive buffer, cut and dropped.
    pub truncated: u64,
    /// Receive-queue overflows reported by the kernel (`ENOBUFS`): each is one or more
    /// dropped datagrams; their exact number is in `kernel_drops`.
    pub overruns: u64,
    /// Messages known lost: the sum of sequence gaps from cnbus peers.
    pub lost: u64,
    /// Sequence numbers that went backwards or repeated (peer restart or unnumbered
    /// sender): not counted as loss.
    pub reordered: u64,
    /// Callbacks that panicked (caught; the dispatcher went on).
    pub callback_panics: u64,
    /// Messages a channel registration could not take because its channel was full.
    pub channel_full: u64,
    /// Messages consumed as replies to [`request`](super::ConnectorHandle::request). (An
    /// async request dropped after its reply was read but before it took it leaves the
    /// reply to the stream; it stays counted here, not in `delivered`.)
    pub replies: u64,
    /// Netlink control messages (`NLMSG_ERROR`, `NOOP`, `OVERRUN`) received.
    pub control: u64,
    /// Messages sent.
    pub sent_messages: u64,
    /// Datagrams sent.
    pub sent_datagrams: u64,
    /// Failed sends.
    pub send_errors: u64,
    /// `(destination, id)` sequences the socket's numbering forgot because it was full (see
    /// [`ConnectorBuilder::numbered_ids`](super::ConnectorBuilder::numbered_ids)); shared
    /// by everything sending on the socket. A forgotten one starts again at 1.
    pub numbering_evictions: u64,
    /// `(port, group, idx, val)` streams the gap tracker forgot because it was full (see
    /// [`ConnectorBuilder::tracked_streams`](super::ConnectorBuilder::tracked_streams)).
    /// While this and the senders' `numbering_evictions` are 0, `lost` is exact.
    pub tracker_evictions: u64,
    /// Datagrams the kernel dropped for this connector's socket because its receive queue was
    /// full, since the connector started: the socket's `sk_drops` counter
    /// ([`ConnectorSocket::drops`]), read after every overrun and by every `stats()` call.
    /// Exact, in datagrams, whoever sent them: the counter belongs to the socket, so it
    /// covers every group and every user of this connector (a datagram of a numbered peer
    /// also shows up later as a gap in `lost`, in messages; one at the end of a stream, or
    /// from an unnumbered sender or the kernel, shows only here). `None` when the kernel does
    /// not report it.
    pub kernel_drops: Option<u64>,
}
