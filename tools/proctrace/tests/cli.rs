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
        "duration_s",
        "cmdline_source",
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
