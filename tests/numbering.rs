//! Sequence numbering is per socket: everything that sends on one socket (buses, their
//! `Producer` lanes, a `Connector`'s `send_numbered`) shares one counter per id, so a
//! receiver, which tracks gaps per `(port, id)`, sees one consecutive stream.
//!
//! Every test here unicasts to its own receiver's port (no group, so no foreign traffic
//! reaches it) and uses its own idx.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnbus::bus::Bus;
use cnbus::connector::{Connector, Event, Received};
use cnbus::sys::{ConnectorSocket, Dest};
use cnbus::CbId;
use common::{kernel_socket, test_idx};

/// A receiver counting the gaps of one stream.
struct Rx {
    conn: Connector,
    rx: crossbeam::channel::Receiver<Received>,
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
    // The next number continues the shared sequence.
    assert_eq!(tx.next_seq(id), n + 1);
}

/// Drains `rx` until `n` messages came or nothing comes for a while.
fn take(rx: &crossbeam::channel::Receiver<Received>, n: usize) -> Vec<Received> {
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
    let skipped = tx.next_seq(live);
    for _ in 0..2 {
        tx.next_seq(live);
    }
    tx.send_numbered(live, vec![0u8; 4], dest).unwrap();
    let got = take(&ch, 2 * streams as usize + 1);
    assert_eq!(got.last().unwrap().msg.seq, skipped + 3);
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
