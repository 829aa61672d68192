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
    // (`spoofed` may count other processes' multicasts on group 1: not asserted.)
    assert_eq!(st.seq_lost, Some(0), "{st:?}");
    drop(events);
}

/// Regression: dropping one of two proc registrations on one connector sent `IGNORE` on the
/// shared socket, after which the kernel filtered every proc event out for it and the other
/// registration silently received nothing. LISTEN / IGNORE are now counted per socket.
#[test]
fn dropping_one_of_two_registrations_keeps_the_other_receiving() {
    if kernel_socket("dropping_one_of_two_registrations_keeps_the_other_receiving").is_none() {
        return;
    }
    let bus = Connector::builder().recv_buffer(8 << 20).spawn().unwrap();
    let exits = Arc::new(Mutex::new(Vec::new()));
    let e = exits.clone();
    let keep = proc::register(&bus, EventSet::EXIT, move |r| {
        if let Received::Event(ev) = r {
            if let EventBody::Exit { process, .. } = ev.body {
                e.lock().push(process.tgid);
            }
        }
    })
    .unwrap();
    let other = proc::register(&bus, EventSet::ALL, |_| {}).unwrap();
    drop(other);
    let (pid, _) = sh("exit 0");
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !exits.lock().contains(&pid) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        exits.lock().contains(&pid),
        "the remaining registration did not see the exit of {pid}: {:?}",
        keep.stats()
    );
    drop(keep);
}
