//! The command lines and outputs of every example, used the way a careless or hostile user
//! would (the tools' own are in `tools/*/tests/cli.rs`, with the same checks from
//! `common::cli`):
//!
//! * hostile arguments (huge, negative, NaN, infinite, empty, missing values, unknown
//!   flags, non-UTF-8) are usage errors: exit status 2 and a message, never a panic, never
//!   a silently wrapped number or a run with defaults;
//! * a failed write of the output (`> /dev/full`) is reported with exit status 1, a closed
//!   pipe (`| head`) is a quiet exit 0, and a full stderr (`2> /dev/full`) panics nothing;
//! * the examples' receive loops survive a malformed datagram and a receive-queue
//!   overflow, count both and keep going.
//!
//! The examples are built with the cargo running the tests (`common::examples`), so a
//! plain `cargo test --workspace --all-features` from a fresh clone runs all of this. The tests that
//! need the kernel connector (root) skip without it, except under CI. Groups 31 and 32
//! belong to this file; its traffic carries this process's own idx (`common::test_idx`) or
//! is identified by its sender's port, and every count that foreign traffic could raise is
//! checked as a lower bound.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnbus::codec::DatagramBuilder;
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};
use common::cli::*;
use common::examples::example;

const GROUP: u32 = 31;

fn kernel(test: &str) -> bool {
    common::kernel_socket(test).is_some()
}

fn datagram(id: CbId, seq: u32, payload: &[u8], pid: u32) -> Vec<u8> {
    let mut d = DatagramBuilder::new(256).with_pid(pid);
    d.push(&CnMsg::new(id, payload.to_vec()).with_seq(seq, 0))
        .unwrap();
    d.take()
}

// ---------------------------------------------------------------------------------------
// Arguments

/// Arguments that must be a usage error, and what the message must name.
type Case = (Vec<&'static str>, &'static str);

/// Per example: its hostile cases.
fn hostile_example_arguments() -> Vec<(&'static str, Vec<Case>)> {
    let v = |a: &[&'static str], e: &'static str| (a.to_vec(), e);
    vec![
        (
            "cn_publish",
            vec![
                v(&["--idx", "4294967296"], "--idx"),
                // Kernel idx 1..=10 and 0 (the help says above 10); the rest of the
                // arguments keep a run as short as possible should one be accepted.
                v(&["--idx", "0", "--group", "31", "--count", "1"], "--idx"),
                v(&["--idx", "10", "--group", "31", "--count", "1"], "--idx"),
                v(&["--idx=0x1", "--group", "31", "--count", "1"], "--idx"),
                v(&["--val=-1"], "--val"),
                v(&["--group", "33"], "--group"),
                v(&["--group", "11"], "--group"),
                v(&["--size", "65536"], "--size"),
                v(&["--count", "18446744073709551616"], "--count"),
                v(&["--batch", "0"], "--batch"),
                v(&["--interval-ms", "1e3"], "--interval-ms"),
                v(&["--count"], "--count"),
            ],
        ),
        (
            "cn_subscribe",
            vec![
                v(&["--seconds", "18446744073709551615"], "--seconds"),
                v(&["--seconds", "1e30"], "--seconds"),
                v(&["--seconds", "NaN"], "--seconds"),
                v(&["--idx", "0x100000000"], "--idx"),
                v(&["--group", "0"], "--group"),
                v(&["--count=-1"], "--count"),
            ],
        ),
        (
            "bus_producer",
            vec![
                v(&["--threads", "4294967297"], "--threads"),
                v(
                    &[
                        "--idx",
                        "0",
                        "--group",
                        "31",
                        "--threads",
                        "1",
                        "--count",
                        "1",
                    ],
                    "--idx",
                ),
                v(
                    &[
                        "--idx",
                        "1",
                        "--group",
                        "31",
                        "--threads",
                        "1",
                        "--count",
                        "1",
                    ],
                    "--idx",
                ),
                v(&["--threads", "0"], "--threads"),
                v(&["--count", "4294967296"], "--count"),
                v(&["--latency-us", "18446744073709551615"], "--latency-us"),
                v(&["--group", "4294967320"], "--group"),
                v(&["--lanes=yes"], "--lanes"),
            ],
        ),
        (
            "bus_subscriber",
            vec![
                v(&["--group", "4294967320"], "--group"),
                v(&["--idle-secs", "1e30"], "--idle-secs"),
                v(&["--idle-secs=-1"], "--idle-secs"),
                v(&["--buffer", "0"], "--buffer"),
                v(&["--count", "x"], "--count"),
            ],
        ),
        (
            "proc_events",
            vec![
                v(&["--seconds", "1e19"], "--seconds"),
                v(&["--count=-1"], "--count"),
                v(&["--buffer", "5G"], "--buffer"),
            ],
        ),
        (
            "soak",
            vec![
                v(&["--seconds", "18446744073709551615"], "--seconds"),
                v(&["--seconds", "0"], "--seconds"),
                v(&["--receivers", "0"], "--receivers"),
                v(&["--producers", "4294967297"], "--producers"),
                v(&["--group", "99"], "--group"),
            ],
        ),
        (
            "noise",
            vec![
                v(&["--seconds", "0"], "--seconds"),
                v(&["--seconds", "86401"], "--seconds"),
                v(&["--rate", "100001"], "--rate"),
                v(&["--proc-rate", "100001"], "--proc-rate"),
                v(&["--rate=-1"], "--rate"),
                v(&["--seconds"], "--seconds"),
                v(&["1"], "1"),
            ],
        ),
    ]
}

/// Every numeric option, by program.
fn numeric_options(name: &str) -> &'static [&'static str] {
    match name {
        "cn_publish" => &[
            "--group",
            "--idx",
            "--val",
            "--count",
            "--size",
            "--interval-ms",
            "--batch",
        ],
        "cn_subscribe" => &["--group", "--idx", "--val", "--count", "--seconds"],
        "bus_producer" => &["--group", "--idx", "--threads", "--count", "--latency-us"],
        "bus_subscriber" => &[
            "--group",
            "--idx",
            "--count",
            "--idle-secs",
            "--buffer",
            "--print",
        ],
        "proc_events" => &["--count", "--seconds", "--buffer"],
        "soak" => &["--seconds", "--producers", "--receivers", "--group"],
        "noise" => &["--seconds", "--rate", "--proc-rate"],
        other => panic!("no options listed for {other}"),
    }
}

/// The values no numeric option accepts: empty, negative, not a number, infinite, huge.

#[test]
fn every_numeric_option_rejects_bad_numbers() {
    for (name, _) in hostile_example_arguments() {
        rejects_bad_numbers(&example(name), numeric_options(name));
    }
}

#[test]
fn every_example_rejects_unknown_flags_and_out_of_range_values_and_has_help() {
    for (name, cases) in hostile_example_arguments() {
        help_and_usage_errors(&example(name), &cases);
    }
}

#[test]
fn a_full_stderr_panics_nothing_on_a_usage_error() {
    for (name, _) in hostile_example_arguments() {
        usage_error_with_a_full_stderr(&example(name));
    }
}

// ---------------------------------------------------------------------------------------
// Output errors

#[test]
fn a_failed_write_of_the_output_is_reported_with_status_1() {
    if !kernel("a_failed_write_of_the_output_is_reported_with_status_1") {
        return;
    }
    let g = GROUP.to_string();
    fails_on_a_full_disk(
        &example("bus_subscriber"),
        &["--group", &g, "--idle-secs", "60"],
        "bus_subscriber: writing to stdout",
    );
    fails_on_a_full_disk(
        &example("bus_producer"),
        &["--group", &g, "--threads", "1", "--count", "1"],
        "bus_producer: writing to stdout",
    );
    fails_on_a_full_disk(
        &example("proc_events"),
        &["--seconds", "60"],
        "proc_events: writing to stdout",
    );
}

#[test]
fn a_closed_pipe_ends_quietly_with_status_0() {
    if !kernel("a_closed_pipe_ends_quietly_with_status_0") {
        return;
    }
    quiet_on_a_closed_pipe(
        &example("proc_events"),
        &["--count", "1000000000", "--seconds", "60"],
    );
}

#[test]
fn a_full_stderr_panics_nothing_while_running() {
    if !kernel("a_full_stderr_panics_nothing_while_running") {
        return;
    }
    runs_with_a_full_stderr(&example("proc_events"), &["--seconds", "0.5"]);
    // Sends nothing (both rates 0): only its start and end lines, to a full stderr.
    runs_with_a_full_stderr(
        &example("noise"),
        &["--seconds", "1", "--rate", "0", "--proc-rate", "0"],
    );
}

// ---------------------------------------------------------------------------------------
// Receive loops

#[test]
fn bus_subscriber_counts_junk_and_overruns_and_keeps_going() {
    let Some(evil) =
        common::kernel_socket("bus_subscriber_counts_junk_and_overruns_and_keeps_going")
    else {
        return;
    };
    let idx = common::test_idx(0x31);
    let id = CbId::new(idx, 1);
    // It prints every message, and runs until SIGTERM. (Foreign senders may replay the
    // test's messages on the group, so neither --count nor --idle-secs can end it.)
    let (mut r, rx, err) = Running::piped(
        Command::new(example("bus_subscriber"))
            .args(["--group", &GROUP.to_string(), "--idx", &idx.to_string()])
            .args([
                "--buffer",
                "4096",
                "--print",
                "1000000000",
                "--idle-secs",
                "600",
            ]),
    );
    line_with(&rx, "listening on group");
    let me = evil.port_id();
    let send = |seq: u32| {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&1u32.to_ne_bytes());
        p[4..].copy_from_slice(&seq.to_ne_bytes());
        evil.send(&datagram(id, seq, &p, me), Dest::Group(GROUP))
            .unwrap();
    };
    // A datagram too short for a netlink header, then the stream's first message.
    evil.send(&[1, 2], Dest::Group(GROUP)).unwrap();
    send(0);
    // Stopped, it cannot read: 2000 datagrams overflow its 4 KiB queue.
    r.signal(libc::SIGSTOP);
    r.wait_stopped();
    for seq in 1..=2000 {
        send(seq);
    }
    r.signal(libc::SIGCONT);
    // Later messages, until one of them is received: it kept going after the overflow.
    let end = Instant::now() + HANG;
    let mut seq = 2000;
    let mut out = Vec::new();
    'seen: loop {
        assert!(
            Instant::now() < end,
            "no message after the overflow: {out:?}"
        );
        seq += 1;
        send(seq);
        let until = Instant::now() + Duration::from_millis(200);
        while let Ok(l) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            let ours = l.contains(&format!("from port {me}, payload seq "));
            let after = ours && count(&l, "payload seq") > 2000;
            out.push(l);
            if after {
                break 'seen;
            }
        }
    }
    r.signal(libc::SIGTERM);
    let st = r.wait("bus_subscriber", || {});
    let err = err.join().unwrap();
    out.extend(rest(&rx));
    let summary = out
        .iter()
        .find(|l| l.starts_with("received "))
        .unwrap_or_else(|| panic!("no summary: {out:?} {err}"));
    // Loss makes the status 1, as documented; it is not a crash.
    assert_eq!(st.code(), Some(1), "{st}: {out:?} {err}");
    assert!(count(summary, "decode errors:") >= 1, "{summary}");
    assert!(count(summary, "overruns:") >= 1, "{summary}");
    let stream = out
        .iter()
        .find(|l| l.contains(&format!("port {me} thread 1:")))
        .unwrap_or_else(|| panic!("no line for the test's stream: {out:?}"));
    let received = count(stream, ":");
    let lost = count(stream, "received,");
    // The first message and at least one after the overflow arrived, and every message in
    // between is either received or counted lost.
    assert!(received >= 2, "{stream}");
    assert!(lost >= 1, "{stream}");
    assert!(received + lost > 2001, "{stream}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn proc_events_counts_junk_spoofs_and_overruns_and_keeps_going() {
    let Some(evil) =
        common::kernel_socket("proc_events_counts_junk_spoofs_and_overruns_and_keeps_going")
    else {
        return;
    };
    let mut r = Running(
        Command::new(example("proc_events"))
            .args([
                "--count",
                "1000000000",
                "--seconds",
                "600",
                "--buffer",
                "4096",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err_rx = stderr_lines(&mut r.0);
    let rx = lines(&mut r.0);
    line_with(&rx, "listening for process events");
    // A 2-byte datagram on group 1, and a fork event from user space, each sent until it is
    // reported (its tiny queue may be full of other processes' events when it arrives).
    let me = evil.port_id();
    let junk = [1u8, 2];
    let spoof = datagram(CbId::PROC, 1, &[0u8; 40], me);
    for (d, report) in [
        (&junk[..], format!("malformed datagram from port {me}:")),
        (&spoof[..], format!("user-space port {me}")),
    ] {
        let end = Instant::now() + HANG;
        'reported: loop {
            assert!(Instant::now() < end, "never reported: {report}");
            evil.send(d, Dest::Group(1)).unwrap();
            let until = Instant::now() + Duration::from_millis(200);
            while let Ok(l) = err_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                if l.contains(&report) {
                    break 'reported;
                }
            }
        }
    }
    // Stopped, it cannot read: a burst of processes overflows its queue.
    r.signal(libc::SIGSTOP);
    r.wait_stopped();
    for _ in 0..100 {
        true_pid();
    }
    r.signal(libc::SIGCONT);
    // A process started now shows up once the queue has room again.
    let end = Instant::now() + HANG;
    'seen: loop {
        assert!(Instant::now() < end, "no event of a new process arrived");
        let pid = true_pid();
        let wanted = format!(" pid {pid}:");
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(l) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if l.contains(&wanted) {
                break 'seen;
            }
        }
    }
    r.signal(libc::SIGTERM);
    let st = r.wait("proc_events", || {});
    let err: Vec<String> = rest(&err_rx);
    let err = err.join("\n");
    assert!(st.success(), "{st}: {err}");
    let summary = rest(&rx)
        .into_iter()
        .find(|l| l.contains(" events; "))
        .unwrap_or_else(|| panic!("no summary: {err}"));
    assert!(count(&summary, "overruns (ENOBUFS):") >= 1, "{summary}");
    assert!(count(&summary, "decode errors:") >= 1, "{summary}");
    assert!(
        count(&summary, "spoofed (not from the kernel):") >= 1,
        "{summary}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn soak_checks_only_its_own_traffic_under_foreign_senders() {
    let Some(evil) =
        common::kernel_socket("soak_checks_only_its_own_traffic_under_foreign_senders")
    else {
        return;
    };
    // Group 32 (so that its flood does not reach the bus_subscriber test on group 31).
    let (mut r, rx, err) = Running::piped(
        Command::new(example("soak"))
            .args(["--seconds", "2", "--producers", "1", "--receivers", "1"])
            .args(["--group", "32"]),
    );
    // The soak's idx, as it computes it; a foreign sender replays messages on it, with
    // garbage sequence numbers, between malformed datagrams.
    let idx = 0x5300_0000 | (r.0.id() & 0xffff);
    let me = evil.port_id();
    let mut n = 0u32;
    let st = r.wait("soak", || {
        for _ in 0..20 {
            n += 1;
            let _ = evil.send(&[1, 2], Dest::Group(32));
            let fake = datagram(CbId::new(idx, 1), 4_000_000_000 - n, &[0u8; 64], me);
            let _ = evil.send(&fake, Dest::Group(32));
        }
    });
    let err = err.join().unwrap();
    let out: Vec<String> = rest(&rx);
    assert!(st.success(), "{st}: {out:?} {err}");
    assert!(out.iter().any(|l| l.starts_with("soak PASSED")), "{out:?}");
    let receiver = out
        .iter()
        .find(|l| l.contains("receiver 0:"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(count(receiver, "from other senders:") >= 1, "{receiver}");
}

/// The pids of `parent`'s children whose command line contains `arg`.
fn children_with_arg(parent: u32, arg: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && cmd.split(|&b| b == 0).any(|a| a == arg.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn soak_survives_a_receiver_that_lost_the_end_of_the_run() {
    if !kernel("soak_survives_a_receiver_that_lost_the_end_of_the_run") {
        return;
    }
    // A receiver that reads nothing while the producer runs (stopped, as a starved process
    // on a loaded host): its queue overflows and the kernel drops the tail of the run, the
    // final messages and the totals. It must still finish, with every message of every
    // stream either delivered or counted lost.
    let (mut r, rx, err) = Running::piped(
        Command::new(example("soak"))
            .args(["--seconds", "2", "--producers", "1", "--receivers", "1"])
            .args(["--group", "32"]),
    );
    let soak = r.0.id();
    let end = Instant::now() + HANG;
    let mut out = Vec::new();
    let next_line = |out: &mut Vec<String>| {
        let l = rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("soak output ended: {out:?}"));
        out.push(l.clone());
        l
    };
    // Stopped once it has started (the soak waits for that): its subscription stays.
    while !next_line(&mut out).contains("receivers ready") {}
    let [receiver] = children_with_arg(soak, "--receiver")[..] else {
        panic!("not one receiver process");
    };
    /// Continues the stopped receiver whatever happens (it is not this test's child).
    struct Stopped(i32);
    impl Drop for Stopped {
        fn drop(&mut self) {
            // SAFETY: signals the soak's receiver, a process this test started (through the
            // soak); a pid reused since then would be the soak's child no more, and would
            // only get a harmless SIGCONT.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: stops the soak's receiver, a process this test started (through the soak).
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    let stopped = Stopped(receiver);
    // The summary line comes once the totals have been sent.
    while !next_line(&mut out).contains(" producers, ") {}
    drop(stopped);
    let st = r.wait("soak", || {});
    let err = err.join().unwrap();
    out.extend(rest(&rx));
    assert!(st.success(), "{st}: {out:?} {err}");
    assert!(out.iter().any(|l| l.starts_with("soak PASSED")), "{out:?}");
    let line = out
        .iter()
        .find(|l| l.contains("receiver 0:"))
        .unwrap_or_else(|| panic!("{out:?}"));
    // The point of the test: the queue did overflow.
    assert!(count(line, "overruns=") >= 1, "{line}");
}

// ---------------------------------------------------------------------------------------
// True figures

#[test]
fn bus_producer_prints_the_real_queue_bound() {
    if !kernel("bus_producer_prints_the_real_queue_bound") {
        return;
    }
    let idx = common::test_idx(0x32).to_string();
    for lanes in [false, true] {
        let mut args = vec!["--group", "32", "--idx", &idx, "--threads", "2"];
        args.extend(["--count", "30000"]);
        if lanes {
            args.push("--lanes");
        }
        let out = run(&example("bus_producer"), &os(&args));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}: {text}", out.status);
        let line = text
            .lines()
            .find(|l| l.starts_with("queue high-water "))
            .unwrap_or_else(|| panic!("{text}"));
        let high = count(line, "high-water");
        let bound = if lanes {
            // "a lane holds B bytes = M messages of 100 bytes": 64-byte payloads.
            let bytes = count(line, "a lane holds");
            let msgs = count(line, "bytes =");
            assert_eq!(count(line, "messages of"), 100, "{line}");
            assert_eq!(msgs, bytes / 100, "{line}");
            msgs
        } else {
            count(line, "a shard holds")
        };
        assert!(
            high <= bound,
            "the high-water mark exceeds the bound: {line}"
        );
    }
}

#[test]
fn bus_subscriber_counts_each_senders_stream_truly() {
    let Some(evil) = common::kernel_socket("bus_subscriber_counts_each_senders_stream_truly")
    else {
        return;
    };
    let idx = common::test_idx(0x33);
    let (mut r, rx, err) = Running::piped(
        Command::new(example("bus_subscriber"))
            .args(["--group", &GROUP.to_string(), "--idx", &idx.to_string()])
            .args(["--print", "1000000000", "--idle-secs", "600"]),
    );
    line_with(&rx, "listening on group");
    let me = evil.port_id();
    // A sender whose stream starts at 1000 (joined late), and one that skips seq 2.
    let sent = [
        (2u32, 1000u32),
        (2, 1001),
        (2, 1002),
        (3, 0),
        (3, 1),
        (3, 3),
    ];
    for (val, seq) in sent {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&val.to_ne_bytes());
        p[4..].copy_from_slice(&seq.to_ne_bytes());
        evil.send(
            &datagram(CbId::new(idx, val), seq, &p, me),
            Dest::Group(GROUP),
        )
        .unwrap();
    }
    for (val, seq) in sent {
        line_with(
            &rx,
            &format!(".{val}] [{seq}.0] 8 bytes from port {me}, payload seq {seq}"),
        );
    }
    r.signal(libc::SIGTERM);
    let st = r.wait("bus_subscriber", || {});
    let err = err.join().unwrap();
    let out: Vec<String> = rest(&rx);
    // The gaps are loss: status 1.
    assert_eq!(st.code(), Some(1), "{st}: {out:?} {err}");
    for want in [
        format!("port {me} thread 2: 3 received, 1000 lost, 0 out of order"),
        format!("port {me} thread 3: 3 received, 1 lost, 0 out of order"),
    ] {
        assert!(out.iter().any(|l| l.trim() == want), "{want}: {out:?}");
    }
}
