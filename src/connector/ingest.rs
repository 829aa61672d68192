//! The receive path shared by the dispatcher thread and the async connector: datagrams and
//! receive errors in, messages and events out, every counter kept on the way.

use bytes::{Bytes, BytesMut};

use super::stats::Counters;
use super::{Event, Incoming, Source};
use crate::codec::{messages, Message};
use crate::error::{Error, Result};
use crate::seq::{SeqTracker, SeqVerdict};
use crate::sys::{ConnectorSocket, RecvMeta};

/// Per-receiver state: the sequence-gap tracker.
#[derive(Debug)]
pub(crate) struct Ingest {
    tracker: SeqTracker,
    track_seq: bool,
    /// The tracker's evictions already added to the counters.
    evictions: u64,
}

impl Ingest {
    pub(crate) fn new(track_seq: bool, streams: usize) -> Self {
        Self {
            tracker: SeqTracker::new(streams),
            track_seq,
            evictions: 0,
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

    /// Parses one datagram, passing each connector message (`Ok`) and every fault or loss
    /// (`Err`) to `sink`, in the order they occur.
    pub(crate) fn datagram(
        &mut self,
        c: &Counters,
        datagram: Bytes,
        meta: RecvMeta,
        mut sink: impl FnMut(std::result::Result<Incoming, Event>),
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
        for m in messages(datagram) {
            let cm = match m {
                Ok(Message::Connector(cm)) => cm,
                Ok(Message::Error(e)) => {
                    Counters::add(&c.control, 1);
                    sink(Err(Event::NetlinkError {
                        port: meta.port,
                        error: e.error,
                    }));
                    continue;
                }
                Ok(Message::Noop(_)) | Ok(Message::Overrun(_)) => {
                    Counters::add(&c.control, 1);
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
            Counters::add(&c.messages, 1);
            let msg = cm.msg;
            if self.track_seq && !source.is_kernel() {
                match self.tracker.observe(meta.port, meta.group, msg.id, msg.seq) {
                    SeqVerdict::Gap(n) => {
                        Counters::add(&c.lost, u64::from(n));
                        sink(Err(Event::Lost {
                            port: meta.port,
                            id: msg.id,
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
            sink(Ok(Incoming { msg, source }));
        }
    }
}
