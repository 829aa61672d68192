//! Serialize/Deserialize of the proc types (feature `serde`): field names and round trips.
#![cfg(feature = "serde")]

use cnbus::proc::{EventBody, ExitStatus, Loss, ProcEvent, Received, Task};
use serde_json::json;

#[test]
fn exit_event_round_trips_with_stable_names() {
    let ev = ProcEvent {
        seq: 9,
        ack: 0,
        cpu: 1,
        timestamp_ns: 123,
        body: EventBody::Exit {
            process: Task { pid: 5, tgid: 5 },
            status: ExitStatus(0x300),
            exit_signal: 17,
            parent: Some(Task { pid: 1, tgid: 1 }),
        },
    };
    let v = serde_json::to_value(ev).unwrap();
    assert_eq!(
        v,
        json!({
            "seq": 9, "ack": 0, "cpu": 1, "timestamp_ns": 123,
            "body": {"Exit": {
                "process": {"pid": 5, "tgid": 5},
                "status": 768,
                "exit_signal": 17,
                "parent": {"pid": 1, "tgid": 1}
            }}
        })
    );
    assert_eq!(serde_json::from_value::<ProcEvent>(v).unwrap(), ev);
    let lost = Received::Lost(Loss::Gap { cpu: 1, count: 4 });
    let v = serde_json::to_value(lost).unwrap();
    assert_eq!(v, json!({"Lost": {"Gap": {"cpu": 1, "count": 4}}}));
    assert_eq!(serde_json::from_value::<Received>(v).unwrap(), lost);
}
