//! The receive path shared by the dispatcher thread and the async connector: datagrams and
//! receive errors in, messages and events out, every counter kept on the way.

use bytes::{Bytes, BytesMut};

use super::stats::Counters;
use super::{Delivery, Event, Source};
use crate::codec::{messages_ref, CbId, MessageRef};
use crate::error::{Error, Result};
use crate::seq::{SeqTracker, SeqVerdict};
use crate::sys::{ConnectorSocket, RecvMeta};

/// How many withdrawn requests [`Withdrawn`] remembers.
const WITHDRAWN: usize = 256;

/// Requests withdrawn before their reply came (timed out, cancelled), and group requests
/// answered (any other member may reply after the first), the last [`WITHDRAWN`] of them:
/// a reply that comes later goes to the callbacks or the stream as any message, but it
/// carries the requester's seq, not its sender's, so the gap tracker must not count it
/// against the sender's numbered stream (a late reply seemed to lose the replies taken in
/// time between two late ones).
///
/// Every message a receiver tracks is asked about (a late reply may continue its sender's
/// numbered stream exactly, seq one past the last), so the common answer is kept cheap: the
/// id last found in no withdrawn request is remembered until the next [`add`](Self::add)
/// (its [`generation`](Self::generation)), and a message of that id is answered without
/// a look at the requests.
#[derive(Debug, Default)]
pub(crate) struct Withdrawn {
    /// The reply's (id, seq, ack) and the port it may come from (`None`: any).
    keys: std::collections::VecDeque<((CbId, u32, u32), Option<u32>)>,
    /// Bumped by every `add`.
    generation: u64,
    /// An id no request in `keys` has, found at the current generation.
    clear: Option<CbId>,
}

impl Withdrawn {
    /// Remembers the request whose reply has `key` and comes from `from`.
    pub(crate) fn add(&mut self, key: (CbId, u32, u32), from: Option<u32>) {
        if self.keys.len() == WITHDRAWN {
            self.keys.pop_front();
        }
        self.keys.push_back((key, from));
        self.generation += 1;
        self.clear = None;
    }

    /// How many requests were added so far: while it is unchanged, an id
    /// [`clear_of`](Self::clear_of) names stays in no withdrawn request.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// `Some(generation)` when no withdrawn request has `id` (as last found by
    /// [`is_late_reply`](Self::is_late_reply)): no message of `id` is a late reply until
    /// the generation changes.
    pub(crate) fn clear_of(&self, id: CbId) -> Option<u64> {
        (self.clear == Some(id)).then_some(self.generation)
    }

    /// True if `m` is the reply of a withdrawn request; one from a port (a request to a
    /// port has one reply) is forgotten then, a group's is kept for other members' replies.
    pub(crate) fn is_late_reply(&mut self, m: &Delivery<'_>) -> bool {
        if self.keys.is_empty() || self.clear == Some(m.id()) {
            return false;
        }
        let (key, port) = ((m.id(), m.seq(), m.ack()), m.source().port);
        let Some(i) = self
            .keys
            .iter()
            .rposition(|(k, from)| *k == key && from.is_none_or(|f| f == port))
        else {
            if !self.keys.iter().any(|((id, _, _), _)| *id == key.0) {
                self.clear = Some(key.0);
            }
            return false;
        };
        if self.keys[i].1.is_some() {
            self.keys.remove(i);
        }
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Per-receiver state: the sequence-gap tracker.
#[derive(Debug)]
pub(crate) struct Ingest {
    tracker: SeqTracker,
    track_seq: bool,
    /// The tracker's evictions already added to the counters.
    evictions: u64,
    /// The stream of the last message and its seq: the next message of that stream, if
    /// in order, is checked here, and the tracker, which may still hold an older seq of it
    /// (`stale`), is brought up to date once, when another stream comes, instead of
    /// hashing every message.
    run: Option<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    port: u32,
    group: u32,
    id: CbId,
    last: u32,
    stale: bool,
}

impl Ingest {
    pub(crate) fn new(track_seq: bool, streams: usize) -> Self {
        Self {
            tracker: SeqTracker::new(streams),
            track_seq,
            evictions: 0,
            run: None,
        }
    }

    /// Receives one datagram without blocking: `Ok(None)` when none is queued. Every
    /// receive error is counted and turned into the event that reports it; only errors
    /// that are not about the traffic itself come back as `Err`.
    pub(crate) fn recv(
        &mut self,
        socket: &ConnectorSocket,
        buf: &mut BytesMut,
        max: usize,
        c: &Counters,
        event: &mut impl FnMut(Event),
    ) -> Result<Option<(Bytes, RecvMeta)>> {
        buf.reserve(max);
        match socket.recv_max(buf, max, true) {
            Ok(Some(meta)) => Ok(Some((buf.split().freeze(), meta))),
            Ok(None) => {
                c.on_drained(socket);
                Ok(None)
            }
            Err(Error::Overrun { .. }) => {
                Counters::add(&c.overruns, 1);
                let _ = c.read_drops(socket);
                event(Event::Overrun);
                Ok(None)
            }
            Err(Error::Truncated { len, capacity, .. }) => {
                buf.clear();
                Counters::add(&c.truncated, 1);
                Counters::add(&c.proc_group_foreign, 1);
                event(Event::Truncated { len, capacity });
                Ok(None)
            }
            Err(e) => {
                event(Event::RecvFailed { errno: e.errno() });
                Err(e)
            }
        }
    }

    /// Hands the tracker the last seq of the run if it has not seen it (its verdict, a
    /// gap the length of the run, is not one: those messages were checked).
    fn settle(&mut self) {
        if let Some(r) = self.run.take().filter(|r| r.stale) {
            self.tracker.observe(r.port, r.group, r.id, r.last);
        }
    }

    /// Checks one message against its stream's last seq, counting and reporting a gap.
    fn observe<'d>(
        &mut self,
        c: &Counters,
        meta: RecvMeta,
        id: CbId,
        seq: u32,
        sink: &mut impl FnMut(std::result::Result<Delivery<'d>, Event>),
    ) {
        match self.tracker.observe(meta.port, meta.group, id, seq) {
            SeqVerdict::Gap(n) => {
                Counters::add(&c.lost, u64::from(n));
                sink(Err(Event::Lost {
                    port: meta.port,
                    id,
                    count: n,
                }));
            }
            SeqVerdict::Reordered => Counters::add(&c.reordered, 1),
            SeqVerdict::First => {
                let e = self.tracker.evictions();
                if e != self.evictions {
                    Counters::add(&c.tracker_evictions, e - self.evictions);
                    self.evictions = e;
                }
            }
            SeqVerdict::InOrder => {}
        }
    }

    /// Parses one datagram, passing each connector message (`Ok`, a view into `datagram`)
    /// and every fault or loss (`Err`) to `sink`, in the order they occur. Each message is
    /// first offered to `reply`: one it takes (a reply to a waiting request) goes no
    /// further and is no part of its sender's numbered stream (it carries the requester's
    /// seq, not the sender's), so the gap tracker does not see it. Nor does it see a
    /// message `late` says is the reply of a request withdrawn before it came (asked of
    /// every message the tracker would see, since a late reply's seq may continue its
    /// sender's stream; [`Withdrawn`] keeps that cheap); that one goes on to `sink`.
    pub(crate) fn datagram<'d>(
        &mut self,
        c: &Counters,
        datagram: &'d Bytes,
        meta: RecvMeta,
        mut reply: impl FnMut(&Delivery<'d>) -> bool,
        mut late: impl FnMut(&Delivery<'d>) -> bool,
        mut sink: impl FnMut(std::result::Result<Delivery<'d>, Event>),
    ) {
        Counters::add(&c.datagrams, 1);
        Counters::add(&c.bytes, datagram.len() as u64);
        if meta.port != 0 && meta.group == 1 {
            Counters::add(&c.proc_group_foreign, 1);
        }
        let source = Source {
            port: meta.port,
            group: meta.group,
        };
        let mut count = 0u64;
        // Parsed in place; each message is handed on as a view into the datagram.
        for m in messages_ref(datagram) {
            let (cn, data) = match m {
                Ok(MessageRef::Connector { cn, data, .. }) => (cn, data),
                Ok(MessageRef::Error(e)) => {
                    Counters::add(&c.control, 1);
                    sink(Err(Event::NetlinkError {
                        port: meta.port,
                        error: e.error,
                    }));
                    continue;
                }
                Ok(MessageRef::Noop(_)) | Ok(MessageRef::Overrun(_)) => {
                    Counters::add(&c.control, 1);
                    // No event reports them (they carry nothing, and a sender's
                    // `NLMSG_OVERRUN` is no overflow of this socket); a proc receiver
                    // counts a user-space sender's on group 1 as spoofed.
                    if meta.port != 0 && meta.group == 1 {
                        Counters::add(&c.proc_group_control, 1);
                    }
                    continue;
                }
                Err(error) => {
                    Counters::add(&c.decode_errors, 1);
                    sink(Err(Event::Decode {
                        port: meta.port,
                        error,
                    }));
                    break; // the iterator ends after an error anyway
                }
            };
            count += 1;
            let m = Delivery::new(cn, data, datagram, source);
            if reply(&m) {
                continue;
            }
            // A late reply is skipped even when its seq happens to continue its sender's
            // stream (one past the last): it carries the requester's seq.
            if self.track_seq && !source.is_kernel() && !late(&m) {
                match &mut self.run {
                    Some(r)
                        if r.id == cn.id
                            && cn.seq == r.last.wrapping_add(1)
                            && (r.port, r.group) == (meta.port, meta.group) =>
                    {
                        r.last = cn.seq;
                        r.stale = true;
                    }
                    _ => {
                        self.settle();
                        self.observe(c, meta, cn.id, cn.seq, &mut sink);
                        self.run = Some(Run {
                            port: meta.port,
                            group: meta.group,
                            id: cn.id,
                            last: cn.seq,
                            stale: false,
                        });
                    }
                }
            }
            sink(Ok(m));
        }
        Counters::add(&c.messages, count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CnMsg, DatagramBuilder};

    /// The memo of an id no withdrawn request has holds until the next request is added:
    /// then a reply of that id is found again.
    #[test]
    fn an_id_found_clear_is_asked_again_after_a_new_withdrawn_request() {
        let (x, y) = (CbId::new(100, 1), CbId::new(100, 2));
        let owner = Bytes::new();
        let msg = |id: CbId, seq: u32, ack: u32| {
            let cn = crate::codec::CnHeader {
                id,
                seq,
                ack,
                len: 0,
                flags: 0,
            };
            Delivery::new(cn, &[], &owner, Source { port: 7, group: 0 })
        };
        let mut w = Withdrawn::default();
        assert!(!w.is_late_reply(&msg(y, 9, 1)), "nothing withdrawn");
        w.add((x, 4, 1), Some(7));
        assert_eq!(w.clear_of(y), None);
        assert!(!w.is_late_reply(&msg(y, 9, 1)));
        assert_eq!(w.clear_of(y), Some(w.generation()));
        assert!(!w.is_late_reply(&msg(x, 5, 1)), "another seq");
        assert_eq!(w.clear_of(x), None, "x has a withdrawn request");
        w.add((y, 9, 1), Some(7));
        assert_eq!(w.clear_of(y), None, "a new request of y");
        assert!(w.is_late_reply(&msg(y, 9, 1)));
        assert!(w.is_late_reply(&msg(x, 4, 1)));
        assert!(
            !w.is_late_reply(&msg(x, 4, 1)),
            "a port's reply is taken once"
        );
    }

    /// The per-run shortcut of `datagram` reaches the same verdicts as asking the tracker
    /// about every message: same gaps (events, in the same place), same counters, over
    /// interleaved streams, runs that cross datagrams, gaps, repeats and backward jumps;
    /// and with a tracker too small for the streams, the same evictions.
    #[test]
    fn runs_are_checked_as_the_tracker_checks_each_message() {
        runs_match_the_tracker(64);
        runs_match_the_tracker(2);
    }

    fn runs_match_the_tracker(capacity: usize) {
        let ids = [CbId::new(100, 1), CbId::new(100, 2), CbId::new(101, 1)];
        let mut next = [1u32; 3];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (c, mut ingest) = (Counters::default(), Ingest::new(true, capacity));
        let mut reference = SeqTracker::new(capacity);
        let (mut want_lost, mut want_reordered) = (0u64, 0u64);
        for _ in 0..2000 {
            let port = 7 + rnd(2) as u32;
            let meta = RecvMeta {
                len: 0,
                port,
                group: 30,
            };
            let mut d = DatagramBuilder::new(1 << 16);
            let mut want = Vec::new();
            for _ in 0..1 + rnd(40) {
                // Mostly runs of one stream, sometimes another one, a gap or a step back.
                let s = if rnd(8) == 0 { rnd(3) as usize } else { 0 };
                match rnd(16) {
                    0 => next[s] += 1 + rnd(5) as u32,
                    1 => next[s] = next[s].saturating_sub(rnd(3) as u32),
                    _ => {}
                }
                let seq = next[s];
                next[s] += 1;
                d.push(&CnMsg::new(ids[s], &b"x"[..]).with_seq(seq, 0))
                    .unwrap();
                match reference.observe(port, 30, ids[s], seq) {
                    SeqVerdict::Gap(n) => {
                        want_lost += u64::from(n);
                        want.push(Err(n));
                    }
                    SeqVerdict::Reordered => want_reordered += 1,
                    _ => {}
                }
                want.push(Ok(seq));
            }
            let mut got = Vec::new();
            ingest.datagram(
                &c,
                &Bytes::from(d.take()),
                meta,
                |_| false,
                |_| false,
                |item| {
                    got.push(match item {
                        Ok(rx) => Ok(rx.seq()),
                        Err(Event::Lost { count, .. }) => Err(count),
                        Err(e) => panic!("unexpected {e:?}"),
                    })
                },
            );
            assert_eq!(got, want);
        }
        let s = c.snapshot();
        assert_eq!((s.lost, s.reordered), (want_lost, want_reordered));
        assert_eq!(s.tracker_evictions, reference.evictions());
        assert!(want_lost > 0 && want_reordered > 0);
        assert_eq!(reference.evictions() > 0, capacity < 6, "{capacity}");
    }
}
