//! `struct cn_msg` and `struct cb_id`.

use std::fmt;

use bytes::Bytes;

use super::{get_u16, get_u32};
use crate::codec::{DecodeError, DecodeErrorKind, TooLarge};

/// Size of the `cn_msg` header (`idx, val, seq, ack: u32; len, flags: u16`).
pub const CN_MSG_HDRLEN: usize = 20;

/// The largest message (header plus data) the kernel's connector accepts from user space
/// (`CONNECTOR_MAX_MSG_SIZE`). Messages between user-space processes are limited only by
/// `cn_msg.len`, a `u16`.
pub const CONNECTOR_MAX_MSG_SIZE: usize = 16384;

/// A connector callback id, `struct cb_id`: the address of one protocol on the bus.
///
/// By convention the multicast group of an id is its `idx` (see [`CbId::default_group`]).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CbId {
    /// Protocol family index (`CN_IDX_*`).
    pub idx: u32,
    /// Value within the family (`CN_VAL_*`).
    pub val: u32,
}

impl CbId {
    /// The proc connector: `CN_IDX_PROC` / `CN_VAL_PROC`.
    pub const PROC: CbId = CbId { idx: 1, val: 1 };

    /// The highest `idx` the kernel registers for its own users (`CN_IDX_PROC` = 1 ..
    /// `CN_IDX_VSS` = 10). A multicast on one of these is also delivered to the kernel.
    pub const KERNEL_IDX_MAX: u32 = 10;

    /// Builds an id.
    pub const fn new(idx: u32, val: u32) -> Self {
        Self { idx, val }
    }

    /// True when `idx` is one the kernel registers for its own protocols (1..=10).
    pub const fn is_kernel_owned(&self) -> bool {
        self.idx >= 1 && self.idx <= Self::KERNEL_IDX_MAX
    }

    /// The multicast group this id uses by the kernel's convention (group = idx), if the idx
    /// is a valid group number (1..=32).
    pub const fn default_group(&self) -> Option<u32> {
        if self.idx >= 1 && self.idx <= 32 {
            Some(self.idx)
        } else {
            None
        }
    }
}

impl fmt::Display for CbId {
    /// Formats as the kernel's samples print ids: `idx.val` in hex-free decimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.idx, self.val)
    }
}

/// The fixed fields of a `cn_msg` header.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CnHeader {
    /// The callback id.
    pub id: CbId,
    /// Sequence number chosen by the sender.
    pub seq: u32,
    /// Acknowledgement: a reply carries the request's `ack + 1`.
    pub ack: u32,
    /// Length of the data that follows.
    pub len: u16,
    /// Flags (unused by the kernel).
    pub flags: u16,
}

impl CnHeader {
    /// Appends the 20 header bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; CN_MSG_HDRLEN];
        self.write(&mut b);
        out.extend_from_slice(&b);
    }

    /// Writes the 20 header bytes into `out` (fixed offsets, plain stores).
    #[inline]
    pub fn write(&self, out: &mut [u8; CN_MSG_HDRLEN]) {
        out[0..4].copy_from_slice(&self.id.idx.to_ne_bytes());
        out[4..8].copy_from_slice(&self.id.val.to_ne_bytes());
        out[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        out[12..16].copy_from_slice(&self.ack.to_ne_bytes());
        out[16..18].copy_from_slice(&self.len.to_ne_bytes());
        out[18..20].copy_from_slice(&self.flags.to_ne_bytes());
    }
}

/// A checked view of a `cn_msg` (header and data) at the start of a netlink payload.
///
/// Construction validates that the buffer holds the 20-byte header and at least `len` data
/// bytes. Bytes past `len` (padding, or trailing garbage from a careless sender) are not part
/// of [`data`](Self::data).
#[derive(Debug, Clone, Copy)]
pub struct CnMsgBuffer<T> {
    buf: T,
    header: CnHeader,
}

impl<T: AsRef<[u8]>> CnMsgBuffer<T> {
    /// Validates the message at the start of `buf` (a netlink payload).
    pub fn new_checked(buf: T) -> Result<Self, DecodeError> {
        Self::checked_at(buf, 0)
    }

    pub(crate) fn checked_at(buf: T, base: usize) -> Result<Self, DecodeError> {
        let b = buf.as_ref();
        if b.len() < CN_MSG_HDRLEN {
            return Err(DecodeError::new(
                base,
                DecodeErrorKind::ShortConnectorHeader { payload: b.len() },
            ));
        }
        let header = CnHeader {
            id: CbId::new(get_u32(b, 0), get_u32(b, 4)),
            seq: get_u32(b, 8),
            ack: get_u32(b, 12),
            len: get_u16(b, 16),
            flags: get_u16(b, 18),
        };
        let available = b.len() - CN_MSG_HDRLEN;
        if usize::from(header.len) > available {
            return Err(DecodeError::new(
                base + 16,
                DecodeErrorKind::CnLenOverrun {
                    len: header.len,
                    available,
                },
            ));
        }
        Ok(Self { buf, header })
    }

    /// The header fields.
    pub fn header(&self) -> CnHeader {
        self.header
    }

    /// The `len` data bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf.as_ref()[CN_MSG_HDRLEN..CN_MSG_HDRLEN + usize::from(self.header.len)]
    }
}

/// An owned connector message: id, seq, ack, flags and data.
///
/// `data` is a [`Bytes`]; a received message's data is a slice of the datagram it arrived
/// in, not a copy.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CnMsg {
    /// The callback id.
    pub id: CbId,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags.
    pub flags: u16,
    /// The payload; at most `u16::MAX` bytes (the width of `cn_msg.len`).
    pub data: Bytes,
}

impl CnMsg {
    /// The largest `data` a `cn_msg` can describe.
    pub const MAX_DATA: usize = u16::MAX as usize;

    /// The largest encoded message, netlink header and padding included: 65 572 bytes, the
    /// smallest datagram that holds any one message. (Receivers that accept less, such as
    /// a `Connector` whose `max_datagram` is below it, drop some messages that senders may
    /// send.)
    pub const MAX_ENCODED: usize =
        super::nlmsg_align(super::NLMSG_HDRLEN + CN_MSG_HDRLEN + Self::MAX_DATA);

    /// A message with seq, ack and flags zero.
    pub fn new(id: CbId, data: impl Into<Bytes>) -> Self {
        Self {
            id,
            seq: 0,
            ack: 0,
            flags: 0,
            data: data.into(),
        }
    }

    /// Sets `seq` and `ack`.
    pub fn with_seq(mut self, seq: u32, ack: u32) -> Self {
        self.seq = seq;
        self.ack = ack;
        self
    }

    /// The header this message encodes to. Fails when `data` is longer than `u16::MAX`.
    pub fn header(&self) -> Result<CnHeader, TooLarge> {
        let len = u16::try_from(self.data.len()).map_err(|_| TooLarge {
            len: self.data.len(),
            limit: Self::MAX_DATA,
        })?;
        Ok(CnHeader {
            id: self.id,
            seq: self.seq,
            ack: self.ack,
            len,
            flags: self.flags,
        })
    }

    /// Bytes this message occupies in a datagram, netlink header and padding included.
    pub fn encoded_len(&self) -> usize {
        super::nlmsg_align(super::NLMSG_HDRLEN + CN_MSG_HDRLEN + self.data.len())
    }

    /// The reply to `request` by the connector convention: same id, same seq, `ack + 1`
    /// (wrapping), carrying `data`; [`is_reply_to`](Self::is_reply_to) `request` is true.
    ///
    /// ```
    /// # use cnbus::{CbId, CnMsg};
    /// let request = CnMsg::new(CbId::new(0x1000, 1), &b"ping"[..]).with_seq(5, 7);
    /// let reply = CnMsg::reply_to(&request, &b"pong"[..]);
    /// assert_eq!((reply.id, reply.seq, reply.ack), (request.id, 5, 8));
    /// assert!(reply.is_reply_to(&request));
    /// ```
    pub fn reply_to(request: &CnMsg, data: impl Into<Bytes>) -> Self {
        Self::new(request.id, data).with_seq(request.seq, request.ack.wrapping_add(1))
    }

    /// True when `self` answers `request` by the connector convention: same id, same seq,
    /// `ack == request.ack + 1`.
    pub fn is_reply_to(&self, request: &CnMsg) -> bool {
        self.id == request.id && self.seq == request.seq && self.ack == request.ack.wrapping_add(1)
    }
}
