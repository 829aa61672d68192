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
#[derive(Clone, Copy)]
pub struct Delivery<'a> {
    /// Read for id, seq, ack and flags; its `len` is not (see `data`).
    cn: CnHeader,
    /// The message data: a subslice of `owner`.
    data: &'a [u8],
    /// The buffer `data` lies in, for `to_incoming`.
    owner: &'a Bytes,
    source: Source,
}

impl std::fmt::Debug for Delivery<'_> {
    /// The fields a callback sees (not the whole datagram the data lies in).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.cn.id)
            .field("seq", &self.cn.seq)
            .field("ack", &self.cn.ack)
            .field("flags", &self.cn.flags)
            .field("data", &self.data)
            .field("source", &self.source)
            .finish()
    }
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

    /// The reply to this message by the connector convention (same id, same seq,
    /// `ack + 1`), carrying `data`: what [`CnMsg::reply_to`] builds from an owned request,
    /// without making this view owned first.
    ///
    /// ```no_run
    /// # use cnbus::connector::Connector;
    /// # use cnbus::{CbId, sys::Dest};
    /// # fn main() -> cnbus::error::Result<()> {
    /// let conn = Connector::builder().spawn()?;
    /// let handle = conn.handle();
    /// let _reg = conn.register(CbId::new(0x1000, 1), move |m| {
    ///     let reply = m.reply(&b"pong"[..]);
    ///     // A failed send is counted in the connector's statistics.
    ///     let _ = handle.send(&reply, Dest::Port(m.source().port));
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub fn reply(&self, data: impl Into<Bytes>) -> CnMsg {
        CnMsg::new(self.cn.id, data).with_seq(self.cn.seq, self.cn.ack.wrapping_add(1))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages, messages_ref, DatagramBuilder, Message, MessageRef};

    /// A view's reply is the reply `CnMsg::reply_to` builds from the owned request.
    #[test]
    fn a_views_reply_is_the_owned_messages_reply() {
        let req = CnMsg::new(CbId::new(0x1000, 2), &b"ping"[..]).with_seq(9, u32::MAX);
        let incoming = Incoming {
            msg: req.clone(),
            source: Source { port: 7, group: 0 },
        };
        let reply = incoming.as_delivery().reply(&b"pong"[..]);
        assert_eq!(reply, CnMsg::reply_to(&req, &b"pong"[..]));
        assert!(reply.is_reply_to(&req));
    }

    /// A view's owned form is the message the owned codec iterator yields, its data a
    /// slice of the same datagram (no copy), and an owned message's view gives it back.
    #[test]
    fn to_incoming_is_the_owned_message_sharing_the_datagram() {
        let mut b = DatagramBuilder::new(4096);
        for (i, n) in [3usize, 0, 64].into_iter().enumerate() {
            let m = CnMsg::new(CbId::new(0x4000, i as u32), vec![i as u8 + 1; n])
                .with_seq(10 + i as u32, 20 + i as u32);
            b.push(&CnMsg { flags: 7, ..m }).unwrap();
        }
        let datagram = Bytes::from(b.take());
        let source = Source { port: 9, group: 30 };
        let owned = messages(datagram.clone()).map(|m| match m {
            Ok(Message::Connector(c)) => c.msg,
            other => panic!("{other:?}"),
        });
        let views = messages_ref(&datagram).map(|m| match m {
            Ok(MessageRef::Connector { cn, data, .. }) => {
                Delivery::new(cn, data, &datagram, source)
            }
            other => panic!("{other:?}"),
        });
        for (want, view) in owned.zip(views) {
            assert_eq!(
                (view.id(), view.seq(), view.ack(), view.flags(), view.data()),
                (want.id, want.seq, want.ack, want.flags, &want.data[..])
            );
            let got = view.to_incoming();
            assert_eq!(got.msg, want);
            assert_eq!(got.source, source);
            if !got.msg.data.is_empty() {
                assert!(datagram.as_ptr_range().contains(&got.msg.data.as_ptr()));
            }
            assert_eq!(got.as_delivery().to_incoming(), got);
        }
    }
}
