//! Serialize/Deserialize (feature `serde`): stable field names, data as bytes, round trips.
#![cfg(feature = "serde")]

use cnbus::connector::{Received, Source, Stats};
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
    let r = Received {
        msg: CnMsg::new(CbId::new(0x4000, 7), vec![0u8, 255, 7]),
        source: Source { port: 0, group: 1 },
    };
    let s = serde_json::to_string(&r).unwrap();
    assert!(s.contains(r#""source":{"port":0,"group":1}"#), "{s}");
    assert_eq!(serde_json::from_str::<Received>(&s).unwrap(), r);
    let stats = Stats {
        lost: 3,
        overruns: 1,
        ..Stats::default()
    };
    let v = serde_json::to_value(stats).unwrap();
    assert_eq!(v["lost"], 3);
    assert_eq!(v["overruns"], 1);
    assert_eq!(serde_json::from_value::<Stats>(v).unwrap(), stats);
}
