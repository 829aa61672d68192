//! A crash of the process (exit without shutdown): the spool is replayed by the next start and
//! the stream stores each record once.

mod common;

use cnbus_nats::{Config, NatsSink};
use common::*;

const N: usize = 20_000;
const CHILD: &str = "CNBUS_NATS_CRASH_CHILD";

fn config(url: &str, spool: &std::path::Path) -> Config {
    let mut config = Config::new(url, "h", spool);
    // Nearly every record overflows into the spool, in small segments.
    config.queue = 1;
    config.window = 8;
    config.spool_segment_bytes = 4096;
    config
}

/// In the child: publish, wait for some acknowledgements, and exit without shutdown.
fn child(spec: &str) -> ! {
    let (url, spool) = spec.split_once(' ').unwrap();
    let sink = NatsSink::start(config(url, std::path::Path::new(spool))).expect("start");
    publish(&sink, 0..N);
    wait_for("some acknowledgements", || {
        sink.stats().acknowledged >= 1000
    });
    // No destructors: the sink's thread dies with the process, as in a crash.
    std::process::exit(0);
}

#[test]
fn a_crash_keeps_the_spool_and_the_next_start_stores_each_record_once() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
    }
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_crash_keeps_the_spool_and_the_next_start_stores_each_record_once",
            "--nocapture",
        ])
        .env(
            CHILD,
            format!("{} {}", server.url(), spool.path().display()),
        )
        .status()
        .unwrap();
    assert!(status.success());
    let before = read_stream(&server.url(), "CNBUS_EVENTS").len();
    assert!(before >= 1000, "{before} stored before the crash");

    let sink = NatsSink::start(config(&server.url(), spool.path())).expect("restart");
    let replayed = sink.stats().replayed;
    assert!(replayed > 0);
    let stats_then = sink.stats();
    let report = sink.shutdown(DEADLINE);
    eprintln!("stored before the crash {before}, replayed {replayed}");
    assert_eq!((report.unsent, report.dropped), (0, 0), "{stats_then:?}");
    assert_eq!(report.sent, replayed);
    let map = by_id(&read_stream(&server.url(), "CNBUS_EVENTS")); // panics on a record stored twice
                                                                  // Lost with the process: at most the queue and the window, which were only in memory.
    assert!(map.len() + 1 + 8 >= N, "{} of {N} stored", map.len());
    for (id, s) in &map {
        let i: usize = id.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(s.payload, line(i));
    }
}
