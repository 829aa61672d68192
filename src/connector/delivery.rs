//! What callbacks and channels receive: [`Delivery`], a borrowed view of one message in the
//! datagram it arrived in, and [`Incoming`], the owned form.

use bytes::Bytes;

use crate::codec::{CbId, CnHeader, CnMsg};

/// Where a received message came from.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// The sender's port id; 0 is the kernel (no user-space socket can have port 0).
    pub port: u32,
    /// The multicast group it was sent to; 0 for a unicast.
    pub group: u32,
}

impl Source {
    /// True when the kernel sent the message.
    pub fn is_kernel(&self) -> bool {
        self.port == 0
    }
}

/// A connector message as channels, requests and the async stream deliver it, owned, with
/// where it came from: what [`Delivery::to_incoming`] makes. (Not
/// [`proc::Received`](crate::proc::Received), a proc receiver's event or loss report.)
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The message; `data` is a slice of the datagram it arrived in.
    pub msg: CnMsg,
    /// Its sender.
    pub source: Source,
}

impl Incoming {
    /// The borrowed view of this message, as callbacks get it: for feeding a
    /// [`Registry`](super::Registry) by hand.
    pub fn as_delivery(&self) -> Delivery<'_> {
        Delivery {
            cn: CnHeader {
                id: self.msg.id,
                seq: self.msg.seq,
                ack: self.msg.ack,
                // Not read: `data` carries the length.
                len: 0,
                flags: self.msg.flags,
            },
            data: &self.msg.data,
            owner: &self.msg.data,
            source: self.source,
        }
    }
}

/// One received message as a callback gets it: its header fields, its data borrowed from
/// the datagram it arrived in, and its sender. Nothing is copied or reference-counted to
/// make it; a callback that keeps the message makes the owned form with
/// [`to_incoming`](Self::to_incoming) (the data stays a slice of the datagram, not a copy).
///
/// ```
/// # use cnbus::connector::Registry;
/// # use cnbus::CbId;
/// let registry = Registry::new();
/// let (tx, rx) = std::sync::mpsc::channel();
/// let _reg = registry.register(CbId::new(0x7e00, 1), move |m| {
///     if m.data().starts_with(b"keep") {
///         tx.send(m.to_incoming()).unwrap();
///     }
/// });
/// # drop(rx);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// Read for id, seq, ack and flags; its `len` is not (see `data`).
    cn: CnHeader,
    /// The message data: a subslice of `owner`.
    data: &'a [u8],
    /// The buffer `data` lies in, for `to_incoming`.
    owner: &'a Bytes,
    source: Source,
}

impl<'a> Delivery<'a> {
    /// A view of a message whose data `data` lies within `owner` (the datagram). The codec
    /// hands out `data` as a subslice of the datagram it parsed; `to_incoming` relies on it.
    #[inline]
    pub(crate) fn new(cn: CnHeader, data: &'a [u8], owner: &'a Bytes, source: Source) -> Self {
        debug_assert!(owner.as_ptr_range().contains(&data.as_ptr()) || data.is_empty());
        Self {
            cn,
            data,
            owner,
            source,
        }
    }

    /// The callback id.
    #[inline]
    pub fn id(&self) -> CbId {
        self.cn.id
    }

    /// The sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        self.cn.seq
    }

    /// The acknowledgement number.
    #[inline]
    pub fn ack(&self) -> u32 {
        self.cn.ack
    }

    /// The flags.
    #[inline]
    pub fn flags(&self) -> u16 {
        self.cn.flags
    }

    /// The data, borrowed from the datagram.
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The sender.
    #[inline]
    pub fn source(&self) -> Source {
        self.source
    }

    /// The owned message, for keeping it past the callback: its data is a [`Bytes`] slice
    /// of the datagram (a reference count, no copy).
    pub fn to_incoming(&self) -> Incoming {
        Incoming {
            msg: CnMsg {
                id: self.cn.id,
                seq: self.cn.seq,
                ack: self.cn.ack,
                flags: self.cn.flags,
                data: self.owner.slice_ref(self.data),
            },
            source: self.source,
        }
    }
}
