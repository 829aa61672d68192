//! Delivery to a real nats-server: every record in the stream exactly once, unchanged.

mod common;

use std::time::Duration;

use cnbus_nats::{Config, NatsSink, Record};
use common::*;

#[test]
fn every_record_is_in_the_stream_once_and_unchanged() {
    // Woken by every packet (0), the default, and a linger longer than a burst of publishes.
    for linger in [0, 5, 200] {
        every_record_is_in_the_stream_once_and_unchanged_with(Duration::from_millis(linger));
    }
}

fn every_record_is_in_the_stream_once_and_unchanged_with(linger: Duration) {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "test host.example", spool.path());
    config.window = 64;
    config.linger = linger;
    let sink = NatsSink::start(config).expect("start");
    let events = ["fork", "exec", "lost", "exit.x"];
    const N: usize = 3000;
    for i in 0..N {
        sink.publish(Record {
            event: events[i % events.len()],
            msg_id: msg_id(i),
            line: line(i),
        });
    }
    let report = sink.shutdown(DEADLINE);
    assert_eq!(
        (report.sent, report.unsent, report.dropped),
        (N as u64, 0, 0)
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    assert_eq!(stored.len(), N);
    let map = by_id(&stored);
    for i in 0..N {
        let s = &map[&msg_id(i)];
        assert_eq!(s.payload, line(i));
        let event = ["fork", "exec", "lost", "exit_x"][i % events.len()];
        assert_eq!(s.subject, format!("cnbus.events.test_host_example.{event}"));
    }
    assert!(common::spool_files(spool.path()).is_empty());
}

#[test]
fn the_same_msg_id_sent_twice_is_stored_once() {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(Config::new(server.url(), "h", spool.path())).expect("start");
    for round in 1..=2u64 {
        for i in 0..100 {
            sink.publish(Record {
                event: "fork",
                msg_id: msg_id(i),
                line: line(i),
            });
        }
        wait_for("acks", || sink.stats().acknowledged == 100 * round);
    }
    let stats = sink.stats();
    let report = sink.shutdown(Duration::from_secs(60));
    assert_eq!(report.sent, 200);
    assert_eq!(stats.duplicates, 100);
    assert_eq!(read_stream(&server.url(), "CNBUS_EVENTS").len(), 100);
}

#[test]
fn a_stream_deleted_while_running_is_created_again_and_nothing_is_lost() {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    config.ack_timeout = Duration::from_secs(2);
    let sink = NatsSink::start(config).expect("start");
    let send = |range: std::ops::Range<usize>| {
        for i in range {
            sink.publish(Record {
                event: "fork",
                msg_id: msg_id(i),
                line: line(i),
            });
        }
    };
    send(0..100);
    wait_for("acks", || sink.stats().acknowledged == 100);
    runtime().block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        assert!(js.delete_stream("CNBUS_EVENTS").await.unwrap().success);
    });
    send(100..300);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (300, 0, 0));
    let map = by_id(&read_stream(&server.url(), "CNBUS_EVENTS"));
    assert_eq!(map.len(), 200);
    assert!((100..300).all(|i| map.contains_key(&msg_id(i))));
}

#[test]
fn a_record_the_stream_refuses_for_good_is_dropped_and_counted_and_the_rest_delivered() {
    let server = NatsServer::start(&[]);
    // An operator's stream with a size limit per message: JetStream refuses a larger record
    // at every attempt (it is not over the server's max_payload, which the client checks).
    runtime().block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: "CNBUS_EVENTS".into(),
                subjects: vec!["cnbus.events.>".into()],
                max_message_size: 300,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(Config::new(server.url(), "h", spool.path())).expect("start");
    const N: usize = 200;
    let big = |i: usize| i % 50 == 7;
    for i in 0..N {
        let line = if big(i) {
            bytes::Bytes::from(format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(400)))
        } else {
            line(i)
        };
        sink.publish(Record {
            event: "fork",
            msg_id: msg_id(i),
            line,
        });
    }
    let n_big = (0..N).filter(|&i| big(i)).count() as u64;
    wait_for("every record acknowledged or dropped", || {
        let s = sink.stats();
        s.acknowledged + s.dropped == N as u64
    });
    let stats = sink.stats();
    assert_eq!(
        (stats.acknowledged, stats.dropped),
        (N as u64 - n_big, n_big)
    );
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains("maximum"), "{error}");
    let report = sink.shutdown(DEADLINE);
    assert_eq!(
        (report.sent, report.unsent, report.dropped),
        (N as u64 - n_big, 0, n_big)
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let map = by_id(&stored);
    assert_eq!(stored.len(), N - n_big as usize);
    assert!((0..N).all(|i| map.contains_key(&msg_id(i)) != big(i)));
}
