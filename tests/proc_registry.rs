//! Proc events through a shared connector's registry (the callback path).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus::connector::Connector;
use cnbus::proc::{self, EventBody, EventSet, Received};
use common::{kernel_socket, sh};
use parking_lot::Mutex;

#[test]
fn a_connector_callback_receives_typed_proc_events() {
    if kernel_socket("a_connector_callback_receives_typed_proc_events").is_none() {
        return;
    }
    let foreign = common::ForeignOnGroup1::start();
    let bus = Connector::builder().recv_buffer(8 << 20).spawn().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let events = proc::register(
        &bus,
        EventSet::FORK | EventSet::EXEC | EventSet::EXIT,
        move |r| {
            if let Received::Event(ev) = r {
                s.lock().push(ev.body);
            }
        },
    )
    .unwrap();
    let (pid, status) = sh("exit 4");
    assert_eq!(status.code(), Some(4));
    let end = Instant::now() + Duration::from_secs(5);
    let (mut fork, mut exec, mut exit) = (false, false, None);
    while Instant::now() < end && !(fork && exec && exit.is_some()) {
        std::thread::sleep(Duration::from_millis(10));
        for body in seen.lock().iter() {
            match *body {
                EventBody::Fork { child, .. } if child.tgid == pid => fork = true,
                EventBody::Exec { process } if process.tgid == pid => exec = true,
                EventBody::Exit {
                    process, status, ..
                } if process.tgid == pid => exit = status.code(),
                EventBody::Comm { .. } | EventBody::Uid { .. } => {
                    panic!("an event outside the set was delivered: {body:?}")
                }
                _ => {}
            }
        }
    }
    assert!(fork && exec, "fork {fork} exec {exec}");
    assert_eq!(exit, Some(4));
    let st = events.stats();
    assert!(st.events >= 3);
    assert_eq!(st.seq_lost, Some(0), "{st:?}");
    drop(events);
    foreign.check_spoofed(
        "a_connector_callback_receives_typed_proc_events",
        st.spoofed,
    );
}
