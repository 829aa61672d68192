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
    let sink = start_sink(server.url(), spool.path());
    for round in 1..=2u64 {
        publish(&sink, 0..100);
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
    publish(&sink, 0..100);
    wait_for("acks", || sink.stats().acknowledged == 100);
    runtime().block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        assert!(js.delete_stream("CNBUS_EVENTS").await.unwrap().success);
    });
    publish(&sink, 100..300);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (300, 0, 0));
    let map = by_id(&read_stream(&server.url(), "CNBUS_EVENTS"));
    assert_eq!(map.len(), 200);
    assert!((100..300).all(|i| map.contains_key(&msg_id(i))));
}

#[test]
fn a_record_the_stream_refuses_for_good_is_kept_counted_and_the_rest_delivered() {
    let server = NatsServer::start(&[]);
    // An operator's stream with a size limit per message: JetStream refuses a larger record
    // at every attempt (it is not over the server's max_payload, which the client checks).
    server.create_stream_with("CNBUS_EVENTS", &["cnbus.events.>"], |c| {
        c.max_message_size = 300
    });
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
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
    assert_eq!(report.stats.dead_lettered, n_big);
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let map = by_id(&stored);
    assert_eq!(stored.len(), N - n_big as usize);
    assert!((0..N).all(|i| map.contains_key(&msg_id(i)) != big(i)));
    // Each refused record is kept, unchanged, with its subject and the server's reason.
    let kept = dead_letters(spool.path());
    assert_eq!(kept.len() as u64, n_big, "{kept:?}");
    for (k, i) in kept.iter().zip((0..N).filter(|&i| big(i))) {
        assert_eq!(k["msg_id"], msg_id(i).as_str());
        assert_eq!(k["subject"], "cnbus.events.h.fork");
        let want = format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(400));
        assert_eq!(k["line"], want.as_str());
        let reason = k["reason"].as_str().unwrap();
        assert!(reason.contains("10054"), "{reason}");
    }
}

/// A refusal of the bad-request class other than the size limit (a sealed stream refuses
/// every publish with code 400): before, every refusal but error 10054 was sent again every
/// 250 ms forever, holding up every record behind it and counting none.
#[test]
fn a_stream_that_refuses_every_record_for_good_holds_nothing_up_and_keeps_every_record() {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
    publish(&sink, 0..50);
    wait_for("acks", || sink.stats().acknowledged == 50);
    server.update_stream(|c| c.sealed = true);
    publish(&sink, 50..150);
    wait_for("every record acknowledged or refused", || {
        let s = sink.stats();
        s.acknowledged + s.dropped == 150
    });
    let stats = sink.stats();
    assert_eq!(
        (stats.acknowledged, stats.dropped, stats.dead_lettered),
        (50, 100, 100)
    );
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains("sealed"), "{error}");
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (50, 0, 100));
    let kept = dead_letters(spool.path());
    let mut got: Vec<String> = kept
        .iter()
        .map(|k| k["msg_id"].as_str().unwrap().to_owned())
        .collect();
    let mut want: Vec<String> = (50..150).map(msg_id).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(read_stream(&server.url(), "CNBUS_EVENTS").len(), 50);
}

/// A record stored whose acknowledgement was lost, then refused for good when sent again
/// (the stream sealed in between: JetStream checks that before de-duplication), may be in
/// the stream: it is counted as `maybe_stored`, kept in the dead-letter file, and not
/// claimed dropped. Before, it was counted as dropped (not in the stream) while the stream
/// held it. A proxy holds the server's replies while the record is sent, stored, the
/// stream sealed and the record sent again.
#[test]
fn a_record_refused_after_an_unacknowledged_publish_may_be_stored_and_is_not_counted_dropped() {
    let server = NatsServer::start(&[]);
    let proxy = HoldingProxy::start(server.port);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(proxy.url(), "h", spool.path());
    config.ack_timeout = Duration::from_millis(300);
    let sink = NatsSink::start(config).expect("start");
    publish(&sink, 0..1);
    wait_for("the first acknowledgement", || {
        sink.stats().acknowledged == 1
    });
    proxy.hold(true);
    publish(&sink, 1..2);
    wait_for("record 1 in the stream", || {
        read_stream(&server.url(), "CNBUS_EVENTS").len() == 2
    });
    server.update_stream(|c| c.sealed = true);
    wait_for("record 1 sent again", || sink.stats().resent >= 1);
    proxy.hold(false);
    wait_for("record 1 given up", || {
        let s = sink.stats();
        s.dropped + s.maybe_stored >= 1
    });
    let stats = sink.stats();
    assert_eq!(
        (
            stats.acknowledged,
            stats.dropped,
            stats.maybe_stored,
            stats.dead_lettered
        ),
        (1, 0, 1, 1),
        "{stats:?}"
    );
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains("may be in the stream"), "{error}");
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (1, 0, 0));
    let kept = dead_letters(spool.path());
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["msg_id"].as_str(), Some(msg_id(1).as_str()));
    assert_eq!(read_stream(&server.url(), "CNBUS_EVENTS").len(), 2);
}

/// A full stream (`max_msgs` with the `new` discard policy) refuses with 503: transient, an
/// operator may lift the limit. The records are sent again with a bounded backoff, none is
/// dropped, and once the limit is lifted every one is stored once.
#[test]
fn a_full_stream_is_retried_and_delivers_everything_once_the_limit_is_lifted() {
    let server = NatsServer::start(&[]);
    server.create_stream_with("CNBUS_EVENTS", &["cnbus.events.>"], |c| {
        c.max_messages = 40;
        c.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    });
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
    publish(&sink, 0..100);
    wait_for("the stream full and the rest retried", || {
        let s = sink.stats();
        s.acknowledged == 40 && s.resent > 0
    });
    let stats = sink.stats();
    assert_eq!((stats.dropped, stats.dead_lettered), (0, 0));
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains("maximum messages"), "{error}");
    server.update_stream(|c| c.max_messages = -1);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (100, 0, 0));
    assert_eq!(
        by_id(&read_stream(&server.url(), "CNBUS_EVENTS")).len(),
        100
    );
    assert!(dead_letters(spool.path()).is_empty());
}

/// No stream covers the subjects any more (an operator changed them while the sink runs):
/// the publishes get no responders, the sink checks the stream, finds it does not cover
/// `cnbus.events.>`, says so and keeps every record in the spool (nothing dropped, nothing
/// sent again and again: one check every 2 s); once the subjects are back, every record is
/// stored once.
#[test]
fn records_for_a_subject_no_stream_covers_are_spooled_reported_and_delivered_once_it_is_covered() {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
    publish(&sink, 0..50);
    wait_for("acks", || sink.stats().acknowledged == 50);
    server.update_stream(|c| c.subjects = vec!["other.>".into()]);
    publish(&sink, 50..150);
    wait_for("the records spooled and the cause said", || {
        let s = sink.stats();
        s.spool_records == 100 && s.last_error.is_some_and(|e| e.contains("do not cover"))
    });
    let stats = sink.stats();
    assert_eq!((stats.acknowledged, stats.dropped), (50, 0));
    assert!(!stats.connected);
    server.update_stream(|c| c.subjects = vec!["cnbus.events.>".into()]);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (150, 0, 0));
    assert_eq!(
        by_id(&read_stream(&server.url(), "CNBUS_EVENTS")).len(),
        150
    );
}

/// The operator's way back for dead letters: records the stream refuses for good (over its
/// `max_msg_size`; one of them not UTF-8, kept as `line_hex`) land in the dead-letter file;
/// the operator raises the limit and runs `requeue_dead_letters`; the next start, under
/// another host name, stores each exactly once with its own msg id, subject and bytes.
/// Requeued again (a crash before the dead-letter file was removed, simulated by putting
/// it back), they are sent with the same ids and de-duplicated: still once in the stream.
/// Before, there was no way back but re-publishing `jq -j .line` by hand, under new ids
/// and the re-publisher's subjects.
#[test]
fn dead_letters_requeued_once_the_cause_is_fixed_are_stored_once_with_their_ids_and_subjects() {
    let server = NatsServer::start(&[]);
    server.create_stream_with("CNBUS_EVENTS", &["cnbus.events.>"], |c| {
        c.max_message_size = 300;
        c.duplicate_window = Duration::from_secs(3600);
    });
    let spool = tempfile::tempdir().unwrap();
    const N: usize = 100;
    let big = |i: usize| i % 25 == 3;
    let line_of = |i: usize| {
        if !big(i) {
            return line(i);
        }
        let mut l = format!("{{\"n\":{i},\"pad\":\"{}\"", "x".repeat(400)).into_bytes();
        if i == 3 {
            // Not UTF-8 (never the agent's, but a library user's line may be anything).
            l.extend_from_slice(b",\"raw\":\"\xff\xfe\"");
        }
        l.extend_from_slice(b"}\n");
        bytes::Bytes::from(l)
    };
    let sink = start_sink(server.url(), spool.path());
    let events = ["fork", "exec"];
    for i in 0..N {
        sink.publish(Record {
            event: events[i % 2],
            msg_id: msg_id(i),
            line: line_of(i),
        });
    }
    let n_big = (0..N).filter(|&i| big(i)).count() as u64;
    let report = sink.shutdown(DEADLINE);
    assert_eq!(
        (report.sent, report.unsent, report.dropped),
        (N as u64 - n_big, 0, n_big)
    );
    assert_eq!(report.stats.dead_lettered, n_big);
    let kept = std::fs::read(spool.path().join(cnbus_nats::DEAD_LETTER_FILE)).unwrap();
    assert!(
        String::from_utf8_lossy(&kept).contains("line_hex"),
        "the non-UTF-8 line is kept in hex"
    );
    // The operator fixes the cause, then requeues.
    server.update_stream(|c| c.max_message_size = -1);
    let done = cnbus_nats::requeue_dead_letters(spool.path()).unwrap();
    assert_eq!((done.requeued, done.malformed), (n_big, 0));
    assert!(!spool.path().join(cnbus_nats::DEAD_LETTER_FILE).exists());
    let check_stream = || {
        let stored = read_stream(&server.url(), "CNBUS_EVENTS");
        assert_eq!(stored.len(), N);
        let map = by_id(&stored);
        for i in 0..N {
            let s = &map[&msg_id(i)];
            assert_eq!(s.payload, line_of(i), "{i}");
            let subject = format!("cnbus.events.h.{}", events[i % 2]);
            assert_eq!(s.subject, subject, "{i}");
        }
    };
    // The next start: another host name, which requeued records do not take.
    let restart = || {
        let sink =
            NatsSink::start(Config::new(server.url(), "other", spool.path())).expect("start");
        sink.shutdown(DEADLINE)
    };
    let report = restart();
    assert_eq!((report.sent, report.unsent, report.dropped), (n_big, 0, 0));
    assert_eq!(
        (
            report.stats.replayed,
            report.stats.duplicates,
            report.stats.dead_lettered
        ),
        (n_big, 0, 0)
    );
    check_stream();
    assert!(spool_files(spool.path()).is_empty());
    // The crash case: the dead-letter file back, requeued again, sent again with the same ids.
    std::fs::write(spool.path().join(cnbus_nats::DEAD_LETTER_FILE), &kept).unwrap();
    let done = cnbus_nats::requeue_dead_letters(spool.path()).unwrap();
    assert_eq!(done.requeued, n_big);
    let report = restart();
    assert_eq!(
        (report.sent, report.stats.duplicates, report.dropped),
        (n_big, n_big, 0)
    );
    check_stream();
}

/// Regression: a record whose subject is too long for the server's protocol line (4096
/// bytes by default; here a requeued dead letter's subject, or a library user's very long
/// event name) made the server close the connection at each publish of it: sent again and
/// again, forever, the sink disconnecting each time, the record never stored nor counted.
/// Now a subject over `MAX_SUBJECT` is refused for good: dead-lettered, counted as
/// dropped, the records around it stored, no disconnect. (Failed before the fix: the
/// long-subject record stayed unsent, with disconnects.)
#[test]
fn a_subject_too_long_for_the_server_is_refused_for_good_without_disconnecting() {
    let server = NatsServer::start(&[]);
    server.create_stream("CNBUS_EVENTS", &["cnbus.events.>"]);
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
    let long_event = "e".repeat(5000);
    for i in 0..3 {
        sink.publish(Record {
            event: if i == 1 { &long_event } else { "fork" },
            msg_id: msg_id(i),
            line: line(i),
        });
    }
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (2, 0, 1));
    assert_eq!(
        (report.stats.dead_lettered, report.stats.disconnects),
        (1, 0)
    );
    let kept = dead_letters(spool.path());
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["msg_id"], msg_id(1));
    let stored = by_id(&read_stream(&server.url(), "CNBUS_EVENTS"));
    assert_eq!(stored.len(), 2);
    assert!(!stored.contains_key(&msg_id(1)));
}
