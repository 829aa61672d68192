//! The async connector against the real kernel: sends that wait without blocking the
//! runtime and give up in time, and requests beside the stream.

use std::time::Duration;

use bytes::BytesMut;

use crate::codec::{messages, CbId, CnMsg, DatagramBuilder, Message};
use crate::connector::{Connector, Incoming};
use crate::error::{Error, Op};
use crate::sys::{ConnectorSocket, Dest};

/// A (sync) connector that answers every message on `id` with a "pong" reply to its
/// sender's port, and its registration (the server runs while both are kept).
fn pong_server(id: CbId) -> (Connector, crate::connector::Registration) {
    let s = Connector::builder().spawn().unwrap();
    let h = s.handle();
    let reg = s.register(id, move |m| {
        h.send(&m.reply(&b"pong"[..]), Dest::Port(m.source().port))
            .unwrap();
    });
    (s, reg)
}

/// Runs `f` on a one-thread runtime on a thread of its own and returns its result, or
/// panics with `hung` when it has not finished after two minutes (a watchdog for a
/// future that never completes, not a timing assertion).
fn on_runtime<T: Send + 'static>(
    hung: &str,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = done_tx.send(rt.block_on(f));
    });
    done_rx.recv_timeout(Duration::from_secs(120)).expect(hung)
}

/// A peer that never reads: a socket with the smallest receive buffer.
fn stalled_peer() -> ConnectorSocket {
    let rx = ConnectorSocket::open().unwrap();
    rx.set_recv_buffer(4096, false).unwrap();
    rx
}

/// Reads everything queued at `rx` and counts the messages on `id`.
fn drain(rx: &ConnectorSocket, id: CbId) -> usize {
    let mut got = 0;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(1 << 17);
        match rx.recv(&mut buf, true).unwrap() {
            Some(_) => {
                for m in messages(buf.split().freeze()) {
                    if let Ok(Message::Connector(c)) = m {
                        got += usize::from(c.msg.id == id);
                    }
                }
            }
            None => return got,
        }
    }
}

/// Every async send to a unicast peer that never reads gives up after the connector's
/// `send_timeout`, counted as a send error; a batch reports what went out, and a
/// numbered send that gave up used no number. (Before, each waited forever: the
/// watchdog fired.)
#[test]
fn sends_to_a_peer_that_never_reads_give_up_after_send_timeout() {
    on_runtime("an async send to a stalled peer never returned", async {
        const N: usize = 600;
        let rx = stalled_peer();
        let dest = Dest::Port(rx.port_id());
        let tx = Connector::builder()
            .send_timeout(Duration::from_millis(50))
            .build_async()
            .unwrap();
        let id = CbId::new(0x5a19, tx.port_id());
        let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
        let sent = match tx.send_batch(&msgs, dest).await {
            Ok(k) => k,
            Err(Error::TimedOut { op: Op::SendBatch }) => 0,
            Err(e) => panic!("{e}"),
        };
        assert!(sent < N, "{sent}");
        let s = tx.stats();
        assert_eq!((s.sent_messages, s.send_errors), (sent as u64, 1), "{s:?}");

        let e = tx.send(&msgs[0], dest).await.unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Send }), "{e}");
        let e = tx.send_numbered(id, vec![1u8], dest).await.unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Send }), "{e}");
        assert_eq!(tx.stats().send_errors, 3);

        assert_eq!(drain(&rx, id), sent);
        assert_eq!(tx.send_numbered(id, vec![2u8], dest).await.unwrap(), 1);
    });
}

/// A `send_batch` dropped while it waits for room (a timeout around it) has counted
/// what went out: the peer received exactly `sent_messages`. (Before, the batch was
/// counted only at its end, so a dropped one counted nothing.)
#[test]
fn a_send_batch_dropped_while_waiting_counted_what_went_out() {
    on_runtime("the timeout around send_batch never fired", async {
        const N: usize = 600;
        let rx = stalled_peer();
        let dest = Dest::Port(rx.port_id());
        let tx = Connector::builder()
            .send_timeout(Duration::from_secs(3600))
            .build_async()
            .unwrap();
        let id = CbId::new(0x5a1a, tx.port_id());
        let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
        let r = ::tokio::time::timeout(Duration::from_millis(50), tx.send_batch(&msgs, dest));
        assert!(
            r.await.is_err(),
            "the batch cannot fit a stalled 4 KiB queue"
        );
        let got = drain(&rx, id);
        assert!(got > 0 && got < N, "{got}");
        assert_eq!(tx.stats().sent_messages, got as u64);
    });
}

/// A batch to a unicast peer whose queue fills up waits without blocking the runtime:
/// on a one-thread runtime, the task emptying the peer's queue still runs. (Before,
/// `send_batch` made a blocking `sendmmsg`, which held the runtime's only thread: the
/// reader never ran and the test hung until the watchdog.)
#[test]
fn send_batch_to_a_full_peer_does_not_block_the_runtime() {
    const N: usize = 600;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let rx = ConnectorSocket::open().unwrap();
            rx.set_recv_buffer(4096, false).unwrap();
            let dest = Dest::Port(rx.port_id());
            let tx = Connector::builder().build_async().unwrap();
            let id = CbId::new(0x5a17, tx.port_id());
            let reader = ::tokio::spawn(async move {
                let mut got = 0;
                let mut buf = BytesMut::new();
                while got < N {
                    buf.reserve(1 << 17);
                    match rx.recv(&mut buf, true).unwrap() {
                        Some(_) => {
                            for m in messages(buf.split().freeze()) {
                                if let Ok(Message::Connector(c)) = m {
                                    got += usize::from(c.msg.id == id);
                                }
                            }
                        }
                        None => ::tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                got
            });
            let msgs: Vec<CnMsg> = (0..N).map(|_| CnMsg::new(id, vec![7u8; 1000])).collect();
            assert_eq!(tx.send_batch(&msgs, dest).await.unwrap(), N);
            reader.await.unwrap()
        });
        let _ = done_tx.send(got);
    });
    // A watchdog, not a timing assertion: the send blocked forever before the fix.
    let got = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("send_batch blocked the runtime's thread");
    assert_eq!(got, N);
}

/// A request runs beside the task reading the stream (both through `&self`): the reply
/// goes to the request, the other message to the stream. (Before, `request` took
/// `&mut self`: this test did not compile.)
#[test]
fn request_runs_beside_the_stream() {
    let rt = ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = Connector::builder().spawn().unwrap();
        let id = CbId::new(0x5a18, server.port_id());
        let h = server.handle();
        let _svc = server.register(id, move |m| {
            let m = m.to_incoming();
            // First a message that is not the reply, then the reply.
            let other = CnMsg::new(id, &b"other"[..]).with_seq(m.msg.seq, 0);
            h.send(&other, Dest::Port(m.source.port)).unwrap();
            h.send(
                &CnMsg::reply_to(&m.msg, &b"pong"[..]),
                Dest::Port(m.source.port),
            )
            .unwrap();
        });
        let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
        let reader = conn.clone();
        let stream = ::tokio::spawn(async move {
            loop {
                match reader.recv().await {
                    Some(Ok(m)) if m.msg.id == id => return m,
                    Some(_) => {}
                    None => panic!("the stream ended"),
                }
            }
        });
        ::tokio::task::yield_now().await; // the stream's task is waiting on the socket
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 41);
        let reply = conn
            .request(&req, Dest::Port(server.port_id()), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(reply.msg.is_reply_to(&req));
        assert_eq!(&reply.msg.data[..], b"pong");
        let other = stream.await.unwrap();
        assert_eq!(&other.msg.data[..], b"other");
        assert_eq!(conn.stats().replies, 1);
    });
}

/// A stream read promptly loses nothing: 50 datagrams of 1 820 empty messages each, queued
/// at the socket before the first read, all come out of the stream. (Before, one wake-up
/// read 64 datagrams into the stream's queue at once and dropped the oldest past 65 536:
/// 25 464 of 91 000 lost, counted as `channel_full`, with the reader doing nothing wrong.)
#[test]
fn a_stream_read_promptly_loses_nothing_to_its_own_queue() {
    on_runtime("the stream stopped delivering", async {
        let conn = Connector::builder()
            .recv_buffer(64 << 20)
            .build_async()
            .unwrap();
        let id = CbId::new(0x5a1b, conn.port_id());
        let tx = ConnectorSocket::open().unwrap();
        let (mut sent, mut seq) = (0u64, 0u32);
        for _ in 0..50 {
            let mut d = DatagramBuilder::new(1 << 16).with_pid(tx.port_id());
            while d
                .push(&CnMsg::new(id, &b""[..]).with_seq(seq + 1, 0))
                .unwrap()
            {
                seq += 1;
                sent += 1;
            }
            tx.send(d.as_bytes(), Dest::Port(conn.port_id())).unwrap();
        }
        let mut got = 0u64;
        while got < sent {
            match conn.recv().await {
                Some(Ok(m)) if m.source.port == tx.port_id() => {
                    assert_eq!(m.msg.seq as u64, got + 1, "in order, none missing");
                    got += 1;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e}"),
                None => panic!("the stream ended"),
            }
        }
        let s = conn.stats();
        assert_eq!(
            (s.channel_full, s.lost, s.kernel_drops),
            (0, 0, Some(0)),
            "{s:?}"
        );
        // Every message read went to the stream (`delivered`), none elsewhere.
        assert_eq!((s.messages, s.delivered), (sent, sent), "{s:?}");
        assert_eq!(
            s.messages,
            s.replies + s.delivered + s.unmatched + s.shutdown_discards
        );
    });
}

/// A message with a request's id, seq and ack from a port other than the one the request
/// went to is not its reply: it goes to the stream, and the request takes the real
/// one. (Before, any port could answer in the server's name.)
#[test]
fn a_reply_from_another_port_is_not_taken_for_the_reply() {
    on_runtime("the request never returned", async {
        let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
        let server = ConnectorSocket::open().unwrap();
        let evil = ConnectorSocket::open().unwrap();
        let id = CbId::new(0x5a1c, conn.port_id());
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 9);
        let (c, r, to) = (conn.clone(), req.clone(), Dest::Port(server.port_id()));
        let request =
            ::tokio::spawn(async move { c.request(&r, to, Duration::from_secs(60)).await });
        // The request is out (and waiting) once the server has it.
        let got = ::tokio::task::spawn_blocking(move || {
            crate::sys::poll_read(&server, &crate::sys::EventFd::new().unwrap(), None).unwrap();
            server
        });
        let server = got.await.unwrap();
        let reply = |data: &'static [u8]| {
            let mut d = DatagramBuilder::new(256);
            d.push(&CnMsg::reply_to(&req, data)).unwrap();
            d.take()
        };
        let to_conn = Dest::Port(conn.port_id());
        evil.send(&reply(b"forged"), to_conn).unwrap();
        server.send(&reply(b"real"), to_conn).unwrap();
        let r = request.await.unwrap().unwrap();
        assert_eq!(
            (r.source.port, &r.msg.data[..]),
            (server.port_id(), &b"real"[..])
        );
        loop {
            match conn.recv().await {
                Some(Ok(m)) if m.source.port == evil.port_id() => {
                    assert_eq!(&m.msg.data[..], b"forged");
                    break;
                }
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
        assert_eq!(conn.stats().replies, 1);
    });
}

/// A request whose reply the kernel drops for a full receive queue fails with
/// `Error::Overrun` (`Op::Request`), not with a plain timeout: the runtime's one thread
/// floods the group the request went to until the socket drops, then multicasts the reply
/// into the congested queue, before the request's task can read. (Before, the request
/// returned `TimedOut` like one nobody answered.)
#[test]
fn a_reply_dropped_for_a_full_queue_is_an_overrun_not_a_timeout() {
    on_runtime("the request never returned", async {
        let group = 22;
        let conn = std::sync::Arc::new(
            Connector::builder()
                .recv_buffer(4096)
                .build_async()
                .unwrap(),
        );
        let _sub = conn.subscribe(group).unwrap();
        let server = ConnectorSocket::open().unwrap();
        server.join(group).unwrap();
        let evil = ConnectorSocket::open().unwrap();
        let id = CbId::new(0x5a1d, conn.port_id());
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 5);
        let (c, r) = (conn.clone(), req.clone());
        let request = ::tokio::spawn(async move {
            c.request(&r, Dest::Group(group), Duration::from_secs(1))
                .await
        });
        // The request is out once the server has it.
        let (seq, server) = (req.seq, server);
        ::tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::new();
            loop {
                crate::sys::poll_read(&server, &crate::sys::EventFd::new().unwrap(), None).unwrap();
                buf.reserve(1 << 16);
                if let Ok(Some(_)) = server.recv(&mut buf, true) {
                    let found = messages(buf.split().freeze()).any(|m| {
                        matches!(m, Ok(Message::Connector(c)) if (c.msg.id, c.msg.seq) == (id, seq))
                    });
                    if found {
                        return;
                    }
                }
            }
        })
        .await
        .unwrap();
        // No await from here to the reply: the request's task cannot read meanwhile.
        let frame = |m: &CnMsg| {
            let mut d = DatagramBuilder::new(1024).with_pid(evil.port_id());
            d.push(m).unwrap();
            d.take()
        };
        let drops = || conn.outbox.socket.drops().unwrap().unwrap();
        let before = drops();
        while drops() == before {
            let junk = CnMsg::new(CbId::new(0x5a1e, conn.port_id()), vec![0; 200]);
            evil.send(&frame(&junk), Dest::Group(group)).unwrap();
        }
        evil.send(
            &frame(&CnMsg::reply_to(&req, &b"pong"[..])),
            Dest::Group(group),
        )
        .unwrap();
        let e = request.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::Overrun { op: Op::Request }), "{e:?}");
        assert_eq!(conn.stats().replies, 0);
    });
}

/// Replies taken by requests are not gap-tracked (they carry the requester's seq): async
/// requests numbered with `next_seq`, alternating between two servers, all answered,
/// count no loss. (Before, 8 of 10 replies were counted as lost.)
#[test]
fn replies_to_requests_are_not_counted_as_gaps() {
    on_runtime("a request never returned", async {
        let conn = Connector::builder().build_async().unwrap();
        let id = CbId::new(0x5a1f, conn.port_id());
        let (a, _ra) = pong_server(id);
        let (b, _rb) = pong_server(id);
        for i in 0..10 {
            let to = Dest::Port([a.port_id(), b.port_id()][i % 2]);
            let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
            let r = conn.request(&req, to, Duration::from_secs(60)).await;
            assert!(r.unwrap().msg.is_reply_to(&req));
        }
        let s = conn.stats();
        assert_eq!((s.replies, s.lost, s.reordered), (10, 0, 0), "{s:?}");
    });
}

/// Async `request_numbered`: one sequence per destination, so servers that each get some
/// of a client's requests on one id count no loss.
#[test]
fn numbered_requests_to_several_servers_count_no_loss_at_the_servers() {
    on_runtime("a request never returned", async {
        let conn = Connector::builder().build_async().unwrap();
        let id = CbId::new(0x5a20, conn.port_id());
        let (a, _ra) = pong_server(id);
        let (b, _rb) = pong_server(id);
        for i in 0..10 {
            let to = Dest::Port([a.port_id(), b.port_id()][i % 2]);
            let r = conn
                .request_numbered(id, &b"ping"[..], to, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!((r.msg.seq, r.msg.ack), (i as u32 / 2 + 1, 1));
        }
        for s in [a.stats(), b.stats(), conn.stats()] {
            assert_eq!((s.lost, s.reordered), (0, 0), "{s:?}");
        }
        assert_eq!(conn.stats().replies, 10);
    });
}

/// A second request with the id, seq and ack of one outstanding fails at once with
/// `InvalidArgument`, as in the synchronous connector; the first gets the reply. (Before,
/// both waited, the reply went to the first, and the second timed out as if nobody had
/// answered.)
#[test]
fn a_second_request_with_an_outstanding_key_is_refused() {
    on_runtime("the request never returned", async {
        let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
        let server = ConnectorSocket::open().unwrap();
        let id = CbId::new(0x5a21, conn.port_id());
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
        let (c, r, to) = (conn.clone(), req.clone(), Dest::Port(server.port_id()));
        let first = ::tokio::spawn(async move { c.request(&r, to, Duration::from_secs(60)).await });
        let server = ::tokio::task::spawn_blocking(move || {
            crate::sys::poll_read(&server, &crate::sys::EventFd::new().unwrap(), None).unwrap();
            server
        })
        .await
        .unwrap();
        let e = conn
            .request(&req, to, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let mut d = DatagramBuilder::new(256);
        d.push(&CnMsg::reply_to(&req, &b"pong"[..])).unwrap();
        server
            .send(d.as_bytes(), Dest::Port(conn.port_id()))
            .unwrap();
        let r = first.await.unwrap().unwrap();
        assert_eq!(&r.msg.data[..], b"pong");
    });
}

/// Async numbered requests on one id to two servers at once: both are request 1 of their
/// destination's sequence, told apart by the reply's port, so the second is not refused
/// as a duplicate; a group request with that key is (its reply could come from either
/// port). (Before, the second numbered request failed with `InvalidArgument`.)
#[test]
fn concurrent_numbered_requests_to_two_servers_are_not_duplicates() {
    on_runtime("a request never returned", async {
        let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
        let id = CbId::new(0x5a22, conn.port_id());
        let slow = ConnectorSocket::open().unwrap();
        let fast = Connector::builder().spawn().unwrap();
        let h = fast.handle();
        let _reg = fast.register(id, move |m| {
            h.send(&m.reply(&b"fast"[..]), Dest::Port(m.source().port))
                .unwrap();
        });
        let (c, to) = (conn.clone(), Dest::Port(slow.port_id()));
        let first = ::tokio::spawn(async move {
            c.request_numbered(id, &b"ping"[..], to, Duration::from_secs(60))
                .await
        });
        // Out (so outstanding) once the slow server has it.
        let (slow, req) = ::tokio::task::spawn_blocking(move || {
            crate::sys::poll_read(&slow, &crate::sys::EventFd::new().unwrap(), None).unwrap();
            let mut buf = BytesMut::with_capacity(1 << 16);
            slow.recv(&mut buf, true).unwrap().unwrap();
            let req = match messages(buf.split().freeze()).next() {
                Some(Ok(Message::Connector(c))) => c.msg,
                other => panic!("{other:?}"),
            };
            (slow, req)
        })
        .await
        .unwrap();
        assert_eq!((req.id, req.seq, req.ack), (id, 1, 0));
        let r = conn
            .request_numbered(
                id,
                &b"ping"[..],
                Dest::Port(fast.port_id()),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.source.port, r.msg.seq, &r.msg.data[..]),
            (fast.port_id(), 1, &b"fast"[..])
        );
        let e = conn
            .request(
                &CnMsg::new(id, &b"ping"[..]).with_seq(1, 0),
                Dest::Group(25),
                Duration::from_secs(60),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let mut d = DatagramBuilder::new(256);
        d.push(&CnMsg::reply_to(&req, &b"slow"[..])).unwrap();
        slow.send(d.as_bytes(), Dest::Port(conn.port_id())).unwrap();
        let r = first.await.unwrap().unwrap();
        assert_eq!(
            (r.source.port, r.msg.seq, &r.msg.data[..]),
            (slow.port_id(), 1, &b"slow"[..])
        );
        let s = conn.stats();
        assert_eq!((s.replies, s.lost, s.reordered), (2, 0, 0), "{s:?}");
    });
}

/// Drops while a request waits for room at a full peer happen before it is sent: no
/// reply of its can be among them, so a request nobody answers is `TimedOut`, not
/// `Overrun`. The request is polled once (it waits for room at a peer whose queue is
/// full), the socket is flooded until it drops, it leaves the group (no more traffic),
/// then the peer reads everything and never replies; `request` and `request_numbered`.
/// (Before, the drop counter was read before the wait for room and the request failed
/// with `Overrun`.)
#[test]
fn drops_while_a_request_waits_for_room_are_not_an_overrun() {
    for numbered in [false, true] {
        drops_while_waiting_for_room(numbered);
    }
}

fn drops_while_waiting_for_room(numbered: bool) {
    on_runtime("the request never returned", async move {
        use std::future::Future;
        let group = 23;
        let conn = Connector::builder()
            .recv_buffer(4096)
            .build_async()
            .unwrap();
        let sub = conn.subscribe(group).unwrap();
        let peer = stalled_peer();
        let evil = ConnectorSocket::open().unwrap();
        let id = CbId::new(0x5a23, conn.port_id());
        let frame = |m: &CnMsg| {
            let mut d = DatagramBuilder::new(1024).with_pid(evil.port_id());
            d.push(m).unwrap();
            d.take()
        };
        let junk = frame(&CnMsg::new(CbId::new(0x5a24, conn.port_id()), vec![0; 200]));
        while evil
            .try_send(&junk, Dest::Port(peer.port_id()))
            .unwrap()
            .is_some()
        {}
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
        let to = Dest::Port(peer.port_id());
        let timeout = Duration::from_millis(300);
        type Request<'a> =
            std::pin::Pin<Box<dyn Future<Output = crate::Result<Incoming>> + Send + 'a>>;
        let mut request: Request<'_> = if numbered {
            Box::pin(conn.request_numbered(id, &b"ping"[..], to, timeout))
        } else {
            Box::pin(conn.request(&req, to, timeout))
        };
        std::future::poll_fn(|cx| {
            assert!(request.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        let drops = || conn.outbox.socket.drops().unwrap().unwrap();
        let before = drops();
        while drops() == before {
            evil.send(&junk, Dest::Group(group)).unwrap();
        }
        drop(sub);
        assert!(drain(&peer, CbId::new(0x5a24, conn.port_id())) > 0);
        let e = request.await.unwrap_err();
        assert!(
            matches!(e, Error::TimedOut { op: Op::Request }),
            "{e:?} (numbered: {numbered})"
        );
        assert!(drain(&peer, id) == 1, "the request went out");
    });
}

/// Async: a reply that comes after its request timed out goes to the stream, and the
/// gap tracker skips it (it carries the requester's seq): requests 1 and 3 time out and
/// their replies come late, request 2's in time; no loss, nothing reordered. (Before,
/// the late replies 1 and 3 were one stream with a gap: 1 counted as lost.)
#[test]
fn late_replies_are_not_counted_as_gaps() {
    on_runtime("a request never returned", async {
        let conn = std::sync::Arc::new(Connector::builder().build_async().unwrap());
        let id = CbId::new(0x5a25, conn.port_id());
        let server = std::sync::Arc::new(ConnectorSocket::open().unwrap());
        let (to, to_client) = (Dest::Port(server.port_id()), Dest::Port(conn.port_id()));
        // Reads the request (it went out), then replies.
        let reply_to = |req: CnMsg| {
            let server = server.clone();
            ::tokio::task::spawn_blocking(move || {
                crate::sys::poll_read(&*server, &crate::sys::EventFd::new().unwrap(), None)
                    .unwrap();
                let mut buf = BytesMut::with_capacity(1 << 16);
                server.recv(&mut buf, true).unwrap().unwrap();
                let mut d = DatagramBuilder::new(256);
                d.push(&CnMsg::reply_to(&req, &b"pong"[..])).unwrap();
                server.send(d.as_bytes(), to_client).unwrap();
            })
        };
        for i in 0..3 {
            let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
            if i == 1 {
                let (c, r) = (conn.clone(), req.clone());
                let t =
                    ::tokio::spawn(async move { c.request(&r, to, Duration::from_secs(60)).await });
                reply_to(req.clone()).await.unwrap();
                assert!(t.await.unwrap().unwrap().msg.is_reply_to(&req));
            } else {
                let e = conn
                    .request(&req, to, Duration::from_millis(1))
                    .await
                    .unwrap_err();
                assert!(matches!(e, Error::TimedOut { op: Op::Request }), "{e:?}");
                reply_to(req.clone()).await.unwrap();
                let m = conn.recv().await.unwrap().unwrap();
                assert!(m.msg.is_reply_to(&req));
            }
        }
        let s = conn.stats();
        assert_eq!((s.replies, s.lost, s.reordered), (1, 0, 0), "{s:?}");
    });
}

/// A request to a user-space port whose reply does not come is `TimedOut` even when the
/// socket dropped datagrams meanwhile: a peer's unicast reply is never one of those drops
/// (its send waits for room), so the drop counter says nothing about it. The request
/// is polled once (sent, waiting), the socket flooded on a group until it drops, then
/// the request times out. (Before, it failed with `Overrun`.)
#[test]
fn drops_do_not_make_a_request_to_a_port_an_overrun() {
    on_runtime("the request never returned", async {
        use std::future::Future;
        let group = 24;
        let conn = Connector::builder()
            .recv_buffer(4096)
            .build_async()
            .unwrap();
        let sub = conn.subscribe(group).unwrap();
        let server = ConnectorSocket::open().unwrap();
        let evil = ConnectorSocket::open().unwrap();
        let id = CbId::new(0x5a26, conn.port_id());
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
        let to = Dest::Port(server.port_id());
        let mut request = Box::pin(conn.request(&req, to, Duration::from_millis(300)));
        std::future::poll_fn(|cx| {
            assert!(request.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        assert_eq!(drain(&server, id), 1, "the request went out");
        let mut d = DatagramBuilder::new(1024).with_pid(evil.port_id());
        d.push(&CnMsg::new(CbId::new(0x5a27, conn.port_id()), vec![0; 200]))
            .unwrap();
        let junk = d.take();
        let drops = || conn.outbox.socket.drops().unwrap().unwrap();
        let before = drops();
        while drops() == before {
            evil.send(&junk, Dest::Group(group)).unwrap();
        }
        drop(sub);
        let e = request.await.unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Request }), "{e:?}");
    });
}

/// Async: a late reply whose seq is one past its sender's stream is no part of it: the
/// server's stream 1, 2, 3, the late reply to request 4, then the stream's 4 and 5 count
/// no loss and nothing reordered. (Before, the reply was taken for the stream's 4 and the
/// real 4 counted as reordered.)
#[test]
fn a_late_reply_continuing_its_senders_stream_is_not_taken_for_part_of_it() {
    on_runtime("the stream stopped delivering", async {
        let conn = Connector::builder().build_async().unwrap();
        let id = CbId::new(0x5a28, conn.port_id());
        let server = ConnectorSocket::open().unwrap();
        let to_conn = Dest::Port(conn.port_id());
        let send = |m: CnMsg| {
            let mut d = DatagramBuilder::new(256).with_pid(server.port_id());
            d.push(&m).unwrap();
            server.send(d.as_bytes(), to_conn).unwrap();
        };
        let stream = |seq: u32| CnMsg::new(id, &b"stream"[..]).with_seq(seq, 0);
        for seq in 1..=3 {
            send(stream(seq));
        }
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(4, 0);
        let e = conn
            .request(&req, Dest::Port(server.port_id()), Duration::from_millis(1))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Request }), "{e:?}");
        send(CnMsg::reply_to(&req, &b"late"[..]));
        send(stream(4));
        send(stream(5));
        let mut seen = Vec::new();
        while seen.len() < 6 {
            match conn.recv().await {
                Some(Ok(m)) => seen.push((m.msg.seq, m.msg.ack)),
                Some(Err(e)) => panic!("{e}"),
                None => panic!("the stream ended"),
            }
        }
        assert_eq!(seen, [(1, 0), (2, 0), (3, 0), (4, 1), (4, 0), (5, 0)]);
        let s = conn.stats();
        assert_eq!((s.lost, s.reordered, s.replies), (0, 0, 0), "{s:?}");
    });
}

/// Async: the other members' replies to a group request answered by one of them carry the
/// request's seq, not their senders': they go to the stream, not gap-tracked. Ten requests
/// numbered with `next_seq` to a group of two servers, each answered by both, first by
/// one then by the other in turn: no loss, nothing reordered. (Before, each server's
/// second replies, every other request's seq, counted 8 as lost.)
#[test]
fn other_members_replies_to_an_answered_group_request_are_not_counted_as_gaps() {
    on_runtime("a request or the stream stopped", async {
        let group = 31;
        let conn = Connector::builder().build_async().unwrap();
        let id = CbId::new(0x5a29, conn.port_id());
        let client = conn.port_id();
        let (ports_tx, ports_rx) = std::sync::mpsc::channel::<[u32; 2]>();
        let (answered_tx, answered) = std::sync::mpsc::channel::<()>();
        // The two servers, on a thread of their own (they block).
        let servers = std::thread::spawn(move || {
            let servers = [
                ConnectorSocket::open().unwrap(),
                ConnectorSocket::open().unwrap(),
            ];
            for s in &servers {
                s.join(group).unwrap();
            }
            let ports = servers.each_ref().map(|s| s.port_id());
            ports_tx.send(ports).unwrap();
            let wake = crate::sys::EventFd::new().unwrap();
            let mut buf = BytesMut::with_capacity(1 << 16);
            // The client's next request (a busy host's multicasts are skipped).
            let mut read = |s: &ConnectorSocket| loop {
                crate::sys::poll_read(s, &wake, None).unwrap();
                buf.clear();
                let Ok(Some(meta)) = s.recv(&mut buf, true) else {
                    continue;
                };
                if let Some(Ok(Message::Connector(c))) = messages(buf.split().freeze()).next() {
                    if meta.port == client && c.msg.id == id {
                        return c.msg;
                    }
                }
            };
            let answer = |s: &ConnectorSocket, req: &CnMsg| {
                let mut d = DatagramBuilder::new(256).with_pid(s.port_id());
                d.push(&CnMsg::reply_to(req, &b"pong"[..])).unwrap();
                s.send(d.as_bytes(), Dest::Port(client)).unwrap();
            };
            for i in 0..10 {
                let (first, second) = (&servers[i % 2], &servers[1 - i % 2]);
                let req = read(first);
                assert_eq!(read(second).seq, req.seq);
                answer(first, &req);
                answered.recv().unwrap();
                answer(second, &req);
            }
        });
        let ports = ports_rx.recv().unwrap();
        for i in 0..10 {
            let req = CnMsg::new(id, &b"ping"[..]).with_seq(conn.next_seq(id), 0);
            let r = conn
                .request(&req, Dest::Group(group), Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(r.source.port, ports[i % 2]);
            eprintln!("REQ {} {:?} {}", req.seq, r.source, r.msg.seq);
            answered_tx.send(()).unwrap();
            match conn.recv().await {
                Some(Ok(m)) => assert_eq!(
                    (m.source.port, m.msg.seq, m.msg.ack),
                    (ports[1 - i % 2], req.seq, 1)
                ),
                other => panic!("{other:?}"),
            }
        }
        servers.join().unwrap();
        eprintln!("STATS {:?}", conn.stats());
        let s = conn.stats();
        assert_eq!((s.replies, s.lost, s.reordered), (10, 0, 0), "{s:?}");
    });
}

/// Async: an answered request is not remembered as withdrawn, so the last 256 requests
/// withdrawn without a reply are remembered however many are answered meanwhile: a request
/// that timed out, then 256 answered ones on another id, then its late reply, one past its
/// sender's stream, is still no part of that stream. (Before, the entry of an answered
/// request stayed until the request returned, and its drop took it for one withdrawn
/// without a reply: the 256 answered requests pushed the late one out, the late reply was
/// taken for the stream's 4 and the real 4 counted as reordered.)
#[test]
fn answered_requests_do_not_push_withdrawn_ones_out() {
    on_runtime("a request or the stream stopped", async {
        let conn = Connector::builder().build_async().unwrap();
        let (id, other) = (
            CbId::new(0x5a2a, conn.port_id()),
            CbId::new(0x5a2b, conn.port_id()),
        );
        let server = ConnectorSocket::open().unwrap();
        let (pong, _svc) = pong_server(other);
        let send = |m: CnMsg| {
            let mut d = DatagramBuilder::new(256).with_pid(server.port_id());
            d.push(&m).unwrap();
            server
                .send(d.as_bytes(), Dest::Port(conn.port_id()))
                .unwrap();
        };
        let stream = |seq: u32| CnMsg::new(id, &b"stream"[..]).with_seq(seq, 0);
        for seq in 1..=3 {
            send(stream(seq));
        }
        let req = CnMsg::new(id, &b"ping"[..]).with_seq(4, 0);
        let e = conn
            .request(&req, Dest::Port(server.port_id()), Duration::from_millis(1))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Request }), "{e:?}");
        for seq in 1..=256 {
            let ping = CnMsg::new(other, &b"ping"[..]).with_seq(seq, 0);
            conn.request(&ping, Dest::Port(pong.port_id()), Duration::from_secs(60))
                .await
                .unwrap();
        }
        send(CnMsg::reply_to(&req, &b"late"[..]));
        send(stream(4));
        send(stream(5));
        let mut seen = Vec::new();
        while seen.len() < 6 {
            match conn.recv().await {
                Some(Ok(m)) => seen.push((m.msg.seq, m.msg.ack)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, [(1, 0), (2, 0), (3, 0), (4, 1), (4, 0), (5, 0)]);
        let s = conn.stats();
        assert_eq!((s.lost, s.reordered, s.replies), (0, 0, 256), "{s:?}");
    });
}

/// Async: `messages == replies + delivered + unmatched + shutdown_discards` after each kind
/// of datagram, with exact counters (`delivered`: queued for the stream): several messages
/// in one datagram, control messages among them (not messages), a decode error after a
/// message, a datagram cut for length (none), a request's reply, a late reply, and
/// messages read by requests while nobody reads the stream, past the queue's capacity (the
/// oldest dropped: `delivered` and `channel_full` both count them).
#[test]
fn the_outcome_identity_holds_after_every_kind_of_datagram() {
    on_runtime("a request or the stream stopped", async {
        let conn = Connector::builder()
            .max_datagram(1024)
            .build_async()
            .unwrap();
        let (id, asked) = (
            CbId::new(0x5a2c, conn.port_id()),
            CbId::new(0x5a2d, conn.port_id()),
        );
        let tx = ConnectorSocket::open().unwrap();
        let to = Dest::Port(conn.port_id());
        let seq = std::sync::atomic::AtomicU32::new(0);
        let msg = || {
            seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut d = DatagramBuilder::new(256);
            d.push(
                &CnMsg::new(id, &b"x"[..])
                    .with_seq(seq.load(std::sync::atomic::Ordering::Relaxed), 0),
            )
            .unwrap();
            d.take()
        };
        let control = |ty: u16, payload: &[u8]| {
            let mut d = Vec::new();
            crate::codec::NlHeader {
                len: 16 + payload.len() as u32,
                ty,
                ..Default::default()
            }
            .emit(&mut d);
            d.extend_from_slice(payload);
            d
        };
        // Reads the stream until `n` messages came; returns the events met on the way.
        let take = |n: usize| {
            let conn = &conn;
            async move {
                let (mut got, mut events) = (0, 0);
                while got < n {
                    match conn.recv().await {
                        Some(Ok(_)) => got += 1,
                        Some(Err(_)) => events += 1,
                        None => panic!("the stream ended"),
                    }
                }
                events
            }
        };
        let check = |want: (u64, u64, u64), step: &str| {
            let s = conn.stats();
            assert_eq!((s.messages, s.replies, s.delivered), want, "{step}: {s:?}");
            assert_eq!((s.unmatched, s.shutdown_discards), (0, 0), "{step}: {s:?}");
            assert_eq!(
                s.messages,
                s.replies + s.delivered + s.unmatched + s.shutdown_discards,
                "{step}: {s:?}"
            );
        };
        tx.send(&[msg(), msg(), msg()].concat(), to).unwrap();
        assert_eq!(take(3).await, 0);
        check((3, 0, 3), "three messages in a datagram");
        let error = [(-5i32).to_ne_bytes().to_vec(), vec![0; 16]].concat();
        let d = [control(1, &[]), control(2, &error), msg(), control(4, &[])].concat();
        tx.send(&d, to).unwrap();
        assert_eq!(take(1).await, 1, "the NLMSG_ERROR");
        check((4, 0, 4), "control messages around a message");
        let mut cut = msg();
        cut[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        tx.send(&[msg(), cut, msg()].concat(), to).unwrap();
        tx.send(&msg(), to).unwrap();
        assert!(take(2).await >= 1, "the decode error (and a gap)");
        check((6, 0, 6), "a decode error after a message");
        let mut big = DatagramBuilder::new(4096);
        big.push(&CnMsg::new(id, vec![7u8; 2000]).with_seq(1000, 0))
            .unwrap();
        tx.send(big.as_bytes(), to).unwrap();
        let next = seq.load(std::sync::atomic::Ordering::Relaxed) + 1;
        let mut d = DatagramBuilder::new(256);
        d.push(&CnMsg::new(id, &b"x"[..]).with_seq(next, 0))
            .unwrap();
        tx.send(d.as_bytes(), to).unwrap();
        seq.store(next, std::sync::atomic::Ordering::Relaxed);
        assert!(take(1).await >= 1, "the cut datagram (and gaps)");
        check((7, 0, 7), "a datagram cut for length");
        let (server, _svc) = pong_server(asked);
        let req = CnMsg::new(asked, &b"ping"[..]).with_seq(1, 0);
        conn.request(&req, Dest::Port(server.port_id()), Duration::from_secs(60))
            .await
            .unwrap();
        check((8, 1, 7), "a request's reply");
        let late = CnMsg::new(asked, &b"ping"[..]).with_seq(2, 0);
        let e = conn
            .request(&late, Dest::Port(tx.port_id()), Duration::from_millis(1))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut { op: Op::Request }), "{e:?}");
        let mut d = DatagramBuilder::new(256);
        d.push(&CnMsg::reply_to(&late, &b"late"[..])).unwrap();
        tx.send(d.as_bytes(), to).unwrap();
        assert_eq!(take(1).await, 0);
        check((9, 1, 8), "a late reply");
        // Past the queue: datagrams of 16 messages, sent on a thread (a full socket
        // queue blocks the sender) and read by requests to a silent port.
        let (n, per) = (super::QUEUE_CAP as u64 + 160, 16);
        let first = seq.load(std::sync::atomic::Ordering::Relaxed) + 1;
        let flood = std::thread::spawn(move || {
            let mut s = first;
            for _ in 0..n / per {
                let mut d = DatagramBuilder::new(1024);
                for _ in 0..per {
                    d.push(&CnMsg::new(id, &b"x"[..]).with_seq(s, 0)).unwrap();
                    s += 1;
                }
                tx.send(d.as_bytes(), to).unwrap();
            }
            tx
        });
        let silent = ConnectorSocket::open().unwrap();
        let mut asks = 2;
        while conn.stats().messages < 9 + n {
            asks += 1;
            let q = CnMsg::new(asked, &b"ping"[..]).with_seq(asks, 0);
            let _ = conn
                .request(&q, Dest::Port(silent.port_id()), Duration::from_millis(20))
                .await;
        }
        let _tx = flood.join().unwrap();
        check((9 + n, 1, 8 + n), "past the queue's capacity");
        assert_eq!(conn.stats().channel_full, 160);
    });
}
