//! The proc fixtures of `proto/fixtures/` (captured from a real kernel or constructed) decode
//! with the typed proc API to exactly the values their `# expect:` line states, and the
//! request fixtures are what the request encoder produces.
//!
//! `tests/fixtures.rs` checks the `dgram.*`, `msgs`, `nl.*` and `cn.*` framing keys of every
//! fixture; this file checks every remaining key of the `proc_*` fixtures, and fails on a key
//! it does not know, so a new key cannot go unchecked.

mod common;

use bytes::Bytes;
use cnbus::codec::{encode, messages, Message, NlHeader, NLMSG_DONE};
use cnbus::proc::{request, EventBody, EventSet, McastOp, ProcEvent, Task};
use common::{parse_int, Fixture};

fn is_framing_key(k: &str) -> bool {
    k == "msgs" || k.starts_with("dgram.") || k.starts_with("nl.") || k.starts_with("cn.")
}

fn what_name(ev: &ProcEvent) -> &'static str {
    match ev.body {
        EventBody::Ack { .. } => "NONE",
        EventBody::Fork { .. } => "FORK",
        EventBody::Exec { .. } => "EXEC",
        EventBody::Uid { .. } => "UID",
        EventBody::Gid { .. } => "GID",
        EventBody::Sid { .. } => "SID",
        EventBody::Ptrace { .. } => "PTRACE",
        EventBody::Comm { .. } => "COMM",
        EventBody::Coredump { .. } => "COREDUMP",
        EventBody::Exit { .. } => "EXIT",
    }
}

/// The value of `key` in the decoded event, as the fixture would write it.
fn event_value(ev: &ProcEvent, key: &str) -> Option<String> {
    let num = |v: u64| Some(v.to_string());
    let opt = |t: Option<Task>| t.unwrap_or_default();
    Some(match (key, ev.body) {
        ("what", _) => what_name(ev).to_string(),
        ("cpu", _) => return num(ev.cpu.into()),
        ("timestamp_ns", _) => return num(ev.timestamp_ns),
        ("err", EventBody::Ack { err }) => return num(err.into()),
        ("parent_pid", EventBody::Fork { parent, .. }) => return num(parent.pid.into()),
        ("parent_tgid", EventBody::Fork { parent, .. }) => return num(parent.tgid.into()),
        ("child_pid", EventBody::Fork { child, .. }) => return num(child.pid.into()),
        ("child_tgid", EventBody::Fork { child, .. }) => return num(child.tgid.into()),
        ("comm", EventBody::Comm { comm, .. }) => comm.to_string(),
        ("exit_code", EventBody::Exit { status, .. }) => return num(status.raw().into()),
        ("exit_signal", EventBody::Exit { exit_signal, .. }) => exit_signal.to_string(),
        ("parent_pid", EventBody::Exit { parent, .. }) => return num(opt(parent).pid.into()),
        ("parent_tgid", EventBody::Exit { parent, .. }) => return num(opt(parent).tgid.into()),
        ("process_pid", _) => return num(ev.task()?.pid.into()),
        ("process_tgid", _) => return num(ev.task()?.tgid.into()),
        _ => return None,
    })
}

fn same(want: &str, got: &str) -> bool {
    let int = |s: &str| {
        if s.starts_with("0x") || s.bytes().all(|b| b.is_ascii_digit()) {
            Some(parse_int(s))
        } else {
            None
        }
    };
    match (int(want), int(got)) {
        (Some(a), Some(b)) => a == b,
        _ => want == got,
    }
}

#[test]
fn every_proc_event_fixture_decodes_to_its_expected_values() {
    let names: Vec<String> = Fixture::all()
        .into_iter()
        .filter(|n| n.starts_with("proc_") && !n.starts_with("proc_listen"))
        .collect();
    assert!(names.len() >= 5, "proc event fixtures missing: {names:?}");
    for name in names {
        let f = Fixture::load(&name);
        let mut it = messages(Bytes::from(f.bytes.clone()));
        let Some(Ok(Message::Connector(c))) = it.next() else {
            panic!("{name}: not a connector message")
        };
        // Captured kernel datagrams come from port 0; the fixture says nl.pid=0 too.
        let ev = ProcEvent::from_kernel(0, &c.msg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            ProcEvent::from_kernel(4242, &c.msg).is_err(),
            "{name}: accepted from a user-space port"
        );
        assert_eq!(ev.seq, c.msg.seq, "{name}: seq");
        assert_eq!(ev.ack, c.msg.ack, "{name}: ack");
        let mut checked = 0;
        for (k, want) in &f.expect {
            if is_framing_key(k) {
                continue;
            }
            let got = event_value(&ev, k)
                .unwrap_or_else(|| panic!("{name}: key {k} has no value in {ev:?}"));
            assert!(same(want, &got), "{name}: {k}: want {want}, got {got}");
            checked += 1;
        }
        assert!(checked >= 3, "{name}: only {checked} proc keys checked");
        // The encoder is the exact inverse on what the kernel sent.
        let mut out = Vec::new();
        ev.emit(&mut out);
        assert_eq!(
            &out[..],
            &c.msg.data[..],
            "{name}: emit differs from the kernel's bytes"
        );
        if let EventBody::Exit { status, .. } = ev.body {
            assert_eq!(status.code(), Some(3), "{name}: _exit(3)");
        }
    }
}

#[test]
fn request_fixtures_are_what_the_encoder_builds() {
    for name in ["proc_listen.hex", "proc_listen_filter.hex"] {
        let f = Fixture::load(name);
        let Some(Ok(Message::Connector(c))) = messages(Bytes::from(f.bytes.clone())).next() else {
            panic!("{name}: not a connector message")
        };
        let op = match f.get("mcast_op").map(parse_int) {
            Some(1) => McastOp::Listen,
            Some(2) => McastOp::Ignore,
            other => panic!("{name}: mcast_op {other:?}"),
        };
        let filter = f
            .get("event_type")
            .map(|v| EventSet::from_bits_truncate(parse_int(v) as u32));
        for (k, _) in &f.expect {
            assert!(
                is_framing_key(k) || k == "mcast_op" || k == "event_type",
                "{name}: unchecked key {k}"
            );
        }
        let msg = request(op, filter, c.msg.seq, c.msg.ack);
        assert_eq!(msg, c.msg, "{name}: encoder output differs");
        let mut out = Vec::new();
        let nl = NlHeader {
            ty: NLMSG_DONE,
            seq: c.nl.seq,
            pid: c.nl.pid,
            ..Default::default()
        };
        encode(nl, &msg, &mut out).unwrap();
        assert_eq!(out, f.bytes, "{name}: datagram differs");
    }
}
