//! [`ProcDecoder`]: the decoding half of a proc receiver, shared by [`ProcListener`](super::ProcListener),
//! [`proc::register`](super::register) and the async [`ProcStream`](crate::tokio::ProcStream).

use super::event::{EventBody, EventSet, ProcEvent};
use super::seq::{CpuSeqTracker, SeqCheck};
use crate::codec::CbId;
use crate::error::DecodeError;

use super::loss::{Loss, LossStats, Received};

/// The decoding half of a listener, for any receive path: checks the sender, decodes,
/// tracks per-CPU sequence gaps, applies the event set with the kernel's rules, and counts.
///
/// [`ProcListener`](super::ProcListener) uses it on its own socket. A callback registered for [`CbId::PROC`] on a
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
/// let conn = Connector::builder().spawn()?;
/// let _group = conn.subscribe(1)?;
/// let mut dec = ProcDecoder::new(EventSet::ALL, true);
/// let _reg = conn.register(CbId::PROC, move |r| {
///     for item in dec.decode(r.source().port, &r.to_incoming().msg) {
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
    pub(super) events: EventSet,
    acks: bool,
    pub(super) seq: Option<CpuSeqTracker>,
    delivered: u64,
    pub(super) overruns: u64,
    pub(super) spoofed: u64,
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
            unread: 0,
            queued: 0,
        }
    }

    /// The last decode error of a kernel message.
    pub fn last_decode_error(&self) -> Option<DecodeError> {
        self.last_decode_error
    }

    pub(super) fn decode_parts(
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
