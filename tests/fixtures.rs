//! Golden datagrams from `proto/fixtures/` (captured from a real kernel, or constructed and
//! marked so): every stated netlink and connector field decodes as expected, and every
//! datagram re-emits byte for byte.

mod common;

use bytes::Bytes;
use cnbus::codec::{encode, messages, Message, NlHeader};
use common::{parse_int, Fixture};

/// Checks `prefix` + nl.* / cn.* keys against one decoded message.
fn check_headers(f: &Fixture, prefix: &str, m: &Message) {
    let int = |k: &str| f.get(&format!("{prefix}{k}")).map(parse_int);
    let nl = match m {
        Message::Connector(c) => c.nl,
        Message::Error(e) => e.nl,
        Message::Noop(h) | Message::Overrun(h) => *h,
    };
    let pairs = [
        ("nl.len", u64::from(nl.len)),
        ("nl.type", u64::from(nl.ty)),
        ("nl.flags", u64::from(nl.flags)),
        ("nl.seq", u64::from(nl.seq)),
        ("nl.pid", u64::from(nl.pid)),
    ];
    for (k, v) in pairs {
        if let Some(want) = int(k) {
            assert_eq!(v, want, "{}: {prefix}{k}", f.name);
        }
    }
    if let Message::Connector(c) = m {
        let pairs = [
            ("cn.idx", u64::from(c.msg.id.idx)),
            ("cn.val", u64::from(c.msg.id.val)),
            ("cn.seq", u64::from(c.msg.seq)),
            ("cn.ack", u64::from(c.msg.ack)),
            ("cn.len", c.msg.data.len() as u64),
            ("cn.flags", u64::from(c.msg.flags)),
        ];
        for (k, v) in pairs {
            if let Some(want) = int(k) {
                assert_eq!(v, want, "{}: {prefix}{k}", f.name);
            }
        }
        if let Some(hex) = f.get(&format!("{prefix}data")) {
            let want: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert_eq!(&c.msg.data[..], &want[..], "{}: {prefix}data", f.name);
        }
    }
    if let Message::Error(e) = m {
        if let Some(want) = f.get("error") {
            assert_eq!(
                i64::from(e.error),
                want.parse::<i64>().unwrap(),
                "{}",
                f.name
            );
        }
        if let Some(want) = int("err.nl.seq") {
            assert_eq!(u64::from(e.request.expect("quoted header").seq), want);
        }
    }
}

/// Re-encodes one message the way it was framed.
fn reemit(m: &Message, raw: &[u8], out: &mut Vec<u8>) {
    match m {
        Message::Connector(c) => encode(c.nl, &c.msg, out).unwrap(),
        // Control messages carry no connector framing: header then payload as received.
        Message::Error(e) => {
            e.nl.emit(out);
            out.extend_from_slice(&raw[16..e.nl.len as usize]);
            out.resize(cnbus::codec::nlmsg_align(out.len()), 0);
        }
        Message::Noop(h) | Message::Overrun(h) => {
            h.emit(out);
            out.extend_from_slice(&raw[16..h.len as usize]);
        }
    }
}

#[test]
fn every_fixture_decodes_as_stated_and_reemits_byte_for_byte() {
    let names = Fixture::all();
    assert!(names.len() >= 9, "fixtures missing: {names:?}");
    for name in names {
        let f = Fixture::load(&name);
        assert!(!f.expect.is_empty(), "{name}: no # expect: line");
        if let Some(n) = f.get("dgram.len") {
            assert_eq!(f.bytes.len() as u64, parse_int(n), "{name}: dgram.len");
        }
        let msgs: Vec<Message> = messages(Bytes::from(f.bytes.clone()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(n) = f.get("msgs") {
            assert_eq!(msgs.len() as u64, parse_int(n), "{name}: msgs");
        }
        let mut out = Vec::new();
        let mut offset = 0;
        for (i, m) in msgs.iter().enumerate() {
            let prefix = if msgs.len() > 1 {
                format!("m{i}.")
            } else {
                String::new()
            };
            check_headers(&f, &prefix, m);
            reemit(m, &f.bytes[offset..], &mut out);
            offset = out.len();
        }
        assert_eq!(out, f.bytes, "{name}: re-emitted bytes differ");
    }
}

#[test]
fn kernel_headers_follow_the_connector_convention() {
    for name in [
        "proc_ack.hex",
        "proc_fork.hex",
        "proc_exec.hex",
        "proc_exit_nonzero.hex",
        "proc_comm.hex",
    ] {
        let f = Fixture::load(name);
        let Some(Ok(Message::Connector(c))) = messages(Bytes::from(f.bytes.clone())).next() else {
            panic!("{name}: not a connector message");
        };
        assert_eq!(c.nl.ty, cnbus::codec::NLMSG_DONE, "{name}");
        assert_eq!(c.nl.pid, 0, "{name}: the kernel writes pid 0");
        assert_eq!(c.nl.seq, c.msg.seq, "{name}: nlmsg_seq mirrors cn_msg.seq");
        assert_eq!(c.msg.id, cnbus::CbId::PROC, "{name}");
        assert_eq!(c.msg.data.len(), 40, "{name}: sizeof(struct proc_event)");
        let _ = NlHeader::parse(&f.bytes).unwrap();
    }
}
