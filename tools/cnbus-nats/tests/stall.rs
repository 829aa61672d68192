//! A server that stops answering without closing its connection (SIGSTOP: a hung server, a
//! network that drops packets): the sink's thread must not wait for the network, so that
//! `shutdown` keeps its deadline and writes what was not acknowledged to the spool.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use cnbus_nats::{Config, NatsSink, Record};
use common::*;

/// Resumes the server when the test ends, whatever happened.
struct Resume<'a>(&'a NatsServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// With a small window the client's socket fills (a flush waits); with a large one its
/// command queue fills too (a publish waits).
#[test]
fn shutdown_keeps_its_deadline_when_the_server_stops_reading() {
    stopped_server_then_shutdown(64);
}

#[test]
fn shutdown_keeps_its_deadline_when_the_server_stops_reading_with_a_large_window() {
    stopped_server_then_shutdown(4096);
}

fn stopped_server_then_shutdown(window: usize) {
    let server = NatsServer::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(server.url(), "h", spool.path());
    cfg.window = window;
    let sink = NatsSink::start(cfg).expect("start");
    publish(&sink, 0..10);
    wait_for("the first acknowledgements", || {
        sink.stats().acknowledged == 10
    });

    server.signal(libc::SIGSTOP);
    let _resume = Resume(&server);
    // Far more than the sockets of both ends hold (the server's max_payload is 1 MiB): the
    // client's writes block; then many small records, more than async-nats's command queue
    // (2048) holds.
    let big = Bytes::from(format!("{{\"pad\":\"{}\"}}\n", "x".repeat(512 << 10)));
    let mut published = 10u64;
    for i in 10..70 {
        sink.publish(Record {
            event: "fork",
            msg_id: msg_id(i),
            line: big.clone(),
        });
        published += 1;
    }
    publish(&sink, 70..4070);
    published += 4000;
    // Time for the sink's thread to publish them (into full sockets).
    std::thread::sleep(Duration::from_secs(2));

    // Shutdown with a 1 s deadline, while the server is still stopped.
    let (tx, rx) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let _ = tx.send(sink.shutdown(Duration::from_secs(1)));
    });
    let report = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "shutdown(1 s) had not returned after 60 s with the server stopped: the \
             sink's thread waits for the network"
            )
        });
    stopper.join().unwrap();
    assert_eq!(report.dropped, 0, "{report:?}");
    assert_eq!(report.sent + report.unsent, published, "{report:?}");
    assert!(report.unsent >= 60, "{report:?}");
}
