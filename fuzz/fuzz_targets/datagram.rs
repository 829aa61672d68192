//! Datagram parser: arbitrary bytes never panic, the iterator stops after its first error,
//! and every message it accepts re-emits and re-parses to itself.
#![no_main]

use bytes::Bytes;
use cnbus::codec::{encode, messages, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut seen_error = false;
    let mut count = 0usize;
    for item in messages(Bytes::copy_from_slice(data)) {
        assert!(!seen_error, "an item after an error");
        count += 1;
        assert!(count <= data.len() / 16 + 1, "more messages than headers fit");
        match item {
            Err(e) => {
                assert!(e.offset <= data.len());
                seen_error = true;
            }
            Ok(Message::Connector(c)) => {
                // parse -> emit -> parse is the identity on what the parser accepted.
                let mut out = Vec::new();
                encode(c.nl, &c.msg, &mut out).expect("a parsed message re-encodes");
                let mut again = messages(Bytes::from(out));
                match again.next() {
                    Some(Ok(Message::Connector(c2))) => {
                        assert_eq!(c2.msg, c.msg);
                        assert_eq!(c2.nl.ty, c.nl.ty);
                        assert_eq!(c2.nl.seq, c.nl.seq);
                        assert_eq!(c2.nl.pid, c.nl.pid);
                        assert_eq!(c2.nl.flags, c.nl.flags);
                    }
                    other => panic!("re-parse failed: {other:?}"),
                }
                assert!(again.next().is_none());
            }
            Ok(_) => {}
        }
    }
});
