//! Bad configurations give a clear error or the documented fallback, never a silent loss.

mod common;

use std::time::Duration;

use cnbus_nats::{Auth, Config, NatsSink, Record, SinkError};
use common::*;

#[test]
fn unreachable_at_start_spools_reports_and_delivers_once_the_server_is_up() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(Config::new(local_url(port), "h", spool.path()))
        .expect("an unreachable server is not an error at start");
    let stats = sink.stats();
    assert!(!stats.connected);
    let error = stats.last_error.unwrap_or_default();
    assert!(error.contains("unreachable"), "{error}");
    publish(&sink, 0..200);
    wait_for("the records to be spooled", || {
        sink.stats().spool_records == 200
    });
    // The server comes up on that port: the sink connects, creates the stream, sends the spool.
    let mut server = NatsServer::start(&[]);
    server.port = port;
    server.restart();
    wait_for("the spool to be sent", || sink.stats().acknowledged == 200);
    let stats = sink.stats();
    assert!(stats.connected);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (200, 0, 0));
    assert_eq!(
        by_id(&read_stream(&server.url(), "CNBUS_EVENTS")).len(),
        200
    );
}

#[test]
fn wrong_credentials_are_a_clear_error_at_start() {
    let server = NatsServer::start(&["--user", "agent", "--pass", "s3cret"]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    match NatsSink::start(config.clone()) {
        Err(SinkError::Auth { reason, .. }) => {
            assert!(reason.contains("authorization"), "{reason}")
        }
        other => panic!("no credentials: {other:?}"),
    }
    config.auth = Auth::UserPassword {
        user: "agent".into(),
        password: "wrong".into(),
    };
    let error = NatsSink::start(config.clone()).unwrap_err();
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    assert!(
        error.to_string().contains("refused the credentials"),
        "{error}"
    );
    config.auth = Auth::UserPassword {
        user: "agent".into(),
        password: "s3cret".into(),
    };
    let sink = NatsSink::start(config).expect("right credentials");
    publish(&sink, 0..10);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent), (10, 0));
}

#[test]
fn wrong_token_is_a_clear_error_at_start() {
    let server = NatsServer::start(&["--auth", "tok3n"]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    config.auth = Auth::Token("nope".into());
    assert!(matches!(
        NatsSink::start(config.clone()),
        Err(SinkError::Auth { .. })
    ));
    config.auth = Auth::Token("tok3n".into());
    let sink = NatsSink::start(config).expect("right token");
    publish(&sink, 0..10);
    assert_eq!(sink.shutdown(DEADLINE).sent, 10);
}

#[test]
fn a_stream_with_other_subjects_is_a_clear_error() {
    let server = NatsServer::start(&[]);
    server.create_stream("CNBUS_EVENTS", &["other.>", "cnbus.events.*"]);
    let spool = tempfile::tempdir().unwrap();
    let error = NatsSink::start(Config::new(server.url(), "h", spool.path())).unwrap_err();
    match &error {
        SinkError::StreamSubjects {
            stream,
            subjects,
            wanted,
        } => {
            assert_eq!(stream, "CNBUS_EVENTS");
            assert_eq!(subjects.len(), 2);
            assert_eq!(wanted, "cnbus.events.>");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        error.to_string().contains("do not cover cnbus.events.>"),
        "{error}"
    );
}

#[test]
fn subjects_claimed_by_another_stream_are_a_clear_error() {
    let server = NatsServer::start(&[]);
    server.create_stream("SOMEONE_ELSE", &["cnbus.>"]);
    let spool = tempfile::tempdir().unwrap();
    let error = NatsSink::start(Config::new(server.url(), "h", spool.path())).unwrap_err();
    assert!(error.to_string().contains("overlap"), "{error}");
    assert!(matches!(error, SinkError::Stream { .. }), "{error:?}");
}

#[test]
fn an_existing_stream_covering_the_subjects_is_used() {
    let server = NatsServer::start(&[]);
    server.create_stream("CNBUS_EVENTS", &["cnbus.>"]);
    let spool = tempfile::tempdir().unwrap();
    let sink = start_sink(server.url(), spool.path());
    publish(&sink, 0..5);
    assert_eq!(sink.shutdown(DEADLINE).sent, 5);
}

#[test]
fn a_server_without_jetstream_is_a_clear_error() {
    let server = NatsServer::start_with(&[], false);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    config.ack_timeout = Duration::from_secs(2);
    let error = NatsSink::start(config).map(|_| ()).unwrap_err();
    assert!(matches!(error, SinkError::Stream { .. }), "{error:?}");
    assert!(error.to_string().contains("JetStream enabled"), "{error}");
}

#[test]
fn invalid_settings_are_refused() {
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new("nats://127.0.0.1:1", "h", spool.path());
    config.window = 0;
    assert!(matches!(
        NatsSink::start(config.clone()),
        Err(SinkError::Config(_))
    ));
    config.window = 1;
    config.stream = "a.b".into();
    assert!(matches!(
        NatsSink::start(config.clone()),
        Err(SinkError::Config(_))
    ));
    config.stream = "S".into();
    config.spool_max_bytes = 100;
    assert!(matches!(
        NatsSink::start(config.clone()),
        Err(SinkError::Config(_))
    ));
    // A subject longer than the server's protocol line (4096 bytes) closes the connection at
    // every publish: nothing would ever be delivered.
    config.spool_max_bytes = 256 << 20;
    config.hostname = "h".repeat(256);
    match NatsSink::start(config.clone()) {
        Err(SinkError::Config(why)) => assert!(why.contains("host name"), "{why}"),
        other => panic!("a 256-byte host name: {other:?}"),
    }
    config.hostname = "é".repeat(127);
    NatsSink::start(config)
        .expect("a 254-byte host name is fine")
        .shutdown(Duration::ZERO);
}

#[test]
fn a_wrong_stream_found_after_an_unreachable_start_keeps_records_spooled_and_says_why() {
    // A store holding CNBUS_EVENTS with other subjects.
    let mut server = NatsServer::start(&[]);
    server.create_stream("CNBUS_EVENTS", &["other.>"]);
    server.kill();
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(Config::new(local_url(port), "h", spool.path())).expect("start");
    publish(&sink, 0..20);
    server.port = port;
    server.restart();
    wait_for("the stream error", || {
        sink.stats()
            .last_error
            .is_some_and(|e| e.contains("do not cover"))
    });
    let stats = sink.stats();
    assert!(!stats.connected);
    assert_eq!((stats.acknowledged, stats.dropped), (0, 0));
    let report = sink.shutdown(Duration::ZERO);
    assert_eq!((report.sent, report.unsent, report.dropped), (0, 20, 0));
}

#[test]
fn wrong_credentials_found_after_an_unreachable_start_keep_records_spooled_and_say_why() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(local_url(port), "h", spool.path());
    config.auth = Auth::UserPassword {
        user: "agent".into(),
        password: "wrong".into(),
    };
    let sink = NatsSink::start(config).expect("an unreachable server is not an error at start");
    publish(&sink, 0..20);
    let mut server = NatsServer::start(&["--user", "agent", "--pass", "s3cret"]);
    server.port = port;
    server.restart();
    refused_after_an_unreachable_start(sink, 20);
}

/// Test certificates (tests/tls: a CA, and a server certificate for 127.0.0.1 signed by it, valid
/// until 2126).
fn tls_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

#[test]
fn tls_with_the_right_root_ca_delivers_and_tls_failures_are_clear_errors() {
    let cert = tls_file("server.pem");
    let key = tls_file("server.key");
    let server = NatsServer::start(&[
        "--tls",
        "--tlscert",
        cert.to_str().unwrap(),
        "--tlskey",
        key.to_str().unwrap(),
    ]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    config.tls_required = true;
    let error = NatsSink::start(config.clone()).unwrap_err();
    assert!(matches!(error, SinkError::Tls { .. }), "{error:?}");
    config.tls_root_ca = Some(tls_file("ca.pem"));
    let sink = NatsSink::start(config).expect("TLS with the test CA");
    publish(&sink, 0..50);
    let report = sink.shutdown(DEADLINE);
    assert_eq!((report.sent, report.unsent, report.dropped), (50, 0, 0));
    // TLS required, server without TLS.
    let plain = NatsServer::start(&[]);
    let mut config = Config::new(plain.url(), "h", spool.path());
    config.tls_required = true;
    let error = NatsSink::start(config).unwrap_err();
    assert!(matches!(error, SinkError::Tls { .. }), "{error:?}");
}

/// Two sinks on one spool directory (a second agent started by hand beside the service, both
/// with the default --spool) would replay, cut and delete each other's segments, losing
/// records without a count: the second start is refused, and the directory is free again once
/// the first has stopped.
/// Regression: a process being spawned holds a copy of every descriptor of its parent, the
/// spool directory's lock included, until its `exec`; a sink started again on the spool
/// right after the first one ended, while another thread's spawn was in flight, was
/// refused as "in use" (`wrong_credentials_are_a_clear_error_at_start` failed so in CI
/// beside the tests starting servers). Here the child is held before its exec until the
/// first sink has ended; the second start must wait for the lock, not fail.
#[test]
fn a_spool_lock_kept_for_a_moment_by_a_spawn_in_flight_is_waited_for() {
    use std::os::unix::process::CommandExt;
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config::new(local_url(free_port()), "h", spool.path());
    let first = NatsSink::start(cfg.clone()).expect("an unreachable server is not an error");
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe` writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let [forked_r, forked_w] = fds;
    let spawner = std::thread::spawn(move || {
        let mut cmd = std::process::Command::new("true");
        // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls
        // (write, nanosleep) before the exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::write(forked_w, [1u8].as_ptr().cast(), 1);
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
        };
        cmd.status().unwrap()
    });
    let mut b = [0u8];
    // SAFETY: reads one byte into `b` from the pipe we own.
    assert_eq!(unsafe { libc::read(forked_r, b.as_mut_ptr().cast(), 1) }, 1);
    // The child exists now, holding a copy of the lock; the first sink ends.
    let report = first.shutdown(Duration::ZERO);
    assert_eq!((report.unsent, report.dropped), (0, 0));
    let second = NatsSink::start(cfg).expect("the lock is free once the spawn has exec'd");
    second.shutdown(Duration::ZERO);
    assert!(spawner.join().unwrap().success());
    // SAFETY: closes the pipe's two ends, ours.
    unsafe {
        libc::close(forked_r);
        libc::close(forked_w);
    }
}

#[test]
fn a_spool_directory_in_use_by_another_sink_is_refused() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let cfg = Config::new(local_url(port), "h", spool.path());
    let first = NatsSink::start(cfg.clone()).expect("an unreachable server is not an error");
    first.publish(Record {
        event: "fork",
        msg_id: msg_id(0),
        line: line(0),
    });
    match NatsSink::start(cfg.clone()) {
        Err(e @ SinkError::Spool { .. }) => {
            let text = e.to_string();
            assert!(text.contains("in use"), "{text}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a second sink started on a spool directory in use"),
    }
    let report = first.shutdown(Duration::ZERO);
    assert_eq!((report.unsent, report.dropped), (1, 0));
    let second = NatsSink::start(cfg).expect("the directory is free again");
    assert_eq!(second.stats().replayed, 1);
    second.shutdown(Duration::ZERO);
}
