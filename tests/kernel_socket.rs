//! The connector socket against the real kernel.

mod common;

use std::time::Duration;

use cnbus::codec::{CbId, CnMsg, DatagramBuilder};
use cnbus::sys::{ConnectorSocket, Dest};
use common::{kernel_socket, recv_until, sh, test_idx};

const LISTEN: u32 = 1;
const IGNORE: u32 = 2;
const WHAT_NONE: u32 = 0;
const WHAT_FORK: u32 = 1;
const WHAT_EXEC: u32 = 2;
const WHAT_EXIT: u32 = 0x8000_0000;

fn u32_at(d: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(d[at..at + 4].try_into().unwrap())
}

fn send_op(sock: &ConnectorSocket, op: u32, seq: u32, ack: u32) {
    let mut b = DatagramBuilder::new(256).with_pid(sock.port_id());
    b.push(&CnMsg::new(CbId::PROC, op.to_ne_bytes().to_vec()).with_seq(seq, ack))
        .unwrap();
    sock.send(b.as_bytes(), Dest::Kernel).unwrap();
}

#[test]
fn proc_connector_listen_ack_events_ignore() {
    let Some(sock) = kernel_socket("proc_connector_listen_ack_events_ignore") else {
        return;
    };
    sock.set_recv_buffer(4 << 20, true).unwrap();
    let (seq, ack) = (0x00c0_ffee, 0x41);
    send_op(&sock, LISTEN, seq, ack);
    let got = recv_until(&sock, Duration::from_secs(5), |meta, c| {
        // The kernel echoes ack + 1 but, on 6.18, not our seq: its ACK carries the
        // per-CPU event counter in seq like every other proc event.
        meta.from_kernel()
            && c.msg.id == CbId::PROC
            && c.msg.ack == ack + 1
            && u32_at(&c.msg.data, 0) == WHAT_NONE
    });
    let (meta, ack_msg) = got.last().expect("no ACK from the kernel");
    assert!(meta.from_kernel());
    assert_eq!(meta.group, 1);
    assert_eq!(ack_msg.msg.ack, ack + 1, "ACK must carry our ack + 1");
    assert_eq!(u32_at(&ack_msg.msg.data, 0), WHAT_NONE);
    assert_eq!(u32_at(&ack_msg.msg.data, 16), 0, "ACK error code");

    let (pid, status) = sh("exit 3");
    assert_eq!(status.code(), Some(3));

    // From our fork of the child on: an earlier holder of its pid (pid_max is 32768, the
    // host forks all the time) may have exited after the LISTEN.
    let (mut fork, mut exec, mut exit) = (false, false, None);
    recv_until(&sock, Duration::from_secs(5), |meta, c| {
        if !meta.from_kernel() || c.msg.id != CbId::PROC || c.msg.data.len() < 40 {
            return false;
        }
        let d = &c.msg.data;
        match u32_at(d, 0) {
            // parent tgid, child pid
            WHAT_FORK if u32_at(d, 20) == std::process::id() && u32_at(d, 24) == pid => fork = true,
            WHAT_EXEC if fork && u32_at(d, 16) == pid => exec = true,
            WHAT_EXIT if fork && u32_at(d, 16) == pid => exit = Some(u32_at(d, 24)),
            _ => {}
        }
        fork && exec && exit.is_some()
    });
    send_op(&sock, IGNORE, seq + 1, 0);
    assert!(fork, "no fork event for child {pid}");
    assert!(exec, "no exec event for child {pid}");
    assert_eq!(
        exit,
        Some(3 << 8),
        "exit event must carry wait status 0x300"
    );
}

#[test]
fn two_sockets_in_one_process_hear_the_same_multicast() {
    if kernel_socket("two_sockets_in_one_process_hear_the_same_multicast").is_none() {
        return;
    }
    let group = 23;
    let id = CbId::new(test_idx(1), 5);
    let a = ConnectorSocket::open().unwrap();
    let b = ConnectorSocket::open().unwrap();
    assert_ne!(
        a.port_id(),
        b.port_id(),
        "kernel-assigned port ids must differ"
    );
    a.join(group).unwrap();
    b.join(group).unwrap();
    let tx = ConnectorSocket::open().unwrap();
    let mut d = DatagramBuilder::new(4096);
    d.push(&CnMsg::new(id, &b"both"[..]).with_seq(7, 0))
        .unwrap();
    d.push(&CnMsg::new(id, &b"twice"[..]).with_seq(8, 0))
        .unwrap();
    tx.send(d.as_bytes(), Dest::Group(group)).unwrap();
    // Ours by the sender's port: a busy host's noise copies the ids (and seq numbers) it
    // hears on the user groups.
    for s in [&a, &b] {
        let got = recv_until(s, Duration::from_secs(5), |m, c| {
            m.port == tx.port_id() && c.msg.id == id && c.msg.seq == 8
        });
        let mine: Vec<_> = got
            .iter()
            .filter(|(m, c)| m.port == tx.port_id() && c.msg.id == id)
            .collect();
        assert_eq!(mine.len(), 2, "both messages of the datagram arrive");
        assert_eq!(&mine[0].1.msg.data[..], b"both");
        assert_eq!(mine[0].0.port, tx.port_id());
        assert_eq!(mine[0].0.group, group);
    }
}

#[test]
fn unicast_to_port_and_truncation() {
    if kernel_socket("unicast_to_port_and_truncation").is_none() {
        return;
    }
    let rx = ConnectorSocket::open().unwrap();
    let tx = ConnectorSocket::open().unwrap();
    let id = CbId::new(test_idx(2), 1);
    let mut d = DatagramBuilder::new(4096);
    d.push(&CnMsg::new(id, vec![0xab; 200])).unwrap();
    tx.send(d.as_bytes(), Dest::Port(rx.port_id())).unwrap();
    let mut small = bytes::BytesMut::with_capacity(64);
    match rx.recv(&mut small, false) {
        Err(cnbus::Error::Truncated { len, capacity, .. }) => {
            assert_eq!(len, d.as_bytes().len());
            assert_eq!(capacity, 64);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    // The socket is still usable and the next datagram arrives whole.
    tx.send(d.as_bytes(), Dest::Port(rx.port_id())).unwrap();
    let got = recv_until(&rx, Duration::from_secs(5), |m, c| {
        m.port == tx.port_id() && m.group == 0 && c.msg.data.len() == 200
    });
    assert!(!got.is_empty());
}

#[test]
fn send_batch_delivers_every_datagram() {
    if kernel_socket("send_batch_delivers_every_datagram").is_none() {
        return;
    }
    let rx = ConnectorSocket::open().unwrap();
    rx.set_recv_buffer(1 << 20, true).unwrap();
    let tx = ConnectorSocket::open().unwrap();
    let id = CbId::new(test_idx(3), 1);
    let dgrams: Vec<Vec<u8>> = (0..50u32)
        .map(|i| {
            let mut d = DatagramBuilder::new(256);
            d.push(&CnMsg::new(id, i.to_ne_bytes().to_vec()).with_seq(i, 0))
                .unwrap();
            d.take()
        })
        .collect();
    let slices: Vec<_> = dgrams.iter().map(|d| std::io::IoSlice::new(d)).collect();
    assert_eq!(
        tx.send_batch(&slices, Dest::Port(rx.port_id())).unwrap(),
        50
    );
    let got = recv_until(&rx, Duration::from_secs(5), |_, c| c.msg.seq == 49);
    let seqs: Vec<u32> = got.iter().map(|(_, c)| c.msg.seq).collect();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
}

#[test]
fn group_out_of_range_is_rejected() {
    let Ok(s) = ConnectorSocket::open() else {
        return;
    };
    assert!(matches!(s.join(0), Err(cnbus::Error::InvalidArgument(_))));
    assert!(matches!(s.join(33), Err(cnbus::Error::InvalidArgument(_))));
}

#[test]
fn outside_the_initial_netns_the_error_says_why() {
    if kernel_socket("outside_the_initial_netns_the_error_says_why").is_none() {
        return;
    }
    let r = std::thread::spawn(|| {
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace; the
        // thread ends right after, so no other code runs in the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let report = cnbus::sys::namespace_report();
        assert_eq!(report.initial_net, Some(false));
        let sock = ConnectorSocket::open().unwrap();
        let mut b = DatagramBuilder::new(256);
        b.push(&CnMsg::new(CbId::PROC, LISTEN.to_ne_bytes().to_vec()))
            .unwrap();
        sock.send(b.as_bytes(), Dest::Kernel)
    })
    .join()
    .unwrap();
    let e = r.expect_err("the kernel connector must be unreachable from a new netns");
    assert!(matches!(e, cnbus::Error::NoKernelConnector { .. }), "{e:?}");
    assert!(e.to_string().contains("initial network namespace"));
    assert_eq!(e.errno(), Some(libc::ECONNREFUSED));
}

#[test]
fn recv_many_reads_a_batch_in_order_and_reports_truncation() {
    if kernel_socket("recv_many_reads_a_batch_in_order_and_reports_truncation").is_none() {
        return;
    }
    let rx = ConnectorSocket::open().unwrap();
    rx.set_recv_buffer(1 << 20, true).unwrap();
    let tx = ConnectorSocket::open().unwrap();
    let id = CbId::new(test_idx(4), 1);
    let mut dgrams: Vec<Vec<u8>> = (0..20u32)
        .map(|i| {
            let mut d = DatagramBuilder::new(256);
            d.push(&CnMsg::new(id, i.to_ne_bytes().to_vec()).with_seq(i, 0))
                .unwrap();
            d.take()
        })
        .collect();
    // The 11th is longer than a slot.
    let mut big = DatagramBuilder::new(4096);
    big.push(&CnMsg::new(id, vec![0xab; 1000]).with_seq(1000, 0))
        .unwrap();
    let big = big.take();
    dgrams.insert(10, big.clone());
    let slices: Vec<_> = dgrams.iter().map(|d| std::io::IoSlice::new(d)).collect();
    assert_eq!(
        tx.send_batch(&slices, Dest::Port(rx.port_id())).unwrap(),
        21
    );
    let mut batch = cnbus::sys::RecvBatch::new(8, 256);
    assert_eq!(batch.slots(), 8);
    let mut seqs = Vec::new();
    let mut truncated = Vec::new();
    while seqs.len() + truncated.len() < 21 {
        // Blocking: waits for the first datagram only.
        let n = rx.recv_many(&mut batch, false).unwrap();
        assert!((1..=8).contains(&n) && n == batch.len());
        for d in batch.iter() {
            match d {
                Ok((bytes, meta)) => {
                    if meta.port != tx.port_id() {
                        continue;
                    }
                    assert_eq!(meta.group, 0);
                    assert_eq!(meta.len, bytes.len());
                    assert_eq!(bytes, &dgrams[seqs.len() + truncated.len()][..]);
                    seqs.push(u32_at(bytes, 24));
                }
                Err(cnbus::Error::Truncated { len, capacity, .. }) => {
                    assert_eq!((len, capacity), (big.len(), 256));
                    truncated.push(seqs.len());
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    assert_eq!(truncated, vec![10]);
    // Nothing left: a non-blocking call says so.
    assert_eq!(rx.recv_many(&mut batch, true).unwrap(), 0);
    assert!(batch.is_empty());
}

#[test]
fn recv_many_reports_an_overrun_once_then_goes_on() {
    if kernel_socket("recv_many_reports_an_overrun_once_then_goes_on").is_none() {
        return;
    }
    let group = 26;
    let rx = ConnectorSocket::open().unwrap();
    rx.set_recv_buffer(4096, true).unwrap();
    rx.join(group).unwrap();
    let tx = ConnectorSocket::open().unwrap();
    let id = CbId::new(test_idx(5), 1);
    let mut d = DatagramBuilder::new(2048);
    d.push(&CnMsg::new(id, vec![0x5a; 1000])).unwrap();
    // A multicast never waits: the small queue overflows.
    for _ in 0..40 {
        let _ = tx.try_send(d.as_bytes(), Dest::Group(group));
    }
    let mut batch = cnbus::sys::RecvBatch::new(16, 4096);
    let (mut mine, mut all, mut overruns) = (0, 0, 0);
    loop {
        match rx.recv_many(&mut batch, true) {
            Ok(0) => break,
            Ok(n) => {
                all += n;
                mine += batch
                    .iter()
                    .filter(|d| matches!(d, Ok((_, m)) if m.port == tx.port_id()))
                    .count()
            }
            Err(cnbus::Error::Overrun { .. }) => overruns += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(overruns >= 1, "the overflow is reported");
    // Some arrived (on a busy host, other senders' multicasts on the group may have taken
    // the room before ours), some of ours were dropped.
    assert!(
        all >= 1 && mine < 40,
        "some arrived, some were dropped: {mine} of {all}"
    );
    // The socket goes on after it.
    tx.send(d.as_bytes(), Dest::Group(group)).unwrap();
    let n = rx.recv_many(&mut batch, false).unwrap();
    assert!(n >= 1);
}

/// A `RecvBatch` of any requested size is made (clamped, never an overflow or a failed
/// allocation) and reads. (Before, `RecvBatch::new(1, usize::MAX)` panicked with a capacity
/// overflow and `RecvBatch::new(64, 1 << 40)` aborted the process, out of memory.)
#[test]
fn a_recv_batch_of_any_size_is_made_and_reads() {
    use cnbus::sys::RecvBatch;
    for (slots, len) in [
        (1, usize::MAX),
        (64, 1 << 40),
        (usize::MAX, usize::MAX),
        (0, 0),
    ] {
        let b = RecvBatch::new(slots, len);
        assert!((1..=RecvBatch::MAX_SLOTS).contains(&b.slots()), "{slots}");
        assert!(b.slot_len() >= 1 && b.slots() * b.slot_len() <= RecvBatch::MAX_BYTES);
    }
    assert_eq!(
        RecvBatch::new(usize::MAX, usize::MAX).slots(),
        RecvBatch::MAX_SLOTS
    );
    assert_eq!(
        RecvBatch::new(1, usize::MAX).slot_len(),
        RecvBatch::MAX_BYTES
    );
    if kernel_socket("a_recv_batch_of_any_size_is_made_and_reads").is_none() {
        return;
    }
    let (rx, tx) = (
        ConnectorSocket::open().unwrap(),
        ConnectorSocket::open().unwrap(),
    );
    let id = CbId::new(test_idx(5), 1);
    let mut d = DatagramBuilder::new(256);
    d.push(&CnMsg::new(id, &b"hi"[..]).with_seq(7, 0)).unwrap();
    tx.send(d.as_bytes(), Dest::Port(rx.port_id())).unwrap();
    let mut batch = RecvBatch::new(usize::MAX, usize::MAX);
    assert_eq!(rx.recv_many(&mut batch, false).unwrap(), 1);
    let (got, meta) = batch.iter().next().unwrap().unwrap();
    assert_eq!((got, meta.port), (d.as_bytes(), tx.port_id()));
}
