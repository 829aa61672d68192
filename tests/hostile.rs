//! Hostile peers on the real kernel: another socket multicasts malformed datagrams on the
//! connector's group; a stalled receiver overflows. The connector keeps running, delivers every
//! valid message, counts every bad one, and accounts for every lost one.
//!
//! Groups 20..=22 belong to this file.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use cnbus::codec::{encode, DatagramBuilder, NlHeader, NLMSG_DONE};
use cnbus::connector::{Connector, Event};
use cnbus::sys::{ConnectorSocket, Dest};
use cnbus::{CbId, CnMsg, DecodeErrorKind};
use common::{kernel_socket, test_idx, wait_for};

fn done(seq: u32) -> NlHeader {
    NlHeader {
        ty: NLMSG_DONE,
        seq,
        ..Default::default()
    }
}

fn valid(id: CbId, seq: u32) -> Vec<u8> {
    let mut d = Vec::new();
    encode(
        done(seq),
        &CnMsg::new(id, seq.to_ne_bytes().to_vec()).with_seq(seq, 0),
        &mut d,
    )
    .unwrap();
    d
}

#[test]
fn malformed_datagrams_are_counted_and_valid_ones_delivered() {
    if kernel_socket("malformed_datagrams_are_counted_and_valid_ones_delivered").is_none() {
        return;
    }
    let (group, id) = (20, CbId::new(test_idx(30), 1));
    // On a busy host others send (bad and good) on our group too: count `evil`'s only.
    let evil = ConnectorSocket::open().unwrap();
    let evil_port = evil.port_id();
    let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let lost = Arc::new(AtomicU64::new(0));
    let (e2, l2) = (errors.clone(), lost.clone());
    let conn = Connector::builder()
        .on_event(move |e| match e {
            Event::Decode { error, port } if *port == evil_port => e2.lock().push(error.kind),
            Event::Lost { port, count, .. } if *port == evil_port => {
                l2.fetch_add(u64::from(*count), Ordering::SeqCst);
            }
            _ => {}
        })
        .spawn()
        .unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let (_reg, rx) = conn.channel(cnbus::connector::Match::Idx(id.idx), 1024);

    let mut seq = 0u32;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut expected = Vec::new();
    let mut bad = 0u64;
    let send = |d: &[u8]| {
        evil.send(d, Dest::Group(group)).unwrap();
    };

    // 1. A datagram too short for a header.
    bad += 1;
    send(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // 2. nlmsg_len larger than the datagram.
    let mut d = valid(id, 0);
    d[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    bad += 1;
    send(&d);
    // 3. nlmsg_len zero.
    let mut d = valid(id, 0);
    d[0..4].copy_from_slice(&0u32.to_ne_bytes());
    bad += 1;
    send(&d);
    // 4. cn_msg.len far beyond the payload.
    let mut d = valid(id, 0);
    d[32..34].copy_from_slice(&60000u16.to_ne_bytes());
    bad += 1;
    send(&d);
    // 5. A garbage netlink type.
    let mut d = valid(id, 0);
    d[4..6].copy_from_slice(&0x7777u16.to_ne_bytes());
    bad += 1;
    send(&d);
    // 6. Netlink payload shorter than a cn_msg header.
    let mut d = Vec::new();
    done(0).emit(&mut d);
    d[0..4].copy_from_slice(&26u32.to_ne_bytes());
    d.extend_from_slice(&[0; 12]);
    bad += 1;
    send(&d);
    // 7. Valid messages interleaved: [valid, valid, bad, valid] in one datagram: the two
    //    before the bad one arrive; the rest of that datagram is dropped.
    let (a, b) = (next(), next());
    expected.extend([a, b]);
    let mut d = [valid(id, a), valid(id, b)].concat();
    let mut broken = valid(id, 0);
    broken[0..4].copy_from_slice(&5u32.to_ne_bytes());
    d.extend_from_slice(&broken);
    d.extend_from_slice(&valid(id, 999));
    bad += 1;
    send(&d);
    // 8. Whole valid datagrams between bad ones, and a multi-message valid datagram.
    for _ in 0..5 {
        let s = next();
        expected.push(s);
        send(&valid(id, s));
        bad += 1;
        send(&[0xff; 15]);
    }
    let mut b = DatagramBuilder::new(4096);
    for _ in 0..10 {
        let s = next();
        expected.push(s);
        b.push(&CnMsg::new(id, s.to_ne_bytes().to_vec()).with_seq(s, 0))
            .unwrap();
    }
    send(b.as_bytes());

    let mut got = Vec::new();
    while got.len() < expected.len() {
        let m = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("valid message");
        if m.source.port == evil_port {
            got.push(m.msg.seq);
        }
    }
    assert_eq!(got, expected, "every valid message, in order");
    while let Ok(m) = rx.recv_timeout(Duration::from_millis(100)) {
        assert_ne!(m.source.port, evil_port, "nothing invalid delivered");
    }
    assert!(wait_for(Duration::from_secs(2), || errors.lock().len()
        as u64
        == bad));
    assert!(conn.stats().decode_errors >= bad);
    let kinds = errors.lock().clone();
    assert_eq!(
        kinds.len() as u64,
        bad,
        "each bad message reported once: {kinds:?}"
    );
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::ShortHeader { .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::NlmsgLenOverrun { len: 1000, .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::NlmsgLenTooSmall { len: 0 })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::CnLenOverrun { len: 60000, .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::UnknownValue { value: 0x7777, .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, DecodeErrorKind::ShortConnectorHeader { .. })));
    assert_eq!(lost.load(Ordering::SeqCst), 0);
}

#[test]
fn a_stalled_receiver_counts_its_loss_exactly_and_resumes() {
    if kernel_socket("a_stalled_receiver_counts_its_loss_exactly_and_resumes").is_none() {
        return;
    }
    let (group, id) = (21, CbId::new(test_idx(31), 1));
    // Others may send on our group and id too: count `tx`'s stream only.
    let tx = Connector::builder().spawn().unwrap();
    let txp = tx.port_id();
    let lost = Arc::new(AtomicU64::new(0));
    let l = lost.clone();
    let conn = Connector::builder()
        .recv_buffer(16 << 10)
        .on_event(move |e| {
            if let Event::Lost { port, count, .. } = e {
                if *port == txp {
                    l.fetch_add(u64::from(*count), Ordering::SeqCst);
                }
            }
        })
        .spawn()
        .unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let stall = Arc::new(Barrier::new(2));
    let delivered = Arc::new(AtomicU64::new(0));
    let (s, d) = (stall.clone(), delivered.clone());
    let _reg = conn.register(id, move |m| {
        if m.source().port == txp && d.fetch_add(1, Ordering::SeqCst) == 0 {
            s.wait(); // the dispatcher stalls inside the first callback
            s.wait();
        }
    });
    tx.send_numbered(id, vec![0u8; 64], Dest::Group(group))
        .unwrap();
    stall.wait(); // the receiver is now stalled
    let mut sent = 1u64;
    for _ in 0..5_000 {
        tx.send_numbered(id, vec![0u8; 64], Dest::Group(group))
            .unwrap();
        sent += 1;
    }
    stall.wait(); // release it
    assert!(wait_for(Duration::from_secs(5), || conn.stats().overruns > 0));
    // After the stall, reception resumes on the same socket with nothing reopened.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..100 {
        tx.send_numbered(id, vec![0u8; 64], Dest::Group(group))
            .unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(wait_for(Duration::from_secs(5), || {
        delivered.load(Ordering::SeqCst) + lost.load(Ordering::SeqCst) == sent
    }));
    let s = conn.stats();
    let got = delivered.load(Ordering::SeqCst);
    let lost = lost.load(Ordering::SeqCst);
    assert_eq!(got + lost, sent, "{s:?}");
    assert!(lost > 0 && s.lost >= lost && s.overruns > 0, "{s:?}");
    assert!(got >= 100, "the messages after the stall arrived: {got}");
}

#[test]
fn an_oversized_datagram_is_dropped_and_counted() {
    if kernel_socket("an_oversized_datagram_is_dropped_and_counted").is_none() {
        return;
    }
    let id = CbId::new(test_idx(32), 1);
    let conn = Connector::builder().max_datagram(256).spawn().unwrap();
    let (_reg, rx) = conn.channel(id, 16);
    let tx = ConnectorSocket::open().unwrap();
    let mut big = DatagramBuilder::new(4096);
    big.push(&CnMsg::new(id, vec![7u8; 1000]).with_seq(2, 0))
        .unwrap();
    tx.send(&valid(id, 1), Dest::Port(conn.port_id())).unwrap();
    tx.send(big.as_bytes(), Dest::Port(conn.port_id())).unwrap();
    tx.send(&valid(id, 3), Dest::Port(conn.port_id())).unwrap();
    let seqs: Vec<u32> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap().msg.seq)
        .collect();
    assert_eq!(seqs, [1, 3]);
    assert_eq!(conn.stats().truncated, 1);
    assert_eq!(
        conn.stats().lost,
        1,
        "the gap in seq shows the dropped message: {:?}",
        conn.stats()
    );
}
