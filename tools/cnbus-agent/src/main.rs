//! `agent`: a process-monitoring agent built on `cnbus::proc`, the way a real one embeds the
//! library.
//!
//! ```sh
//! cargo run --release --example agent -- --interval 5 --output events.jsonl --dump-table live.jsonl
//! ```
//!
//! Needs root (`CAP_NET_ADMIN`) and the initial network, pid and user namespaces, like every
//! proc-connector listener.
//!
//! # What it does
//!
//! * **Process table.** It keeps a table of live processes keyed by process id (the kernel's
//!   `tgid`): parent process id, command line and start time. Threads (task id ≠ process id)
//!   never create entries; their events are logged with `"thread":true`.
//!   - At start it subscribes first and then scans `/proc`, so every process is either seen
//!     by the scan or by a fork event queued on the socket meanwhile (the kernel queues events
//!     while the scan runs; they are applied after it). A process seen by both keeps the
//!     scan's command line and takes the fork's exact start time; one that exits during the
//!     scan is removed by its queued exit event. Zombies and tasks already exiting
//!     (`PF_EXITING`) are skipped: their exit event may have been sent before the agent
//!     subscribed.
//!   - A fork event inserts the child with the parent's command line (a child runs its
//!     parent's program until it calls `exec`, so no `/proc` read is needed); an exec event
//!     re-reads `/proc/<pid>/cmdline`. An exit event of a process's main thread removes it
//!     and moves it to a bounded list of recent exits (`--recent-exits`, default 1024).
//!   - Start time: the fork event's kernel timestamp (`CLOCK_MONOTONIC`) converted to
//!     wall-clock time; for processes found by a scan, `/proc/<pid>/stat` field 22
//!     (`CLOCK_BOOTTIME` ticks) converted likewise.
//!   - Command line: `/proc/<pid>/cmdline` with NULs turned into spaces, at most 1024 bytes,
//!     invalid UTF-8 replaced by U+FFFD (JSON strings must be UTF-8);
//!     when it is empty (kernel threads, or a process that exited before it could be read)
//!     `[comm]`, as `ps` shows it.
//!   - Pids are reused (`/proc/sys/kernel/pid_max` is often 32768): an entry is the same
//!     process as what `/proc` or a new fork shows only if the start times agree within
//!     100 ms. A fork onto a pid whose entry is older replaces it and counts `stale_replaced`.
//! * **Losses.** The kernel drops events when the socket's queue overflows (`ENOBUFS`). The
//!   listener reports that (`Received::Lost`) and, because the agent subscribes to every
//!   event, also the number lost per CPU (sequence gaps, as later events reveal them); the
//!   exact total, the end of the run included, is the socket's kernel drop counter (in the
//!   counters line). Each report becomes a
//!   `"lost"` line and a counter, and schedules a **resync**: a `/proc` rescan (at most one
//!   every 2 s, and one before the final dump if any is pending) that adds live processes
//!   the table lacks, drops entries whose process is gone (they go to the recent exits; a
//!   late exit event for them still gets logged with their details), and refreshes command
//!   lines. The agent never stops because of a loss.
//! * **Counters.** Every `--interval` seconds (default 5) one JSON line on stderr, or the
//!   file `--stats-file` rewritten atomically (written to `FILE.tmp`, then renamed). A final
//!   line (`"final":true`) always goes to stderr on exit.
//! * **Shutdown.** SIGINT and SIGTERM (or the end of `--duration`) stop it: it applies the
//!   events already queued (for at most 1 s), resyncs if a loss is pending, flushes the
//!   event log, prints the final counters, writes `--dump-table` (atomically) and exits 0.
//!   SIGHUP reopens `--output` (for log rotation).
//! * **Output errors.** When the event log cannot be written the agent stops the same way
//!   (final counters, dump): a closed pipe (`agent | head`) quietly with status 0, any
//!   other write error (a full disk) with a message and status 1. Writes to stderr never
//!   fail the agent (a closed or full stderr is ignored). A usage error (unknown option,
//!   value out of range) is status 2.
//!
//! # Event log (stdout, or `--output FILE`, appended)
//!
//! One JSON object per line. Every line has:
//!
//! | field | meaning |
//! |---|---|
//! | `ts` | when it happened, RFC 3339 UTC with microseconds (from the kernel's timestamp; for `lost` and `resync`, when the agent noticed) |
//! | `event` | `fork`, `exec`, `exit`, `comm`, `uid`, `gid`, `sid`, `ptrace`, `coredump`, or `lost`, `resync` (the agent's own) |
//!
//! Process events also have `pid` (process id), `tid` (thread id; = `pid` for the main
//! thread), `thread` (true for an event of a thread other than the main one: a new thread
//! is a `fork` with `"thread":true`), `ppid` and `cmdline` (from the table; `null` when the
//! process is unknown), and by kind:
//!
//! | event | fields |
//! |---|---|
//! | `fork` | `ppid` is the parent's process id from the event |
//! | `exec` | `cmdline` is the new command line |
//! | `exit` | `exit_code` (or `null`), `signal` (killing signal, or `null`), `core_dumped`, `duration_ms` (since the process's start time; `null` for threads and when unknown) |
//! | `comm` | `comm`: the new task name |
//! | `uid` / `gid` | `ruid`, `euid` / `rgid`, `egid` |
//! | `ptrace` | `tracer_pid` (`null` on detach) |
//! | `coredump` | nothing more |
//! | `lost` | `cause`: `overrun` (with `count` `null`) or `seq_gap` (with `cpu` and exact `count`) |
//! | `resync` | `reason` (`start`, `loss`, `shutdown`), `added`, `removed`, `live` |
//!
//! Example: `{"ts":"2026-11-26T12:00:01.123456Z","event":"exit","pid":4242,"tid":4242,
//! "thread":false,"ppid":4200,"cmdline":"sleep 1","exit_code":0,"signal":null,
//! "core_dumped":false,"duration_ms":1002.117}`
//!
//! # Counters line
//!
//! `ts`, `final`, `uptime_s`, `events` (object: count per event type, threads included),
//! `events_total`, `events_per_s` (over the last interval), `lost_events` (events lost: the
//! exact count when `lost_exact` is true, else a lower bound), `lost_exact`,
//! `lost_events_max` (an upper bound, or `null`), `kernel_drops` (the socket's kernel drop
//! counter: datagrams dropped for a full queue, or `null`), `spoofed` (datagrams on the proc
//! group from user-space senders, rejected), `decode_errors` (kernel messages that did not
//! decode), `overruns` (`ENOBUFS` reports), `lost_per_cpu` (object: CPU → count, from
//! sequence gaps),
//! `live_processes` (table entries), `table_capacity` (slots allocated), `recent_exits`,
//! `resyncs`, `resync_added`, `resync_removed`, `stale_replaced` (entries replaced by a fork
//! onto their reused pid: their exit was lost), `fork_known` (forks of processes a scan had
//! already found: the scan/fork race), `exit_unknown` (exits of processes the table
//! never had: they exited during the scan, or their fork was lost), `cpu_s` (the agent's
//! user + system CPU time), `rss_kb`.
//!
//! # Table dump (`--dump-table FILE`)
//!
//! One object per live process, by pid: `pid`, `ppid`, `cmdline`, `start` (RFC 3339 or
//! `null`), `source` (`scan`, `fork`, `exec` or `resync`: what created the entry).
//!
//! # How it uses cnbus
//!
//! * [`ProcListener::builder`] with the default [`EventSet::ALL`](cnbus::proc::EventSet):
//!   every event, so that gaps are counted exactly; `recv_buffer` from `--buffer`.
//! * The main loop alternates [`ProcListener::try_recv`] (drain what is queued) and
//!   [`ProcListener::recv_timeout`] (wait, at most 100 ms so the signal flag and the counters
//!   tick are checked). Each item is a [`Received::Event`] or a [`Received::Lost`].
//! * [`ProcListener::stats`] gives the [`LossStats`] for the counters line, and
//!   [`ProcListener::finish`] the final one.
//! * [`TermSignals::block`] before any thread starts, and a thread waiting for the signals.
//! * [`ProcEvent::timestamp_ns`](cnbus::proc::ProcEvent) is `CLOCK_MONOTONIC`: converted
//!   with [`monotonic_ns`] / [`realtime_ns`]; `/proc` start times with [`boottime_ns`] and
//!   [`clock_ticks_per_sec`].
//!
//! # Limits
//!
//! * Reparenting is not reported by the kernel: `ppid` is the parent at fork (or at scan).
//! * A non-main thread calling `exec` makes the kernel report an exit of the main thread
//!   first: the log shows an `exit` of the process, and its `exec` re-creates the entry.
//! * A process whose main thread exits while other threads run is removed at that exit.
//! * A program that rewrites its own argv (`setproctitle`) is seen with the command line of
//!   its last exec, until a resync.
//! * Memory: the table holds one entry per live process (bounded by `pid_max`), command
//!   lines are capped and shared between a parent and its forked children, the recent-exits
//!   list is bounded.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "../../../examples/common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::proc::{
    EnrichConfig, Enricher, EventBody, EventKind, Loss, LossStats, ProcEvent, ProcListener,
    ProcessInfo, ProcessKey, Received,
};
use cnbus::sys::{boottime_ns, clock_ticks_per_sec, monotonic_ns, realtime_ns, TermSignals};

/// Minimum time between two loss-triggered resyncs.
const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// Longest wait in the main loop, so signals and ticks are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How long the final drain of queued events may take.
const DRAIN_FOR: Duration = Duration::from_secs(1);

/// A process-monitoring agent on the Linux proc connector (cnbus example).
#[derive(Parser)]
#[command(
    name = "cnbus-agent",
    after_help = "Every event is one JSON line (fields: ts, event, pid, tid, thread, ppid, cmdline, \
and per event exit_code, signal, core_dumped, duration_ms, comm, ruid, euid, rgid, egid, \
tracer_pid); lost events are {\"event\":\"lost\",...} lines and counters, and trigger a /proc \
resync. Exits 0 after SIGINT/SIGTERM or --duration (or when the event log's reader closes \
the pipe), with a final counters line on stderr; 1 when writing the event log fails; 2 on a \
usage error. Needs root (CAP_NET_ADMIN)."
)]
struct Args {
    /// Print counters every SECS seconds (0.01 to 1e9)
    #[arg(short, long, value_name = "SECS", default_value = "5", value_parser = parse_interval)]
    interval: Duration,
    /// Write the counters to FILE (rewritten atomically) instead of stderr; the final
    /// counters also go to stderr
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,
    /// Append the event log to FILE instead of stdout (SIGHUP reopens it)
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// On exit, write the live process table to FILE, one JSON object per line (pid, ppid,
    /// cmdline, start, source)
    #[arg(long, value_name = "FILE")]
    dump_table: Option<PathBuf>,
    /// Stop after SECS seconds (0 to 1e9; default: run until SIGINT/SIGTERM)
    #[arg(short, long, value_name = "SECS", value_parser = cli::parse_secs)]
    duration: Option<Duration>,
    /// How many recent exits to remember (0..=1000000)
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_recent_exits)]
    recent_exits: usize,
    /// Socket receive buffer (bytes, or with a K, M or G suffix; 1 byte to 1G)
    #[arg(short, long, value_name = "BYTES", default_value_t = cnbus::proc::DEFAULT_RECV_BUFFER,
          value_parser = cli::parse_size)]
    buffer: usize,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = cli::parse_secs(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s} is too short (at least 0.01 s)"));
    }
    Ok(d)
}

fn parse_recent_exits(s: &str) -> Result<usize, String> {
    match cli::parse_u64(s)? {
        n @ 0..=1_000_000 => Ok(n as usize),
        n => Err(format!("{n} is out of range (0..=1000000)")),
    }
}

// ---------------------------------------------------------------------------------------
// Time and JSON

/// Converts kernel clocks to Unix-epoch nanoseconds.
struct Clocks {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`.
    mono: i128,
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME`.
    boot: i128,
    ticks: u64,
}

impl Clocks {
    fn new() -> Self {
        let mut c = Clocks {
            mono: 0,
            boot: 0,
            ticks: clock_ticks_per_sec(),
        };
        c.sync();
        c
    }

    /// Re-reads the offsets (NTP adjusts the real-time clock).
    fn sync(&mut self) {
        let real = i128::from(realtime_ns());
        self.mono = real - i128::from(monotonic_ns());
        self.boot = real - i128::from(boottime_ns());
    }

    /// Wall-clock time of a proc-event timestamp.
    fn wall_of_event(&self, ns: u64) -> i128 {
        i128::from(ns) + self.mono
    }

    /// Wall-clock time of a `/proc/<pid>/stat` start time (clock ticks since boot).
    fn wall_of_ticks(&self, ticks: u64) -> i128 {
        i128::from(ticks) * 1_000_000_000 / i128::from(self.ticks) + self.boot
    }

    fn now(&self) -> i128 {
        i128::from(realtime_ns())
    }
}

/// Appends `unix_ns` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn push_rfc3339(out: &mut String, unix_ns: i128) {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let micros = unix_ns.rem_euclid(1_000_000_000) / 1_000;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, eras of 400 years
    // starting on March 1st).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3_600,
        sod / 60 % 60,
        sod % 60
    );
}

/// Appends `s` as a JSON string. Control characters (and DEL, which some shippers choke
/// on) are escaped; everything else is UTF-8 as is.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let esc = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\t' => "\\t",
            '\r' => "\\r",
            c if c < ' ' || c == '\u{7f}' => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push_str(esc);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn push_opt_num<T: std::fmt::Display>(out: &mut String, v: Option<T>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
}

// ---------------------------------------------------------------------------------------
// /proc

/// Reads up to `buf.len()` bytes of a `/proc` file. `None` when it cannot be opened or read
/// (the process is gone, or hides it).
fn read_proc(path: &str, buf: &mut [u8]) -> Option<usize> {
    let mut f = File::open(path).ok()?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(n)
}

/// What the agent uses of `/proc/<pid>/stat`.
struct Stat {
    state: u8,
    ppid: u32,
    flags: u64,
    start_ticks: u64,
}

/// `PF_EXITING` in the task flags (`/proc/<pid>/stat` field 9).
const PF_EXITING: u64 = 0x4;

fn read_stat(pid: u32) -> Option<Stat> {
    let mut buf = [0u8; 1024];
    let n = read_proc(&format!("/proc/{pid}/stat"), &mut buf)?;
    let s = &buf[..n];
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the
    // first '(' and the last ')'.
    let open = s.iter().position(|&b| b == b'(')?;
    let close = s.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let rest = std::str::from_utf8(&s[close + 1..]).ok()?;
    let f: Vec<&str> = rest.split_ascii_whitespace().take(20).collect();
    if f.len() < 20 {
        return None;
    }
    Some(Stat {
        state: *f[0].as_bytes().first()?,
        ppid: f[1].parse().ok()?,
        flags: f[6].parse().ok()?,
        start_ticks: f[19].parse().ok()?,
    })
}

/// `(user + system CPU seconds, resident set in KiB)` of this process.
fn self_usage(ticks: u64) -> (f64, u64) {
    let mut buf = [0u8; 2048];
    let cpu = read_proc("/proc/self/stat", &mut buf)
        .and_then(|n| {
            let s = std::str::from_utf8(&buf[..n]).ok()?;
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_ascii_whitespace().take(13).collect();
            let t: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(t as f64 / ticks as f64)
        })
        .unwrap_or(0.0);
    let mut buf = [0u8; 4096];
    let rss = read_proc("/proc/self/status", &mut buf)
        .and_then(|n| {
            let s = std::str::from_utf8(&buf[..n]).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_ascii_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    (cpu, rss)
}

// ---------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Scan,
    Fork,
    Exec,
    Resync,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Scan => "scan",
            Source::Fork => "fork",
            Source::Exec => "exec",
            Source::Resync => "resync",
        }
    }
}

/// A live process: what the agent knows beyond the enricher's attribution.
#[derive(Clone)]
struct Entry {
    pid: u32,
    /// The parent at fork (or at the scan).
    ppid: u32,
    /// The enricher's attribution (its `process_key` is the table's key).
    info: ProcessInfo,
    /// Unix ns; `None` if `/proc` could not tell.
    start: Option<i128>,
    source: Source,
}

/// A process that left the table: by its exit event, or by a resync that found it gone
/// (then `exit_seen` is false until a late exit event fills it in).
struct Exited {
    key: ProcessKey,
    entry: Entry,
    exit_seen: bool,
}

#[derive(Default)]
struct Counters {
    /// Indexed like `EventKind::ALL`.
    by_kind: [u64; 10],
    lost_reports: u64,
    resyncs: u64,
    resync_added: u64,
    resync_removed: u64,
    stale_replaced: u64,
    fork_known: u64,
    exit_unknown: u64,
}

struct Agent {
    /// The live table, keyed by process key (boot id + pid + start time: never reused).
    live: HashMap<ProcessKey, Entry>,
    /// The live process of each pid.
    by_pid: HashMap<u32, ProcessKey>,
    enricher: Enricher,
    exits: VecDeque<Exited>,
    exits_cap: usize,
    clocks: Clocks,
    n: Counters,
    /// A loss happened since the last resync.
    resync_pending: bool,
    last_resync: Option<Instant>,
    line: String,
}

impl Agent {
    fn new(exits_cap: usize) -> Self {
        Agent {
            live: HashMap::new(),
            by_pid: HashMap::new(),
            // A /proc read at fork only for children of container runtimes and namespace
            // tools (the others inherit, marked so, until their exec): see docs/PROC.md.
            enricher: Enricher::with_config(EnrichConfig {
                read_at_fork: false,
                ..EnrichConfig::default()
            }),
            exits: VecDeque::with_capacity(exits_cap.min(4096)),
            exits_cap,
            clocks: Clocks::new(),
            n: Counters::default(),
            resync_pending: false,
            last_resync: None,
            line: String::with_capacity(512),
        }
    }

    fn remember_exit(&mut self, key: ProcessKey, entry: Entry, exit_seen: bool) {
        if self.exits_cap == 0 {
            return;
        }
        if self.exits.len() >= self.exits_cap {
            self.exits.pop_front();
        }
        self.exits.push_back(Exited {
            key,
            entry,
            exit_seen,
        });
    }

    /// Inserts `e` under `key`; an entry of another process on the same pid (its exit was
    /// lost and the pid reused) is removed and returned.
    fn insert(&mut self, key: ProcessKey, e: Entry) -> Option<Entry> {
        let older = match self.by_pid.insert(e.pid, key) {
            Some(k) if k != key => self.live.remove(&k),
            _ => None,
        };
        self.live.insert(key, e);
        older
    }

    fn remove(&mut self, key: ProcessKey) -> Option<Entry> {
        let e = self.live.remove(&key)?;
        if self.by_pid.get(&e.pid) == Some(&key) {
            self.by_pid.remove(&e.pid);
        }
        Some(e)
    }

    /// An entry for a process found in `/proc` (or `None` for zombies, exiting tasks and
    /// vanished pids). `fresh`: read everything again (a resync after a loss: an exec may
    /// have been missed), rather than trust the enricher's cache.
    fn entry_from_proc(&mut self, pid: u32, source: Source, fresh: bool) -> Option<Entry> {
        let st = read_stat(pid)?;
        if matches!(st.state, b'Z' | b'X' | b'x') || st.flags & PF_EXITING != 0 {
            return None;
        }
        let info = if fresh {
            self.enricher.refresh(pid)
        } else {
            self.enricher.process(pid)
        };
        // Gone meanwhile, or another process on the pid already.
        if info.process_key.map(|k| k.start_ticks) != Some(st.start_ticks) {
            return None;
        }
        Some(Entry {
            pid,
            ppid: st.ppid,
            info,
            start: Some(self.clocks.wall_of_ticks(st.start_ticks)),
            source,
        })
    }

    /// Scans `/proc` and reconciles the table with it. Returns `(added, removed)`.
    fn resync(&mut self, reason: &str) -> (u64, u64) {
        self.clocks.sync();
        let source = if reason == "start" {
            Source::Scan
        } else {
            Source::Resync
        };
        let mut seen: HashMap<ProcessKey, Entry> = HashMap::with_capacity(self.live.len() + 64);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for d in dir.flatten() {
                let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(e) = self.entry_from_proc(pid, source, source == Source::Resync) {
                    if let Some(k) = e.info.process_key {
                        seen.insert(k, e);
                    }
                }
            }
        }
        let (mut added, mut removed) = (0, 0);
        let gone: Vec<ProcessKey> = self
            .live
            .keys()
            .filter(|k| !seen.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(e) = self.remove(k) {
                self.remember_exit(k, e, false);
                removed += 1;
            }
        }
        for (k, s) in seen {
            match self.live.get_mut(&k) {
                // The same process: an exec may have been lost, so take /proc's view.
                Some(e) => e.info = s.info,
                None => {
                    // Its exit was already applied (it is still tearing down): do not revive.
                    let exited = self.exits.iter().any(|x| x.key == k && x.exit_seen);
                    if !exited {
                        if self.insert(k, s).is_some() {
                            removed += 1;
                        }
                        added += 1;
                    }
                }
            }
        }
        // After a storm the maps keep their peak capacity: give it back.
        if self.live.capacity() > 4 * self.live.len() + 1024 {
            self.live.shrink_to_fit();
            self.by_pid.shrink_to_fit();
        }
        if source == Source::Resync {
            self.n.resyncs += 1;
            self.n.resync_added += added;
            self.n.resync_removed += removed;
        }
        self.resync_pending = false;
        self.last_resync = Some(Instant::now());
        (added, removed)
    }

    fn resync_line(&mut self, reason: &str, added: u64, removed: u64) {
        let now = self.clocks.now();
        let l = &mut self.line;
        l.clear();
        l.push_str("{\"ts\":\"");
        push_rfc3339(l, now);
        let _ = write!(
            l,
            "\",\"event\":\"resync\",\"reason\":\"{reason}\",\"added\":{added},\"removed\":{removed},\"live\":{}}}",
            self.live.len()
        );
    }

    /// Applies one event to the table and formats its log line into `self.line`.
    fn event(&mut self, ev: &ProcEvent) {
        let kind = ev.kind();
        if let Some(i) = EventKind::ALL.iter().position(|k| *k == kind) {
            self.n.by_kind[i] += 1;
        }
        let (Some(task), Some(info)) = (ev.task(), self.enricher.enrich(ev)) else {
            self.line.clear();
            return; // an ACK: the listener does not deliver them unless asked
        };
        let ts = self.clocks.wall_of_event(ev.timestamp_ns);
        let pid = task.tgid;
        let thread = task.is_thread();
        let key = info.process_key;
        let mut extra = String::new();
        let mut ppid: Option<u32> = None;
        match ev.body {
            EventBody::Fork { parent, child } if !child.is_thread() => {
                ppid = Some(parent.tgid);
                if let Some(k) = key {
                    if let Some(old) = self.live.get_mut(&k) {
                        // Seen by the scan as well (the same key): keep what the scan read
                        // (an exec may have followed), take the fork's exact start time.
                        old.start = Some(ts);
                        self.n.fork_known += 1;
                    } else {
                        let e = Entry {
                            pid,
                            ppid: parent.tgid,
                            info: info.clone(),
                            start: Some(ts),
                            source: Source::Fork,
                        };
                        if self.insert(k, e).is_some() {
                            // The old process's exit was lost and its pid reused.
                            self.n.stale_replaced += 1;
                        }
                    }
                }
            }
            EventBody::Exec { .. } => {
                match key.and_then(|k| self.live.get_mut(&k)) {
                    Some(e) => {
                        e.info = info.clone();
                        ppid = Some(e.ppid);
                    }
                    None => {
                        // Its fork was lost, or a non-main thread exec'd (the kernel then
                        // sends an exit for the old main thread first).
                        if let Some(e) = self.entry_from_proc(pid, Source::Exec, false) {
                            ppid = Some(e.ppid);
                            if let Some(k) = e.info.process_key {
                                if self.insert(k, e).is_some() {
                                    self.n.stale_replaced += 1;
                                }
                            }
                        }
                    }
                }
            }
            EventBody::Exit {
                status, process, ..
            } => {
                let mut duration = None;
                if !process.is_thread() {
                    let entry = match key.and_then(|k| self.remove(k)) {
                        Some(e) => {
                            if let Some(k) = key {
                                self.remember_exit(k, e.clone(), true);
                            }
                            Some(e)
                        }
                        // Removed by a resync before its exit event arrived?
                        None => self
                            .exits
                            .iter_mut()
                            .rev()
                            .find(|x| Some(x.key) == key && !x.exit_seen)
                            .map(|x| {
                                x.exit_seen = true;
                                x.entry.clone()
                            }),
                    };
                    match entry {
                        Some(e) => {
                            duration = e.start.map(|s| (ts - s) as f64 / 1e6);
                            ppid = Some(e.ppid);
                        }
                        None => self.n.exit_unknown += 1,
                    }
                } else if let Some(e) = key.and_then(|k| self.live.get(&k)) {
                    ppid = Some(e.ppid);
                }
                extra.push_str(",\"exit_code\":");
                push_opt_num(&mut extra, status.code());
                extra.push_str(",\"signal\":");
                push_opt_num(&mut extra, status.signal());
                let _ = write!(extra, ",\"core_dumped\":{}", status.core_dumped());
                extra.push_str(",\"duration_ms\":");
                match duration {
                    Some(d) => {
                        let _ = write!(extra, "{d:.3}");
                    }
                    None => extra.push_str("null"),
                }
            }
            _ => {
                match ev.body {
                    EventBody::Comm { comm, .. } => {
                        extra.push_str(",\"comm\":");
                        push_json_str(&mut extra, &comm.to_string_lossy());
                    }
                    EventBody::Uid { ruid, euid, .. } => {
                        let _ = write!(extra, ",\"ruid\":{ruid},\"euid\":{euid}");
                    }
                    EventBody::Gid { rgid, egid, .. } => {
                        let _ = write!(extra, ",\"rgid\":{rgid},\"egid\":{egid}");
                    }
                    EventBody::Ptrace { tracer, .. } => {
                        extra.push_str(",\"tracer_pid\":");
                        push_opt_num(&mut extra, tracer.map(|t| t.tgid));
                    }
                    _ => {} // thread creation, sid, coredump: nothing more
                }
                // The enricher's view is the current one (a comm change renames a
                // process that has no command line).
                if let Some(e) = key.and_then(|k| self.live.get_mut(&k)) {
                    ppid = Some(e.ppid);
                    if !thread {
                        e.info = info.clone();
                    }
                }
            }
        }
        // `ppid` and the attribution are the process's, for thread events too.
        let l = &mut self.line;
        l.clear();
        l.push_str("{\"ts\":\"");
        push_rfc3339(l, ts);
        let _ = write!(
            l,
            "\",\"event\":\"{}\",\"pid\":{pid},\"tid\":{},\"thread\":{thread},\"ppid\":",
            kind.name(),
            task.pid
        );
        push_opt_num(l, ppid);
        push_info(l, &info);
        l.push_str(&extra);
        l.push('}');
    }

    fn lost(&mut self, loss: Loss) {
        self.n.lost_reports += 1;
        self.resync_pending = true;
        // An exit may be among the lost events and its pid reused: the enricher re-checks
        // its cached processes against /proc before trusting them again.
        self.enricher.note_loss();
        let now = self.clocks.now();
        let l = &mut self.line;
        l.clear();
        l.push_str("{\"ts\":\"");
        push_rfc3339(l, now);
        match loss {
            Loss::Overrun => {
                l.push_str("\",\"event\":\"lost\",\"cause\":\"overrun\",\"count\":null}")
            }
            Loss::Gap { cpu, count } => {
                let _ = write!(
                    l,
                    "\",\"event\":\"lost\",\"cause\":\"seq_gap\",\"cpu\":{cpu},\"count\":{count}}}"
                );
            }
        }
    }

    fn stats_line(&self, st: &LossStats, started: Instant, rate: f64, final_: bool) -> String {
        let mut s = String::with_capacity(512);
        s.push_str("{\"ts\":\"");
        push_rfc3339(&mut s, self.clocks.now());
        let _ = write!(
            s,
            "\",\"final\":{final_},\"uptime_s\":{:.3},\"events\":{{",
            started.elapsed().as_secs_f64()
        );
        let mut first = true;
        for (k, n) in EventKind::ALL.iter().zip(self.n.by_kind) {
            if *k == EventKind::Ack {
                continue;
            }
            if !first {
                s.push(',');
            }
            first = false;
            let _ = write!(s, "\"{}\":{n}", k.name());
        }
        let _ = write!(
            s,
            "}},\"events_total\":{},\"events_per_s\":{rate:.1},\"lost_events\":",
            self.n.by_kind.iter().sum::<u64>()
        );
        // `lost_exact` is true only when the figure is exact (see LossStats::lost); else
        // `lost_events` is a lower bound and `lost_events_max` an upper one, if known.
        let _ = write!(
            s,
            "{},\"lost_exact\":{},\"lost_events_max\":",
            st.lost_at_least(),
            st.lost().is_some()
        );
        push_opt_num(&mut s, st.lost_at_most());
        s.push_str(",\"kernel_drops\":");
        push_opt_num(&mut s, st.kernel_drops);
        let _ = write!(
            s,
            ",\"spoofed\":{},\"decode_errors\":{},\"overruns\":{},\"unread\":{},\"lost_per_cpu\":{{",
            st.spoofed, st.decode_errors, st.overruns, st.unread
        );
        for (i, (cpu, n)) in st.lost_per_cpu.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "\"{cpu}\":{n}");
        }
        let (cpu, rss) = self_usage(self.clocks.ticks);
        let es = self.enricher.stats();
        let _ = write!(
            s,
            "}},\"live_processes\":{},\"table_capacity\":{},\"recent_exits\":{},\"resyncs\":{},\"resync_added\":{},\"resync_removed\":{},\"stale_replaced\":{},\"fork_known\":{},\"exit_unknown\":{},\"enrich_proc_reads\":{},\"enrich_evictions\":{},\"enrich_stale\":{},\"cpu_s\":{cpu:.2},\"rss_kb\":{rss}}}",
            self.live.len(),
            self.live.capacity(),
            self.exits.len(),
            self.n.resyncs,
            self.n.resync_added,
            self.n.resync_removed,
            self.n.stale_replaced,
            self.n.fork_known,
            self.n.exit_unknown,
            es.proc_reads,
            es.evictions,
            es.stale,
        );
        s
    }

    /// The live table, one JSON object per line, by pid.
    fn table_dump(&self) -> String {
        let mut rows: Vec<&Entry> = self.live.values().collect();
        rows.sort_unstable_by_key(|e| (e.pid, e.info.process_key));
        let mut s = String::with_capacity(rows.len() * 256);
        for e in rows {
            let _ = write!(s, "{{\"pid\":{},\"ppid\":{}", e.pid, e.ppid);
            push_info(&mut s, &e.info);
            s.push_str(",\"start\":");
            match e.start {
                Some(t) => {
                    s.push('"');
                    push_rfc3339(&mut s, t);
                    s.push('"');
                }
                None => s.push_str("null"),
            }
            let _ = writeln!(s, ",\"source\":\"{}\"}}", e.source.name());
        }
        s
    }
}

/// Appends the enricher's fields, each preceded by a comma: `process_key`, `parent_key`,
/// `container_id`, `cgroup`, `cgroup_source`, `ns_pid`, `pidns`, `pidns_source`, `cmdline`,
/// `cmdline_source` (`null` when unknown).
fn push_info(out: &mut String, i: &ProcessInfo) {
    out.push_str(",\"process_key\":");
    push_opt_key(out, i.process_key);
    out.push_str(",\"parent_key\":");
    push_opt_key(out, i.parent_key);
    out.push_str(",\"container_id\":");
    push_opt_str(out, i.container_id.as_deref());
    out.push_str(",\"cgroup\":");
    push_opt_str(out, i.cgroup.as_deref());
    let _ = write!(
        out,
        ",\"cgroup_source\":\"{}\",\"ns_pid\":",
        i.cgroup_source
    );
    push_opt_num(out, i.ns_pid);
    out.push_str(",\"pidns\":");
    push_opt_num(out, i.pidns);
    let _ = write!(out, ",\"pidns_source\":\"{}\",\"cmdline\":", i.pidns_source);
    push_opt_str(out, i.cmdline.as_deref());
    let _ = write!(out, ",\"cmdline_source\":\"{}\"", i.cmdline_source);
}

fn push_opt_key(out: &mut String, k: Option<ProcessKey>) {
    match k {
        Some(k) => {
            let _ = write!(out, "\"{k}\"");
        }
        None => out.push_str("null"),
    }
}

/// Writes `data` to `path` atomically for readers: to `path.tmp`, then renamed over `path`
/// (a reader sees the old or the new content, never a mix). No fsync: these are snapshots.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, path)
}

fn open_output(path: Option<&Path>) -> io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(OpenOptions::new().create(true).append(true).open(p)?),
        None => Box::new(io::stdout()),
    })
}

/// Reports a failed write to the event log; true when it is a failure (exit status 1),
/// false for a closed pipe (`agent | head`), which ends the agent quietly and successfully.
fn log_error(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::BrokenPipe {
        return false;
    }
    warn!("cnbus-agent: writing the event log: {e}");
    true
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread exists: every thread inherits the blocked mask, so only the waiter
    // below receives SIGINT / SIGTERM / SIGHUP.
    let signals = match TermSignals::block() {
        Ok(s) => s,
        Err(e) => {
            warn!("cnbus-agent: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = match open_output(args.output.as_deref()) {
        Ok(w) => BufWriter::with_capacity(1 << 16, w),
        Err(e) => {
            warn!("cnbus-agent: --output: {e}");
            return ExitCode::from(1);
        }
    };
    // Subscribe first, then scan: whatever happens during the scan is queued as events.
    let mut listener = match ProcListener::builder().recv_buffer(args.buffer).open() {
        Ok(l) => l,
        Err(e) => {
            warn!("cnbus-agent: cannot subscribe to the proc connector: {e}");
            if matches!(e, cnbus::Error::PermissionDenied { .. }) {
                warn!("cnbus-agent: it needs root (CAP_NET_ADMIN)");
            }
            return ExitCode::from(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let reopen = Arc::new(AtomicBool::new(false));
    {
        let (stop, reopen) = (stop.clone(), reopen.clone());
        std::thread::spawn(move || loop {
            if signals.wait() == libc::SIGHUP {
                reopen.store(true, Ordering::SeqCst);
            } else {
                stop.store(true, Ordering::SeqCst);
                return;
            }
        });
    }

    let mut agent = Agent::new(args.recent_exits);
    let started = Instant::now();
    let (added, removed) = agent.resync("start");
    agent.resync_line("start", added, removed);
    let _ = writeln!(out, "{}", agent.line);

    let deadline = args.duration.map(|d| started + d);
    let mut next_tick = started + args.interval;
    let mut last_total = 0u64;
    let mut last_tick = started;
    let mut burst = 0u32;
    let mut failed = false;
    // The event log cannot be written any more (its reader closed the pipe, or a write
    // failed): the agent stops.
    let mut log_closed = false;
    let handle = |agent: &mut Agent,
                  r: Received,
                  out: &mut BufWriter<Box<dyn Write + Send>>|
     -> io::Result<()> {
        match r {
            Received::Event(ev) => agent.event(&ev),
            Received::Lost(loss) => agent.lost(loss),
        }
        if agent.line.is_empty() {
            return Ok(());
        }
        writeln!(out, "{}", agent.line)
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if reopen.swap(false, Ordering::SeqCst) && args.output.is_some() {
            let _ = out.flush();
            match open_output(args.output.as_deref()) {
                Ok(w) => out = BufWriter::with_capacity(1 << 16, w),
                Err(e) => warn!("cnbus-agent: reopening --output: {e}"),
            }
        }
        if now >= next_tick {
            let total: u64 = agent.n.by_kind.iter().sum();
            let rate = (total - last_total) as f64 / now.duration_since(last_tick).as_secs_f64();
            let line = agent.stats_line(&listener.stats(), started, rate, false);
            match &args.stats_file {
                Some(p) => {
                    if let Err(e) = write_atomic(p, format!("{line}\n").as_bytes()) {
                        warn!("cnbus-agent: --stats-file: {e}");
                    }
                }
                None => warn!("{line}"),
            }
            (last_total, last_tick) = (total, now);
            while next_tick <= now {
                next_tick += args.interval;
            }
        }
        if agent.resync_pending
            && agent
                .last_resync
                .is_none_or(|t| t.elapsed() >= RESYNC_EVERY)
        {
            let (a, r) = agent.resync("loss");
            agent.resync_line("loss", a, r);
            let _ = writeln!(out, "{}", agent.line);
        }
        let r = match listener.try_recv() {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => {
                // Idle: flush the log before waiting, and re-read the clock offsets.
                if let Err(e) = out.flush() {
                    failed = log_error(&e);
                    log_closed = true;
                    break;
                }
                agent.clocks.sync();
                if burst >= 4 {
                    // Events come in bursts: let a few queue up rather than waking for each
                    // (a wake-up costs more than handling an event). At most 0.5 ms late.
                    burst = 0;
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
                burst = 0;
                let mut wait = next_tick.saturating_duration_since(now).min(MAX_WAIT);
                if let Some(d) = deadline {
                    wait = wait.min(d.saturating_duration_since(now));
                }
                listener.recv_timeout(Some(wait))
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(Some(r)) => {
                burst = burst.saturating_add(1);
                if let Err(e) = handle(&mut agent, r, &mut out) {
                    // The log's reader is gone (a closed pipe: quietly) or the disk is
                    // full (loudly): stop.
                    failed = log_error(&e);
                    log_closed = true;
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!("cnbus-agent: receive failed: {e}");
                failed = true;
                break;
            }
        }
    }

    // Apply what had reached the agent before the stop (IGNORE first, so only that is
    // left), so the log and the dump are as of the stop. Whatever the time bound leaves is
    // counted as `unread` in the final counters.
    if !failed && !log_closed {
        let drain_until = Instant::now() + DRAIN_FOR;
        for r in listener.drain_queued(usize::MAX) {
            if let Err(e) = handle(&mut agent, r, &mut out) {
                failed = log_error(&e);
                log_closed = true;
                break;
            }
            if Instant::now() >= drain_until {
                break;
            }
        }
    }
    if agent.resync_pending {
        let (a, r) = agent.resync("shutdown");
        agent.resync_line("shutdown", a, r);
        let _ = writeln!(out, "{}", agent.line);
    }
    if !log_closed {
        if let Err(e) = out.flush() {
            failed |= log_error(&e);
        }
    }
    // Sends IGNORE and reads the queue empty: the final, settled loss figures.
    let stats = listener.finish();
    drop(listener);
    let total: u64 = agent.n.by_kind.iter().sum();
    let rate = (total - last_total) as f64 / last_tick.elapsed().as_secs_f64().max(1e-3);
    let line = agent.stats_line(&stats, started, rate, true);
    if let Some(p) = &args.stats_file {
        let _ = write_atomic(p, format!("{line}\n").as_bytes());
    }
    warn!("{line}");
    if let Some(p) = &args.dump_table {
        if let Err(e) = write_atomic(p, agent.table_dump().as_bytes()) {
            warn!("cnbus-agent: --dump-table {}: {e}", p.display());
            return ExitCode::from(1);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let mut s = String::new();
        push_rfc3339(&mut s, 0);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        // 2024-02-29T23:59:59.999999Z
        push_rfc3339(&mut s, 1_709_251_199_999_999_000);
        assert_eq!(s, "2024-02-29T23:59:59.999999Z");
    }

    #[test]
    fn json_strings() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}\u{7f}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001\u007fé""#);
    }
}
