//! Proc events through a shared connector's registry (the callback path).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus::connector::Connector;
use cnbus::proc::{self, EventBody, EventSet, ProcRegistration, Received};
use common::{kernel_socket, sh};
use parking_lot::Mutex;

/// Waits (10 s at most each) until `bus`'s dispatcher has read its queue empty and handled
/// everything that was in it (a marker unicast to the connector's own port once the queue
/// was found empty reaches its callback after all of that), then until `reg`'s loss figure
/// is settled (the dispatcher's snapshot at an empty queue since the last drop). A fixed
/// 50 ms pause stood for both before: too short for a dispatcher descheduled on a busy host.
fn drained(bus: &Connector, reg: &ProcRegistration) {
    let end = Instant::now() + Duration::from_secs(10);
    while bus.socket().meminfo().unwrap().rmem_alloc > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let id = cnbus::CbId::new(common::test_idx(9), 9);
    let marker = cnbus::sys::ConnectorSocket::open().unwrap();
    let from = marker.port_id();
    let (tx, rx) = crossbeam::channel::unbounded();
    let _reg = bus.register(id, move |m| {
        if m.source().port == from {
            let _ = tx.send(());
        }
    });
    let mut d = cnbus::codec::DatagramBuilder::new(128);
    d.push(&cnbus::CnMsg::new(id, &b"marker"[..])).unwrap();
    marker
        .send(d.as_bytes(), cnbus::sys::Dest::Port(bus.port_id()))
        .unwrap();
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the dispatcher never reached the marker"
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !reg.stats().foreign_settled && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
}

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
        // From our fork of the child on: an earlier holder of its pid (pid_max is 32768,
        // the host forks all the time) may have exited after the registration.
        (fork, exec, exit) = (false, false, None);
        for body in seen.lock().iter() {
            match *body {
                EventBody::Fork { parent, child }
                    if parent.tgid == std::process::id() && child.tgid == pid =>
                {
                    fork = true
                }
                EventBody::Exec { process } if fork && process.tgid == pid => exec = true,
                EventBody::Exit {
                    process, status, ..
                } if fork && process.pid == pid && exit.is_none() => exit = status.code(),
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
    // No gap without a loss (a busy host's burst can overflow even an 8 MiB queue).
    if st.overruns == 0 {
        assert_eq!(st.seq_lost, Some(0), "{st:?}");
    }
    drop(events);
    foreign.check_spoofed(
        "a_connector_callback_receives_typed_proc_events",
        st.spoofed,
    );
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
/// come from the socket's kernel counter. A registration whose dispatcher was stalled during
/// a burst reports the exact loss (the connector's witness takes out the user-space
/// multicasts on group 1), equal, per CPU, to the events a lossless reference saw after the
/// callback's last event before the burst and the callback did not get; and it gives no
/// drop count once the socket carries other groups.
///
/// It held on a quiet host and under `stress-ng --cpu 2` (60 of 60 runs), but failed 25 of
/// 60 under `scripts/busy_host.sh`, whose noise multicasts spoofed proc events on group 1
/// and whose fork storm overflows a 16 KiB queue at any time: the baseline was the raw
/// drop counter, which holds the user-space multicasts dropped before the burst, while the
/// figures compared with it take them out (`hi - before` went below zero, 23 runs); the
/// queue overflowed again after the burst, so the figure could not settle (2 runs); and the
/// reference's time window missed the events of a task preempted between the kernel's
/// timestamp and its broadcast. Now the queue is small only from just before the stall to
/// right after it, the baseline is the exact loss figure, and the cross-check is per CPU,
/// by sequence number (the kernel numbers and sends with preemption off).
#[test]
fn a_registration_reports_the_kernel_drops_of_its_socket() {
    use cnbus::proc::EventBody;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    let test = "a_registration_reports_the_kernel_drops_of_its_socket";
    if kernel_socket(test).is_none() {
        return;
    }
    // A lossless reference, drained on its own thread.
    let reference = common::Reference::start();
    // A big queue, except during the burst: nothing is dropped before or after it.
    let bus = Connector::builder().recv_buffer(8 << 20).spawn().unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let got = Arc::new(Mutex::new(BTreeSet::new()));
    let (release, released) = crossbeam::channel::bounded::<()>(1);
    let (s, g) = (stall.clone(), got.clone());
    let reg = proc::register(&bus, EventSet::ALL, move |r| {
        if let Received::Event(e) = r {
            g.lock().insert((e.cpu, e.seq));
        }
        // Stalls the dispatcher once, so the socket's queue overflows.
        if s.swap(false, Ordering::SeqCst) {
            let _ = released.recv();
        }
    })
    .unwrap();
    // An event of ours on every CPU, received: the per-CPU marks below exist. (The
    // children inherit this thread's CPU.)
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on_every_cpu = || {
        for cpu in 0..cpus {
            if cnbus::sys::pin_current_thread(cpu).is_ok() {
                std::process::Command::new("/bin/true").status().unwrap();
            }
        }
    };
    on_every_cpu();
    drained(&bus, &reg);
    let before = reg.stats();
    if !before.foreign_settled {
        // A host so busy that the dispatcher never found its 8 MiB queue empty for 10 s:
        // it dropped events before the registration's baseline, and no exact figure
        // exists to start from (seen once: 100 188 events in gaps, 912 counted drops since
        // the baseline, the first settled snapshot came that late).
        eprintln!("{test}: SKIPPED, the loss figure never settled before the burst: {before:?}");
        return;
    }
    let before_lost = before
        .lost()
        .expect("exact: nothing dropped before the burst");
    let before_k = before
        .kernel_drops
        .expect("a proc-only socket gives its drops");
    // Each CPU's last event the callback got before the burst. The kernel numbers an event
    // and sends it with preemption off, so what comes later on a CPU has a higher number.
    let marks = |got: &BTreeSet<(u32, u32)>| {
        let mut m = BTreeMap::new();
        for &(cpu, seq) in got {
            m.insert(cpu, seq);
        }
        m
    };
    let from = marks(&got.lock());
    bus.socket().set_recv_buffer(16 << 10, true).unwrap();
    stall.store(true, Ordering::SeqCst);
    for _ in 0..60 {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    bus.socket().set_recv_buffer(8 << 20, true).unwrap();
    release.send(()).unwrap();
    drained(&bus, &reg);
    // Each CPU's next event reveals what it lost at the end of the burst.
    on_every_cpu();
    drained(&bus, &reg);
    let st = reg.stats();
    let c = bus.stats();
    let (seen, rstats) = reference.finish();
    eprintln!("{test}: {before:?} -> {st:?}");
    assert!(c.overruns >= 1, "{c:?}");
    let k = st.kernel_drops.unwrap();
    assert!(k > before_k && Some(k) <= c.kernel_drops, "{st:?} {c:?}");
    // Every gap since `before` is a drop since then (the events of ours on every CPU,
    // handled before it, revealed the earlier ones).
    assert!(
        st.seq_lost.unwrap() - before.seq_lost.unwrap() <= k - before_k,
        "{before:?} -> {st:?}"
    );
    // The dispatcher found the queue empty after the burst and nothing was dropped since:
    // the figure is settled and exact.
    let lost = st.lost().expect("an exact figure") - before_lost;
    if rstats.lost() != Some(0) {
        eprintln!("{test}: the reference lost events too ({rstats:?}); cross-check skipped");
    } else {
        let got = got.lock();
        let to = marks(&got);
        let (mut missed, mut acks) = (0u64, 0u64);
        for (&cpu, &last) in &to {
            let first = from.get(&cpu).map_or(0, |s| s.wrapping_add(1));
            for ((_, q), e) in seen.range((cpu, first)..=(cpu, last)) {
                if !got.contains(&(cpu, *q)) {
                    // ACKs are decoded but not delivered to the callback: received or
                    // not, they look missed here.
                    if matches!(e.body, EventBody::Ack { .. }) {
                        acks += 1;
                    } else {
                        missed += 1;
                    }
                }
            }
        }
        eprintln!("{test}: missed {missed} (+{acks} ACKs), reported {lost}");
        assert!(missed > 0, "{test}: the burst cost events");
        assert!(
            (missed..=missed + acks).contains(&lost),
            "{test}: missed {missed} (+{acks} ACKs), reported {lost}: {st:?}"
        );
    }
    // Another group on the socket: its drops are no longer proc events only.
    let _other = bus.subscribe(20).unwrap();
    assert_eq!(reg.stats().kernel_drops, None);
    drop(reg);
}

/// What the overrun test's callback and event handler saw, in the order they saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The callback stalled the dispatcher here (and went on once released).
    Stalled,
    Event(u32, u32),
    Overrun,
    Gap(u32),
    /// The connector's event handler got `Event::Overrun`.
    Handler,
}

/// Regression: an overflow of the connector's socket reached a proc registration's callback
/// as nothing at all (the connector counted it and its event handler got `Event::Overrun`,
/// but the callback saw only the `Loss::Gap` reports of later events, and no sign of the
/// loss at the end of each CPU's stream). It now gets one `Received::Lost(Loss::Overrun)`
/// per overrun, at the point of the stream where the connector reports it (just before its
/// event handler, which the user set here), before the events and gaps that follow; a
/// registration of another id hears nothing of it; and the counters still add up: per CPU,
/// the gaps reported are the events a lossless reference saw and the callback missed.
#[test]
fn an_overrun_reaches_the_callback_in_stream_order() {
    use cnbus::connector::Event;
    use cnbus::proc::{EventBody, Loss};
    use cnbus::CbId;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let test = "an_overrun_reaches_the_callback_in_stream_order";
    if kernel_socket(test).is_none() {
        return;
    }
    let reference = common::Reference::start();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = seen.clone();
    let bus = Connector::builder()
        .recv_buffer(16 << 10)
        .on_event(move |e| {
            if *e == Event::Overrun {
                h.lock().push(Seen::Handler);
            }
        })
        .spawn()
        .unwrap();
    let other_calls = Arc::new(AtomicU64::new(0));
    let o = other_calls.clone();
    let _other = bus.register(CbId::new(common::test_idx(7), 1), move |_| {
        o.fetch_add(1, Ordering::SeqCst);
    });
    let stall = Arc::new(AtomicBool::new(false));
    let (release, released) = crossbeam::channel::bounded::<()>(1);
    let (s, g) = (stall.clone(), seen.clone());
    let reg = proc::register(&bus, EventSet::ALL, move |r| {
        g.lock().push(match r {
            Received::Event(e) => Seen::Event(e.cpu, e.seq),
            Received::Lost(Loss::Overrun) => Seen::Overrun,
            Received::Lost(Loss::Gap { count, .. }) => Seen::Gap(count),
        });
        // Stalls the dispatcher once, at an event, so the socket's queue overflows.
        if matches!(r, Received::Event(_)) && s.swap(false, Ordering::SeqCst) {
            let _ = released.recv();
            g.lock().push(Seen::Stalled);
        }
    })
    .unwrap();
    // The queue read empty, and the dispatcher's look at it: the registration's baseline
    // before the burst, its settled figure after.
    drained(&bus, &reg);
    // This thread and its children stay on one CPU, so the events after the burst reveal
    // its loss as a gap on the CPU where it happened.
    let cpu = cnbus::sys::current_cpu().unwrap_or(0);
    cnbus::sys::pin_current_thread(cpu).unwrap();
    stall.store(true, Ordering::SeqCst);
    for _ in 0..60 {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    release.send(()).unwrap();
    drained(&bus, &reg);
    std::process::Command::new("/bin/true").status().unwrap();
    drained(&bus, &reg);
    // Nothing runs on the dispatcher any more: what it counted and what it reported are final.
    let handle = bus.handle();
    bus.shutdown();
    let c = handle.stats();
    let fin = reg.stats();
    drop(reg);
    let (refseen, rstats) = reference.finish();
    let seen = seen.lock().clone();
    eprintln!("{test}: {fin:?} {c:?}");

    let count = |x: Seen| seen.iter().filter(|s| **s == x).count() as u64;
    let overruns = count(Seen::Overrun);
    assert!(
        c.overruns >= 1,
        "{test}: the stall overflowed the queue: {c:?}"
    );
    assert_eq!(overruns, c.overruns, "{test}: one report per overrun");
    assert_eq!(count(Seen::Handler), c.overruns, "{test}");
    // Each report comes where the connector reports the overrun: right before its handler.
    for (i, s) in seen.iter().enumerate() {
        let next = seen.get(i + 1);
        match s {
            Seen::Overrun => assert_eq!(next, Some(&Seen::Handler), "{test}: {seen:?}"),
            Seen::Handler => assert_eq!(
                i.checked_sub(1).map(|j| seen[j]),
                Some(Seen::Overrun),
                "{test}: {seen:?}"
            ),
            _ => {}
        }
    }
    // The overrun comes where the connector reports it, before the events read after it:
    // after the stall, or before it when the queue was congested already (a busy host; the
    // kernel reports one ENOBUFS per congestion, which ends only when the queue is read
    // empty). Every gap comes after an overrun (nothing else loses events).
    let first_overrun = seen.iter().position(|s| *s == Seen::Overrun).unwrap();
    assert!(
        seen[first_overrun..]
            .iter()
            .any(|s| matches!(s, Seen::Event(..))),
        "{test}: events follow the overrun: {seen:?}"
    );
    assert!(seen.contains(&Seen::Stalled), "{test}: {seen:?}");
    let first_gap = seen.iter().position(|s| matches!(s, Seen::Gap(_)));
    assert!(
        first_gap.is_none_or(|g| g > first_overrun),
        "{test}: {seen:?}"
    );
    let gaps: u64 = seen
        .iter()
        .map(|s| match s {
            Seen::Gap(n) => u64::from(*n),
            _ => 0,
        })
        .sum();
    assert_eq!(fin.seq_lost, Some(gaps), "{test}: every gap was reported");
    assert_eq!(
        other_calls.load(Ordering::SeqCst),
        0,
        "{test}: another id heard it"
    );

    // Delivered + lost = sent, against a lossless reference: per CPU, over the sequence
    // numbers the callback got, the gaps it was told of are the events the reference saw
    // there and the callback did not get (ACKs aside: the callback never gets them, and one
    // dropped counts as a gap).
    if rstats.lost() != Some(0) {
        eprintln!("{test}: the reference lost events too ({rstats:?}); cross-check skipped");
        return;
    }
    let mut got: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for s in &seen {
        if let Seen::Event(cpu, seq) = s {
            got.entry(*cpu).or_default().insert(*seq);
        }
    }
    let per_cpu: BTreeMap<u32, u64> = fin.lost_per_cpu.iter().copied().collect();
    let mut all_missed = 0;
    for (cpu, mine) in &got {
        let (lo, hi) = (*mine.first().unwrap(), *mine.last().unwrap());
        let (mut missed, mut acks) = (0u64, 0u64);
        for ((_, q), e) in refseen.range((*cpu, lo)..=(*cpu, hi)) {
            if !mine.contains(q) {
                if matches!(e.body, EventBody::Ack { .. }) {
                    acks += 1;
                } else {
                    missed += 1;
                }
            }
        }
        let gaps = per_cpu.get(cpu).copied().unwrap_or(0);
        eprintln!("{test}: cpu {cpu}: missed {missed} (+{acks} ACKs), gaps {gaps}");
        assert!(
            (missed..=missed + acks).contains(&gaps),
            "{test}: cpu {cpu}: gaps {gaps}, missed {missed} (+{acks} ACKs)"
        );
        all_missed += missed;
    }
    assert!(all_missed > 0, "{test}: the burst cost events");
}

/// `register` sends `LISTEN` while the connector's queue is full (the dispatcher is held in
/// a callback, the queue filled with unicasts to the connector's own port): the kernel drops
/// the ACK. Once the dispatcher is let go and reads the queue empty, `register` must ask
/// again (the drop counter moved, an overrun was reported) and succeed, as `ProcListener`
/// does. It failed before with "the kernel did not acknowledge LISTEN" after one try.
#[test]
fn a_listen_ack_dropped_by_a_full_connector_queue_is_asked_for_again() {
    if kernel_socket("a_listen_ack_dropped_by_a_full_connector_queue_is_asked_for_again").is_none()
    {
        return;
    }
    let bus = Connector::builder().recv_buffer(1).spawn().unwrap();
    let id = cnbus::CbId::new(common::test_idx(10), 10);
    let filler = cnbus::sys::ConnectorSocket::open().unwrap();
    let from = filler.port_id();
    let (held_tx, held_rx) = crossbeam::channel::bounded(1);
    let (go_tx, go_rx) = crossbeam::channel::bounded::<()>(1);
    let _hold = bus.register(id, move |m| {
        if m.source().port == from && m.data() == b"hold" {
            let _ = held_tx.try_send(());
            // Bounded, so that a failing test never wedges the dispatcher for good.
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
        }
    });
    let datagram = |data: &'static [u8]| {
        let mut d = cnbus::codec::DatagramBuilder::new(128);
        d.push(&cnbus::CnMsg::new(id, data)).unwrap();
        d.as_bytes().to_vec()
    };
    let to = cnbus::sys::Dest::Port(bus.port_id());
    filler.send(&datagram(b"hold"), to).unwrap();
    held_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the dispatcher never reached the holding callback");
    // The dispatcher is held: fill its queue until the kernel refuses more.
    let fill = datagram(b"fill");
    while filler.try_send(&fill, to).unwrap().is_some() {}
    let drops = || bus.socket().drops().unwrap();
    let before = drops();
    let b = bus.handle();
    let registering = std::thread::spawn(move || proc::register(&b, EventSet::ALL, |_| {}));
    // The ACK of the first LISTEN meets the full queue: wait until the kernel counted a drop
    // (and a little more, for the LISTEN to be sent, if something else was dropped first).
    let end = Instant::now() + Duration::from_secs(10);
    while drops() == before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Room for the events of a busy host from now on, so that the next ACK finds its way.
    bus.socket().set_recv_buffer(8 << 20, true).unwrap();
    go_tx.send(()).unwrap();
    let registered = registering.join().unwrap();
    assert!(
        registered.is_ok(),
        "register failed after its ACK was dropped: {:?}",
        registered.err()
    );
}
