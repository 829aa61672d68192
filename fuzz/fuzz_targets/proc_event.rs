//! proc_event parser: never panics on arbitrary bytes; what it accepts emits and parses
//! back to the same event.
#![no_main]

use cnbus::proc::ProcEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ev) = ProcEvent::parse(data) else {
        return;
    };
    let mut out = Vec::new();
    ev.emit(&mut out);
    assert_eq!(out.len(), cnbus::proc::PROC_EVENT_LEN);
    let again = ProcEvent::parse(&out).expect("an emitted event parses");
    assert_eq!(again, ev);
});
