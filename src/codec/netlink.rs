//! `struct nlmsghdr`.

use super::{get_u16, get_u32};
use crate::codec::{DecodeError, DecodeErrorKind};

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// `NLMSG_NOOP`: a message to be ignored.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error (or, with error 0, an acknowledgement).
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the type the connector uses for every data message, in both directions.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`: data was lost.
pub const NLMSG_OVERRUN: u16 = 4;

/// Rounds `len` up to the netlink alignment of 4 bytes (`NLMSG_ALIGN`), saturating.
#[inline]
pub const fn nlmsg_align(len: usize) -> usize {
    match len.checked_add(3) {
        Some(l) => l & !3,
        None => usize::MAX & !3,
    }
}

/// The lowest multicast group for custom buses: groups below it are left to the kernel's
/// own connector users (group = idx for idx 1..=10, plus margin).
pub const FIRST_USER_GROUP: u32 = 12;

/// Where a datagram goes: the netlink address (`nl_pid`, `nl_groups`) of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The kernel (port 0). The kernel reads only the first message of a datagram.
    Kernel,
    /// One socket, by port id.
    Port(u32),
    /// Every member of a multicast group (1..=32). Netlink also hands such a datagram to
    /// the kernel side of the connector.
    Group(u32),
}

impl Dest {
    /// True when the datagram goes to the kernel: [`Dest::Kernel`], or [`Dest::Port`] 0,
    /// the kernel's port id, which is the same address (the kernel reads only the first
    /// message of a datagram, whichever way it is named).
    pub fn is_kernel(&self) -> bool {
        matches!(self, Dest::Kernel | Dest::Port(0))
    }
}

/// The fields of a netlink message header.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NlHeader {
    /// `nlmsg_len`: length of the message including this header, excluding trailing padding.
    pub len: u32,
    /// `nlmsg_type`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`: the sender's port id as the sender wrote it (the kernel writes 0).
    pub pid: u32,
}

impl NlHeader {
    /// Reads a header from the first 16 bytes of `buf`; `None` if `buf` is shorter.
    /// Does not validate `len` (see [`NlmsgBuffer::new_checked`]).
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        Some(Self {
            len: get_u32(buf, 0),
            ty: get_u16(buf, 4),
            flags: get_u16(buf, 6),
            seq: get_u32(buf, 8),
            pid: get_u32(buf, 12),
        })
    }

    /// Appends the 16 header bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; NLMSG_HDRLEN];
        self.write(&mut b);
        out.extend_from_slice(&b);
    }

    /// Writes the 16 header bytes into `out` (fixed offsets: the compiler turns this into
    /// five plain stores).
    #[inline]
    pub fn write(&self, out: &mut [u8; NLMSG_HDRLEN]) {
        out[0..4].copy_from_slice(&self.len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.ty.to_ne_bytes());
        out[6..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        out[12..16].copy_from_slice(&self.pid.to_ne_bytes());
    }

    /// True for the netlink control types (`NOOP`, `ERROR`, `OVERRUN`). `NLMSG_DONE` is
    /// *not* a control type on the connector: it carries every data message.
    pub fn is_control(&self) -> bool {
        matches!(self.ty, NLMSG_NOOP | NLMSG_ERROR | NLMSG_OVERRUN)
    }
}

/// A checked view of one netlink message at the start of a buffer.
///
/// Construction validates that the buffer holds a whole header and that `nlmsg_len` is at
/// least the header size and no larger than the buffer; afterwards [`header`](Self::header)
/// and [`payload`](Self::payload) cannot fail.
#[derive(Debug, Clone, Copy)]
pub struct NlmsgBuffer<T> {
    buf: T,
    header: NlHeader,
}

impl<T: AsRef<[u8]>> NlmsgBuffer<T> {
    /// Validates the message at the start of `buf`. Errors carry offsets relative to `buf`.
    pub fn new_checked(buf: T) -> Result<Self, DecodeError> {
        Self::checked_at(buf, 0)
    }

    /// As [`new_checked`](Self::new_checked), reporting offsets as `base + local`.
    pub(crate) fn checked_at(buf: T, base: usize) -> Result<Self, DecodeError> {
        let b = buf.as_ref();
        let header = NlHeader::parse(b).ok_or(DecodeError::new(
            base,
            DecodeErrorKind::ShortHeader { remaining: b.len() },
        ))?;
        let len = header.len as usize;
        if len < NLMSG_HDRLEN {
            return Err(DecodeError::new(
                base,
                DecodeErrorKind::NlmsgLenTooSmall { len: header.len },
            ));
        }
        if len > b.len() {
            return Err(DecodeError::new(
                base,
                DecodeErrorKind::NlmsgLenOverrun {
                    len: header.len,
                    remaining: b.len(),
                },
            ));
        }
        Ok(Self { buf, header })
    }

    /// The header.
    pub fn header(&self) -> NlHeader {
        self.header
    }

    /// The bytes after the header, up to `nlmsg_len` (padding excluded).
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[NLMSG_HDRLEN..self.header.len as usize]
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }
}
