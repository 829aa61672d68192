//! The codec's errors: malformed wire data ([`DecodeError`]) and a message too large for
//! its frame ([`TooLarge`]). They convert into [`crate::Error`]; the codec itself names no
//! module above it.

use std::fmt;

/// What went wrong while decoding wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// Fewer bytes remain than a netlink header needs (16).
    ShortHeader {
        /// Bytes that remained.
        remaining: usize,
    },
    /// `nlmsg_len` is smaller than the netlink header itself.
    NlmsgLenTooSmall {
        /// The length field.
        len: u32,
    },
    /// `nlmsg_len` runs past the end of the datagram.
    NlmsgLenOverrun {
        /// The length field.
        len: u32,
        /// Bytes that remained in the datagram from this header on.
        remaining: usize,
    },
    /// The netlink payload is too short for a connector header (20 bytes).
    ShortConnectorHeader {
        /// Netlink payload length.
        payload: usize,
    },
    /// `cn_msg.len` claims more data than the netlink payload holds.
    CnLenOverrun {
        /// The length field.
        len: u16,
        /// Bytes available after the connector header.
        available: usize,
    },
    /// An `NLMSG_ERROR` message shorter than its 4-byte error code.
    ShortError {
        /// Netlink payload length.
        payload: usize,
    },
    /// A payload is too short for the structure it must hold (for example a `proc_event`).
    ShortPayload {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// An enumerated field holds a value this version does not know.
    UnknownValue {
        /// The field.
        what: &'static str,
        /// The value found.
        value: u32,
    },
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ShortHeader { remaining } => {
                write!(
                    f,
                    "{remaining} trailing bytes, too short for a 16-byte netlink header"
                )
            }
            Self::NlmsgLenTooSmall { len } => {
                write!(
                    f,
                    "nlmsg_len {len} is smaller than the 16-byte netlink header"
                )
            }
            Self::NlmsgLenOverrun { len, remaining } => write!(
                f,
                "nlmsg_len {len} runs past the end of the datagram ({remaining} bytes remain)"
            ),
            Self::ShortConnectorHeader { payload } => write!(
                f,
                "netlink payload of {payload} bytes is too short for a 20-byte cn_msg header"
            ),
            Self::CnLenOverrun { len, available } => write!(
                f,
                "cn_msg.len {len} exceeds the {available} bytes after the cn_msg header"
            ),
            Self::ShortError { payload } => {
                write!(
                    f,
                    "NLMSG_ERROR payload of {payload} bytes has no error code"
                )
            }
            Self::ShortPayload { what, need, have } => {
                write!(f, "{what} needs {need} bytes, payload has {have}")
            }
            Self::UnknownValue { what, value } => write!(f, "unknown {what} value {value:#x}"),
        }
    }
}

/// Malformed wire data: what was wrong, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("malformed datagram at offset {offset}: {kind}")]
pub struct DecodeError {
    /// Byte offset, from the start of the datagram, of the header or field that is wrong.
    pub offset: usize,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    pub(crate) const fn new(offset: usize, kind: DecodeErrorKind) -> Self {
        Self { offset, kind }
    }
}

/// A message too large for where it was to go: data longer than a `cn_msg` can say
/// (`u16::MAX`), or a message that could never fit the datagram being built. Converts into
/// the crate's `Error::TooLarge` with the same fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("message of {len} bytes exceeds the limit of {limit} bytes")]
pub struct TooLarge {
    /// The encoded size.
    pub len: usize,
    /// The limit.
    pub limit: usize,
}
