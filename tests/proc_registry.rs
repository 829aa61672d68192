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

/// The connector's `Stats::kernel_drops` and a registration's `LossStats::kernel_drops`
/// come from the socket's kernel counter; the registration's figure is exact only where the
/// gaps explain it (it has no witness of user-space multicasts), and it gives no drop count
/// once the socket carries other groups.
#[test]
fn a_registration_reports_the_kernel_drops_of_its_socket() {
    use std::sync::atomic::{AtomicBool, Ordering};
    if kernel_socket("a_registration_reports_the_kernel_drops_of_its_socket").is_none() {
        return;
    }
    let bus = Connector::builder().recv_buffer(16 << 10).spawn().unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let (release, released) = crossbeam::channel::bounded::<()>(1);
    let s = stall.clone();
    let reg = proc::register(&bus, EventSet::ALL, move |_| {
        // Stalls the dispatcher once, so the socket's queue overflows.
        if s.swap(false, Ordering::SeqCst) {
            let _ = released.recv();
        }
    })
    .unwrap();
    assert_eq!(bus.stats().kernel_drops, Some(0));
    stall.store(true, Ordering::SeqCst);
    for _ in 0..60 {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    release.send(()).unwrap();
    // Until the dispatcher has read the queue empty.
    let end = Instant::now() + Duration::from_secs(10);
    while bus.socket().meminfo().unwrap().rmem_alloc > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = reg.stats();
    let c = bus.stats();
    assert!(c.overruns >= 1, "{c:?}");
    let k = st.kernel_drops.expect("a proc-only socket gives its drops");
    assert!(k > 0 && Some(k) <= c.kernel_drops, "{st:?} {c:?}");
    let gaps = st.seq_lost.unwrap();
    assert!(gaps <= k, "{st:?}");
    match st.lost() {
        Some(n) => assert_eq!((n, gaps), (k, k), "exact only where gaps explain it"),
        None => assert_eq!(st.lost_at_most(), Some(k)),
    }
    // Another group on the socket: its drops are no longer proc events only.
    let _other = bus.subscribe(20).unwrap();
    assert_eq!(reg.stats().kernel_drops, None);
    drop(reg);
}
