//! Decoding and encoding tests of the proc wire format.

use super::kind::*;
use super::*;

fn ev(what: u32, body: &[u32]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&what.to_ne_bytes());
    d.extend_from_slice(&3u32.to_ne_bytes());
    d.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_ne_bytes());
    for w in body {
        d.extend_from_slice(&w.to_ne_bytes());
    }
    d.resize(PROC_EVENT_LEN, 0);
    d
}

#[test]
fn decodes_every_kind() {
    let p = |w, b: &[u32]| ProcEvent::parse(&ev(w, b)).unwrap();
    let e = p(WHAT_FORK, &[10, 10, 11, 10]);
    assert_eq!(e.cpu, 3);
    assert_eq!(e.timestamp_ns, 0x0123_4567_89ab_cdef);
    assert_eq!(
        e.body,
        EventBody::Fork {
            parent: Task { pid: 10, tgid: 10 },
            child: Task { pid: 11, tgid: 10 }
        }
    );
    assert!(e.task().unwrap().is_thread());
    assert_eq!(p(WHAT_NONE, &[22]).body, EventBody::Ack { err: 22 });
    assert!(matches!(p(WHAT_EXEC, &[5, 5]).body, EventBody::Exec { .. }));
    assert_eq!(
        p(WHAT_UID, &[5, 5, 65534, 0]).body,
        EventBody::Uid {
            process: Task { pid: 5, tgid: 5 },
            ruid: 65534,
            euid: 0
        }
    );
    assert!(matches!(
        p(WHAT_GID, &[5, 5, 1, 2]).body,
        EventBody::Gid {
            rgid: 1,
            egid: 2,
            ..
        }
    ));
    assert!(matches!(p(WHAT_SID, &[5, 5]).body, EventBody::Sid { .. }));
    assert!(matches!(
        p(WHAT_PTRACE, &[5, 5, 0, 0]).body,
        EventBody::Ptrace { tracer: None, .. }
    ));
    assert!(matches!(
        p(WHAT_PTRACE, &[5, 5, 7, 7]).body,
        EventBody::Ptrace {
            tracer: Some(Task { pid: 7, tgid: 7 }),
            ..
        }
    ));
    let mut c = ev(WHAT_COMM, &[5, 5]);
    c[24..29].copy_from_slice(b"hello");
    let e = ProcEvent::parse(&c).unwrap();
    let EventBody::Comm { comm, .. } = e.body else {
        panic!()
    };
    assert_eq!(comm.as_bytes(), b"hello");
    assert!(matches!(
        p(WHAT_COREDUMP, &[5, 5, 1, 1]).body,
        EventBody::Coredump {
            parent: Some(_),
            ..
        }
    ));
    let e = p(WHAT_EXIT, &[5, 5, 0x300, 17, 1, 1]);
    let EventBody::Exit {
        status,
        exit_signal,
        ..
    } = e.body
    else {
        panic!()
    };
    assert_eq!(status.code(), Some(3));
    assert_eq!(exit_signal, 17);
    let e = p(WHAT_EXIT, &[6, 5, 9, u32::MAX, 0, 0]);
    let EventBody::Exit {
        status,
        exit_signal,
        parent,
        ..
    } = e.body
    else {
        panic!()
    };
    assert_eq!(status.signal(), Some(9));
    assert_eq!(status.code(), None);
    assert_eq!(exit_signal, -1);
    assert_eq!(parent, None);
}

#[test]
fn exit_status_decoding() {
    assert_eq!(ExitStatus(0).code(), Some(0));
    assert!(ExitStatus(0).success());
    assert_eq!(ExitStatus(0x0500).code(), Some(5));
    assert_eq!(ExitStatus(0x86).signal(), Some(6));
    assert!(ExitStatus(0x86).core_dumped());
    assert!(!ExitStatus(0x06).core_dumped());
    assert_eq!(ExitStatus(0x06).to_string(), "signal 6");
    assert_eq!(ExitStatus(0x86).to_string(), "signal 6 (core dumped)");
    assert_eq!(ExitStatus(0x0300).to_string(), "exit code 3");
    // A stopped status (0x7f low byte) is neither exited nor signaled.
    assert_eq!(ExitStatus(0x137f).code(), None);
    assert_eq!(ExitStatus(0x137f).signal(), None);
}

#[test]
fn short_and_unknown_are_errors_with_offsets() {
    let e = ProcEvent::parse_at(&[0; 15], 36).unwrap_err();
    assert_eq!(e.offset, 36);
    assert!(matches!(
        e.kind,
        DecodeErrorKind::ShortPayload {
            need: 16,
            have: 15,
            ..
        }
    ));
    let d = ev(WHAT_EXIT, &[]);
    let e = ProcEvent::parse_at(&d[..39], 36).unwrap_err();
    assert_eq!(e.offset, 52);
    assert!(matches!(
        e.kind,
        DecodeErrorKind::ShortPayload {
            what: "proc_event exit",
            need: 40,
            have: 39
        }
    ));
    // An exec needs only 24 bytes.
    assert!(ProcEvent::parse(&ev(WHAT_EXEC, &[1, 1])[..24]).is_ok());
    let e = ProcEvent::parse(&ev(0x3, &[])).unwrap_err();
    assert!(matches!(
        e.kind,
        DecodeErrorKind::UnknownValue { value: 3, .. }
    ));
    // NONZERO_EXIT is a filter bit, never a `what`.
    assert!(ProcEvent::parse(&ev(WHAT_NONZERO_EXIT, &[])).is_err());
}

#[test]
fn from_kernel_rejects_user_space_senders() {
    let msg = CnMsg::new(CbId::PROC, ev(WHAT_EXEC, &[9, 9])).with_seq(77, 0);
    assert_eq!(
        ProcEvent::from_kernel(1234, &msg),
        Err(Rejected::NotFromKernel { port: 1234 })
    );
    let e = ProcEvent::from_kernel(0, &msg).unwrap();
    assert_eq!(e.seq, 77);
    let other = CnMsg::new(CbId::new(2, 1), ev(WHAT_EXEC, &[9, 9]));
    assert!(matches!(
        ProcEvent::from_kernel(0, &other),
        Err(Rejected::NotProc { .. })
    ));
}

#[test]
fn filter_matches_the_kernel() {
    let exit = |code| ProcEvent::parse(&ev(WHAT_EXIT, &[5, 5, code, 17, 1, 1])).unwrap();
    let fork = ProcEvent::parse(&ev(WHAT_FORK, &[1, 1, 2, 2])).unwrap();
    let ack = ProcEvent::parse(&ev(WHAT_NONE, &[0])).unwrap();
    let nz = EventSet::NONZERO_EXIT;
    assert!(nz.matches(&exit(0x100)));
    assert!(!nz.matches(&exit(0)));
    assert!(!nz.matches(&fork));
    assert!(!nz.matches(&ack));
    let both = EventSet::NONZERO_EXIT | EventSet::EXIT;
    assert!(both.matches(&exit(0)));
    assert!(EventSet::ALL.matches(&ack));
    let all_but_comm = EventSet::from_bits_truncate(WHAT_ALL & !WHAT_COMM);
    assert!(!all_but_comm.matches(&ack));
    assert!((EventSet::FORK | EventSet::EXEC).matches(&fork));
}

#[test]
fn event_set_text() {
    let s: EventSet = "fork, exec,nonzero-exit".parse().unwrap();
    assert_eq!(s, EventSet::FORK | EventSet::EXEC | EventSet::NONZERO_EXIT);
    assert_eq!(s.to_string(), "fork,exec,nonzero-exit");
    assert_eq!("all".parse::<EventSet>().unwrap(), EventSet::ALL);
    assert_eq!(EventSet::ALL.bits(), 0xE000_03C7);
    assert!("forks".parse::<EventSet>().is_err());
    assert_eq!(EventSet::from_bits_truncate(0xffff_ffff), EventSet::ALL);
}

#[test]
fn request_encoding() {
    let m = request(McastOp::Listen, None, 1, 2);
    assert_eq!(&m.data[..], &1u32.to_ne_bytes());
    assert_eq!((m.seq, m.ack), (1, 2));
    let m = request(McastOp::Ignore, Some(EventSet::NONZERO_EXIT), 0, 0);
    assert_eq!(&m.data[..4], &2u32.to_ne_bytes());
    assert_eq!(&m.data[4..], &0x2000_0000u32.to_ne_bytes());
}

proptest::proptest! {
    #[test]
    fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
        let _ = ProcEvent::parse(&data);
    }

    #[test]
    fn parse_accepts_every_known_what(
        kind in 0usize..10,
        rest in proptest::collection::vec(proptest::num::u8::ANY, 36),
    ) {
        let mut d = EventKind::ALL[kind].what().to_ne_bytes().to_vec();
        d.extend_from_slice(&rest);
        let e = ProcEvent::parse(&d).unwrap();
        proptest::prop_assert_eq!(e.kind(), EventKind::ALL[kind]);
    }
}
