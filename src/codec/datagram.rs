//! Datagrams: iterating over the messages of a received datagram, and packing messages
//! into one for sending.
//!
//! (Over 600 lines with its unit tests, about 420 without: reading and writing a datagram
//! are tested against each other here.)

use bytes::Bytes;

use super::connector::{CnHeader, CnMsg, CnMsgBuffer, CN_MSG_HDRLEN};
use super::netlink::{
    nlmsg_align, NlHeader, NlmsgBuffer, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP,
    NLMSG_OVERRUN,
};
use crate::codec::{DecodeError, DecodeErrorKind, TooLarge};

/// A connector message as received, with the netlink header it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorMessage {
    /// The netlink header (type is `NLMSG_DONE` for well-behaved senders).
    pub nl: NlHeader,
    /// The connector message; its data is a slice of the datagram.
    pub msg: CnMsg,
    /// Offset of the netlink header within the datagram.
    pub offset: usize,
}

/// An `NLMSG_ERROR` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlError {
    /// Its netlink header.
    pub nl: NlHeader,
    /// The error code as the kernel writes it: a negative errno, or 0 for an ACK.
    pub error: i32,
    /// The header of the message that caused it, when present.
    pub request: Option<NlHeader>,
}

/// One message of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A connector message (`NLMSG_DONE`, the only type the connector uses for data).
    Connector(ConnectorMessage),
    /// `NLMSG_ERROR`.
    Error(NlError),
    /// `NLMSG_NOOP`.
    Noop(NlHeader),
    /// `NLMSG_OVERRUN`: the sender says data was lost.
    Overrun(NlHeader),
}

/// One message of a datagram, viewed in place: what [`messages_ref`] yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRef<'a> {
    /// A connector message (`NLMSG_DONE`).
    Connector {
        /// Its netlink header.
        nl: NlHeader,
        /// Its connector header.
        cn: CnHeader,
        /// The `cn.len` data bytes.
        data: &'a [u8],
        /// Offset of the netlink header within the datagram.
        offset: usize,
        /// Offset of `data` within the datagram.
        data_offset: usize,
    },
    /// `NLMSG_ERROR`.
    Error(NlError),
    /// `NLMSG_NOOP`.
    Noop(NlHeader),
    /// `NLMSG_OVERRUN`: the sender says data was lost.
    Overrun(NlHeader),
}

/// Iterates over the messages of a borrowed datagram, without copying or reference
/// counting: the views borrow `datagram`.
///
/// The iterator checks every length before reading a field, yields `Err` for the first
/// malformed message and then ends. It never panics and always terminates: each step
/// advances by at least one aligned header.
pub fn messages_ref(datagram: &[u8]) -> MessagesRef<'_> {
    MessagesRef {
        buf: datagram,
        pos: 0,
        failed: false,
    }
}

/// Iterator returned by [`messages_ref`].
#[derive(Debug, Clone)]
pub struct MessagesRef<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> MessagesRef<'a> {
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The common case, checked and decoded in one step: a whole `NLMSG_DONE` message at
    /// `pos` (`nlmsg_len` at least both headers and within the buffer, `cn_msg.len` within
    /// `nlmsg_len`). `None` for anything else, which [`next_message`](Self::next_message)
    /// then checks field by field and reports. Accepts exactly what it accepts.
    #[inline(always)]
    fn next_connector(&mut self) -> Option<MessageRef<'a>> {
        const HDRS: usize = NLMSG_HDRLEN + CN_MSG_HDRLEN;
        let base = self.pos;
        let rest = self.buf.get(base..)?;
        let h: &[u8; HDRS] = rest.first_chunk()?;
        let word = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let half = |at: usize| u16::from_ne_bytes([h[at], h[at + 1]]);
        let len = word(0) as usize;
        let dlen = usize::from(half(NLMSG_HDRLEN + 16));
        if half(4) != NLMSG_DONE || len < HDRS || len > rest.len() || dlen > len - HDRS {
            return None;
        }
        let data = rest.get(HDRS..HDRS + dlen)?;
        // Progress as in `next_message`: len >= 36, so the position strictly increases.
        self.pos = base.saturating_add(nlmsg_align(len)).min(self.buf.len());
        Some(MessageRef::Connector {
            nl: NlHeader {
                len: word(0),
                ty: NLMSG_DONE,
                flags: half(6),
                seq: word(8),
                pid: word(12),
            },
            cn: CnHeader {
                id: super::CbId::new(word(16), word(20)),
                seq: word(24),
                ack: word(28),
                len: half(32),
                flags: half(34),
            },
            data,
            offset: base,
            data_offset: base + HDRS,
        })
    }

    #[cold]
    #[inline(never)]
    fn next_message(&mut self) -> Result<MessageRef<'a>, DecodeError> {
        let base = self.pos;
        let nl = NlmsgBuffer::checked_at(&self.buf[base..], base)?;
        let header = nl.header();
        // Invariant: len >= NLMSG_HDRLEN (checked), so the position strictly increases.
        self.pos = base
            .saturating_add(nlmsg_align(header.len as usize))
            .min(self.buf.len());
        let payload_at = base + NLMSG_HDRLEN;
        match header.ty {
            NLMSG_NOOP => Ok(MessageRef::Noop(header)),
            NLMSG_OVERRUN => Ok(MessageRef::Overrun(header)),
            NLMSG_ERROR => {
                let p = nl.payload();
                if p.len() < 4 {
                    return Err(DecodeError::new(
                        payload_at,
                        DecodeErrorKind::ShortError { payload: p.len() },
                    ));
                }
                Ok(MessageRef::Error(NlError {
                    nl: header,
                    error: i32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
                    request: NlHeader::parse(&p[4..]),
                }))
            }
            NLMSG_DONE => {
                let payload = &self.buf[payload_at..base + header.len as usize];
                let cn = CnMsgBuffer::checked_at(payload, payload_at)?;
                Ok(MessageRef::Connector {
                    nl: header,
                    cn: cn.header(),
                    data: &payload[CN_MSG_HDRLEN..CN_MSG_HDRLEN + usize::from(cn.header().len)],
                    offset: base,
                    data_offset: payload_at + CN_MSG_HDRLEN,
                })
            }
            // The connector frames every data message as NLMSG_DONE, in both directions;
            // anything else is not a connector message and is not guessed at.
            ty => Err(DecodeError::new(
                base + 4,
                DecodeErrorKind::UnknownValue {
                    what: "nlmsg_type",
                    value: u32::from(ty),
                },
            )),
        }
    }
}

impl<'a> Iterator for MessagesRef<'a> {
    type Item = Result<MessageRef<'a>, DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        if let Some(m) = self.next_connector() {
            return Some(Ok(m));
        }
        let r = self.next_message();
        self.failed = r.is_err();
        Some(r)
    }
}

impl std::iter::FusedIterator for MessagesRef<'_> {}

/// Iterates over the messages of `datagram`, yielding owned messages whose data are
/// [`Bytes`] slices of the datagram (no copy). The same checks and guarantees as
/// [`messages_ref`], which it is built on.
pub fn messages(datagram: Bytes) -> Messages {
    Messages {
        buf: datagram,
        pos: 0,
        failed: false,
    }
}

/// Iterator returned by [`messages`].
#[derive(Debug, Clone)]
pub struct Messages {
    buf: Bytes,
    pos: usize,
    failed: bool,
}

impl Messages {
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
}

impl Iterator for Messages {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut view = MessagesRef {
            buf: &self.buf,
            pos: self.pos,
            failed: self.failed,
        };
        let item = view.next();
        (self.pos, self.failed) = (view.pos, view.failed);
        Some(item?.map(|m| {
            match m {
                MessageRef::Connector {
                    nl,
                    cn,
                    offset,
                    data_offset,
                    ..
                } => Message::Connector(ConnectorMessage {
                    nl,
                    msg: CnMsg {
                        id: cn.id,
                        seq: cn.seq,
                        ack: cn.ack,
                        flags: cn.flags,
                        data: self
                            .buf
                            .slice(data_offset..data_offset + usize::from(cn.len)),
                    },
                    offset,
                }),
                MessageRef::Error(e) => Message::Error(e),
                MessageRef::Noop(h) => Message::Noop(h),
                MessageRef::Overrun(h) => Message::Overrun(h),
            }
        }))
    }
}

impl std::iter::FusedIterator for Messages {}

/// Appends one connector message, framed by a netlink header, to `out`, padded to 4 bytes.
///
/// `nl` supplies type, flags, seq and pid; its `len` is ignored and computed. Fails only
/// when the data is longer than `cn_msg.len` can say.
pub fn encode(nl: NlHeader, msg: &CnMsg, out: &mut Vec<u8>) -> Result<(), TooLarge> {
    let cn = msg.header()?;
    let start = out.len();
    out.resize(start + msg.encoded_len(), 0);
    // Cannot fail: the space was just made and `header()` checked the data length.
    let _ = encode_into(&mut out[start..], nl, cn, &msg.data);
    Ok(())
}

/// Writes one connector message, framed by a netlink header, at the start of `out`, zero
/// padding included: the slice counterpart of [`encode`], for callers that own a buffer
/// (the bus writes straight into its shards with it).
///
/// `nl.len` and `cn.len` are ignored and computed from `data`. Returns the bytes written,
/// `nlmsg_align(36 + data.len())`, or `None`, writing nothing, when `out` is shorter than
/// that or `data` is longer than `cn_msg.len` can say ([`CnMsg::MAX_DATA`]).
#[inline(always)]
pub fn encode_into(out: &mut [u8], nl: NlHeader, cn: CnHeader, data: &[u8]) -> Option<usize> {
    let dlen = u16::try_from(data.len()).ok()?;
    let len = NLMSG_HDRLEN + CN_MSG_HDRLEN + data.len();
    let dst = out.get_mut(..nlmsg_align(len))?;
    let padded = dst.len() > len;
    let written = dst.len();
    NlHeader {
        len: len as u32, // at most 16 + 20 + 65535
        ..nl
    }
    .write(super::array_mut(dst)?);
    CnHeader { len: dlen, ..cn }.write(super::array_mut(dst.get_mut(NLMSG_HDRLEN..)?)?);
    let rest = dst.get_mut(NLMSG_HDRLEN + CN_MSG_HDRLEN..)?;
    // Padding (0 to 3 bytes) lies in the last 4: zero them with one store, before the
    // data goes over the part of them that is data (no memset call on the hot path).
    if padded {
        let at = rest.len().saturating_sub(4);
        if let Some(tail) = rest.get_mut(at..).and_then(super::array_mut::<4>) {
            *tail = [0; 4];
        }
    }
    rest.get_mut(..data.len())?.copy_from_slice(data);
    Some(written)
}

/// Packs connector messages into one datagram, up to a size limit.
///
/// Each message gets its own netlink header of type `NLMSG_DONE` whose `nlmsg_seq` is the
/// message's `seq` (as the kernel's connector writes it) and whose `nlmsg_pid` is the
/// builder's port id. User-space cnbus receivers read every message of a datagram; the kernel
/// reads only the first, so datagrams for the kernel must hold one message.
#[derive(Debug, Clone)]
pub struct DatagramBuilder {
    buf: Vec<u8>,
    limit: usize,
    count: usize,
    pid: u32,
}

impl DatagramBuilder {
    /// A builder whose datagrams never exceed `limit` bytes (but always hold at least one
    /// message that fits on its own).
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::with_capacity(limit.min(1 << 16)),
            limit,
            count: 0,
            pid: 0,
        }
    }

    /// Sets the `nlmsg_pid` written into each header (conventionally the sender's port id).
    pub fn with_pid(mut self, pid: u32) -> Self {
        self.pid = pid;
        self
    }

    /// The size limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Appends `msg` if it fits. Returns `Ok(false)`, leaving the datagram unchanged, when
    /// it does not fit in the space left; `Err(TooLarge)` when it could never fit.
    pub fn push(&mut self, msg: &CnMsg) -> Result<bool, TooLarge> {
        let need = msg.encoded_len();
        if need > self.limit || msg.data.len() > CnMsg::MAX_DATA {
            return Err(TooLarge {
                len: need,
                limit: self.limit.min(CnMsg::MAX_ENCODED),
            });
        }
        if self.buf.len() + need > self.limit {
            return Ok(false);
        }
        let nl = NlHeader {
            len: 0,
            ty: NLMSG_DONE,
            flags: 0,
            seq: msg.seq,
            pid: self.pid,
        };
        encode(nl, msg, &mut self.buf)?;
        self.count += 1;
        Ok(true)
    }

    /// Space left, in bytes.
    pub fn remaining(&self) -> usize {
        self.limit.saturating_sub(self.buf.len())
    }

    /// Messages in the datagram.
    pub fn count(&self) -> usize {
        self.count
    }

    /// True when no message has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The datagram so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the builder, keeping its allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
    }

    /// Takes the datagram out, leaving the builder empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.count = 0;
        std::mem::replace(&mut self.buf, Vec::with_capacity(self.limit.min(1 << 16)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CbId;

    const DONE: NlHeader = NlHeader {
        len: 0,
        ty: NLMSG_DONE,
        flags: 0,
        seq: 0,
        pid: 0,
    };

    /// The datagram walked by the field-by-field checks alone, without the fast path.
    fn checked_slowly(d: &[u8]) -> Vec<Result<MessageRef<'_>, DecodeError>> {
        let mut it = messages_ref(d);
        let mut out = Vec::new();
        while !it.failed && it.pos < it.buf.len() {
            let r = it.next_message();
            it.failed = r.is_err();
            out.push(r);
        }
        out
    }

    /// The fast path for whole `NLMSG_DONE` messages accepts exactly what the
    /// field-by-field checks accept, with the same views, positions and errors: datagrams
    /// with random lengths, types, `cn_msg.len`s, bytes and truncations.
    #[test]
    fn the_fast_path_agrees_with_the_checks() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut b = DatagramBuilder::new(1 << 12);
            for i in 0..1 + rnd(6) {
                let m = CnMsg::new(CbId::new(7, i as u32), vec![i as u8; rnd(40)]);
                b.push(&m).unwrap();
            }
            let mut d = b.take();
            for _ in 0..rnd(4) {
                let (at, last) = (rnd(d.len()), d.len() - 1);
                // Mostly the length and type fields of the headers.
                match rnd(4) {
                    0 => d[at] = rnd(256) as u8,
                    1 => d[(at & !3).min(last)] = rnd(80) as u8,
                    2 => d[((at & !3) + 4).min(last)] = rnd(5) as u8,
                    _ => d[((at & !3) + 32).min(last)] = rnd(60) as u8,
                }
            }
            d.truncate(d.len() - rnd(3) * rnd(20).min(d.len() / 3));
            let fast: Vec<_> = messages_ref(&d).collect();
            assert_eq!(fast, checked_slowly(&d), "datagram {d:?}");
            accepted += fast.iter().filter(|m| m.is_ok()).count();
        }
        assert!(accepted > 20_000);
    }

    #[test]
    fn pack_and_iterate() {
        let mut b = DatagramBuilder::new(4096).with_pid(77);
        for (i, n) in [0usize, 5, 64].into_iter().enumerate() {
            let m = CnMsg::new(CbId::new(0x4000, 7), vec![i as u8; n]).with_seq(i as u32, 0);
            assert!(b.push(&m).unwrap());
        }
        let msgs: Vec<_> = messages(Bytes::from(b.take())).collect();
        assert_eq!(msgs.len(), 3);
        for (i, m) in msgs.into_iter().enumerate() {
            let Message::Connector(c) = m.unwrap() else {
                panic!("not connector")
            };
            assert_eq!(c.nl.pid, 77);
            assert_eq!(c.nl.ty, NLMSG_DONE);
            assert_eq!(c.msg.seq, i as u32);
        }
    }

    #[test]
    fn limit_is_respected() {
        let mut b = DatagramBuilder::new(100);
        let m = CnMsg::new(CbId::new(20, 1), vec![0u8; 40]); // 76 bytes
        assert!(b.push(&m).unwrap());
        assert!(!b.push(&m).unwrap());
        assert_eq!(b.count(), 1);
        assert!(matches!(
            b.push(&CnMsg::new(CbId::new(20, 1), vec![0u8; 80])),
            Err(TooLarge { .. })
        ));
    }

    #[test]
    fn stops_after_first_error() {
        let mut d = Vec::new();
        encode(DONE, &CnMsg::new(CbId::new(1, 2), &b"ok"[..]), &mut d).unwrap();
        let good_len = d.len();
        d.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // len 9 < 16
        encode(DONE, &CnMsg::new(CbId::new(1, 2), &b"x"[..]), &mut d).unwrap();
        let r: Vec<_> = messages(Bytes::from(d)).collect();
        assert_eq!(r.len(), 2);
        assert!(r[0].is_ok());
        let e = r[1].clone().unwrap_err();
        assert_eq!(e.offset, good_len);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::NlmsgLenTooSmall { len: 9 }
        ));
    }

    #[test]
    fn cn_len_overrun_is_reported_at_len_field() {
        let mut d = Vec::new();
        encode(DONE, &CnMsg::new(CbId::new(1, 2), &b"abcd"[..]), &mut d).unwrap();
        d[16 + 16] = 200; // cn_msg.len
        let e = messages(Bytes::from(d)).next().unwrap().unwrap_err();
        assert_eq!(e.offset, 32);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::CnLenOverrun {
                len: 200,
                available: 4
            }
        ));
    }

    #[test]
    fn other_types_are_errors() {
        let mut d = Vec::new();
        encode(
            NlHeader {
                ty: 0x7777,
                ..Default::default()
            },
            &CnMsg::new(CbId::new(1, 2), &b"x"[..]),
            &mut d,
        )
        .unwrap();
        let e = messages(Bytes::from(d)).next().unwrap().unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::UnknownValue {
                what: "nlmsg_type",
                value: 0x7777
            }
        ));
    }

    #[test]
    fn control_types() {
        let mut d = Vec::new();
        NlHeader {
            len: 16,
            ty: NLMSG_NOOP,
            ..Default::default()
        }
        .emit(&mut d);
        NlHeader {
            len: 36,
            ty: NLMSG_ERROR,
            ..Default::default()
        }
        .emit(&mut d);
        d.extend_from_slice(&(-105i32).to_ne_bytes());
        NlHeader {
            len: 16,
            ty: 3,
            seq: 9,
            ..Default::default()
        }
        .emit(&mut d);
        NlHeader {
            len: 16,
            ty: NLMSG_OVERRUN,
            ..Default::default()
        }
        .emit(&mut d);
        let r: Vec<_> = messages(Bytes::from(d)).map(Result::unwrap).collect();
        assert!(matches!(r[0], Message::Noop(_)));
        let Message::Error(e) = &r[1] else { panic!() };
        assert_eq!(e.error, -105);
        assert_eq!(e.request.unwrap().seq, 9);
        assert!(matches!(r[2], Message::Overrun(_)));
        assert_eq!(r.len(), 3);
    }
}
