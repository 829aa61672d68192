//! cn_msg parser: the checked view never panics and never reads past `len`; what it
//! accepts packs into a datagram and parses back to the same message.
#![no_main]

use bytes::Bytes;
use cnbus::codec::{messages, CnMsg, CnMsgBuffer, DatagramBuilder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = CnMsgBuffer::new_checked(data) else {
        return;
    };
    let h = view.header();
    assert_eq!(view.data().len(), usize::from(h.len));
    assert!(view.data().len() + 20 <= data.len());
    let msg = CnMsg {
        id: h.id,
        seq: h.seq,
        ack: h.ack,
        flags: h.flags,
        data: Bytes::copy_from_slice(view.data()),
    };
    let mut b = DatagramBuilder::new(msg.encoded_len());
    assert!(b.push(&msg).expect("fits its own size"));
    let mut it = messages(Bytes::copy_from_slice(b.as_bytes()));
    match it.next() {
        Some(Ok(Message::Connector(c))) => assert_eq!(c.msg, msg),
        other => panic!("re-parse failed: {other:?}"),
    }
    assert!(it.next().is_none());
});
