//! The async connector (feature `tokio`) against the real kernel. Group 22 belongs to
//! this file.
#![cfg(feature = "tokio")]

mod common;

use std::time::Duration;

use cnbus::connector::{Connector, Event};
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};
use common::{kernel_socket, sh, test_idx};
use futures_util::StreamExt;

#[tokio::test]
async fn the_stream_yields_messages_and_loss_in_order() {
    if kernel_socket("the_stream_yields_messages_and_loss_in_order").is_none() {
        return;
    }
    let (group, id) = (22, CbId::new(test_idx(40), 3));
    // A queue no busy host's senders on our group fill while this test reads slowly (an
    // overrun here may take our messages: the order check below would say so).
    let mut rx = Connector::builder()
        .recv_buffer(8 << 20)
        .build_async()
        .unwrap();
    let _sub = rx.subscribe(group).unwrap();
    let tx = Connector::builder().spawn().unwrap();
    for seq in [1, 2, 5, 6] {
        tx.send(
            &CnMsg::new(id, vec![seq as u8]).with_seq(seq, 0),
            Dest::Group(group),
        )
        .unwrap();
    }
    // tx's stream only: on a busy host others send (good and bad) on this group and id.
    let txp = tx.port_id();
    let mut got = Vec::new();
    while got.len() < 5 {
        let item = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("stream item")
            .expect("stream open");
        match item {
            Ok(m) if m.source.port == txp => {
                assert_eq!(m.msg.id, id);
                got.push(format!("msg {}", m.msg.seq));
            }
            Ok(_) => {}
            Err(Event::Lost {
                id: lost_id,
                count,
                port,
            }) if port == txp => {
                assert_eq!(lost_id, id);
                got.push(format!("lost {count}"));
            }
            // Others' losses, malformed datagrams and control messages, and overruns
            // (which, if they took ours, fail the order check below).
            Err(
                Event::Lost { .. }
                | Event::Decode { .. }
                | Event::NetlinkError { .. }
                | Event::Overrun,
            ) => {}
            Err(e) => panic!("unexpected event {e}"),
        }
    }
    assert_eq!(got, ["msg 1", "msg 2", "lost 2", "msg 5", "msg 6"]);
    let s = rx.stats();
    assert!(s.messages >= 4 && s.lost >= 2, "{s:?}");
}

#[tokio::test]
async fn async_send_and_request() {
    if kernel_socket("async_send_and_request").is_none() {
        return;
    }
    let id = CbId::new(test_idx(41), 1);
    let server = Connector::builder().spawn().unwrap();
    let h = server.handle();
    let _svc = server.register(id, move |m| {
        let m = m.to_incoming();
        let reply = CnMsg::reply_to(&m.msg, m.msg.data.clone());
        h.send(&reply, Dest::Port(m.source.port)).unwrap();
    });
    let mut client = Connector::builder().build_async().unwrap();
    // An unrelated message that arrives first stays queued for the stream.
    let other = Connector::builder().spawn().unwrap();
    other
        .send(
            &CnMsg::new(CbId::new(test_idx(42), 1), &b"early"[..]),
            Dest::Port(client.port_id()),
        )
        .unwrap();
    // (A unicast is in the receiver's queue when `send` returns: no wait needed.)
    let req = CnMsg::new(id, &b"ping"[..]).with_seq(client.next_seq(id), 7);
    let r = client
        .request(&req, Dest::Port(server.port_id()), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!((&r.msg.data[..], r.msg.ack), (&b"ping"[..], 8));
    let early = client.next().await.unwrap().unwrap();
    assert_eq!(&early.msg.data[..], b"early");
    let seq = client
        .send_numbered(id, &b"one-way"[..], Dest::Port(server.port_id()))
        .await
        .unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(2), client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.msg.seq, seq);
    let e = client
        .request(
            &CnMsg::new(CbId::new(test_idx(43), 1), &b"?"[..]),
            Dest::Port(server.port_id()),
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, cnbus::Error::TimedOut { .. }));
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let Err(e) = Connector::builder().build_async() else {
        panic!("built outside a runtime")
    };
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}

#[tokio::test]
async fn the_proc_stream_receives_real_events() {
    use cnbus::proc::{EventBody, EventSet, Received};
    use cnbus::tokio::ProcStream;
    if kernel_socket("the_proc_stream_receives_real_events").is_none() {
        return;
    }
    let foreign = common::ForeignOnGroup1::start();
    let mut events = ProcStream::open(EventSet::EXEC | EventSet::EXIT)
        .await
        .unwrap();
    // A busy host may overflow the stream's queue: a reported loss may have taken our
    // shell's events, so the shell is run again (a loss is never silent, and never ours to
    // assume away). Three tries bound the test.
    let mut losses = Vec::new();
    let mut exit = None;
    'tries: for _ in 0..3 {
        let (pid, _) = sh("exit 9");
        let mut exec = false;
        while !(exec && exit.is_some()) {
            let r = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("proc event")
                .expect("stream open");
            match r {
                Received::Event(ev) => match ev.body {
                    EventBody::Exec { process } if process.tgid == pid => exec = true,
                    EventBody::Exit {
                        process, status, ..
                    } if process.tgid == pid => exit = status.code(),
                    EventBody::Fork { .. } => panic!("fork is outside the set"),
                    _ => {}
                },
                Received::Lost(loss) => {
                    losses.push(loss);
                    exit = None;
                    continue 'tries;
                }
            }
        }
        break;
    }
    assert_eq!(exit, Some(9), "losses on the way: {losses:?}");
    let st = events.stats();
    assert_eq!(st.decode_errors, 0);
    // The kernel's drop counter of the stream's socket, and (6.6+) the witness of
    // user-space multicasts on group 1.
    assert!(st.kernel_drops.is_some(), "{st:?}");
    if cnbus::sys::kernel_at_least(6, 6) {
        assert!(st.foreign_unaccounted.is_some(), "{st:?}");
    }
    let spoofed = events.stats().spoofed;
    drop(events);
    foreign.check_spoofed("the_proc_stream_receives_real_events", spoofed);
}
