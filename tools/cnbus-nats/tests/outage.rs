//! Outages of a real nats-server: kill -9 mid-stream, the spool, its cap, its replay.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus_nats::{Accepted, Config, NatsSink, Record};
use common::*;

fn config(server: &NatsServer, spool: &std::path::Path) -> Config {
    let mut config = Config::new(server.url(), "h", spool);
    config.window = 64;
    config.queue = 256;
    config.ack_timeout = Duration::from_secs(2);
    config.spool_segment_bytes = 16 << 10;
    config
}

/// Publishes records `from..to` at a steady pace, returning the ids `publish` said it dropped.
fn publish_range(sink: &NatsSink, from: usize, to: usize, pace: bool) -> HashSet<String> {
    let mut dropped = HashSet::new();
    for i in from..to {
        if sink.publish(Record {
            event: "fork",
            msg_id: msg_id(i),
            line: line(i),
        }) == Accepted::Dropped
        {
            dropped.insert(msg_id(i));
        }
        if pace && i % 5 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    dropped
}

/// Checks `published = in stream + dropped` exactly, each stored record once and unchanged.
fn check_stream(
    server: &NatsServer,
    published: usize,
    dropped: u64,
    known_dropped: &HashSet<String>,
) {
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let map = by_id(&stored);
    assert_eq!(
        published as u64,
        map.len() as u64 + dropped,
        "published = in stream + dropped"
    );
    for (id, s) in &map {
        assert!(
            !known_dropped.contains(id),
            "{id} was reported dropped but is in the stream"
        );
        let i: usize = id.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(s.payload, line(i));
    }
}

#[test]
fn kill_9_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let mut server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let sink = Arc::new(NatsSink::start(config(&server, spool.path())).expect("start"));
    const N: usize = 20_000;
    let publisher = {
        let sink = Arc::clone(&sink);
        std::thread::spawn(move || publish_range(&sink, 0, N, true))
    };
    wait_for("the first acknowledgements", || {
        sink.stats().acknowledged >= 1000
    });
    server.kill();
    let down = Instant::now();
    // Keep it down for a few seconds while records keep coming (they go to the spool).
    wait_for("records spooled during a 4 s outage", || {
        down.elapsed() >= Duration::from_secs(4) && sink.stats().spooled > 0
    });
    server.restart();
    wait_for("the reconnection", || sink.stats().reconnects >= 1);
    let known_dropped = publisher.join().unwrap();
    let sink = Arc::try_unwrap(sink).expect("the publisher is done");
    let stats = sink.stats();
    eprintln!("{stats:?}");
    let report = sink.shutdown(DEADLINE);
    assert_eq!(report.unsent, 0, "{stats:?}");
    assert_eq!(report.dropped, 0, "the spool cap is far away: {stats:?}");
    assert_eq!(report.sent, N as u64);
    assert!(stats.spooled > 0, "the outage spooled nothing: {stats:?}");
    check_stream(&server, N, report.dropped, &known_dropped);
}

#[test]
fn a_full_spool_during_a_long_outage_drops_an_exact_count() {
    let mut server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = config(&server, spool.path());
    cfg.spool_max_bytes = 64 << 10;
    cfg.queue = 32;
    let sink = NatsSink::start(cfg).expect("start");
    // Some records before the outage.
    let mut known_dropped = publish_range(&sink, 0, 500, false);
    wait_for("acknowledgements", || sink.stats().acknowledged == 500);
    server.kill();
    wait_for("the sink to see the outage", || !sink.stats().connected);
    const N: usize = 5000;
    known_dropped.extend(publish_range(&sink, 500, N, false));
    wait_for("the queue to drain into the spool", || {
        let s = sink.stats();
        s.spool_records + s.dropped + s.acknowledged == N as u64
    });
    let during = sink.stats();
    assert!(
        during.dropped > 0,
        "the spool cap was not reached: {during:?}"
    );
    // Over the cap only by records published without acknowledgement (at most the window).
    assert!(during.spool_bytes <= (64 << 10) + 64 * 200, "{during:?}");
    server.restart();
    let report = sink.shutdown(DEADLINE);
    assert_eq!(report.unsent, 0);
    assert_eq!(report.sent + report.dropped, N as u64);
    assert_eq!(
        report.dropped, during.dropped,
        "dropped only while the spool was full"
    );
    assert!(known_dropped.len() as u64 <= report.dropped);
    check_stream(&server, N, report.dropped, &known_dropped);
}

#[test]
fn shutdown_reports_unsent_exactly_and_the_next_start_replays_them() {
    let mut server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(config(&server, spool.path())).expect("start");
    publish_range(&sink, 0, 300, false);
    wait_for("acknowledgements", || sink.stats().acknowledged == 300);
    server.kill();
    wait_for("the sink to see the outage", || !sink.stats().connected);
    const N: usize = 2000;
    let dropped = publish_range(&sink, 300, N, false);
    assert!(dropped.is_empty());
    let report = sink.shutdown(Duration::from_millis(300));
    assert_eq!(report.dropped, 0);
    assert_eq!(report.sent, 300);
    assert_eq!(report.unsent, N as u64 - 300, "{report:?}");
    assert!(!spool_files(spool.path()).is_empty());

    server.restart();
    let sink = NatsSink::start(config(&server, spool.path())).expect("restart");
    assert_eq!(sink.stats().replayed, N as u64 - 300);
    let report2 = sink.shutdown(DEADLINE);
    assert_eq!(
        (report2.sent, report2.unsent, report2.dropped),
        (N as u64 - 300, 0, 0)
    );
    assert!(spool_files(spool.path()).is_empty());
    check_stream(&server, N, 0, &HashSet::new());
}

#[test]
fn a_torn_spool_tail_is_counted_and_cut_never_parsed() {
    // No server at first: everything goes to the spool.
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(local_url(port), "h", spool.path());
    cfg.spool_segment_bytes = 1 << 20;
    let sink =
        NatsSink::start(cfg.clone()).expect("an unreachable server is not an error at start");
    publish_range(&sink, 0, 50, false);
    let report = sink.shutdown(Duration::ZERO);
    assert_eq!((report.sent, report.unsent, report.dropped), (0, 50, 0));
    // A crash in the middle of the last record's write.
    let files = spool_files(spool.path());
    assert_eq!(files.len(), 1);
    let len = std::fs::metadata(&files[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let mut server = NatsServer::start(&[]);
    cfg.url = server.url();
    let sink = NatsSink::start(cfg).expect("start");
    let stats = sink.stats();
    assert_eq!(
        (stats.replayed, stats.spool_torn_tails),
        (49, 1),
        "{stats:?}"
    );
    assert!(stats.spool_torn_bytes > 0);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent), (49, 0));
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let map = by_id(&stored);
    assert_eq!(map.len(), 49);
    for i in 0..49 {
        assert_eq!(map[&msg_id(i)].payload, line(i));
    }
    server.kill();
}

/// A spool segment damaged on disk while the sink runs (a bad sector, a hand that cut a
/// file): the records it loses are counted as dropped, so that `published = acknowledged +
/// dropped + unsent` still holds exactly and the agent writes a `dropped` line for them.
#[test]
fn records_lost_from_a_segment_damaged_while_running_are_counted_as_dropped() {
    let mut server = NatsServer::start(&[]);
    server.kill();
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(config(&server, spool.path())).expect("unreachable is no error");
    const N: usize = 2000;
    let dropped_at_publish = publish_range(&sink, 0, N, false);
    assert!(dropped_at_publish.is_empty());
    wait_for("every record in the spool", || {
        sink.stats().spool_records == N as u64
    });
    let files = spool_files(spool.path());
    assert!(files.len() >= 3, "{files:?}");
    // Flip a byte in the middle of the second segment: its records from there on are lost.
    let mut data = std::fs::read(&files[1]).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x55;
    std::fs::write(&files[1], &data).unwrap();
    server.restart();
    let report = sink.shutdown(DEADLINE);
    let stats = &report.stats;
    assert_eq!(report.unsent, 0, "{stats:?}");
    assert!(stats.spool_torn_tails >= 1, "{stats:?}");
    assert!(
        report.dropped > 0,
        "the lost records are not counted: {stats:?}"
    );
    assert_eq!(
        report.sent + report.dropped,
        N as u64,
        "published = acknowledged + dropped + unsent: {stats:?}"
    );
    check_stream(&server, N, report.dropped, &HashSet::new());
}
