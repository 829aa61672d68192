//! `cnbus-agent`'s command line (clap): options, their ranges, and the help text that
//! documents every option and output field.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cnbus_cli::args::{parse_secs, parse_size, parse_u64};
use cnbus_cli::generate::Generate;

/// The long help's tail: every output field, signals, exit status.
const AFTER_LONG_HELP: &str = "\
Event log (stdout, or --output FILE, appended): one JSON object per line.
  Every line: ts (RFC 3339 UTC, microseconds; the kernel's timestamp, or when the agent
  noticed for lost and resync), event (fork exec exit comm uid gid sid ptrace coredump, or
  the agent's own lost and resync).
  Process events: pid, tid, thread (a non-main thread's event; a new thread is a fork with
  thread true), ppid (null when unknown), the enricher's attribution: process_key,
  parent_key, container_id, cgroup, cgroup_source, ns_pid, pidns, pidns_source, cmdline,
  cmdline_source (null when unknown; sources: proc, inherited, comm, exited, denied); and
  exit: exit_code, signal, core_dumped, duration_ms (null when not applicable or unknown);
  comm: comm; uid: ruid, euid; gid: rgid, egid; ptrace: tracer_pid (null on detach).
  lost: cause (overrun with count null, or seq_gap with cpu and the exact count).
  resync: reason (start, loss, shutdown), added, removed, live.

Counters (stderr every --interval, or --stats-file; the last one, final true, always on
stderr): ts, final, uptime_s, events (per type), events_total, events_per_s, lost_events,
lost_exact, lost_events_max, kernel_drops, spoofed, decode_errors, overruns, unread,
lost_per_cpu, live_processes, table_capacity, recent_exits, resyncs, resync_added,
resync_removed, stale_replaced, fork_known, exit_unknown, enrich_proc_reads,
enrich_evictions, enrich_stale, cpu_s, rss_kb.

Table dump (--dump-table): one object per live process, by pid: pid, ppid, the
attribution fields, start (RFC 3339 or null), source (scan, fork, exec, resync).

Signals: SIGINT and SIGTERM stop it (queued events applied, final counters, dump); SIGHUP
reopens --output.

Exit status: 0 after SIGINT/SIGTERM or --duration, or when the event log's reader closes
the pipe; 1 when the proc connector cannot be used or writing the event log fails; 2 on a
usage error.

Privileges: on Linux 6.6+ any user can listen; CAP_SYS_PTRACE lets it read other users'
pid namespaces (pidns_source is denied without it); before 6.6 it needs CAP_NET_ADMIN.
It must run in the initial network namespace. See docs/AGENT.md (and the systemd unit
cnbus-agent.service).";

/// A process-monitoring agent on the Linux proc connector: a table of live processes, a
/// JSON event log, counters, and loss that is reported and repaired.
#[derive(Debug, Parser)]
#[command(
    name = "cnbus-agent",
    version,
    after_help = "Output fields, signals and exit status: see --help.",
    after_long_help = AFTER_LONG_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub generate: Option<Generate>,
    #[command(flatten)]
    pub args: Args,
}

/// What the agent does.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print counters every SECS seconds (0.01 to 1e9)
    #[arg(short, long, value_name = "SECS", default_value = "5", value_parser = parse_interval,
          allow_negative_numbers = true)]
    pub interval: Duration,
    /// Write the counters to FILE (rewritten atomically) instead of stderr; the final
    /// counters also go to stderr
    #[arg(long, value_name = "FILE")]
    pub stats_file: Option<PathBuf>,
    /// Append the event log to FILE instead of stdout (SIGHUP reopens it)
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// On exit, write the live process table to FILE, one JSON object per line
    #[arg(long, value_name = "FILE")]
    pub dump_table: Option<PathBuf>,
    /// Stop after SECS seconds (0 to 1e9; default: run until SIGINT/SIGTERM)
    #[arg(short, long, value_name = "SECS", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub duration: Option<Duration>,
    /// How many recent exits to remember (0..=1000000)
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_recent_exits,
          allow_negative_numbers = true)]
    pub recent_exits: usize,
    /// Socket receive buffer (bytes, or with a K, M or G suffix; 1 byte to 1G)
    #[arg(short, long, value_name = "BYTES", default_value = "16M", value_parser = parse_size,
          allow_negative_numbers = true)]
    pub buffer: usize,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s} is too short (at least 0.01 s)"));
    }
    Ok(d)
}

fn parse_recent_exits(s: &str) -> Result<usize, String> {
    match parse_u64(s)? {
        n @ 0..=1_000_000 => Ok(n as usize),
        n => Err(format!("{n} is out of range (0..=1000000)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cnbus-agent").chain(args.iter().copied()))
    }

    #[test]
    fn options_and_ranges() {
        Cli::command().debug_assert();
        let a = parse(&[]).unwrap().args;
        assert_eq!(a.interval, Duration::from_secs(5));
        assert_eq!(a.buffer, cnbus::proc::DEFAULT_RECV_BUFFER);
        assert_eq!(a.recent_exits, 1024);
        assert!(a.duration.is_none() && a.output.is_none());
        let a = parse(&["-i", "0.01", "--recent-exits", "0", "-b", "4K", "-d", "2"])
            .unwrap()
            .args;
        assert_eq!(a.interval, Duration::from_millis(10));
        assert_eq!((a.recent_exits, a.buffer), (0, 4096));
        for bad in [
            &["--interval", "0.001"][..],
            &["--interval", "-1"],
            &["--recent-exits", "1000001"],
            &["--buffer", "0"],
            &["--duration", "1e10"],
            &["completions"],
            &["-d", "1", "man"],
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        assert_eq!(parse(&["man"]).unwrap().generate, Some(Generate::Man),);
    }
}
