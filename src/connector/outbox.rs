//! The send side shared by [`ConnectorHandle`](super::ConnectorHandle) and the async
//! connector: id/group policy, framing, batching and send counters.

use std::io::IoSlice;
use std::time::Duration;

use super::stats::{Counters, Stats};
use super::FIRST_USER_GROUP;
use crate::codec::{CbId, CnMsg, DatagramBuilder, CONNECTOR_MAX_MSG_SIZE, NLMSG_HDRLEN};
use crate::error::{Error, Op, Result};
use crate::seq::write_seq;
use crate::sys::{ConnectorSocket, Dest, RoomWait};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct Outbox {
    pub(crate) socket: Arc<ConnectorSocket>,
    pub(crate) counters: Arc<Counters>,
    allow_kernel_ids: bool,
    max_datagram: usize,
}

impl Outbox {
    pub(crate) fn new(
        socket: Arc<ConnectorSocket>,
        counters: Arc<Counters>,
        allow_kernel_ids: bool,
        max_datagram: usize,
    ) -> Self {
        Self {
            socket,
            counters,
            allow_kernel_ids,
            max_datagram,
        }
    }

    /// Takes the next number of `id`'s destination-less sequence from the socket's
    /// numbering.
    pub(crate) fn next_seq(&self, id: CbId) -> u32 {
        self.socket.numbering().lock().next(id)
    }

    /// The counters, with the socket's numbering evictions.
    pub(crate) fn stats(&self) -> Stats {
        let _ = self.counters.read_drops(&self.socket);
        let mut s = self.counters.snapshot();
        s.numbering_evictions = self.socket.numbering_evictions();
        s
    }

    /// Frames `data` on `id` for [`try_send_numbered`](Self::try_send_numbered) (seq 0 for
    /// now), after the policy check, so that a refused message uses no number.
    pub(crate) fn frame_numbered(
        &self,
        id: CbId,
        data: bytes::Bytes,
        dest: Dest,
    ) -> Result<Vec<u8>> {
        self.frame(&CnMsg::new(id, data), dest)
    }

    /// Sends `datagram` (from [`frame_numbered`](Self::frame_numbered)) with the next
    /// number of `id` to `dest` written into it, without waiting: under the socket's numbering lock,
    /// so that numbers follow wire order among everything sending on the socket.
    /// `Ok(None)`: the destination's queue is full, nothing sent and no number used (try
    /// again later, outside any lock). A failed send uses its number, as the bus's do: a
    /// multicast may have reached its members even when the kernel's part of the delivery
    /// fails, and a receiver then counts what did not arrive as lost.
    pub(crate) fn try_send_numbered(
        &self,
        datagram: &mut [u8],
        id: CbId,
        dest: Dest,
    ) -> Result<Option<u32>> {
        self.try_send_numbered_then(datagram, id, dest, |_| Ok(()))
    }

    /// As [`try_send_numbered`](Self::try_send_numbered), calling `before` with the number
    /// just before the datagram goes out, under the numbering lock (a request waits for its
    /// reply from there on); its error ends the call, nothing sent and no number used.
    pub(crate) fn try_send_numbered_then(
        &self,
        datagram: &mut [u8],
        id: CbId,
        dest: Dest,
        before: impl FnOnce(u32) -> Result<()>,
    ) -> Result<Option<u32>> {
        let mut seqs = self.socket.numbering().lock();
        let seq = seqs.peek_to(dest, id);
        if let Some(h) = crate::codec::array_mut::<28>(datagram) {
            write_seq(h, seq);
        }
        before(seq)?;
        let r = self.socket.try_send(datagram, dest);
        if matches!(r, Ok(None)) {
            return Ok(None);
        }
        seqs.next_to(dest, id);
        drop(seqs);
        self.account(&r, 1);
        r.map(|_| Some(seq))
    }

    /// The policy: no multicast on kernel-owned ids or groups unless allowed; nothing over
    /// the kernel's size limit to the kernel.
    pub(crate) fn check(&self, msg: &CnMsg, dest: Dest) -> Result<()> {
        match dest {
            Dest::Group(g)
                if !self.allow_kernel_ids && (msg.id.is_kernel_owned() || g < FIRST_USER_GROUP) =>
            {
                Err(Error::KernelOwned {
                    id: msg.id,
                    group: g,
                })
            }
            d if d.is_kernel() && msg.encoded_len() - NLMSG_HDRLEN > CONNECTOR_MAX_MSG_SIZE => {
                Err(Error::TooLarge {
                    len: msg.encoded_len() - NLMSG_HDRLEN,
                    limit: CONNECTOR_MAX_MSG_SIZE,
                })
            }
            _ => Ok(()),
        }
    }

    /// Frames `msg` alone in a datagram, after the policy check.
    pub(crate) fn frame(&self, msg: &CnMsg, dest: Dest) -> Result<Vec<u8>> {
        self.check(msg, dest)?;
        let mut d = DatagramBuilder::new(msg.encoded_len()).with_pid(self.socket.port_id());
        d.push(msg)?;
        Ok(d.take())
    }

    /// Counts the outcome of sending one datagram of `messages` messages.
    pub(crate) fn account<T>(&self, r: &Result<T>, messages: u64) {
        let c = &self.counters;
        if r.is_ok() {
            Counters::add(&c.sent_datagrams, 1);
            Counters::add(&c.sent_messages, messages);
        } else {
            Counters::add(&c.send_errors, 1);
        }
    }

    pub(crate) fn send(&self, msg: &CnMsg, dest: Dest) -> Result<()> {
        let d = self.frame(msg, dest)?;
        let r = self.socket.send(&d, dest);
        self.account(&r, 1);
        r.map(drop)
    }

    /// Frames `msgs` for one `sendmmsg`, after the policy check: one message per datagram
    /// to the kernel (`Dest::Kernel` or its port, `Dest::Port(0)`), else packed up to
    /// `max_datagram`. Each datagram with its message count.
    pub(crate) fn frame_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<Vec<(Vec<u8>, usize)>> {
        for m in msgs {
            self.check(m, dest)?;
        }
        let pid = self.socket.port_id();
        let mut datagrams: Vec<(Vec<u8>, usize)> = Vec::new();
        if dest.is_kernel() {
            for m in msgs {
                let mut d = DatagramBuilder::new(m.encoded_len()).with_pid(pid);
                d.push(m)?;
                datagrams.push((d.take(), 1));
            }
        } else {
            let mut d = DatagramBuilder::new(self.max_datagram).with_pid(pid);
            for m in msgs {
                if !d.push(m)? {
                    let n = d.count();
                    datagrams.push((d.take(), n));
                    // It fits an empty datagram: push returned Ok(false), not TooLarge.
                    d.push(m)?;
                }
            }
            if !d.is_empty() {
                let n = d.count();
                datagrams.push((d.take(), n));
            }
        }
        Ok(datagrams)
    }

    /// Counts a batch of which the first `sent` datagrams went out (a send error, or fewer
    /// sent than framed, counts one send error); returns the messages sent.
    pub(crate) fn account_batch(&self, datagrams: &[(Vec<u8>, usize)], sent: usize) -> usize {
        let c = &self.counters;
        let msgs_sent: usize = datagrams[..sent].iter().map(|(_, n)| n).sum();
        Counters::add(&c.sent_datagrams, sent as u64);
        Counters::add(&c.sent_messages, msgs_sent as u64);
        if sent < datagrams.len() {
            Counters::add(&c.send_errors, 1);
        }
        msgs_sent
    }

    /// Sends one message without waiting more than `timeout` for room at a full unicast
    /// peer: then [`Error::TimedOut`], counted as a send error.
    pub(crate) fn send_within(&self, msg: &CnMsg, dest: Dest, timeout: Duration) -> Result<()> {
        self.send_within_then(msg, dest, timeout, || {})
    }

    /// As [`send_within`](Self::send_within), calling `before` just before each attempt
    /// to hand the datagram to the kernel (a request reads the socket's drop counter
    /// there: drops while it waited for room are no part of its reply's fate).
    pub(crate) fn send_within_then(
        &self,
        msg: &CnMsg,
        dest: Dest,
        timeout: Duration,
        mut before: impl FnMut(),
    ) -> Result<()> {
        let d = self.frame(msg, dest)?;
        let mut wait = RoomWait::new(timeout);
        loop {
            before();
            let r = self.socket.try_send(&d, dest);
            if !matches!(r, Ok(None)) {
                self.account(&r, 1);
                return r.map(drop);
            }
            if !wait.sleep() {
                return Err(self.timed_out(Op::Send));
            }
        }
    }

    /// As [`send_batch`](Self::send_batch), waiting at most `timeout` for room at a full
    /// unicast peer each time (a peer that keeps reading gets the whole batch): the
    /// messages sent, or [`Error::TimedOut`] when none went out in time.
    pub(crate) fn send_batch_within(
        &self,
        msgs: &[CnMsg],
        dest: Dest,
        timeout: Duration,
    ) -> Result<usize> {
        let datagrams = self.frame_batch(msgs, dest)?;
        let mut wait = RoomWait::new(timeout);
        let (mut sent, mut msgs_sent) = (0, 0);
        while sent < datagrams.len() {
            let slices: Vec<IoSlice<'_>> = datagrams[sent..]
                .iter()
                .map(|(d, _)| IoSlice::new(d))
                .collect();
            match self.socket.try_send_batch(&slices, dest) {
                Ok(0) if wait.sleep() => {}
                Ok(0) if sent == 0 => return Err(self.timed_out(Op::SendBatch)),
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(datagrams.len() - sent);
                    msgs_sent += self.account_batch(&datagrams[sent..sent + n], n);
                    sent += n;
                    wait = RoomWait::new(timeout);
                }
                Err(_) if sent > 0 => break,
                Err(e) => {
                    self.account_batch(&datagrams, 0); // counts the error
                    return Err(e);
                }
            }
        }
        if sent < datagrams.len() {
            Counters::add(&self.counters.send_errors, 1);
        }
        Ok(msgs_sent)
    }

    /// A send that found no room in time: counted as a send error.
    pub(crate) fn timed_out(&self, op: Op) -> Error {
        Counters::add(&self.counters.send_errors, 1);
        Error::TimedOut { op }
    }

    pub(crate) fn send_batch(&self, msgs: &[CnMsg], dest: Dest) -> Result<usize> {
        let datagrams = self.frame_batch(msgs, dest)?;
        let slices: Vec<IoSlice<'_>> = datagrams.iter().map(|(d, _)| IoSlice::new(d)).collect();
        let sent = match self.socket.send_batch(&slices, dest) {
            Ok(n) => n,
            Err(e) => {
                Counters::add(&self.counters.send_errors, 1);
                return Err(e);
            }
        };
        Ok(self.account_batch(&datagrams, sent))
    }
}
