//! `proctrace`'s command line and outputs used the way a careless or hostile user would
//! (the same checks as the examples', from `common::cli`): hostile arguments are usage
//! errors (status 2, a message, no panic), `> /dev/full` is status 1 with a message,
//! `| head` a quiet 0, and a full stderr panics nothing.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use common::cli::*;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_proctrace"))
}

fn kernel(test: &str) -> bool {
    common::kernel_socket(test).is_some()
}

#[test]
fn proctrace_rejects_hostile_arguments() {
    let bin = bin();
    for (args, expect) in [
        (&["--duration", "1e19"][..], "--duration"),
        (&["--duration", "1e30"], "--duration"),
        (&["--duration", "-1"], "--duration"),
        (&["--duration", "NaN"], "--duration"),
        (&["--duration", "inf"], "--duration"),
        (&["--duration", ""], "--duration"),
        (&["--duration"], "--duration"),
        (&["--buffer", "2G"], "--buffer"),
        (&["--buffer", "0"], "--buffer"),
        (&["--buffer", "99999999999999999999"], "--buffer"),
        (&["--json=yes"], "--json"),
        (&["--bogus"], "--bogus"),
        (&[""], "unrecognized"),
        (&["--events", ""], "--events"),
    ] {
        usage_error(&bin, &os(args), expect);
    }
    // (clap takes a lone word for a subcommand: "unrecognized subcommand")
    usage_error(&bin, &[OsStr::from_bytes(b"\xff")], "unrecognized");
    usage_error(
        &bin,
        &[OsStr::new("--duration"), OsStr::from_bytes(b"1\xff")],
        "UTF-8",
    );
}

#[test]
fn every_numeric_option_rejects_bad_numbers() {
    rejects_bad_numbers(&bin(), &["--duration", "--buffer"]);
}

#[test]
fn a_full_stderr_panics_nothing_on_a_usage_error() {
    usage_error_with_a_full_stderr(&bin());
}

#[test]
fn a_failed_write_of_the_output_is_reported_with_status_1() {
    if !kernel("a_failed_write_of_the_output_is_reported_with_status_1") {
        return;
    }
    fails_on_a_full_disk(
        &bin(),
        &["--duration", "60"],
        "proctrace: writing the events to stdout",
    );
    fails_on_a_full_disk(
        &bin(),
        &["--json", "--duration", "60"],
        "proctrace: writing the events to stdout",
    );
}

#[test]
fn a_closed_pipe_ends_quietly_with_status_0() {
    if !kernel("a_closed_pipe_ends_quietly_with_status_0") {
        return;
    }
    quiet_on_a_closed_pipe(&bin(), &["--duration", "60"]);
}

#[test]
fn a_full_stderr_panics_nothing_while_running() {
    if !kernel("a_full_stderr_panics_nothing_while_running") {
        return;
    }
    runs_with_a_full_stderr(&bin(), &["--duration", "0.5", "--stats"]);
}

#[test]
fn help_version_completions_and_man_page() {
    let bin = bin();
    let help = run(&bin, &os(&["--help"]));
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for text in [
        "--events",
        "--json",
        "--duration",
        "--stats",
        "--buffer",
        "--enrich",
        "--container",
        "--cgroup",
        "--host-only",
        "--containers-only",
        "--allow-foreign-namespace",
        "--version",
        "timestamp_ns",
        "duration_ms",
        "cmdline_source",
        "JSON event lines",
        "seq_gap",
        "Exit status",
    ] {
        assert!(help.contains(text), "--help lacks {text}");
    }
    assert!(!help.contains("completions"), "{help}");
    let v = run(&bin, &os(&["--version"]));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("proctrace "));
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&bin, &os(&["completions", shell]));
        assert!(out.status.success(), "{shell}: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        for opt in ["events", "duration", "enrich", "containers-only"] {
            assert!(text.contains(opt), "{shell} completions lack {opt}");
        }
    }
    let man = run(&bin, &os(&["man"]));
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH proctrace"), "{man}");
    assert!(man.contains("process_key"), "{man}");
}

/// Regression: `proctrace completions bash > /dev/full` panicked (status 101, a backtrace
/// from clap_complete: "failed to write completion file"); `--help > /dev/full` and
/// `--version > /dev/full` exited 0 having written nothing (clap ignores the error; the
/// hand-written parser before clap said so and exited 1); `man > /dev/full` blamed "the
/// events".
#[test]
fn help_version_completions_and_man_page_to_a_full_disk_fail_with_status_1() {
    let bin = bin();
    full_stdout(&bin, "proctrace", &["--help"], "the help");
    full_stdout(&bin, "proctrace", &["-h"], "the help");
    full_stdout(&bin, "proctrace", &["help"], "the help");
    full_stdout(&bin, "proctrace", &["--version"], "the version");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        full_stdout(
            &bin,
            "proctrace",
            &["completions", shell],
            "the completion script",
        );
    }
    full_stdout(&bin, "proctrace", &["man"], "the man page");
}

/// With stdout closed (`>&-`) Rust's runtime opens /dev/null on it, so what is written
/// there is discarded and the run succeeds, as with `> /dev/null` (docs/PROC.md); nothing
/// panics and nothing is written to the wrong file.
#[test]
fn a_closed_stdout_is_dev_null() {
    let bin = bin();
    for args in [
        &["--help"][..],
        &["--version"],
        &["completions", "bash"],
        &["man"],
    ] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" >&-")
            .arg(&bin)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} >&-: {}: {err}", out.status);
        assert!(err.is_empty(), "{args:?} >&-: {err}");
    }
    if !kernel("a_closed_stdout_is_dev_null") {
        return;
    }
    for args in [&["--duration", "0.3"][..], &["--json", "--duration", "0.3"]] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" >&-")
            .arg(&bin)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} >&-: {}: {err}", out.status);
        assert!(err.contains(" events in "), "{args:?} >&-: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Regression: clap rejected a repeated option ("cannot be used multiple times": `-j -j`,
/// `-e fork -e exit`, `-b 1K -b 16M`, an alias plus the same option), which the parser
/// before clap accepted, the last value winning; and it rejected `-b " 1K"` (white space
/// around a size), which that parser trimmed. `--help` at the end ends the parse after
/// the options were accepted.
#[test]
fn repeated_options_are_accepted_and_the_last_one_wins() {
    let bin = bin();
    for args in [
        &["-j", "-j", "--help"][..],
        &["--json", "-j", "-s", "--stats", "--help"],
        &["-e", "fork", "--events=exit", "--help"],
        &["-b", "1K", "-b", "16M", "--help"],
        &["-b", " 1K", "--help"],
        &["-d", "1", "--duration=2", "--help"],
        &["--enrich", "lazy", "--enrich=off", "--help"],
        &["--container", "ab", "--container", "cd", "--help"],
        &["--cgroup", "/a", "--cgroup=/b", "--help"],
        &["--host-only", "--host-only", "--help"],
        &[
            "--allow-foreign-namespace",
            "--allow-foreign-namespace",
            "--help",
        ],
    ] {
        let out = run(&bin, &os(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}: {err}", out.status);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: proctrace"),
            "{args:?}"
        );
    }
    // A bad value is an error wherever it is, even when a good one follows.
    usage_error(&bin, &os(&["-b", "0", "-b", "1K"]), "--buffer");
    usage_error(&bin, &os(&["-b", "1K", "-b", "0"]), "--buffer");
    usage_error(&bin, &os(&["-b", "1 K"]), "--buffer");
    if !kernel("repeated_options_are_accepted_and_the_last_one_wins") {
        return;
    }
    let out = run(
        &bin,
        &os(&["-j", "-j", "-b", "1K", "-b", "16M", "-d", "9", "-d", "0"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert!(
        err.contains(" events in 0.0 s"),
        "the last --duration (0) won: {err}"
    );
}

/// Hostile arguments of every kind the brief of issue #15 listed: usage errors (status 2,
/// a message naming the culprit, no panic).
#[test]
fn positional_junk_subcommand_junk_and_list_junk_are_usage_errors() {
    let bin = bin();
    for (args, expect) in [
        (&["junk"][..], "junk"),
        (&["-d", "1", "junk"], "junk"),
        (&["--", "-d", "1"], "-d"),
        (&["-d", "1", "--", "junk"], "junk"),
        (&["-j", "completions", "bash"], "completions"),
        (&["completions"], "SHELL"),
        (&["completions", ""], "SHELL"),
        (&["completions", "tcsh"], "tcsh"),
        (&["completions", "BASH"], "BASH"),
        (&["completions", "bash", "zsh"], "zsh"),
        (&["completions", "bash", "-j"], "-j"),
        (&["man", "extra"], "extra"),
        (&["man", "--json"], "--json"),
        (&["-e", ","], "--events"),
        (&["-e", "fork,junk"], "junk"),
        (&["-e", "fork;exit"], "fork;exit"),
        (&["-e", "-1"], "-1"),
        (&["--container", "0xab"], "--container"),
        (&["--container", " ab"], "--container"),
        (&["--container", "g"], "--container"),
        (&["--cgroup", "system.slice"], "--cgroup"),
        (&["--cgroup", "./x"], "--cgroup"),
        (&["--cgroup", ""], "--cgroup"),
        (&["--enrich", "FULL"], "--enrich"),
        (&["--enrich="], "--enrich"),
        (&["-d", "1e9.5"], "--duration"),
        (&["-d", "0x10"], "--duration"),
        (&["-d", "1_0"], "--duration"),
        (&["-d", "1e10"], "--duration"),
        (&["-d", "-0.000001"], "--duration"),
        (&["-b", "1G+1"], "--buffer"),
        (&["-b", "1073741825"], "--buffer"),
        (&["-b", "1T"], "--buffer"),
        (&["-b", "1.5K"], "--buffer"),
        (&["-b", "1KB"], "--buffer"),
        (&["-b", "0K"], "--buffer"),
        (&["-b", "1e3"], "--buffer"),
        (&["-jx"], "-x"),
        (&["--json=", "-d", "0"], "--json"),
    ] {
        usage_error(&bin, &os(args), expect);
    }
    usage_error(
        &bin,
        &[OsStr::new("completions"), OsStr::from_bytes(b"b\xffsh")],
        "SHELL",
    );
    usage_error(&bin, &[OsStr::from_bytes(b"--\xff")], "--");
    usage_error(
        &bin,
        &[OsStr::new("--cgroup"), OsStr::from_bytes(b"/\xff")],
        "UTF-8",
    );
}

/// A proctrace whose reader holds the pipe open and never reads: once its output blocks
/// (the kernel shows it waiting in a pipe write), `stop` ends the run (a signal, or
/// nothing for `--duration`); it must exit within the hang guard, with status 1 and a
/// message.
fn stalled_reader(args: &[&str], stop: Option<i32>) {
    use std::process::{Command, Stdio};
    let mut r = Running(
        Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _reader = r.0.stdout.take().unwrap(); // held open, never read
    let err = stderr_of(&mut r.0);
    let wchan = format!("/proc/{}/wchan", r.pid());
    let blocked = || std::fs::read_to_string(&wchan).is_ok_and(|w| w.contains("pipe_write"));
    for _ in 0..20_000 {
        if blocked() {
            break;
        }
        true_pid();
    }
    assert!(blocked(), "proctrace's output never blocked");
    if let Some(sig) = stop {
        r.signal(sig);
    }
    let st = r.wait(&format!("proctrace {args:?} with a stalled reader"), || {});
    let err = err.join().unwrap();
    assert_eq!(st.code(), Some(1), "{st}: {err}");
    assert!(err.contains("the output accepted nothing"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Regression: with a reader that stopped reading (`proctrace | less` left alone, a
/// stalled pipeline), SIGTERM never ended proctrace: its main thread sat in a blocking
/// `write` of the events forever (and `--duration` never ended either).
#[test]
fn a_reader_that_stopped_reading_does_not_keep_it_alive_after_sigterm() {
    if !kernel("a_reader_that_stopped_reading_does_not_keep_it_alive_after_sigterm") {
        return;
    }
    stalled_reader(&["--json"], Some(libc::SIGTERM));
    stalled_reader(&[], Some(libc::SIGINT));
}

#[test]
fn a_reader_that_stopped_reading_does_not_keep_it_alive_after_its_duration() {
    if !kernel("a_reader_that_stopped_reading_does_not_keep_it_alive_after_its_duration") {
        return;
    }
    stalled_reader(&["--json", "--duration", "1"], None);
}

/// Regression: a proctrace on a terminal that hangs up (its window closed, its ssh
/// session dropped) exited with status 1 and `writing the events to stdout: Input/output
/// error`, though SIGHUP is documented as a clean stop with status 0: the kernel sends
/// SIGHUP and every write to the terminal fails with EIO from then on. Here proctrace runs
/// as a session leader on a pseudo-terminal of its own (stdout and stderr on it), blocked in
/// a write because nobody reads the terminal; closing the terminal's master side hangs it
/// up.
#[test]
fn a_terminal_that_hangs_up_stops_it_like_sighup_with_status_0() {
    if !kernel("a_terminal_that_hangs_up_stops_it_like_sighup_with_status_0") {
        return;
    }
    let (mut r, mut term) = on_a_terminal(&mut std::process::Command::new(bin()));
    // The header is on the terminal once it has subscribed.
    let seen = term.read_line();
    assert!(seen.contains("event"), "{seen}");
    // Nobody reads the terminal any more: its buffer fills and proctrace blocks in a write.
    until_blocked_in_write(r.pid());
    drop(term);
    let st = r.wait("proctrace on a terminal that hung up", || {
        true_pid();
    });
    assert_eq!(st.code(), Some(0), "{st}");
}

/// Regression: with stdout and stderr on one pipe that its reader stopped reading
/// (`proctrace 2>&1 | less` left alone), the watchdog's own message blocked on that pipe and
/// proctrace never exited after SIGTERM.
#[test]
fn a_stalled_stderr_does_not_block_the_watchdog() {
    use std::process::{Command, Stdio};
    if !kernel("a_stalled_stderr_does_not_block_the_watchdog") {
        return;
    }
    let (reader, writer) = std::io::pipe().unwrap();
    let mut r = Running(
        Command::new(bin())
            .stdin(Stdio::null())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap(),
    );
    until_blocked_in_write(r.pid());
    r.signal(libc::SIGTERM);
    let st = r.wait("proctrace 2>&1 with a stalled reader", || {});
    drop(reader);
    assert_eq!(st.code(), Some(1), "{st}");
}

/// Regression: a stderr that accepts nothing (a full pipe nobody reads) kept proctrace
/// alive forever once its run was over, writing the summary (the watchdog watched only the
/// events).
#[test]
fn a_stalled_stderr_does_not_keep_it_alive_at_the_summary() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::process::{Command, Stdio};
    if !kernel("a_stalled_stderr_does_not_keep_it_alive_at_the_summary") {
        return;
    }
    let (reader, writer) = std::io::pipe().unwrap();
    // Filled through a description of its own (opened again by its /proc name), so that
    // proctrace's stays blocking.
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
        .unwrap();
    let chunk = [b'x'; 4096];
    loop {
        match filler.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    let mut r = Running(
        Command::new(bin())
            .args(["--duration", "0.2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(writer)
            .spawn()
            .unwrap(),
    );
    let st = r.wait("proctrace with a full stderr at the end", || {});
    drop(reader);
    assert_eq!(st.code(), Some(1), "{st}");
}

/// Regression: messages (`warn!`) to a stderr another process made non-blocking were
/// lost when the pipe was full (`EAGAIN`, ignored): here proctrace, in a network namespace
/// of its own (no proc connector there), ended with status 1 and no word of why. Now its
/// messages are waited for as on a blocking stderr (`cnbus_cli::output::to_stderr`, the
/// writer both tools use). (Failed before: nothing after the filling.)
#[test]
fn messages_to_a_full_non_blocking_stderr_are_waited_for() {
    let test = "messages_to_a_full_non_blocking_stderr_are_waited_for";
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("--net").arg(bin()).args(["--duration", "1"]);
    let (status, err) = with_a_full_non_blocking_stderr(&mut cmd);
    assert_eq!(status.code(), Some(1), "{test}: {err}");
    assert!(err.starts_with("proctrace: "), "{test}: {err:?}");
    assert!(err.contains("Run it on the host"), "{test}: {err:?}");
}
