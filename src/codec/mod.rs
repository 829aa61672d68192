//! The wire codec: netlink and connector framing as plain data. No I/O, no `unsafe`.
//!
//! A connector datagram is a sequence of netlink messages, each a 16-byte `nlmsghdr`
//! followed by a 20-byte `cn_msg` header and the message data, every message starting on a
//! 4-byte boundary. All integers are in host byte order.
//!
//! ```text
//! offset 0              16                          36
//!        +--------------+---------------------------+-----------------+---------+----
//!        | nlmsghdr     | cn_msg idx val seq ack    | data (cn.len)   | pad to 4| next nlmsghdr ...
//!        | len type ... |        len flags          |                 |         |
//!        +--------------+---------------------------+-----------------+---------+----
//! ```
//!
//! Parsing follows the `new_checked` discipline of `netlink-packet-core`: a view over a
//! buffer is only handed out after every length it will use has been checked against the
//! bytes that are really there, so field accessors cannot go out of bounds. The datagram
//! iterator ([`messages`]) yields `Result`s, never panics, always makes progress, and stops
//! after the first error.
//!
//! See `proto/` in the repository for the byte-level description of every format.

mod connector;
mod datagram;
mod error;
mod netlink;
pub mod proc;

pub use connector::{CbId, CnHeader, CnMsg, CnMsgBuffer, CN_MSG_HDRLEN, CONNECTOR_MAX_MSG_SIZE};
pub use datagram::{
    encode, encode_into, messages, messages_ref, ConnectorMessage, DatagramBuilder, Message,
    MessageRef, Messages, MessagesRef, NlError,
};
pub use error::{DecodeError, DecodeErrorKind, TooLarge};
pub use netlink::{
    nlmsg_align, Dest, NlHeader, NlmsgBuffer, FIRST_USER_GROUP, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_HDRLEN, NLMSG_NOOP, NLMSG_OVERRUN,
};

/// The first `N` bytes of `b` as an array, or `None` when `b` is shorter.
#[inline(always)]
pub(crate) fn array_mut<const N: usize>(b: &mut [u8]) -> Option<&mut [u8; N]> {
    b.get_mut(..N)?.try_into().ok()
}

/// Reads a host-order `u16` at `at`. Callers have checked the bounds.
#[inline]
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Reads a host-order `u32` at `at`. Callers have checked the bounds.
#[inline]
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a host-order `u64` at `at`, with no alignment requirement. Callers have checked
/// the bounds.
#[inline]
#[allow(dead_code)] // used by the proc-event decoder
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(x)
}
