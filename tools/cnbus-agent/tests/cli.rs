//! `cnbus-agent`'s command line and outputs used the way a careless or hostile user would
//! (the same checks as the examples', from `common::cli`): hostile arguments are usage
//! errors (status 2, a message, no panic), `> /dev/full` is status 1 with a message,
//! `| head` a quiet 0, and a full stderr panics nothing.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use common::cli::*;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cnbus-agent"))
}

fn kernel(test: &str) -> bool {
    common::kernel_socket(test).is_some()
}

#[test]
fn rejects_unknown_flags_and_out_of_range_values_and_has_help() {
    let v = |a: &[&'static str], e: &'static str| (a.to_vec(), e);
    help_and_usage_errors(
        &bin(),
        &[
            v(&["--duration", "1e30"], "--duration"),
            v(&["--duration=-1"], "--duration"),
            v(&["--interval", "0"], "--interval"),
            v(&["--interval", "1e19"], "--interval"),
            v(
                &["--recent-exits", "18446744073709551616"],
                "--recent-exits",
            ),
            v(&["--buffer", "5G"], "--buffer"),
        ],
    );
}

#[test]
fn every_numeric_option_rejects_bad_numbers() {
    rejects_bad_numbers(
        &bin(),
        &["--interval", "--duration", "--recent-exits", "--buffer"],
    );
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
        "cnbus-agent: writing the event log",
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
    runs_with_a_full_stderr(&bin(), &["--duration", "0.5", "--interval", "0.05"]);
}

/// Regression: `cnbus-agent --help > /dev/full` exited 0 having written nothing (clap's
/// `Cli::parse` ignores the write error); now status 1 with a message, as proctrace.
#[test]
fn help_version_completions_and_man_page_to_a_full_disk_fail_with_status_1() {
    let bin = bin();
    full_stdout(&bin, "cnbus-agent", &["--help"], "the help");
    full_stdout(&bin, "cnbus-agent", &["-h"], "the help");
    full_stdout(&bin, "cnbus-agent", &["--version"], "the version");
    full_stdout(
        &bin,
        "cnbus-agent",
        &["completions", "bash"],
        "the completion script",
    );
    full_stdout(&bin, "cnbus-agent", &["man"], "the man page");
}

/// Regression: an event log on a stdout that another process sharing it made non-blocking
/// (a shell, node) ended the agent with status 1 and "Resource temporarily unavailable" at
/// the first full pipe; it now waits for the reader as with a blocking stdout, as
/// proctrace does (`cnbus_cli::output::Patient`).
#[test]
fn a_non_blocking_stdout_is_waited_for() {
    let test = "a_non_blocking_stdout_is_waited_for";
    if !kernel(test) {
        return;
    }
    let args = ["--duration", "4", "--interval", "60"];
    let (status, text, err) = with_a_non_blocking_stdout(&bin(), &args);
    assert_eq!(status.code(), Some(0), "{test}: {err}");
    assert!(text.len() > 64 << 10, "{test}: only {} bytes", text.len());
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{test}: {e}: {line}"));
        // The event schema (and the agent's own `ppid`); its own lines are not events.
        if !matches!(v["event"].as_str(), Some("resync" | "dropped")) {
            cnbus_cli::event::check_line(&v, true, &["ppid"])
                .unwrap_or_else(|e| panic!("{test}: {e}: {line}"));
        }
    }
}

/// The final counters in `path` (`--stats-file`), once the agent has exited.
fn final_counters(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["final"], true, "not the final counters: {text}");
    v
}

/// Regression: an agent whose event log is a terminal that hangs up (an ssh session that
/// dies while it runs in the foreground) exited with status 1 and `writing the event log:
/// Input/output error`; it now stops as on SIGTERM: status 0 and its final counters, as
/// proctrace does. The agent runs as the session leader of a pseudo-terminal of its own,
/// blocked in a write because nobody reads the terminal; closing the master hangs it up.
#[test]
fn a_terminal_that_hangs_up_under_the_event_log_stops_it_with_status_0() {
    if !kernel("a_terminal_that_hangs_up_under_the_event_log_stops_it_with_status_0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let (mut r, mut term) = on_a_terminal(
        std::process::Command::new(bin())
            .args(["--interval", "1e9", "--stats-file"])
            .arg(&stats),
    );
    // The start resync's line is on the terminal once it has subscribed.
    let seen = term.read_line();
    assert!(seen.contains("resync"), "{seen}");
    // Nobody reads the terminal any more: its buffer fills and the agent blocks in a write.
    until_blocked_in_write(r.pid());
    drop(term);
    let st = r.wait("cnbus-agent on a terminal that hung up", || {
        true_pid();
    });
    assert_eq!(st.code(), Some(0), "{st}");
    final_counters(&stats);
}

/// Regression: the SIGHUP of a terminal that hangs up under an agent logging to `--output`
/// (started in the foreground of an ssh session that then dies) only reopened the log, and
/// the agent ran on forever, unseen; now it stops as on SIGTERM (status 0, final counters).
/// Nothing is written to the terminal here, so only the SIGHUP tells.
#[test]
fn the_sighup_of_a_terminal_that_hangs_up_stops_it_even_with_output() {
    if !kernel("the_sighup_of_a_terminal_that_hangs_up_stops_it_even_with_output") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, stats) = (
        dir.path().join("events.jsonl"),
        dir.path().join("stats.json"),
    );
    let (mut r, term) = on_a_terminal(
        std::process::Command::new(bin())
            .args(["--interval", "1e9", "--output"])
            .arg(&log)
            .arg("--stats-file")
            .arg(&stats),
    );
    assert!(
        common::wait_for(HANG, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("\"resync\""))),
        "no start resync in the log"
    );
    drop(term);
    let st = r.wait(
        "cnbus-agent with --output on a terminal that hung up",
        || {},
    );
    assert_eq!(st.code(), Some(0), "{st}");
    final_counters(&stats);
}

/// A SIGHUP that is not a hang-up (`kill -HUP`, `systemctl reload`) still only reopens
/// `--output`: after the log is moved away (rotated), new lines go to a new file at the
/// path, and the agent runs on, even on a terminal (that did not hang up).
#[test]
fn a_plain_sighup_reopens_the_output_and_does_not_stop_it() {
    if !kernel("a_plain_sighup_reopens_the_output_and_does_not_stop_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, rotated) = (
        dir.path().join("events.jsonl"),
        dir.path().join("old.jsonl"),
    );
    let (mut r, _term) = on_a_terminal(
        std::process::Command::new(bin())
            .args(["--interval", "1e9", "--output"])
            .arg(&log),
    );
    let has_lines = |p: &std::path::Path| std::fs::read_to_string(p).is_ok_and(|l| !l.is_empty());
    assert!(common::wait_for(HANG, || has_lines(&log)), "no log");
    std::fs::rename(&log, &rotated).unwrap();
    r.signal(libc::SIGHUP);
    assert!(
        common::wait_for(HANG, || {
            true_pid();
            has_lines(&log)
        }),
        "the log was not reopened"
    );
    assert!(r.0.try_wait().unwrap().is_none(), "SIGHUP stopped it");
    r.signal(libc::SIGTERM);
    let st = r.wait("cnbus-agent after SIGTERM", || {});
    assert_eq!(st.code(), Some(0), "{st}");
}

/// Regression: messages (`warn!`) to a stderr another process made non-blocking were
/// lost when the pipe was full (`EAGAIN`, ignored): here the agent, in a network namespace
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
    assert!(
        err.starts_with("cnbus-agent: cannot subscribe to the proc connector"),
        "{test}: {err:?}"
    );
}

/// Regression: a stderr whose reader holds the pipe but reads nothing (stopped with
/// SIGSTOP, `2>&1 | less` left alone) wedged the agent at its next message for ever: the
/// loop that reads the events blocked in `write(2)` (a non-blocking stderr in the wait for
/// it), so no event was read, no counters written, and SIGTERM stopped nothing (a log
/// problem became a monitoring outage). Now a message waits for stderr at most
/// `cnbus_cli::output::STDERR_WAIT`, then counts as lost (`stderr_lines_lost`), and the
/// agent runs on. The message here: the warning that `--output` cannot be reopened on
/// SIGHUP (its directory removed). (Failed before: `stderr_lines_lost` never 1, the agent
/// still running after SIGTERM.)
#[test]
fn a_stderr_whose_reader_stopped_reading_wedges_nothing() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let test = "a_stderr_whose_reader_stopped_reading_wedges_nothing";
    if !kernel(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("logs");
    std::fs::create_dir(&sub).unwrap();
    let stats = dir.path().join("stats.json");
    // A blocking pipe, full (filled through a non-blocking description of its own), whose
    // reader (this test) reads nothing until the end.
    let (mut reader, writer) = std::io::pipe().unwrap();
    let mut fill = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
        .unwrap();
    while fill.write(&[b'.'; 4096]).is_ok() {}
    while fill.write(b".").is_ok() {}
    drop(fill);
    let mut r = Running(
        std::process::Command::new(bin())
            .args(["--interval", "0.05", "--output"])
            .arg(sub.join("events.jsonl"))
            .arg("--stats-file")
            .arg(&stats)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(writer)
            .spawn()
            .unwrap(),
    );
    let lost = || {
        std::fs::read_to_string(&stats)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t.trim()).ok())
            .and_then(|v| v["stderr_lines_lost"].as_u64())
    };
    assert!(
        common::wait_for(HANG, || lost().is_some()),
        "{test}: no counters"
    );
    assert_eq!(lost(), Some(0), "{test}");
    std::fs::remove_dir_all(&sub).unwrap();
    r.signal(libc::SIGHUP);
    assert!(
        common::wait_for(HANG, || lost() == Some(1)),
        "{test}: the lost warning not counted: {:?}",
        lost()
    );
    r.signal(libc::SIGTERM);
    let st = r.wait(&format!("{test}: cnbus-agent after SIGTERM"), || {});
    assert_eq!(st.code(), Some(0), "{test}: {st}");
    let last = final_counters(&stats);
    assert!(
        last["stderr_lines_lost"].as_u64() >= Some(1),
        "{test}: {last}"
    );
    // Nothing of the lost lines reached the pipe (whatever follows the filling is whole).
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    let after = String::from_utf8_lossy(&all)
        .trim_start_matches('.')
        .to_owned();
    assert!(
        after.is_empty() || after.ends_with('\n'),
        "{test}: {after:?}"
    );
}
