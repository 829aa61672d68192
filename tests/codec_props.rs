//! Property tests of the wire codec.

use bytes::Bytes;
use cnbus::codec::{messages, CbId, CnMsg, DatagramBuilder, Message, NLMSG_DONE};
use proptest::prelude::*;

fn arb_msg(max_data: usize) -> impl Strategy<Value = CnMsg> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..=max_data),
    )
        .prop_map(|(idx, val, seq, ack, flags, data)| CnMsg {
            id: CbId::new(idx, val),
            seq,
            ack,
            flags,
            data: Bytes::from(data),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Packing then parsing gives back exactly the messages that fit, in order.
    #[test]
    fn emit_then_parse_is_identity(
        msgs in proptest::collection::vec(arb_msg(2048), 1..40),
        limit in 36usize..16384,
        pid in any::<u32>(),
    ) {
        let mut b = DatagramBuilder::new(limit).with_pid(pid);
        let mut packed = Vec::new();
        for m in &msgs {
            match b.push(m) {
                Ok(true) => packed.push(m.clone()),
                Ok(false) => break,
                Err(cnbus::codec::TooLarge { .. }) => prop_assert!(m.encoded_len() > limit),
            }
        }
        prop_assert!(b.as_bytes().len() <= limit);
        prop_assert_eq!(b.as_bytes().len() % 4, 0);
        let parsed: Vec<CnMsg> = messages(Bytes::copy_from_slice(b.as_bytes()))
            .map(|r| match r.unwrap() {
                Message::Connector(c) => {
                    assert_eq!(c.nl.ty, NLMSG_DONE);
                    assert_eq!(c.nl.pid, pid);
                    assert_eq!(c.nl.seq, c.msg.seq);
                    c.msg
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        prop_assert_eq!(parsed, packed);
    }

    /// The largest data a cn_msg can carry round-trips too.
    #[test]
    fn emit_then_parse_at_the_size_limit(m in arb_msg(0), fill in any::<u8>()) {
        let m = CnMsg { data: Bytes::from(vec![fill; CnMsg::MAX_DATA]), ..m };
        let mut b = DatagramBuilder::new(m.encoded_len());
        prop_assert!(b.push(&m).unwrap());
        let mut it = messages(Bytes::copy_from_slice(b.as_bytes()));
        let Some(Ok(Message::Connector(c))) = it.next() else { panic!("no message") };
        prop_assert_eq!(c.msg, m);
        prop_assert!(it.next().is_none());
    }

    /// Arbitrary bytes never make the parser panic; it ends, and an error is the last item.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check_terminates(data);
    }

    /// Valid datagrams with a few bytes overwritten: no panic, errors stop the iteration.
    #[test]
    fn mutated_datagrams_never_panic(
        msgs in proptest::collection::vec(arb_msg(64), 1..8),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut b = DatagramBuilder::new(1 << 16);
        for m in &msgs { b.push(m).unwrap(); }
        let mut d = b.take();
        for (at, v) in edits { let n = d.len(); d[at % n] = v; }
        let n = d.len();
        d.truncate(cut % (n + 1));
        check_terminates(d);
    }
}

fn check_terminates(data: Vec<u8>) {
    let n = data.len();
    let mut items = 0usize;
    let mut it = messages(Bytes::from(data));
    let mut errored = false;
    for r in it.by_ref() {
        assert!(!errored, "an item followed an error");
        items += 1;
        assert!(items <= n / 16 + 1, "more items than headers fit");
        if let Ok(Message::Connector(c)) = &r {
            assert!(c.msg.data.len() <= n);
        }
        errored = r.is_err();
    }
    assert!(it.next().is_none(), "iterator is fused");
}

/// Inputs that once crashed a fuzz target (`fuzz/regressions/<target>/`) replayed through
/// the same checks.
#[test]
fn fuzz_regression_inputs_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    for target in ["datagram", "cn_msg", "proc_event"] {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
            continue;
        };
        for e in entries {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            match target {
                "datagram" => check_terminates(data),
                "proc_event" => {
                    if let Ok(ev) = cnbus::proc::ProcEvent::parse(&data) {
                        let mut out = Vec::new();
                        ev.emit(&mut out);
                        assert_eq!(cnbus::proc::ProcEvent::parse(&out).unwrap(), ev);
                    }
                }
                _ => {
                    if let Ok(v) = cnbus::codec::CnMsgBuffer::new_checked(&data[..]) {
                        assert_eq!(v.data().len(), usize::from(v.header().len));
                    }
                }
            }
        }
    }
}
