//! The connector core against the real kernel: registry, dispatcher, groups, requests,
//! loss accounting and shutdown.
//!
//! Groups 12..=19 belong to this file, one per test, so parallel tests never hear each
//! other; each test also uses its own idx.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus::connector::{Connector, Event, Match};
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};
use common::{kernel_socket, test_idx, wait_for};

fn need_kernel(name: &str) -> bool {
    kernel_socket(name).is_some()
}

/// Runs in a child process (see `two_processes_exchange_through_a_group`): publishes
/// `count` numbered messages of `idx` (vals 1..=3) on `group`.
#[test]
fn child_publisher() {
    let Ok(spec) = std::env::var("CNBUS_TEST_PUBLISH") else {
        return;
    };
    let v: Vec<u32> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let (group, idx, count) = (v[0], v[1], v[2]);
    let conn = Connector::builder().spawn().unwrap();
    for i in 0..count {
        let id = CbId::new(idx, 1 + i % 3);
        conn.send_numbered(id, format!("msg {i}").into_bytes(), Dest::Group(group))
            .unwrap();
    }
    println!("child port {}", conn.port_id());
}

#[test]
fn two_processes_exchange_through_a_group() {
    if !need_kernel("two_processes_exchange_through_a_group") {
        return;
    }
    let (group, idx) = (12, test_idx(10));
    let conn = Connector::builder().spawn().unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let (_reg, rx) = conn.channel(Match::Idx(idx), 1024);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_publisher",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CNBUS_TEST_PUBLISH", format!("{group},{idx},30"))
        .output()
        .unwrap();
    assert!(out.status.success());
    // The child's messages only: on a busy host others may send on this group and idx.
    let child: u32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.split("child port ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the child prints its port");
    let mut got = Vec::new();
    while got.len() < 30 {
        let m = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("message from the other process");
        if m.source.port == child {
            assert_eq!(m.source.group, group);
            got.push(m);
        }
    }
    // All 30, in order: nothing of the child's stream was lost or reordered.
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.msg.id, CbId::new(idx, 1 + i as u32 % 3));
        assert_eq!(m.msg.data, format!("msg {i}").into_bytes());
    }
}

#[test]
fn wildcard_sees_every_val_and_exact_sees_one() {
    if !need_kernel("wildcard_sees_every_val_and_exact_sees_one") {
        return;
    }
    let (group, idx) = (13, test_idx(11));
    let conn = Connector::builder().spawn().unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let (_w, wild) = conn.channel(Match::Idx(idx), 64);
    let (_e, exact) = conn.channel(CbId::new(idx, 2), 64);
    let tx = Connector::builder().spawn().unwrap();
    let msgs: Vec<CnMsg> = (1..=5)
        .map(|v| CnMsg::new(CbId::new(idx, v), vec![v as u8]))
        .collect();
    assert_eq!(tx.send_batch(&msgs, Dest::Group(group)).unwrap(), 5);
    // tx's messages only: on a busy host others may send on this group and idx.
    let txp = tx.port_id();
    let vals: Vec<u32> = std::iter::from_fn(|| wild.recv_timeout(Duration::from_secs(5)).ok())
        .filter(|m| m.source.port == txp)
        .take(5)
        .map(|m| m.msg.id.val)
        .collect();
    assert_eq!(vals, vec![1, 2, 3, 4, 5]);
    let mine: Vec<u32> = std::iter::from_fn(|| exact.recv_timeout(Duration::from_millis(300)).ok())
        .filter(|m| m.source.port == txp)
        .map(|m| m.msg.id.val)
        .collect();
    assert_eq!(mine, vec![2], "the exact match sees val 2 only, once");
    let s = tx.stats();
    assert_eq!(s.sent_messages, 5);
    assert_eq!(
        s.sent_datagrams, 1,
        "five small messages share one datagram"
    );
}

#[test]
fn a_dropped_registration_stops_receiving_mid_stream() {
    if !need_kernel("a_dropped_registration_stops_receiving_mid_stream") {
        return;
    }
    let (group, id) = (14, CbId::new(test_idx(12), 1));
    let conn = Connector::builder().spawn().unwrap();
    let _sub = conn.subscribe(group).unwrap();
    // tx's messages only: on a busy host others may send on this group and id.
    let tx = Connector::builder().spawn().unwrap();
    let txp = tx.port_id();
    let counted = Arc::new(AtomicU64::new(0));
    let c = counted.clone();
    let reg = conn.register(id, move |m| {
        if m.source().port == txp {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (_keep, all) = conn.channel(id, 4096);
    let recv_mine = |n: usize| {
        let mut k = 0;
        while k < n {
            if all
                .recv_timeout(Duration::from_secs(5))
                .unwrap()
                .source
                .port
                == txp
            {
                k += 1;
            }
        }
    };
    for _ in 0..100 {
        tx.send_numbered(id, &b"x"[..], Dest::Group(group)).unwrap();
    }
    recv_mine(100);
    reg.unregister();
    let at_drop = counted.load(Ordering::SeqCst);
    assert_eq!(at_drop, 100);
    for _ in 0..100 {
        tx.send_numbered(id, &b"y"[..], Dest::Group(group)).unwrap();
    }
    recv_mine(100);
    assert_eq!(
        counted.load(Ordering::SeqCst),
        at_drop,
        "no call after unregister returned"
    );
}

#[test]
fn registering_and_unregistering_from_inside_a_callback_does_not_deadlock() {
    if !need_kernel("registering_and_unregistering_from_inside_a_callback_does_not_deadlock") {
        return;
    }
    let (group, idx) = (14, test_idx(13));
    let conn = Connector::builder().spawn().unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let h = conn.handle();
    // tx's messages only: on a busy host others may send on this group and idx.
    let tx = Connector::builder().spawn().unwrap();
    let txp = tx.port_id();
    let slot = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (s2, seen) = (slot.clone(), Arc::new(AtomicU64::new(0)));
    let seen2 = seen.clone();
    let first = conn.register(CbId::new(idx, 1), move |m| {
        if m.source().port != txp {
            return;
        }
        // Each message registers a fresh callback and drops the previous one.
        let s = seen2.clone();
        let reg = h.register(CbId::new(idx, 2), move |m| {
            if m.source().port == txp {
                s.fetch_add(1, Ordering::SeqCst);
            }
        });
        let mut v = s2.lock();
        v.clear(); // drops (unregisters) the older one, on the dispatcher thread
        v.push(reg);
    });
    for v in [1, 2, 1, 2] {
        tx.send(
            &CnMsg::new(CbId::new(idx, v), &b"z"[..]),
            Dest::Group(group),
        )
        .unwrap();
    }
    assert!(wait_for(Duration::from_secs(5), || seen
        .load(Ordering::SeqCst)
        == 2));
    drop(first);
    assert_eq!(conn.registry().len(), 1);
    slot.lock().clear();
    assert!(conn.registry().is_empty());
}

#[test]
fn a_panicking_callback_does_not_stop_the_others() {
    if !need_kernel("a_panicking_callback_does_not_stop_the_others") {
        return;
    }
    let (group, id) = (15, CbId::new(test_idx(14), 1));
    let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let ev = events.clone();
    let conn = Connector::builder()
        .on_event(move |e| ev.lock().push(e.clone()))
        .spawn()
        .unwrap();
    let _sub = conn.subscribe(group).unwrap();
    // Only our sender's messages count: on a busy host others may send on our id.
    let tx = Connector::builder().spawn().unwrap();
    let txp = tx.port_id();
    let _bad = conn.register(id, move |m| {
        if m.source().port == txp && m.data()[0] % 2 == 0 {
            panic!("callback fault on {}", m.data()[0]);
        }
    });
    let (_good, rx) = conn.channel(id, 64);
    for i in 0..10u8 {
        tx.send_numbered(id, vec![i], Dest::Group(group)).unwrap();
    }
    let got: Vec<u8> = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok())
        .filter(|m| m.source.port == txp)
        .take(10)
        .map(|m| m.msg.data[0])
        .collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    assert_eq!(conn.stats().callback_panics, 5);
    let panics = events
        .lock()
        .iter()
        .filter(|e| matches!(e, Event::CallbackPanic { message, .. } if message.starts_with("callback fault")))
        .count();
    assert_eq!(panics, 5);
}

/// Shutdown wakes the dispatcher out of `poll` (which has no timeout: only the eventfd can
/// end the wait) and joins it, idle and while datagrams keep coming. A watchdog, not a
/// timing assertion: a busy host may leave the thread unscheduled for a while, but a
/// shutdown that did not wake it would never return. The time taken is printed. (Before,
/// the test demanded 100 ms while subscribed to group 16, where a busy host's senders
/// multicast: a time bound on a loaded machine, and not idle.)
#[test]
fn shutdown_wakes_the_dispatcher_and_returns() {
    if !need_kernel("shutdown_wakes_the_dispatcher_and_returns") {
        return;
    }
    for busy in [false, true] {
        let conn = Connector::builder().spawn().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = busy.then(|| {
            let (to, stop) = (Dest::Port(conn.port_id()), stop.clone());
            let tx = cnbus::sys::ConnectorSocket::open().unwrap();
            let mut d = cnbus::codec::DatagramBuilder::new(256).with_pid(tx.port_id());
            d.push(&CnMsg::new(CbId::new(test_idx(20), 1), &b"x"[..]))
                .unwrap();
            let d = d.take();
            std::thread::spawn(move || {
                // Without waiting for room: the receiver stops reading.
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(None) = tx.try_send(&d, to) {
                        std::thread::yield_now();
                    }
                }
            })
        });
        // Most likely blocked in poll (idle) or reading (busy) by now; either way it must
        // stop.
        std::thread::sleep(Duration::from_millis(50));
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            conn.shutdown();
            let _ = done_tx.send(t.elapsed());
        });
        let took = done
            .recv_timeout(Duration::from_secs(60))
            .expect("shutdown never returned: the dispatcher was not woken");
        stop.store(true, Ordering::SeqCst);
        if let Some(t) = flood {
            t.join().unwrap();
        }
        eprintln!("shutdown (busy: {busy}) took {took:?}");
    }
}

#[test]
fn groups_are_reference_counted() {
    if !need_kernel("groups_are_reference_counted") {
        return;
    }
    let (group, id) = (17, CbId::new(test_idx(15), 1));
    let conn = Connector::builder().spawn().unwrap();
    let (_r, rx) = conn.channel(id, 64);
    let a = conn.subscribe(group).unwrap();
    let b = conn.subscribe(group).unwrap();
    assert_eq!(conn.subscribers(group), 2);
    let tx = Connector::builder().spawn().unwrap();
    // tx's messages only: on a busy host others may send on this group and id.
    let txp = tx.port_id();
    drop(a);
    tx.send(&CnMsg::new(id, &b"1"[..]), Dest::Group(group))
        .unwrap();
    assert!(
        std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok())
            .any(|m| m.source.port == txp && m.msg.data == b"1"[..]),
        "still a member"
    );
    drop(b);
    assert_eq!(conn.subscribers(group), 0);
    tx.send(&CnMsg::new(id, &b"2"[..]), Dest::Group(group))
        .unwrap();
    assert!(
        !std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(200)).ok())
            .any(|m| m.source.port == txp),
        "left the group"
    );
    assert!(matches!(
        conn.subscribe(0),
        Err(cnbus::Error::InvalidArgument(_))
    ));
}

#[test]
fn kernel_owned_ids_and_groups_are_refused_for_multicast() {
    if !need_kernel("kernel_owned_ids_and_groups_are_refused_for_multicast") {
        return;
    }
    let conn = Connector::builder().spawn().unwrap();
    let e = conn
        .send(&CnMsg::new(CbId::new(1, 1), &b"x"[..]), Dest::Group(18))
        .unwrap_err();
    assert!(matches!(e, cnbus::Error::KernelOwned { .. }), "{e}");
    let e = conn
        .send(
            &CnMsg::new(CbId::new(test_idx(16), 1), &b"x"[..]),
            Dest::Group(5),
        )
        .unwrap_err();
    assert!(
        matches!(e, cnbus::Error::KernelOwned { group: 5, .. }),
        "{e}"
    );
    assert_eq!(conn.stats().sent_messages, 0);
}

#[test]
fn request_gets_the_reply_by_seq_and_ack() {
    if !need_kernel("request_gets_the_reply_by_seq_and_ack") {
        return;
    }
    let id = CbId::new(test_idx(17), 9);
    let server = Connector::builder().spawn().unwrap();
    let h = server.handle();
    let _svc = server.register(id, move |m| {
        let m = m.to_incoming();
        let reply = CnMsg::reply_to(&m.msg, [&b"re: "[..], &m.msg.data[..]].concat());
        h.send(&reply, Dest::Port(m.source.port)).unwrap();
    });
    let client = Connector::builder().spawn().unwrap();
    let (_other, unmatched) = client.channel(id, 8);
    for i in 0..3 {
        let seq = client.next_seq(id);
        let req = CnMsg::new(id, format!("q{i}").into_bytes()).with_seq(seq, 100);
        let r = client
            .request(&req, Dest::Port(server.port_id()), Duration::from_secs(2))
            .unwrap();
        assert_eq!(r.msg.data, format!("re: q{i}").into_bytes());
        assert_eq!((r.msg.seq, r.msg.ack), (seq, 101));
        assert_eq!(r.source.port, server.port_id());
    }
    assert!(
        unmatched.try_recv().is_err(),
        "replies go to the requester only"
    );
    assert_eq!(client.stats().replies, 3);
    let silent = CnMsg::new(CbId::new(test_idx(18), 1), &b"?"[..]).with_seq(1, 0);
    let e = client
        .request(
            &silent,
            Dest::Port(server.port_id()),
            Duration::from_millis(50),
        )
        .unwrap_err();
    assert!(matches!(e, cnbus::Error::TimedOut { .. }));
}

/// A small receive buffer, a slow callback and a fast sender: the kernel drops
/// datagrams, the connector sees ENOBUFS, and sequence gaps count exactly what was lost.
#[test]
fn loss_is_counted_exactly_with_a_small_buffer() {
    if !need_kernel("loss_is_counted_exactly_with_a_small_buffer") {
        return;
    }
    let (group, id) = (19, CbId::new(test_idx(19), 1));
    // On a busy host others may send on our group and id too: count our sender's stream
    // only (its deliveries, its gaps, its order).
    let tx = Connector::builder().spawn().unwrap();
    let txp = tx.port_id();
    let overruns = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let (o, l) = (overruns.clone(), lost.clone());
    let rx_bus = Connector::builder()
        .recv_buffer(8 << 10)
        .on_event(move |e| match e {
            Event::Overrun => {
                o.fetch_add(1, Ordering::SeqCst);
            }
            Event::Lost { port, count, .. } if *port == txp => {
                l.fetch_add(u64::from(*count), Ordering::SeqCst);
            }
            _ => {}
        })
        .spawn()
        .unwrap();
    let _sub = rx_bus.subscribe(group).unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let reordered = Arc::new(AtomicU64::new(0));
    let last_seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (d, r, ls) = (delivered.clone(), reordered.clone(), last_seen.clone());
    let mut last = None;
    let _reg = rx_bus.register(id, move |m| {
        if m.source().port != txp {
            return;
        }
        if last.is_some_and(|l| m.seq() <= l) {
            r.fetch_add(1, Ordering::SeqCst);
        }
        last = Some(m.seq());
        ls.store(m.seq(), Ordering::SeqCst);
        if d.fetch_add(1, Ordering::SeqCst) % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let n = 20_000u64;
    for _ in 0..n {
        tx.send_numbered(id, vec![0u8; 64], Dest::Group(group))
            .unwrap();
    }
    // Closing messages until the receiver has one, so a loss at the tail shows as a gap
    // (on a busy host the receiver may still be draining, or drop a lone final message).
    let closing = common::close_stream(
        || {
            tx.send_numbered(id, vec![1u8; 64], Dest::Group(group))
                .unwrap()
        },
        || last_seen.load(Ordering::SeqCst),
        Duration::from_secs(1),
    );
    let sent = n + closing;
    assert!(
        wait_for(Duration::from_secs(10), || {
            delivered.load(Ordering::SeqCst) + lost.load(Ordering::SeqCst) == sent
        }),
        "sent {sent}, delivered {delivered:?}, lost {lost:?}: {:?}",
        rx_bus.stats()
    );
    let s = rx_bus.stats();
    let got = delivered.load(Ordering::SeqCst);
    let lost = lost.load(Ordering::SeqCst);
    assert!(s.overruns > 0, "the test must provoke loss: {s:?}");
    assert!(lost > 0 && s.lost >= lost, "{s:?}");
    assert_eq!(
        got + lost,
        sent,
        "delivered {got} + lost {lost} != sent {sent}"
    );
    // Every overrun counted is reported (just after it is counted; a busy host's senders
    // on our group may overrun the small queue again at any time, so no equality).
    assert!(
        wait_for(Duration::from_secs(10), || overruns.load(Ordering::SeqCst)
            >= s.overruns),
        "every overrun is reported: {} of {}",
        overruns.load(Ordering::SeqCst),
        s.overruns
    );
    assert_eq!(reordered.load(Ordering::SeqCst), 0);
    eprintln!(
        "sent {sent}, delivered {got}, lost {lost}, overruns {}",
        s.overruns
    );
}

/// A registry driven by hand (no dispatcher thread declared, or dispatched on another
/// thread than the connector's): a callback that drops its own registration must not wait
/// for itself. Before the fix, `unregister` took the callback's own mutex on the thread
/// that held it and never returned.
#[test]
fn a_callback_dropping_its_own_registration_on_a_hand_driven_registry_does_not_deadlock() {
    use cnbus::connector::{Incoming, Registration, Registry, Source};
    let id = CbId::new(test_idx(0x70), 1);
    let msg = Incoming {
        msg: CnMsg::new(id, &b"x"[..]),
        source: Source { port: 1, group: 0 },
    };
    let run = |registry: Registry| {
        let slot: Arc<parking_lot::Mutex<Option<Registration>>> = Arc::default();
        let calls = Arc::new(AtomicU64::new(0));
        let (s, c) = (slot.clone(), calls.clone());
        *slot.lock() = Some(registry.register(id, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            // Drop our own registration, from inside the call, on this (non-dispatcher)
            // thread.
            let reg = s.lock().take();
            drop(reg);
        }));
        let (done_tx, done) = std::sync::mpsc::channel();
        let (r, m) = (registry.clone(), msg.clone());
        std::thread::spawn(move || {
            let first = r.dispatch(&m.as_delivery());
            let second = r.dispatch(&m.as_delivery());
            let _ = done_tx.send((first, second));
        });
        // Generous: the dispatch is two function calls; a deadlock never returns.
        let (first, second) = done
            .recv_timeout(Duration::from_secs(60))
            .expect("dispatch deadlocked: unregister waited for its own callback");
        assert_eq!(first.delivered, 1);
        assert_eq!(second.delivered, 0, "unregistered: never called again");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(registry.is_empty());
    };
    // A bare registry.
    run(Registry::new());
    // A connector's registry, dispatched by hand on a thread other than its dispatcher.
    if kernel_socket("hand_driven_connector_registry").is_some() {
        let conn = Connector::builder().spawn().unwrap();
        run(conn.registry().clone());
    }
}
