//! Serialize/Deserialize (feature `serde`): stable field names, data as bytes, round trips.
#![cfg(feature = "serde")]

use cnbus::connector::{Incoming, Source, Stats};
use cnbus::{CbId, CnMsg};
use serde_json::json;

#[test]
fn ids_and_messages_have_stable_field_names() {
    let m = CnMsg::new(CbId::new(14, 0x456), &b"hi"[..]).with_seq(3, 4);
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(
        v,
        json!({"id": {"idx": 14, "val": 0x456}, "seq": 3, "ack": 4, "flags": 0, "data": [104, 105]})
    );
    let back: CnMsg = serde_json::from_value(v).unwrap();
    assert_eq!(back, m);
}

#[test]
fn received_messages_and_stats_round_trip() {
    let r = Incoming {
        msg: CnMsg::new(CbId::new(0x4000, 7), vec![0u8, 255, 7]),
        source: Source { port: 0, group: 1 },
    };
    let s = serde_json::to_string(&r).unwrap();
    assert!(s.contains(r#""source":{"port":0,"group":1}"#), "{s}");
    assert_eq!(serde_json::from_str::<Incoming>(&s).unwrap(), r);
    let stats = Stats {
        lost: 3,
        overruns: 1,
        ..Stats::default()
    };
    let v = serde_json::to_value(stats).unwrap();
    assert_eq!(v["lost"], 3);
    assert_eq!(v["overruns"], 1);
    // Every key, as docs/ARCHITECTURE.md lists them ("Serialised forms").
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| &k[..]).collect();
    keys.sort_unstable();
    let mut documented = vec![
        "datagrams",
        "messages",
        "bytes",
        "dispatched",
        "delivered",
        "unmatched",
        "shutdown_discards",
        "decode_errors",
        "truncated",
        "overruns",
        "lost",
        "reordered",
        "callback_panics",
        "channel_full",
        "replies",
        "control",
        "sent_messages",
        "sent_datagrams",
        "send_errors",
        "numbering_evictions",
        "tracker_evictions",
        "kernel_drops",
    ];
    documented.sort_unstable();
    assert_eq!(keys, documented);
    assert_eq!(serde_json::from_value::<Stats>(v).unwrap(), stats);
}

#[test]
fn proc_events_have_stable_field_names_and_round_trip() {
    use cnbus::proc::{EventBody, ExitStatus, Loss, ProcEvent, Received, Task};
    let ev = ProcEvent {
        seq: 5,
        ack: 0,
        cpu: 1,
        timestamp_ns: 42,
        body: EventBody::Exit {
            process: Task { pid: 10, tgid: 10 },
            status: ExitStatus(0x300),
            exit_signal: 17,
            parent: Some(Task { pid: 1, tgid: 1 }),
        },
    };
    let v = serde_json::to_value(ev).unwrap();
    assert_eq!(
        v,
        json!({"seq": 5, "ack": 0, "cpu": 1, "timestamp_ns": 42, "body": {
            "event": "exit", "process": {"pid": 10, "tgid": 10}, "status": 768,
            "exit_signal": 17, "parent": {"pid": 1, "tgid": 1}}})
    );
    assert_eq!(serde_json::from_value::<ProcEvent>(v).unwrap(), ev);

    let comm = EventBody::Comm {
        process: Task { pid: 3, tgid: 3 },
        comm: cnbus::proc::Comm::new(b"cnbus-fixture"),
    };
    let v = serde_json::to_value(comm).unwrap();
    assert_eq!(v["comm"], "cnbus-fixture");
    assert_eq!(serde_json::from_value::<EventBody>(v).unwrap(), comm);

    let lost = Received::Lost(Loss::Gap { cpu: 1, count: 3 });
    let v = serde_json::to_value(lost).unwrap();
    assert_eq!(v, json!({"lost": {"cause": "gap", "cpu": 1, "count": 3}}));
    assert_eq!(serde_json::from_value::<Received>(v).unwrap(), lost);
}
