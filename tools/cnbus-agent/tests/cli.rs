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
