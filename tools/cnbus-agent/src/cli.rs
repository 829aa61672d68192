//! `cnbus-agent`'s command line (clap): options, their ranges, and the help text that
//! documents every option and output field.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cnbus_cli::args::{parse_secs, parse_size, parse_u64};
use cnbus_cli::generate::Generate;

/// The long help's tail: every output field, signals, exit status.
const AFTER_LONG_HELP: &str = concat!(
    "\
Event log (stdout, or --output FILE, appended): one JSON object per line (docs/AGENT.md,
\"JSON event lines\").
",
    cnbus_cli::event_fields_help!(),
    "  The agent's own field: ppid (the parent from the fork event or the table; null when
  unknown). Its own lines (ts: when it noticed; event lost, resync, dropped):
  resync: reason (start, loss, shutdown), added, removed, live.
  dropped (with --nats; at most one a second): sink (nats), count (lines the NATS sink
  dropped since the last dropped line: its spool was full, a spool write failed, a spool
  segment was damaged, or the line is refused for good: over the server's max_payload or
  the stream's max_msg_size, a bad request, a sealed stream; those are kept in
  SPOOL/dead-letter.jsonl, and `cnbus-agent requeue-dead-letters` puts them back in the
  spool once the cause is fixed), dropped_total.

Counters (stderr every --interval, or --stats-file; the last one, final true, always on
stderr): ts, final, uptime_s, events (per type), events_total, events_per_s, lost_events,
lost_exact, lost_events_max, kernel_drops, spoofed, decode_errors, overruns, unread,
lost_per_cpu, live_processes, table_capacity, recent_exits, resyncs, resync_added,
resync_removed, stale_replaced, fork_known, exit_unknown, enrich_proc_reads,
enrich_evictions, enrich_stale, cpu_s, rss_kb, stderr_lines_lost, and with --nats: nats {published,
acknowledged, resent, spooled, dropped, maybe_stored, dead_lettered, reconnects, disconnects,
duplicates, replayed,
in_flight, queued, spool_bytes, spool_records, spool_torn_tails, spool_torn_bytes,
connected, last_error}, plus sent and unsent in the final one (unsent: lines left in the
spool for the next start).

Table dump (--dump-table): one object per live process, by pid: pid, ppid, the
attribution fields, start (RFC 3339 or null), source (scan, fork, exec, resync).

Signals: SIGINT and SIGTERM stop it (queued events applied, final counters, dump); with
--nats it then sends for at most --shutdown-deadline, and a second SIGINT or SIGTERM ends
that wait at once (what is not acknowledged stays in the spool, counted as unsent).
SIGHUP reopens --output, except the SIGHUP of a terminal that hangs up (stdout or stderr
was a terminal at start: a closed window, a dropped ssh session): that one stops it as
SIGTERM does.

Exit status: 0 after SIGINT/SIGTERM or --duration, when the event log's reader closes
the pipe, or when the terminal it runs on hangs up (final counters, as on SIGTERM); 1 when the proc connector cannot be used, writing the event log fails, or the
NATS sink cannot start (credentials or TLS refused, a stream with other subjects; an
unreachable server is not an error: lines are spooled until it is back); 2 on a usage
error.

Privileges: on Linux 6.6+ any user can listen; CAP_SYS_PTRACE lets it read other users'
pid namespaces (pidns_source is denied without it); before 6.6 it needs CAP_NET_ADMIN.
It must run in the initial network namespace. See docs/AGENT.md (and the systemd unit
cnbus-agent.service)."
);

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
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

/// What the agent does instead of running.
#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Put the lines JetStream refused for good back in the spool, for the next start to send
    ///
    /// Moves every record of DIR/dead-letter.jsonl back into the spool DIR, each with its own
    /// subject and msg id, for the next `cnbus-agent --nats` start on DIR to send first
    /// (de-duplicated by msg id). Run it once the cause is fixed, while no agent runs on DIR.
    /// Lines that are no record are kept aside in DIR/dead-letter.malformed.
    #[command(
        after_help = "Prints one line: requeued N, kept M malformed. Exit status: 0 when \
                            every line was requeued or kept aside; 1 on an error (DIR missing \
                            or in use by a running agent, a failed write), the dead-letter \
                            file then left as it was and the spool too (what the run had \
                            written is taken out again). See docs/AGENT.md, \"Sending dead \
                            letters again\"."
    )]
    RequeueDeadLetters {
        /// The agent's spool directory (its --spool)
        #[arg(long, value_name = "DIR", default_value = DEFAULT_SPOOL)]
        spool: PathBuf,
    },
    #[command(flatten)]
    Generate(Generate),
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
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// The NATS JetStream sink's options (all but `--nats` need it).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "NATS JetStream sink (docs/AGENT.md)")]
pub struct NatsArgs {
    /// Also publish every event-log line to NATS JetStream at URL (nats://HOST:PORT or
    /// tls://HOST:PORT): stream CNBUS_EVENTS, subject cnbus.events.HOSTNAME.EVENT
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// The stream (created if absent with subjects cnbus.events.>)
    #[arg(long, value_name = "NAME", default_value = cnbus_nats::DEFAULT_STREAM, requires = "nats")]
    pub nats_stream: String,
    /// The host token of the subjects (default: the host's name; `.`, `*`, `>` and blanks
    /// become `_`; at most 255 bytes)
    #[arg(long, value_name = "NAME", requires = "nats")]
    pub nats_hostname: Option<String>,
    /// User name for user/password authorization (the password from --nats-password-file or
    /// the environment variable CNBUS_NATS_PASSWORD)
    #[arg(long, value_name = "USER", requires = "nats", conflicts_with_all = ["nats_token_file", "nats_creds", "nats_nkey_file"])]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user (first line)
    #[arg(long, value_name = "FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a token for token authorization (first line; or the environment
    /// variable CNBUS_NATS_TOKEN)
    #[arg(long, value_name = "FILE", requires = "nats", conflicts_with_all = ["nats_creds", "nats_nkey_file"])]
    pub nats_token_file: Option<PathBuf>,
    /// A .creds file (JWT and NKey seed, as written by nsc)
    #[arg(
        long,
        value_name = "FILE",
        requires = "nats",
        conflicts_with = "nats_nkey_file"
    )]
    pub nats_creds: Option<PathBuf>,
    /// File holding an NKey seed (SU...)
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_nkey_file: Option<PathBuf>,
    /// Refuse a connection without TLS
    #[arg(long, requires = "nats")]
    pub nats_tls_required: bool,
    /// PEM file of root certificates to trust besides the system ones
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate (with --nats-tls-key), for servers that verify clients
    #[arg(long, value_name = "FILE", requires_all = ["nats", "nats_tls_key"])]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM key of --nats-tls-cert
    #[arg(long, value_name = "FILE", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Spool directory: records wait there while the server is unreachable, and the next
    /// start sends what a stop left (the systemd unit's StateDirectory)
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SPOOL, requires = "nats")]
    pub spool: PathBuf,
    /// Most bytes the spool may hold; past it the newest records are dropped and counted
    /// (a `dropped` line). 16K to 1G
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_spool_max,
          allow_negative_numbers = true, requires = "nats")]
    pub spool_max: u64,
    /// Most bytes of the spool directory's dead-letter file (lines JetStream refuses for
    /// good, kept for an operator); past it such lines are only counted. 0 (keep none) to 1G
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_dead_letter_max,
          allow_negative_numbers = true, requires = "nats")]
    pub dead_letter_max: u64,
    /// Most publishes waiting for JetStream's acknowledgement at once (1..=65536)
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_window,
          allow_negative_numbers = true, requires = "nats")]
    pub nats_window: usize,
    /// Milliseconds the sink lets JetStream's acknowledgements gather while publishes are in
    /// flight, so that one wake-up handles many (less CPU per event, at most this much more
    /// delay per round trip; 0: woken by every packet). 0 to 1000
    #[arg(long, value_name = "MS", default_value_t = 5, value_parser = parse_linger,
          allow_negative_numbers = true, requires = "nats")]
    pub nats_linger: u64,
    /// At exit, how long the sink may go on sending before what is left stays in the spool
    /// (0 to 3600)
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_deadline,
          allow_negative_numbers = true, requires = "nats")]
    pub shutdown_deadline: Duration,
}

/// The spool directory unless `--spool` says otherwise.
pub const DEFAULT_SPOOL: &str = "/var/lib/cnbus-agent/spool";

fn parse_spool_max(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if n >= 16 << 10 => Ok(n as u64),
        _ => Err(format!("{s} is too small (at least 16K)")),
    }
}

fn parse_dead_letter_max(s: &str) -> Result<u64, String> {
    // parse_size's range starts at 1 byte; 0 here means "keep none".
    match s.trim() {
        "0" | "0K" | "0k" | "0M" | "0m" | "0G" | "0g" => Ok(0),
        _ => parse_size(s).map(|n| n as u64),
    }
}

fn parse_window(s: &str) -> Result<usize, String> {
    match parse_u64(s)? {
        n @ 1..=65536 => Ok(n as usize),
        n => Err(format!("{n} is out of range (1..=65536)")),
    }
}

fn parse_linger(s: &str) -> Result<u64, String> {
    match parse_u64(s)? {
        n @ 0..=1000 => Ok(n),
        n => Err(format!("{n} is out of range (0..=1000)")),
    }
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    let out_of_range = || format!("{s} is out of range (0 to 3600 seconds)");
    // A number parse_secs refuses (negative, NaN, infinite, huge) is out of this range, not
    // of parse_secs' own.
    let d = parse_secs(s).map_err(|e| match s.trim().parse::<f64>() {
        Ok(_) => out_of_range(),
        Err(_) => e,
    })?;
    if d > Duration::from_secs(3600) {
        return Err(out_of_range());
    }
    Ok(d)
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
            &["--spool", "/tmp/x"],
            &["--nats", "nats://h:1", "--spool-max", "1K"],
            &["--nats", "nats://h:1", "--dead-letter-max", "-1"],
            &["--nats", "nats://h:1", "--dead-letter-max", "2G"],
            &["--nats", "nats://h:1", "--dead-letter-max", "x"],
            &["--dead-letter-max", "1M"],
            &["--nats", "nats://h:1", "--nats-window", "0"],
            &["--nats", "nats://h:1", "--nats-linger", "1001"],
            &["--nats", "nats://h:1", "--nats-linger", "-1"],
            &["--nats-linger", "5"],
            &["--nats", "nats://h:1", "--shutdown-deadline", "3601"],
            &["--nats", "nats://h:1", "--nats-password-file", "/p"],
            &["--nats", "nats://h:1", "--nats-tls-cert", "/c"],
            &[
                "--nats",
                "nats://h:1",
                "--nats-user",
                "u",
                "--nats-creds",
                "/c",
            ],
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        for v in ["-1", "NaN", "inf", "1e400", "3600.5"] {
            let e = parse(&["--nats", "nats://h:1", "--shutdown-deadline", v])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("(0 to 3600 seconds)"), "{v}: {e}");
        }
        assert_eq!(
            parse(&["man"]).unwrap().command,
            Some(Command::Generate(Generate::Man))
        );
        let n = parse(&[
            "--nats",
            "nats://127.0.0.1:4222",
            "--spool-max",
            "16K",
            "--nats-window",
            "65536",
            "--shutdown-deadline",
            "0",
        ])
        .unwrap()
        .args
        .nats;
        assert_eq!((n.spool_max, n.nats_window), (16 << 10, 65536));
        assert_eq!(n.dead_letter_max, 64 << 20);
        for (v, want) in [("0", 0), ("1", 1), ("3M", 3 << 20), ("1G", 1 << 30)] {
            let n = parse(&["--nats", "nats://h:1", "--dead-letter-max", v])
                .unwrap()
                .args
                .nats;
            assert_eq!(n.dead_letter_max, want, "{v}");
        }
        assert_eq!(n.shutdown_deadline, Duration::ZERO);
        assert_eq!(n.spool, PathBuf::from(DEFAULT_SPOOL));
    }

    #[test]
    fn requeue_dead_letters_takes_the_spool_and_nothing_of_the_agent() {
        let requeue = |spool: &str| {
            Some(Command::RequeueDeadLetters {
                spool: PathBuf::from(spool),
            })
        };
        let c = parse(&["requeue-dead-letters"]).unwrap().command;
        assert_eq!(c, requeue(DEFAULT_SPOOL));
        let c = parse(&["requeue-dead-letters", "--spool", "/s"])
            .unwrap()
            .command;
        assert_eq!(c, requeue("/s"));
        for bad in [
            &["requeue-dead-letters", "--nats", "nats://h:1"][..],
            &["--duration", "1", "requeue-dead-letters"],
            &["requeue-dead-letters", "/s"],
            &["requeue-dead-letters", "--spool"],
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
