//! Sequence numbering is per socket and destination: everything that sends on one socket
//! (buses, their `Producer` lanes, a `Connector`'s `send_numbered`) shares one counter per
//! destination and id, so a receiver, which tracks gaps per `(port, group, id)`, sees one
//! consecutive stream per sender port and group (0: unicast).
//!
//! The tests unicast to their own receivers' ports (no foreign traffic reaches them) and
//! use their own idx; the one group test counts only its own sender port's messages.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnbus::bus::{Bus, Insert};
use cnbus::connector::{Connector, Event, Incoming};
use cnbus::sys::{ConnectorSocket, Dest};
use cnbus::CbId;
use common::{kernel_socket, test_idx};

/// A receiver counting the gaps of one stream.
struct Rx {
    conn: Connector,
    rx: crossbeam::channel::Receiver<Incoming>,
    lost: Arc<AtomicU64>,
    _reg: cnbus::connector::Registration,
}

impl Rx {
    fn open(id: CbId) -> Rx {
        let lost = Arc::new(AtomicU64::new(0));
        let l = lost.clone();
        let conn = Connector::builder()
            .on_event(move |e| {
                if let Event::Lost { id: lid, count, .. } = e {
                    if *lid == id {
                        l.fetch_add(u64::from(*count), Ordering::SeqCst);
                    }
                }
            })
            .spawn()
            .unwrap();
        let (reg, rx) = conn.channel(id, 1 << 16);
        Rx {
            conn,
            rx,
            lost,
            _reg: reg,
        }
    }

    fn dest(&self) -> Dest {
        Dest::Port(self.conn.port_id())
    }

    /// Takes `n` messages and checks they are `1..=n` in order from `port`, carrying
    /// `0..n` as data, with nothing lost or reordered.
    fn expect_consecutive(&self, n: u32, port: u32) {
        for i in 0..n {
            let m = self
                .rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("message {i} of {n}: {e}"));
            assert_eq!(m.source.port, port);
            assert_eq!(&m.msg.data[..], &i.to_ne_bytes()[..], "wire order");
            assert_eq!(m.msg.seq, i + 1, "one sequence per (socket, id)");
        }
        let s = self.conn.stats();
        assert_eq!(self.lost.load(Ordering::SeqCst), 0, "{s:?}");
        assert_eq!(s.lost, 0, "{s:?}");
        assert_eq!(s.reordered, 0, "{s:?}");
    }
}

/// Two buses (and their producer lanes) sending on one shared socket, same id: the
/// receiver sees 1, 2, 3, ... and counts no loss and no reordering.
#[test]
fn two_buses_sharing_a_socket_number_one_sequence() {
    let Some(_k) = kernel_socket("two_buses_sharing_a_socket_number_one_sequence") else {
        return;
    };
    let id = CbId::new(test_idx(0x60), 1);
    let rx = Rx::open(id);
    let sock = Arc::new(ConnectorSocket::open().unwrap());
    let a = Bus::builder(rx.dest())
        .socket(sock.clone())
        .build()
        .unwrap();
    let b = Bus::builder(rx.dest())
        .socket(sock.clone())
        .build()
        .unwrap();
    let n = 400u32;
    {
        let (mut pa, mut pb) = (a.producer(), b.producer());
        for i in 0..n {
            let d = i.to_ne_bytes();
            match i % 4 {
                0 => a.insert(id, &d).unwrap(),
                1 => b.insert(id, &d).unwrap(),
                2 => pa.insert(id, &d).unwrap(),
                _ => pb.insert(id, &d).unwrap(),
            }
            // Each message on the wire before the next is queued: wire order = i.
            if i % 2 == 0 {
                a.flush().unwrap();
            } else {
                b.flush().unwrap();
            }
        }
    }
    rx.expect_consecutive(n, sock.port_id());
    assert_eq!(
        a.close().unwrap().sent_messages + b.close().unwrap().sent_messages,
        n as u64
    );
}

/// A bus sending through a `Connector`'s socket, interleaved with the connector's own
/// `send_numbered` on the same id: one sequence, no loss, no reordering.
#[test]
fn a_bus_and_a_connector_sharing_a_socket_number_one_sequence() {
    let Some(_k) = kernel_socket("a_bus_and_a_connector_sharing_a_socket_number_one_sequence")
    else {
        return;
    };
    let id = CbId::new(test_idx(0x61), 1);
    let rx = Rx::open(id);
    let tx = Connector::builder().spawn().unwrap();
    let bus = Bus::builder(rx.dest())
        .socket(tx.socket().clone())
        .build()
        .unwrap();
    let n = 400u32;
    for i in 0..n {
        let d = i.to_ne_bytes();
        if i % 3 == 0 {
            let seq = tx.send_numbered(id, d.to_vec(), rx.dest()).unwrap();
            assert_eq!(seq, i + 1);
        } else {
            bus.insert(id, &d).unwrap();
            bus.flush().unwrap();
        }
    }
    rx.expect_consecutive(n, tx.port_id());
}

/// Receives from `rx` until `want` messages of `id` from `port` arrived (messages from
/// other ports, such as a busy host's foreign senders on a group, are skipped), and
/// splits them by the group they came on (0: unicast).
fn streams(
    rx: &crossbeam::channel::Receiver<Incoming>,
    port: u32,
    id: CbId,
    want: usize,
) -> std::collections::BTreeMap<u32, Vec<u32>> {
    let mut by_group = std::collections::BTreeMap::<u32, Vec<u32>>::new();
    let mut n = 0;
    while n < want {
        let m = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{n} of {want} messages: {e}"));
        if m.source.port == port && m.msg.id == id {
            by_group.entry(m.source.group).or_default().push(m.msg.seq);
            n += 1;
        }
    }
    by_group
}

/// One socket sending one id to several destinations (a bus to a group, a bus to one
/// port, the connector's `send_numbered` to another port): each destination gets its own
/// sequence 1, 2, 3, ..., and a receiver that is both a group member and a unicast
/// destination tracks the two streams apart, so no receiver counts a false loss or
/// reordering.
#[test]
fn one_socket_numbers_each_destination_apart() {
    let Some(_k) = kernel_socket("one_socket_numbers_each_destination_apart") else {
        return;
    };
    const GROUP: u32 = 31;
    let id = CbId::new(test_idx(0x64), 1);
    let tx = Connector::builder().spawn().unwrap();
    let tx_port = tx.port_id();
    // Loss events of our stream (other ports' traffic on the group is not ours).
    let ours = move |lost: Arc<AtomicU64>| {
        move |e: &Event| {
            if let Event::Lost {
                port,
                id: lid,
                count,
            } = e
            {
                if *port == tx_port && *lid == id {
                    lost.fetch_add(u64::from(*count), Ordering::SeqCst);
                }
            }
        }
    };
    let (lost1, lost2) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let rx1 = Connector::builder()
        .on_event(ours(lost1.clone()))
        .spawn()
        .unwrap();
    let _member = rx1.subscribe(GROUP).unwrap();
    let (_r1, ch1) = rx1.channel(id, 1 << 16);
    let rx2 = Connector::builder()
        .on_event(ours(lost2.clone()))
        .spawn()
        .unwrap();
    let (_r2, ch2) = rx2.channel(id, 1 << 16);
    let to_group = Bus::builder(Dest::Group(GROUP))
        .socket(tx.socket().clone())
        .build()
        .unwrap();
    let to_rx1 = Bus::builder(Dest::Port(rx1.port_id()))
        .socket(tx.socket().clone())
        .build()
        .unwrap();
    let n = 200u32;
    for i in 0..n {
        let d = i.to_ne_bytes();
        to_group.insert(id, &d).unwrap();
        to_group.flush().unwrap();
        to_rx1.insert(id, &d).unwrap();
        to_rx1.flush().unwrap();
        let seq = tx
            .send_numbered(id, d.to_vec(), Dest::Port(rx2.port_id()))
            .unwrap();
        assert_eq!(seq, i + 1, "the connector's own destination");
    }
    let one_to_n: Vec<u32> = (1..=n).collect();
    let s1 = streams(&ch1, tx_port, id, 2 * n as usize);
    assert_eq!(s1.get(&GROUP), Some(&one_to_n), "rx1's group stream");
    assert_eq!(s1.get(&0), Some(&one_to_n), "rx1's unicast stream");
    let s2 = streams(&ch2, tx_port, id, n as usize);
    assert_eq!(s2.get(&0), Some(&one_to_n), "rx2's unicast stream");
    assert_eq!(lost1.load(Ordering::SeqCst), 0);
    assert_eq!(lost2.load(Ordering::SeqCst), 0);
    // rx2 hears no group: only our stream, nothing reordered.
    assert_eq!(rx2.stats().reordered, 0);
}

/// Drains `rx` until `n` messages came or nothing comes for a while.
fn take(rx: &crossbeam::channel::Receiver<Incoming>, n: usize) -> Vec<Incoming> {
    let mut got = Vec::new();
    while got.len() < n {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(m) => got.push(m),
            Err(e) => panic!("{} of {n} messages: {e}", got.len()),
        }
    }
    got
}

/// A receiver whose tracker is smaller than the number of streams it hears: it forgets
/// the least recently seen ones and counts them, invents no loss, and a stream that stays
/// in use keeps its baseline, so its gaps are still counted exactly.
#[test]
fn the_receivers_gap_tracker_is_bounded_and_counts_evictions() {
    let Some(_k) = kernel_socket("the_receivers_gap_tracker_is_bounded_and_counts_evictions")
    else {
        return;
    };
    let idx = test_idx(0x62);
    let live = CbId::new(idx, 0);
    let rx = Connector::builder().tracked_streams(16).spawn().unwrap();
    let (_reg, ch) = rx.channel(cnbus::connector::Match::Idx(idx), 1 << 16);
    let tx = Connector::builder().spawn().unwrap();
    let dest = Dest::Port(rx.port_id());
    let streams = 200u32;
    for v in 1..=streams {
        tx.send_numbered(live, vec![0u8; 4], dest).unwrap();
        tx.send_numbered(CbId::new(idx, v), vec![0u8; 4], dest)
            .unwrap();
    }
    // The live stream skips 3 numbers: a real gap, counted although the tracker evicted.
    let skipped = cnbus::CnMsg::new(live, vec![0u8; 4]).with_seq(streams + 4, 0);
    tx.send(&skipped, dest).unwrap();
    let got = take(&ch, 2 * streams as usize + 1);
    assert_eq!(got.last().unwrap().msg.seq, streams + 4);
    let s = rx.stats();
    assert!(
        s.tracker_evictions >= u64::from(streams) + 1 - 16,
        "forgotten streams are counted: {s:?}"
    );
    assert_eq!(
        s.lost, 3,
        "the live stream's gap, and nothing invented: {s:?}"
    );
    assert_eq!(s.reordered, 0, "{s:?}");
}

/// A sender whose numbering remembers fewer ids than it sends forgets the least recently
/// used ones and counts them; a forgotten id starts again at 1, which the receiver counts
/// as `reordered`, never as loss. Through the bus builder and the connector builder alike
/// (the numbering is the shared socket's).
#[test]
fn the_senders_numbering_is_bounded_and_counts_evictions() {
    let Some(_k) = kernel_socket("the_senders_numbering_is_bounded_and_counts_evictions") else {
        return;
    };
    let idx = test_idx(0x63);
    let rx = Connector::builder().spawn().unwrap();
    let (_reg, ch) = rx.channel(cnbus::connector::Match::Idx(idx), 1 << 16);
    let dest = Dest::Port(rx.port_id());
    let tx = Connector::builder().numbered_ids(8).spawn().unwrap();
    let bus = Bus::builder(dest)
        .socket(tx.socket().clone())
        .numbered_ids(8)
        .build()
        .unwrap();
    // Two rounds over 64 ids: the second round finds every id forgotten and restarts it.
    let ids = 64u32;
    for round in 0..2 {
        for v in 0..ids {
            let id = CbId::new(idx, v);
            if v % 2 == 0 {
                assert_eq!(tx.send_numbered(id, vec![round; 4], dest).unwrap(), 1);
            } else {
                bus.insert(id, &[round; 4]).unwrap();
                bus.flush().unwrap();
            }
        }
    }
    let got = take(&ch, 2 * ids as usize);
    assert!(
        got.iter().all(|m| m.msg.seq == 1),
        "every id restarted at 1"
    );
    let (ts, bs) = (tx.stats(), bus.stats());
    assert_eq!(
        ts.numbering_evictions, bs.numbering_evictions,
        "one table per socket"
    );
    assert!(ts.numbering_evictions >= 2 * u64::from(ids) - 8, "{ts:?}");
    let s = rx.stats();
    assert_eq!(s.lost, 0, "a restart is not loss: {s:?}");
    assert_eq!(s.reordered, u64::from(ids), "one restart per id: {s:?}");
}

/// A receiver that stops reading while a numbered unicast stream comes: the senders wait
/// for room (without holding the socket's numbering lock, and taking no number while they
/// wait), and once it reads again it gets 1, 2, 3, ... with nothing lost. Through the
/// connector and, with the `tokio` feature, the async connector.
#[test]
fn numbered_sends_to_a_full_receiver_wait_and_use_no_number() {
    let Some(_k) = kernel_socket("numbered_sends_to_a_full_receiver_wait_and_use_no_number") else {
        return;
    };
    let id = CbId::new(test_idx(0x65), 1);
    let lost = Arc::new(AtomicU64::new(0));
    let l = lost.clone();
    let rx = Connector::builder()
        .recv_buffer(4 << 10)
        .on_event(move |e| {
            if let Event::Lost { count, .. } = e {
                l.fetch_add(u64::from(*count), Ordering::SeqCst);
            }
        })
        .spawn()
        .unwrap();
    // The first message stops the dispatcher until the gate opens: the queue fills.
    let (open, gate) = crossbeam::channel::bounded::<()>(1);
    let (tx_seen, seen) = crossbeam::channel::unbounded::<u32>();
    let _reg = rx.register(id, move |m| {
        if m.seq() == 1 {
            let _ = gate.recv();
        }
        let _ = tx_seen.send(m.seq());
    });
    let dest = Dest::Port(rx.port_id());
    let n = 200u32;
    let sender = std::thread::spawn(move || {
        let tx = Connector::builder().spawn().unwrap();
        for i in 0..n {
            assert_eq!(tx.send_numbered(id, vec![0u8; 64], dest).unwrap(), i + 1);
        }
        tx.port_id()
    });
    // Not a timed assertion: the gate opens after the sender has had time to fill the
    // queue and wait; the outcome does not depend on it.
    std::thread::sleep(Duration::from_millis(200));
    open.send(()).unwrap();
    sender.join().unwrap();
    let got: Vec<u32> = (0..n)
        .map(|_| seen.recv_timeout(Duration::from_secs(20)).unwrap())
        .collect();
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    assert_eq!(lost.load(Ordering::SeqCst), 0);
    assert_eq!(rx.stats().reordered, 0);
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_numbered_sends_to_a_full_receiver_wait_and_use_no_number() {
    if kernel_socket("async_numbered_sends_to_a_full_receiver_wait_and_use_no_number").is_none() {
        return;
    }
    let id = CbId::new(test_idx(0x66), 1);
    let rx = Connector::builder().recv_buffer(4 << 10).spawn().unwrap();
    let (open, gate) = crossbeam::channel::bounded::<()>(1);
    let (tx_seen, seen) = crossbeam::channel::unbounded::<u32>();
    let _reg = rx.register(id, move |m| {
        if m.seq() == 1 {
            let _ = gate.recv();
        }
        let _ = tx_seen.send(m.seq());
    });
    let dest = Dest::Port(rx.port_id());
    let n = 200u32;
    let sender = tokio::spawn(async move {
        let tx = Connector::builder()
            .send_timeout(Duration::from_secs(600)) // the receiver is held up on purpose
            .build_async()
            .unwrap();
        for i in 0..n {
            let seq = tx.send_numbered(id, vec![0u8; 64], dest).await.unwrap();
            assert_eq!(seq, i + 1);
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    open.send(()).unwrap();
    sender.await.unwrap();
    let got: Vec<u32> = (0..n)
        .map(|_| seen.recv_timeout(Duration::from_secs(20)).unwrap())
        .collect();
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    let s = rx.stats();
    assert_eq!((s.lost, s.reordered), (0, 0), "{s:?}");
}
