//! `proctrace`: a process tracer on the proc connector, in the spirit of `forkstat`.
//!
//! One line per event (time, event, pid, info, duration on exit, process name or command
//! line), or one JSON object per line with `--json`. Event types are chosen with `--events`
//! and filtered in the kernel where it can (Linux 6.6+). Lost events are reported in the
//! stream and counted (exactly, from the socket's kernel drop counter, in every filter mode);
//! `--stats` prints per-process counts and loss totals at the end. SIGINT / SIGTERM / SIGHUP
//! end it cleanly, with the summary.
//!
//! Run `proctrace --help` for the options; `docs/PROC.md` has the design notes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnbus::proc::{
    EnrichConfig, Enricher, EventBody, EventKind, EventSet, Filtering, Loss, LossStats, ProcEvent,
    ProcListener, ProcessInfo, Received, Source, Task,
};
use cnbus::sys::{clock_ticks_per_sec, monotonic_ns, realtime_ns, TermSignals};
use cnbus::Error;

const HELP: &str = "\
proctrace: trace process events from the Linux proc connector

USAGE:
    proctrace [OPTIONS]

OPTIONS:
    -e, --events LIST    event types to trace, comma-separated (default: all):
                         fork, exec, exit, nonzero-exit, uid, gid, sid, ptrace, comm,
                         coredump, all. 'nonzero-exit' selects exits with a non-zero status.
                         Filtered in the kernel on Linux 6.6+, in user space before.
    -j, --json           one JSON object per line instead of text columns
    -d, --duration SECS  stop after SECS seconds (fractions allowed; at most 1e9)
    -s, --stats          at the end, also print loss per CPU and event counts per program
                         (the one-line summary of events and losses is always printed
                         to stderr on exit)
    -b, --buffer BYTES   socket receive buffer to ask for (suffix K, M or G; 1 byte to 1G;
                         default 16M)
        --enrich MODE    process attribution (process key, container, cgroup, pid
                         namespace, command line; see docs/PROC.md):
                         'full' (default): a child's cgroup and pid namespace are read
                           at fork when its parent is a container runtime or namespace
                           tool, else its parent's (marked inherited) until its exec;
                         'eager': read at every fork (costs a /proc read per fork);
                         'lazy': never read at fork;
                         'off': none of these fields (the filters below need them)
        --container ID   only processes in a container whose id starts with ID (hex)
        --cgroup PATH    only processes whose cgroup path starts with PATH
        --host-only      only processes not in a container
        --containers-only
                         only processes in a container
        --allow-foreign-namespace
                         run even outside the initial pid/user namespace (events then
                         arrive only while another process listens, with host ids)
    -h, --help           print this help

OUTPUT:
    Text: time (UTC, from the event's kernel timestamp), event, pid, info, duration (on
    exit, since the fork or exec seen, or the process start time), process (command line,
    or [comm] for kernel threads; <unknown> when the process was gone before /proc could be
    read). Once a process in a container was seen, a 'container' column (the first 12 hex
    digits of its id, '-' on the host) appears before the process, under a new header.
    With --json, each event also has process_key, parent_key, container_id, cgroup,
    cgroup_source, ns_pid, pidns, pidns_source, cmdline, cmdline_source (null when
    unknown). The filters apply to the process an event is about (a fork's child).
    Lost events appear as 'lost' lines and in the totals.

EXIT STATUS:
    0 on --duration, SIGINT, SIGTERM, SIGHUP, or when the reader of the output closes the
    pipe (proctrace | head); 1 when the proc connector cannot be used or writing the
    events fails (a full disk), with a message; 2 on a usage error.

Needs root (CAP_NET_ADMIN) on most kernels, and the initial network namespace.
";

/// Longest `--duration`, in seconds (about 31 years): adding it to the start time cannot
/// overflow.
const MAX_DURATION_SECS: f64 = 1e9;
/// Largest `--buffer` (the kernel caps a socket buffer near 2 GiB).
const MAX_BUFFER: usize = 1 << 30;

/// Writes a line to stderr, ignoring errors: `eprintln!` panics when stderr is closed or
/// full, and then there is nowhere left to report anything.
macro_rules! warn {
    ($($t:tt)*) => {{
        let _ = writeln!(io::stderr().lock(), $($t)*);
    }};
}

struct Args {
    events: EventSet,
    json: bool,
    duration: Option<Duration>,
    stats: bool,
    buffer: usize,
    allow_foreign_ns: bool,
    enrich: Enrich,
    filter: Filter,
}

/// How much process attribution (`--enrich`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enrich {
    Full,
    Eager,
    Lazy,
    Off,
}

/// Which processes' events are shown (`--container`, `--cgroup`, `--host-only`,
/// `--containers-only`), decided on the enricher's attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Filter {
    container: Option<String>,
    cgroup: Option<String>,
    host_only: bool,
    containers_only: bool,
}

impl Filter {
    fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// True when an event about a process with `info` is shown. Nothing known (`None`: an
    /// ACK) passes only an empty filter.
    fn matches(&self, info: Option<&ProcessInfo>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(info) = info else {
            return false;
        };
        let cid = info.container_id.as_deref();
        if self.host_only && cid.is_some() {
            return false;
        }
        if self.containers_only && cid.is_none() {
            return false;
        }
        if let Some(p) = &self.container {
            if !cid.is_some_and(|c| c.starts_with(p.as_str())) {
                return false;
            }
        }
        if let Some(p) = &self.cgroup {
            if !info
                .cgroup
                .as_deref()
                .is_some_and(|c| c.starts_with(p.as_str()))
            {
                return false;
            }
        }
        true
    }
}

fn parse_container(v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--container: {v:?} is not a container id or prefix (1 to 64 hex digits)"
        ));
    }
    Ok(v.to_ascii_lowercase())
}

fn parse_cgroup_prefix(v: &str) -> Result<String, String> {
    if !v.starts_with('/') || v.chars().any(char::is_control) {
        return Err(format!(
            "--cgroup: {v:?} is not a cgroup path (it starts with '/')"
        ));
    }
    Ok(v.to_string())
}

fn parse_enrich(v: &str) -> Result<Enrich, String> {
    match v {
        "full" => Ok(Enrich::Full),
        "eager" => Ok(Enrich::Eager),
        "lazy" => Ok(Enrich::Lazy),
        "off" => Ok(Enrich::Off),
        _ => Err(format!("--enrich: {v:?} is not full, eager, lazy or off")),
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

/// What the command line asks for.
enum Cli {
    Run(Args),
    Help,
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let secs: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("--duration: not a number of seconds: {v:?}"))?;
    if !secs.is_finite() || !(0.0..=MAX_DURATION_SECS).contains(&secs) {
        return Err(format!(
            "--duration: {v} is out of range (0 to {MAX_DURATION_SECS:e} seconds)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_buffer(v: &str) -> Result<usize, String> {
    match parse_size(v) {
        Some(b) if (1..=MAX_BUFFER).contains(&b) => Ok(b),
        Some(_) => Err(format!("--buffer: {v} is out of range (1 byte to 1G)")),
        None => Err(format!(
            "--buffer: bad size {v:?} (bytes, or a number with K, M or G)"
        )),
    }
}

/// Parses the arguments (without the program name). Every value is checked: an unknown
/// option, a missing value, a value given to a flag that takes none, a number out of range
/// or an argument that is not UTF-8 is an error, never a panic or a silent default.
fn parse_args(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, String> {
    let mut a = Args {
        events: EventSet::ALL,
        json: false,
        duration: None,
        stats: false,
        buffer: cnbus::proc::DEFAULT_RECV_BUFFER,
        allow_foreign_ns: false,
        enrich: Enrich::Full,
        filter: Filter::default(),
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not valid UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let flag = flag.as_str();
        let mut value = || match inline.clone() {
            Some(v) => Ok(v),
            None => match it.next() {
                Some(v) => v
                    .into_string()
                    .map_err(|v| format!("{flag}: value {v:?} is not valid UTF-8")),
                None => Err(format!("{flag} needs a value")),
            },
        };
        let is_switch = matches!(
            flag,
            "-h" | "--help"
                | "-j"
                | "--json"
                | "-s"
                | "--stats"
                | "--allow-foreign-namespace"
                | "--host-only"
                | "--containers-only"
        );
        if let (true, Some(v)) = (is_switch, &inline) {
            return Err(format!("{flag} takes no value (got {v:?})"));
        }
        match flag {
            "-h" | "--help" => return Ok(Cli::Help),
            "-j" | "--json" => a.json = true,
            "-s" | "--stats" => a.stats = true,
            "--allow-foreign-namespace" => a.allow_foreign_ns = true,
            "--host-only" => a.filter.host_only = true,
            "--containers-only" => a.filter.containers_only = true,
            "--container" => a.filter.container = Some(parse_container(&value()?)?),
            "--cgroup" => a.filter.cgroup = Some(parse_cgroup_prefix(&value()?)?),
            "--enrich" => a.enrich = parse_enrich(&value()?)?,
            "-e" | "--events" => {
                a.events = value()?.parse().map_err(|e| format!("{e}"))?;
                if a.events.is_empty() {
                    return Err("--events: no event type given".into());
                }
            }
            "-d" | "--duration" => a.duration = Some(parse_duration(&value()?)?),
            "-b" | "--buffer" => a.buffer = parse_buffer(&value()?)?,
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    let f = &a.filter;
    if f.host_only && (f.containers_only || f.container.is_some()) {
        return Err("--host-only excludes --containers-only and --container".into());
    }
    if a.enrich == Enrich::Off && !f.is_empty() {
        return Err(
            "--container, --cgroup, --host-only and --containers-only need enrichment (not --enrich off)"
                .into(),
        );
    }
    Ok(Cli::Run(a))
}

/// The exit status after a failed write to stdout: a closed pipe (`proctrace |
/// head`) ends the run quietly and successfully; any other error (a full disk) is reported
/// and is a failure.
fn output_failed(what: &str, e: &io::Error) -> ExitCode {
    if e.kind() == io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    warn!("proctrace: writing {what} to stdout: {e}");
    ExitCode::from(1)
}

/// Converts event timestamps (CLOCK_MONOTONIC) to wall-clock time.
struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    fn new() -> Self {
        let mut w = WallClock { offset_ns: 0 };
        w.sync();
        w
    }

    /// Re-reads the offset between the clocks (NTP slews it slowly).
    fn sync(&mut self) {
        self.offset_ns = i128::from(realtime_ns()) - i128::from(monotonic_ns());
    }

    fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Appends `v` in decimal, zero-padded to at least `width` digits. By hand: times are
/// printed for every event, and `write!` with padding costs more than the rest of a line.
fn push_digits(out: &mut String, v: u64, width: usize) {
    let mut b = [b'0'; 20];
    let mut v = v;
    let mut i = b.len();
    while v > 0 {
        i -= 1;
        b[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    let start = i.min(b.len() - width.min(b.len()));
    out.push_str(std::str::from_utf8(&b[start..]).unwrap_or_default());
}

fn write_time(out: &mut String, wall_ns: i128, full: bool) {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let micros = (wall_ns.rem_euclid(1_000_000_000) / 1000) as u32;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m, s) = (sod / 3600, sod / 60 % 60, sod % 60);
    if full {
        let (y, mo, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            let _ = write!(
                out,
                "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z"
            );
            return;
        }
        push_digits(out, y as u64, 4);
        out.push('-');
        push_digits(out, u64::from(mo), 2);
        out.push('-');
        push_digits(out, u64::from(d), 2);
        out.push('T');
    }
    push_digits(out, h as u64, 2);
    out.push(':');
    push_digits(out, m as u64, 2);
    out.push(':');
    push_digits(out, s as u64, 2);
    out.push('.');
    push_digits(out, u64::from(micros), 6);
    if full {
        out.push('Z');
    }
}

/// The event-specific fields of a JSON line, in output order; absent ones are left out.
/// (`exit_code` and `signal` are present on exits, `null` when they do not apply.)
#[derive(serde::Serialize, Default)]
struct Detail {
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ruid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    euid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attach: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracer_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracer_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<Option<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<Option<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    core_dumped: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_s: Option<f64>,
}

impl Detail {
    fn parent(&mut self, t: Task) {
        (self.parent_pid, self.parent_tid) = (Some(t.tgid), Some(t.pid));
    }
}

/// One `--json` event line.
#[derive(serde::Serialize)]
struct JsonEvent<'a> {
    time: &'a str,
    timestamp_ns: u64,
    cpu: u32,
    seq: u32,
    event: &'a str,
    pid: u32,
    tid: u32,
    #[serde(flatten)]
    detail: Detail,
    name: Option<&'a str>,
    /// The enricher's fields (absent with `--enrich off`).
    #[serde(flatten)]
    process: Option<&'a ProcessInfo>,
}

/// One `--json` loss line.
#[derive(serde::Serialize)]
struct JsonLost<'a> {
    time: &'a str,
    event: &'a str,
    cause: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<u32>,
    count: Option<u32>,
}

/// Serialises `record` into `line` (cleared first). Serialising these plain records into
/// a string cannot fail.
fn write_json(line: &mut String, record: &impl serde::Serialize) {
    line.clear();
    let mut buf = std::mem::take(line).into_bytes();
    serde_json::to_writer(&mut buf, record).expect("plain records serialise");
    *line = String::from_utf8(buf).expect("serde_json writes UTF-8");
}

/// Appends `v` as a JSON string, escaped exactly as serde_json does (`"`, `\\`, the
/// control characters: `\b \f \n \r \t` or `\u00xx`).
fn push_json_str(out: &mut String, v: &str) {
    out.push('"');
    // A fold without early exit, which the compiler vectorises: most strings need no
    // escaping, and this check is on every string of every line.
    let plain = !v
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.push_str(v);
    } else {
        for c in v.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// Appends `,"key":` (the key needs no escaping).
fn push_key(out: &mut String, key: &str) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":");
}

fn push_opt_json_str(out: &mut String, v: Option<&str>) {
    match v {
        Some(v) => push_json_str(out, v),
        None => out.push_str("null"),
    }
}

fn push_opt_num(out: &mut String, v: Option<impl Into<u64>>) {
    match v {
        Some(v) => push_digits(out, v.into(), 1),
        None => out.push_str("null"),
    }
}

impl JsonEvent<'_> {
    /// The same line as serialising it with serde_json (the unit tests compare the two),
    /// written directly: serde's `flatten` and the UTF-8 check of the serialised bytes cost
    /// a good part of the tracer's time per event.
    fn write(&self, out: &mut String) {
        out.clear();
        out.push_str("{\"time\":");
        push_json_str(out, self.time);
        push_key(out, "timestamp_ns");
        push_digits(out, self.timestamp_ns, 1);
        push_key(out, "cpu");
        push_digits(out, u64::from(self.cpu), 1);
        push_key(out, "seq");
        push_digits(out, u64::from(self.seq), 1);
        push_key(out, "event");
        push_json_str(out, self.event);
        push_key(out, "pid");
        push_digits(out, u64::from(self.pid), 1);
        push_key(out, "tid");
        push_digits(out, u64::from(self.tid), 1);
        let d = &self.detail;
        let nums = [
            ("err", d.err),
            ("ruid", d.ruid),
            ("euid", d.euid),
            ("rgid", d.rgid),
            ("egid", d.egid),
            ("sid", d.sid),
        ];
        for (k, v) in nums {
            if let Some(v) = v {
                push_key(out, k);
                push_digits(out, u64::from(v), 1);
            }
        }
        if let Some(a) = d.attach {
            push_key(out, "attach");
            out.push_str(if a { "true" } else { "false" });
        }
        for (k, v) in [("tracer_pid", d.tracer_pid), ("tracer_tid", d.tracer_tid)] {
            if let Some(v) = v {
                push_key(out, k);
                push_digits(out, u64::from(v), 1);
            }
        }
        for (k, v) in [("old_name", &d.old_name), ("comm", &d.comm)] {
            if let Some(v) = v {
                push_key(out, k);
                push_json_str(out, v);
            }
        }
        if let Some(v) = d.status {
            push_key(out, "status");
            push_digits(out, u64::from(v), 1);
        }
        for (k, v) in [("exit_code", d.exit_code), ("signal", d.signal)] {
            if let Some(v) = v {
                push_key(out, k);
                push_opt_num(out, v);
            }
        }
        if let Some(c) = d.core_dumped {
            push_key(out, "core_dumped");
            out.push_str(if c { "true" } else { "false" });
        }
        if let Some(v) = d.exit_signal {
            push_key(out, "exit_signal");
            let _ = write!(out, "{v}");
        }
        for (k, v) in [("parent_pid", d.parent_pid), ("parent_tid", d.parent_tid)] {
            if let Some(v) = v {
                push_key(out, k);
                push_digits(out, u64::from(v), 1);
            }
        }
        if let Some(v) = d.duration_s {
            push_key(out, "duration_s");
            // serde_json's float format (shortest round-trip, `ryu`).
            match serde_json::to_string(&v) {
                Ok(t) => out.push_str(&t),
                Err(_) => out.push_str("null"),
            }
        }
        push_key(out, "name");
        push_opt_json_str(out, self.name);
        if let Some(i) = self.process {
            let key = |out: &mut String, k: &str, v: Option<cnbus::proc::ProcessKey>| {
                push_key(out, k);
                match v {
                    Some(v) => {
                        out.push('"');
                        let _ = write!(out, "{v}");
                        out.push('"');
                    }
                    None => out.push_str("null"),
                }
            };
            key(out, "process_key", i.process_key);
            key(out, "parent_key", i.parent_key);
            push_key(out, "container_id");
            push_opt_json_str(out, i.container_id.as_deref());
            push_key(out, "cgroup");
            push_opt_json_str(out, i.cgroup.as_deref());
            push_key(out, "cgroup_source");
            push_json_str(out, i.cgroup_source.name());
            push_key(out, "ns_pid");
            push_opt_num(out, i.ns_pid);
            push_key(out, "pidns");
            push_opt_num(out, i.pidns);
            push_key(out, "pidns_source");
            push_json_str(out, i.pidns_source.name());
            push_key(out, "cmdline");
            push_opt_json_str(out, i.cmdline.as_deref());
            push_key(out, "cmdline_source");
            push_json_str(out, i.cmdline_source.name());
        }
        out.push('}');
    }
}

/// What the tracer remembers about a process.
#[derive(Clone)]
struct ProcInfo {
    name: Arc<str>,
    /// Event timestamp of the fork (or first exec) seen, CLOCK_MONOTONIC ns.
    start_ns: Option<u64>,
    /// False for a name inherited from the parent at fork while exec events are not traced:
    /// the process may have exec'd since, so /proc is read once more when it is next needed.
    fresh: bool,
}

/// A bounded map with approximately-LRU eviction: two generations of at most `cap / 2`
/// entries each; a hit in the old generation is promoted, and when the young one is full the
/// old one is dropped whole. O(1) per operation, never more than `cap` entries.
struct Cache {
    young: HashMap<u32, ProcInfo>,
    old: HashMap<u32, ProcInfo>,
    half: usize,
}

impl Cache {
    fn new(cap: usize) -> Self {
        let half = (cap / 2).max(1);
        Cache {
            young: HashMap::with_capacity(half),
            old: HashMap::new(),
            half,
        }
    }

    fn get(&mut self, pid: u32) -> Option<&mut ProcInfo> {
        if !self.young.contains_key(&pid) {
            let v = self.old.remove(&pid)?;
            self.insert(pid, v);
        }
        self.young.get_mut(&pid)
    }

    fn insert(&mut self, pid: u32, v: ProcInfo) {
        if self.young.len() >= self.half && !self.young.contains_key(&pid) {
            self.old = std::mem::replace(&mut self.young, HashMap::with_capacity(self.half));
        }
        self.young.insert(pid, v);
    }

    fn remove(&mut self, pid: u32) -> Option<ProcInfo> {
        self.young.remove(&pid).or_else(|| self.old.remove(&pid))
    }
}

/// Reads a small /proc file into `buf`; the bytes read.
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

/// The command line of `pid` (arguments joined by spaces, at most 256 bytes), or `[comm]`
/// when it has none (kernel threads).
fn read_name(pid: u32) -> Option<Arc<str>> {
    let mut buf = [0u8; 256];
    // An exiting process has no command line any more (or its read fails): use the comm.
    let n = read_proc(&format!("/proc/{pid}/cmdline"), &mut buf).unwrap_or(0);
    let mut b = &buf[..n];
    while let [rest @ .., 0] = b {
        b = rest;
    }
    if !b.is_empty() {
        let s: String = String::from_utf8_lossy(b)
            .chars()
            .map(|c| if c == '\0' { ' ' } else { c })
            .collect();
        return Some(s.into());
    }
    let n = read_proc(&format!("/proc/{pid}/comm"), &mut buf)?;
    let comm = String::from_utf8_lossy(&buf[..n]);
    Some(format!("[{}]", comm.trim_end()).into())
}

/// Start time of `pid` from `/proc/<pid>/stat` (field 22), in ns since boot.
fn read_start_ns(pid: u32, ticks: u64) -> Option<u64> {
    let mut buf = [0u8; 1024];
    let n = read_proc(&format!("/proc/{pid}/stat"), &mut buf)?;
    let s = std::str::from_utf8(&buf[..n]).ok()?;
    // The comm field is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let start: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(start.saturating_mul(1_000_000_000) / ticks)
}

const UNKNOWN: &str = "<unknown>";
/// A burst of at least this many events makes the tracer pause before its next wait...
const COALESCE_AFTER: u32 = 4;
/// ...for this long, so that the next wake-up finds several events queued. The 16 MiB
/// receive queue holds tens of thousands of events: far more than arrive in this time.
const COALESCE_DELAY: Duration = Duration::from_micros(500);
/// During a burst the output is written once this much is buffered (about 70 JSON lines)
/// rather than at every wake-up. A burst goes on only while each sleep brings
/// COALESCE_AFTER events or more (70 lines then come within about 9 ms); when it ends,
/// everything is flushed before blocking.
const FLUSH_IN_BURST: usize = 32 << 10;
/// At most this many queued items are printed after the stop: far more than a 16 MiB
/// receive queue holds, so it only bounds a flood of user-space datagrams on group 1.
const DRAIN_LIMIT: usize = 1 << 20;
const MAX_STAT_NAMES: usize = 4096;

struct Tracer {
    args: Args,
    /// Exec events are traced, so names inherited at fork get refreshed by them.
    exec_traced: bool,
    cache: Cache,
    clock: WallClock,
    ticks: u64,
    line: String,
    /// The JSON time field being formatted (reused).
    time: String,
    /// Per process name: counts per event kind (indexed like `EventKind::ALL`).
    counts: HashMap<Arc<str>, [u64; 10]>,
    other_counts: [u64; 10],
    lost_reports: u64,
    /// Process attribution (`None` with `--enrich off`).
    enricher: Option<Enricher>,
    /// A process in a container was shown: the text output has the container column.
    containers_seen: bool,
}

/// The name shown for a process the enricher described: its command line, `[comm]` when
/// only the task name was left, `<unknown>` when it was gone (or unreadable).
fn enriched_name(info: &ProcessInfo) -> Arc<str> {
    match (&info.cmdline, info.cmdline_source) {
        (Some(c), Source::Comm) => format!("[{c}]").into(),
        (Some(c), _) => c.clone(),
        (None, _) => UNKNOWN.into(),
    }
}

impl Tracer {
    /// The enricher's name for the process when enriching, else [`Self::name_of`].
    fn name_or(&mut self, known: &Option<Arc<str>>, tgid: u32) -> Arc<str> {
        match known {
            Some(n) => n.clone(),
            None => self.name_of(tgid),
        }
    }

    fn name_of(&mut self, tgid: u32) -> Arc<str> {
        if let Some(i) = self.cache.get(tgid) {
            if !i.fresh {
                i.fresh = true;
                if let Some(n) = read_name(tgid) {
                    i.name = n;
                }
            }
            return i.name.clone();
        }
        match read_name(tgid) {
            Some(name) => {
                self.cache.insert(
                    tgid,
                    ProcInfo {
                        name: name.clone(),
                        start_ns: None,
                        fresh: true,
                    },
                );
                name
            }
            None => UNKNOWN.into(),
        }
    }

    /// Counts an event for the per-process table, keyed by program name (pids of a fork
    /// storm are all different; the program is what a reader wants totals for).
    fn count(&mut self, name: &str, kind: EventKind) {
        let k = EventKind::ALL.iter().position(|x| *x == kind).unwrap_or(0);
        let prog = program(name);
        if let Some(c) = self.counts.get_mut(prog) {
            c[k] += 1;
        } else if self.counts.len() < MAX_STAT_NAMES {
            let mut c = [0; 10];
            c[k] = 1;
            self.counts.insert(prog.into(), c);
        } else {
            self.other_counts[k] += 1;
        }
    }

    /// Formats one event into `self.line` (without the newline); leaves it empty when the
    /// filters exclude the event.
    fn event(&mut self, ev: &ProcEvent) {
        let json = self.args.json;
        // Every event goes through the enricher (its cache follows forks, execs and exits
        // whatever the filters show).
        let pinfo = match self.enricher.as_mut() {
            Some(e) => e.enrich(ev),
            None => None,
        };
        let known = pinfo.as_ref().map(enriched_name);
        // The info column: text lines only (a JSON line has the same facts in its fields).
        let mut info = String::new();
        macro_rules! info {
            ($($arg:tt)*) => {
                if !json {
                    let _ = write!(info, $($arg)*);
                }
            };
        }
        let mut d = Detail::default();
        let mut duration: Option<f64> = None;
        let mut kind_name = ev.kind().name();
        let subject = ev.task().unwrap_or_default();
        let name: Arc<str>;
        match ev.body {
            EventBody::Ack { err } => {
                name = "".into();
                info!("ack err {err}");
                d.err = Some(err);
            }
            EventBody::Fork { parent, child } => {
                if child.is_thread() {
                    // A new thread of process child.tgid. (The kernel reports the process's
                    // own parent as the thread's parent.)
                    kind_name = "clone";
                    name = self.name_or(&known, child.tgid);
                    info!("thread {}", child.pid);
                } else {
                    let pname = self.name_or(&known, parent.tgid);
                    info!("parent {}", parent.tgid);
                    self.cache.insert(
                        child.tgid,
                        ProcInfo {
                            name: pname.clone(),
                            start_ns: Some(ev.timestamp_ns),
                            fresh: self.exec_traced,
                        },
                    );
                    name = pname;
                }
                d.parent(parent);
            }
            EventBody::Exec { process } => {
                let n = match &known {
                    Some(n) => n.clone(),
                    None => read_name(process.tgid).unwrap_or_else(|| self.name_of(process.tgid)),
                };
                let start = self
                    .cache
                    .get(process.tgid)
                    .and_then(|i| i.start_ns)
                    .unwrap_or(ev.timestamp_ns);
                self.cache.insert(
                    process.tgid,
                    ProcInfo {
                        name: n.clone(),
                        start_ns: Some(start),
                        fresh: true,
                    },
                );
                name = n;
            }
            EventBody::Uid {
                process: _,
                ruid,
                euid,
            } => {
                name = self.name_or(&known, subject.tgid);
                info!("uid {ruid} euid {euid}");
                (d.ruid, d.euid) = (Some(ruid), Some(euid));
            }
            EventBody::Gid {
                process: _,
                rgid,
                egid,
            } => {
                name = self.name_or(&known, subject.tgid);
                info!("gid {rgid} egid {egid}");
                (d.rgid, d.egid) = (Some(rgid), Some(egid));
            }
            EventBody::Sid { process } => {
                name = self.name_or(&known, subject.tgid);
                info!("sid {}", process.tgid);
                d.sid = Some(process.tgid);
            }
            EventBody::Ptrace { process: _, tracer } => {
                name = self.name_or(&known, subject.tgid);
                match tracer {
                    Some(t) => {
                        info!("attach by {}", t.tgid);
                        d.attach = Some(true);
                        (d.tracer_pid, d.tracer_tid) = (Some(t.tgid), Some(t.pid));
                    }
                    None => {
                        info!("detach");
                        d.attach = Some(false);
                    }
                }
            }
            EventBody::Comm { process, comm } => {
                // (The enricher already names a comm-only process by its new comm.)
                let old = match (&known, self.cache.get(process.tgid)) {
                    (Some(_), Some(i)) => i.name.clone(),
                    _ => self.name_or(&known, process.tgid),
                };
                let new: Arc<str> = comm.to_string().into();
                info!("{} -> {}", program(&old), new);
                if json {
                    d.old_name = Some(old.to_string());
                    d.comm = Some(new.to_string());
                }
                if !process.is_thread() {
                    let start = self.cache.get(process.tgid).and_then(|i| i.start_ns);
                    self.cache.insert(
                        process.tgid,
                        ProcInfo {
                            name: new.clone(),
                            start_ns: start,
                            fresh: true,
                        },
                    );
                }
                name = new;
            }
            EventBody::Coredump { process: _, parent } => {
                name = self.name_or(&known, subject.tgid);
                if let Some(p) = parent {
                    info!("parent {}", p.tgid);
                    d.parent(p);
                }
            }
            EventBody::Exit {
                process,
                status,
                exit_signal,
                parent,
            } => {
                if process.is_thread() {
                    name = self.name_or(&known, process.tgid);
                    info!("thread {} ", process.pid);
                } else {
                    let cached = self.cache.remove(process.tgid);
                    let start = cached.as_ref().and_then(|i| i.start_ns).or_else(|| {
                        match &pinfo {
                            // The start time is in the key: no read.
                            Some(p) => p.process_key.map(|k| {
                                k.start_ticks.saturating_mul(1_000_000_000) / self.ticks.max(1)
                            }),
                            None => read_start_ns(process.tgid, self.ticks),
                        }
                    });
                    duration = start.map(|s| ev.timestamp_ns.saturating_sub(s) as f64 / 1e9);
                    name = match cached {
                        _ if known.is_some() => known.clone().unwrap_or_else(|| UNKNOWN.into()),
                        Some(i) if i.fresh && self.exec_traced => i.name,
                        // Without exec events any cached name may be stale: use what /proc
                        // still says (at exit the command line is gone but the comm is not,
                        // shown as [comm] like ps does), else the cached name.
                        Some(i) => read_name(process.tgid).unwrap_or(i.name),
                        None => read_name(process.tgid).unwrap_or_else(|| UNKNOWN.into()),
                    };
                }
                match (status.code(), status.signal()) {
                    (Some(c), _) => {
                        info!("{c}");
                    }
                    (None, Some(s)) => {
                        info!(
                            "signal {s}{}",
                            if status.core_dumped() { " (core)" } else { "" }
                        );
                    }
                    _ => {
                        info!("status {:#x}", status.raw());
                    }
                }
                d.status = Some(status.raw());
                d.exit_code = Some(status.code());
                d.signal = Some(status.signal());
                d.core_dumped = Some(status.core_dumped());
                d.exit_signal = Some(exit_signal);
                if let Some(p) = parent {
                    d.parent(p);
                }
                // Microseconds are all the clocks behind it can tell.
                d.duration_s = duration.map(|s| (s * 1e6).round() / 1e6);
            }
        }
        let line = &mut self.line;
        line.clear();
        if !self.args.filter.matches(pinfo.as_ref()) {
            return;
        }
        self.count(&name, ev.kind());
        let wall = self.clock.wall_ns(ev.timestamp_ns);
        let cid = pinfo.as_ref().and_then(|p| p.container_id.as_deref());
        let line = &mut self.line;
        if !json && cid.is_some() && !self.containers_seen {
            // From now on the text lines have a container column, under a new header.
            self.containers_seen = true;
            push_header(line, true);
            line.push('\n');
        }
        if json {
            let time = &mut self.time;
            time.clear();
            write_time(time, wall, true);
            let record = JsonEvent {
                time,
                timestamp_ns: ev.timestamp_ns,
                cpu: ev.cpu,
                seq: ev.seq,
                event: kind_name,
                pid: subject.tgid,
                tid: subject.pid,
                detail: d,
                name: (&*name != UNKNOWN).then_some(&*name),
                process: pinfo.as_ref(),
            };
            record.write(line);
        } else {
            write_time(line, wall, false);
            let dur = match duration {
                Some(d) => format!("{d:.3}s"),
                None => String::new(),
            };
            let _ = write!(
                line,
                " {kind_name:<8} {:>7} {:<24} {dur:>9} ",
                subject.tgid,
                printable(&info),
            );
            if self.containers_seen {
                let short = cid.map_or("-", |c| c.get(..12).unwrap_or(c));
                let _ = write!(line, "{short:<12} ");
            }
            line.push_str(&printable(&name));
        }
    }

    /// Formats `r` and writes its line to `out` (nothing when the filters drop it).
    fn print(&mut self, r: Received, out: &mut impl Write) -> io::Result<()> {
        match r {
            Received::Event(ev) => self.event(&ev),
            Received::Lost(loss) => self.lost(loss),
        }
        if self.line.is_empty() {
            return Ok(());
        }
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }

    fn lost(&mut self, loss: Loss) {
        self.lost_reports += 1;
        // An exit may be among the lost: cached processes are re-checked before reuse.
        if let Some(e) = self.enricher.as_mut() {
            e.note_loss();
        }
        let now = monotonic_ns();
        let wall = self.clock.wall_ns(now);
        let line = &mut self.line;
        line.clear();
        if self.args.json {
            let mut time = String::with_capacity(32);
            write_time(&mut time, wall, true);
            let (cause, cpu, count) = match loss {
                Loss::Overrun => ("overrun", None, None),
                Loss::Gap { cpu, count } => ("seq_gap", Some(cpu), Some(count)),
            };
            let record = JsonLost {
                time: &time,
                event: "lost",
                cause,
                cpu,
                count,
            };
            write_json(line, &record);
        } else {
            write_time(line, wall, false);
            match loss {
                Loss::Overrun => line.push_str(
                    " lost           - receive queue overflowed (ENOBUFS); events dropped",
                ),
                Loss::Gap { cpu, count } => {
                    let _ = write!(line, " lost           - {count} events of cpu {cpu}");
                }
            }
        }
    }

    fn summary(&self, stats: &LossStats, elapsed: Duration, filtering: Filtering) -> String {
        let mut s = String::new();
        // "exact" only when the figure is: the kernel's drop counter (every filter mode, the
        // end of the run included), or sequence gaps with no overflow.
        let n = stats.lost_at_least();
        let lost = match stats.lost_source() {
            cnbus::proc::LossSource::KernelCounter if filtering == Filtering::Kernel => {
                format!("{n} (exact, kernel drop counter)")
            }
            // Without a kernel filter the kernel's ACKs to anyone's LISTEN/IGNORE reach this
            // socket too, and one that met the full queue is in the figure.
            cnbus::proc::LossSource::KernelCounter => format!(
                "{n} (exact, kernel drop counter; proc-connector messages: events, and any ACKs to other listeners' requests dropped with them)"
            ),
            cnbus::proc::LossSource::SequenceNumbers => {
                format!("{n} (exact, from per-CPU sequence numbers)")
            }
            cnbus::proc::LossSource::NoOverrun => {
                format!("{n} (exact: no overflow reported; kernel filter, so no sequence check)")
            }
            cnbus::proc::LossSource::Bounded => format!(
                "between {n} and {} (not exact: user-space senders multicast on the proc group meanwhile, and the kernel's drop counter counts theirs too)",
                stats.lost_at_most().unwrap_or(n)
            ),
            cnbus::proc::LossSource::Unknown => format!(
                "at least {n} (not exact: {} receive-queue overflows and no kernel drop counter)",
                stats.overruns
            ),
        };
        let _ = writeln!(
            s,
            "proctrace: {} events in {:.1} s; lost: {lost}; overflows: {}; spoofed rejected: {}; decode errors: {}; filtering: {}",
            stats.events,
            elapsed.as_secs_f64(),
            stats.overruns,
            stats.spoofed,
            stats.decode_errors,
            match filtering {
                Filtering::None => "none (all events)",
                Filtering::Kernel => "kernel",
                Filtering::UserSpace => "user space",
            }
        );
        if stats.unread > 0 {
            // Only when the output failed before the queue was drained (see main).
            let _ = writeln!(
                s,
                "proctrace: {} events received before the stop were not printed (the output failed first)",
                stats.unread
            );
        }
        if !self.args.stats {
            return s;
        }
        if let Some(e) = &self.enricher {
            let st = e.stats();
            let _ = writeln!(
                s,
                "enrichment: {} events, cache hits {}, misses {} (gone {}), /proc reads {} (failed {}), start-time reads {}, evictions {}, stale {}, cached {}",
                st.events, st.hits, st.misses, st.gone, st.proc_reads, st.proc_read_failures,
                st.start_time_reads, st.evictions, st.stale, st.cached
            );
        }
        if !stats.lost_per_cpu.is_empty() {
            let per: Vec<String> = stats
                .lost_per_cpu
                .iter()
                .map(|(c, n)| format!("cpu{c}={n}"))
                .collect();
            let _ = writeln!(s, "lost per CPU (sequence gaps): {}", per.join(" "));
        }
        let _ = writeln!(
            s,
            "loss sources: kernel drop counter {} ({}); per-CPU sequence gaps {}; dropped by proctrace {}",
            stats
                .kernel_drops
                .map_or("unavailable".to_string(), |n| n.to_string()),
            match (stats.foreign_unaccounted, stats.foreign_settled) {
                (Some(0), _) => "no user-space datagram among them".to_string(),
                (Some(u), true) => format!("{u} of them user-space datagrams on the proc group"),
                (Some(u), false) => format!("up to {u} of them user-space datagrams on the proc group"),
                (None, _) => "user-space datagrams among them not known".to_string(),
            },
            stats
                .seq_lost
                .map_or("not tracked (kernel filter)".to_string(), |n| n.to_string()),
            stats.dropped
        );
        let kinds = &EventKind::ALL[1..];
        let mut rows: Vec<(&Arc<str>, &[u64; 10])> = self.counts.iter().collect();
        rows.sort_by(|a, b| {
            b.1.iter()
                .sum::<u64>()
                .cmp(&a.1.iter().sum::<u64>())
                .then(a.0.cmp(b.0))
        });
        let _ = write!(s, "{:>8}", "total");
        for k in kinds {
            let _ = write!(s, " {:>8}", k.name());
        }
        let _ = writeln!(s, "  process");
        let row = |s: &mut String, name: &str, c: &[u64; 10]| {
            let _ = write!(s, "{:>8}", c.iter().sum::<u64>());
            for n in &c[1..] {
                let _ = write!(s, " {n:>8}");
            }
            let _ = writeln!(s, "  {name}");
        };
        for (name, c) in rows {
            row(
                &mut s,
                if name.is_empty() {
                    "(kernel ack)"
                } else {
                    name
                },
                c,
            );
        }
        if self.other_counts.iter().any(|&n| n > 0) {
            row(
                &mut s,
                "(other processes: name table full)",
                &self.other_counts,
            );
        }
        s
    }
}

/// `s` with control characters (a newline in an argument, say) shown as `?`, so that one
/// event stays one line of text.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// The program name of a command line: the base name of its first word (`[comm]` and
/// `<unknown>` stay as they are).
fn program(name: &str) -> &str {
    if name.starts_with('[') || name.starts_with('<') {
        return name;
    }
    let first = name.split(' ').next().unwrap_or(name);
    first.rsplit('/').next().unwrap_or(first)
}

/// The text output's column header (without the newline).
fn push_header(out: &mut String, container: bool) {
    let _ = write!(
        out,
        "{:<15} {:<8} {:>7} {:<24} {:>9} {}process",
        "time (UTC)",
        "event",
        "pid",
        "info",
        "duration",
        if container { "container    " } else { "" }
    );
}

fn open_error(e: &Error) -> String {
    match e {
        Error::PermissionDenied { .. } => format!(
            "proctrace: {e}\nThe proc connector needs root (CAP_NET_ADMIN) here: run it with sudo."
        ),
        Error::NoKernelConnector { .. } => format!(
            "proctrace: {e}\nRun it on the host (or in a container sharing the host network namespace)."
        ),
        Error::ProcConnector { .. } => format!("proctrace: {e}"),
        _ => format!("proctrace: cannot subscribe to the proc connector: {e}"),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Cli::Run(a)) => a,
        Ok(Cli::Help) => {
            return match io::stdout().lock().write_all(HELP.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => output_failed("the help", &e),
            };
        }
        Err(e) => {
            warn!("proctrace: {e}");
            return ExitCode::from(2);
        }
    };
    // Block the termination signals before any thread exists, so only the waiter gets them.
    let signals = match TermSignals::block() {
        Ok(s) => s,
        Err(e) => {
            warn!("proctrace: {e}");
            return ExitCode::from(1);
        }
    };
    let mut listener = match ProcListener::builder()
        .events(args.events)
        .recv_buffer(args.buffer)
        .allow_foreign_namespace(args.allow_foreign_ns)
        .open()
    {
        Ok(l) => l,
        Err(e) => {
            warn!("{}", open_error(&e));
            return ExitCode::from(1);
        }
    };
    if let Some(w) = listener.namespace_warning() {
        warn!("proctrace: warning: {w}");
    }
    let caught = Arc::new(AtomicI32::new(0));
    {
        let stop = listener.shutdown_handle();
        let caught = caught.clone();
        std::thread::spawn(move || {
            caught.store(signals.wait(), Ordering::SeqCst);
            stop.shutdown();
        });
    }
    let filtering = listener.filtering();
    let mut t = Tracer {
        exec_traced: args.events.contains(EventSet::EXEC),
        cache: Cache::new(8192),
        clock: WallClock::new(),
        ticks: clock_ticks_per_sec(),
        line: String::with_capacity(512),
        time: String::with_capacity(32),
        counts: HashMap::new(),
        other_counts: [0; 10],
        lost_reports: 0,
        enricher: match args.enrich {
            Enrich::Off => None,
            mode => Some(Enricher::with_config(EnrichConfig {
                read_at_fork: mode == Enrich::Eager,
                spawners: if mode == Enrich::Lazy {
                    Vec::new()
                } else {
                    EnrichConfig::default().spawners
                },
                ..EnrichConfig::default()
            })),
        },
        containers_seen: false,
        args,
    };
    let started = Instant::now();
    let deadline = t.args.duration.map(|d| started + d);
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    if !t.args.json {
        let mut header = String::new();
        push_header(&mut header, false);
        let _ = writeln!(out, "{header}");
    }
    let mut status = ExitCode::SUCCESS;
    // A write of the events failed: no more attempts.
    let mut output_closed = false;
    // Events handled since the queue was last found empty.
    let mut burst = 0u32;
    loop {
        let r = match listener.try_recv() {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => {
                // Nothing queued: flush what was written before blocking. Between the
                // short sleeps of a burst, only once FLUSH_IN_BURST bytes are waiting (a
                // write system call per wake-up cost 5-10 % of the tracer's CPU).
                let flush = burst < COALESCE_AFTER || out.buffer().len() >= FLUSH_IN_BURST;
                if let Err(e) = if flush { out.flush() } else { Ok(()) } {
                    status = output_failed("the events", &e);
                    output_closed = true;
                    break;
                }
                t.clock.sync();
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    break;
                }
                if burst >= COALESCE_AFTER {
                    // Events are coming fast: let a few accumulate rather than waking up for
                    // each one (a context switch per event costs more than handling it).
                    // Adds at most COALESCE_DELAY of latency, only during bursts.
                    burst = 0;
                    std::thread::sleep(COALESCE_DELAY);
                    continue;
                }
                burst = 0;
                listener.recv_timeout(left)
            }
            Err(e) => Err(e),
        };
        burst = burst.saturating_add(1);
        let r = match r {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(Error::Closed) => break,
            Err(e) => {
                warn!("proctrace: receive failed: {e}");
                status = ExitCode::from(1);
                break;
            }
        };
        if let Err(e) = t.print(r, &mut out) {
            status = output_failed("the events", &e);
            output_closed = true;
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    // Events that reached the tracer before the stop (a signal, --duration) are printed
    // too: IGNORE first, so that only what is already queued is left, then all of it.
    if !output_closed {
        for r in listener.drain_queued(DRAIN_LIMIT) {
            if let Err(e) = t.print(r, &mut out) {
                status = output_failed("the events", &e);
                output_closed = true;
                break;
            }
        }
    }
    if !output_closed {
        if let Err(e) = out.flush() {
            status = output_failed("the events", &e);
        }
    }
    drop(out);
    let elapsed = started.elapsed();
    // Sends IGNORE and reads the queue empty, so the loss figure is final (and exact).
    let stats = listener.finish();
    drop(listener);
    // The summary line always goes to stderr; the tables only with --stats.
    let _ = io::stderr()
        .lock()
        .write_all(t.summary(&stats, elapsed, filtering).as_bytes());
    let sig = caught.load(Ordering::SeqCst);
    if sig != 0 {
        warn!("proctrace: stopped by signal {sig}");
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let mut s = String::new();
        // 2026-11-26T12:00:00.123456Z
        write_time(&mut s, 1_795_694_400_123_456_789, true);
        assert_eq!(s, "2026-11-26T12:00:00.123456Z");
        s.clear();
        write_time(&mut s, 1_795_694_400_123_456_789, false);
        assert_eq!(s, "12:00:00.123456");
        s.clear();
        write_time(&mut s, 0, true);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        write_time(&mut s, 1_795_694_400_000_001_000 + 86_399_000_000_000, true);
        assert_eq!(s, "2026-11-27T11:59:59.000001Z");
        s.clear();
        write_time(&mut s, -1_000, true);
        assert_eq!(s, "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn json_lines_escape_names_and_keep_field_order() {
        let mut line = String::new();
        let detail = Detail {
            status: Some(0x300),
            exit_code: Some(Some(3)),
            signal: Some(None),
            ..Detail::default()
        };
        let record = JsonEvent {
            time: "t",
            timestamp_ns: 1,
            cpu: 0,
            seq: 2,
            event: "exit",
            pid: 7,
            tid: 7,
            detail,
            name: Some("a\"b\\c\nd\u{1}é"),
            process: None,
        };
        write_json(&mut line, &record);
        let mut direct = String::new();
        record.write(&mut direct);
        assert_eq!(direct, line);
        assert_eq!(
            line,
            r#"{"time":"t","timestamp_ns":1,"cpu":0,"seq":2,"event":"exit","pid":7,"tid":7,"status":768,"exit_code":3,"signal":null,"name":"a\"b\\c\nd\u0001é"}"#
        );
    }

    #[test]
    fn direct_json_equals_serde_json() {
        let mut info = ProcessInfo::unknown();
        info.process_key = Some(
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654"
                .parse()
                .unwrap(),
        );
        info.cgroup = Some("/a\"b\\c\u{7f}\u{8}\u{c}\r\t/é".into());
        info.container_id = Some("0123".into());
        info.ns_pid = Some(1);
        info.pidns = Some(u64::MAX);
        info.cmdline = Some("sh -c 'x\ny'\u{1f}".into());
        info.cmdline_source = Source::Comm;
        let full = Detail {
            err: Some(1),
            ruid: Some(2),
            euid: Some(3),
            rgid: Some(4),
            egid: Some(5),
            sid: Some(6),
            attach: Some(true),
            tracer_pid: Some(7),
            tracer_tid: Some(8),
            old_name: Some("o\"ld".into()),
            comm: Some("new".into()),
            status: Some(u32::MAX),
            exit_code: Some(None),
            signal: Some(Some(9)),
            core_dumped: Some(false),
            exit_signal: Some(-1),
            parent_pid: Some(10),
            parent_tid: Some(11),
            duration_s: Some(0.203001),
        };
        for (detail, process, name) in [
            (full, Some(&info), Some("n\u{0}")),
            (Detail::default(), None, None),
            (
                Detail {
                    attach: Some(false),
                    duration_s: Some(1e-7),
                    exit_code: Some(Some(0)),
                    ..Detail::default()
                },
                Some(&ProcessInfo::unknown()),
                Some(""),
            ),
        ] {
            let record = JsonEvent {
                time: "2026-11-26T12:00:00.123456Z",
                timestamp_ns: u64::MAX,
                cpu: u32::MAX,
                seq: 0,
                event: "exit",
                pid: 1,
                tid: 2,
                detail,
                name,
                process,
            };
            let mut serde = String::new();
            write_json(&mut serde, &record);
            let mut direct = String::from("leftover");
            record.write(&mut direct);
            assert_eq!(direct, serde);
        }
    }

    #[test]
    fn cache_is_bounded_and_keeps_recent_entries() {
        let mut c = Cache::new(4);
        let info = |n: &str| ProcInfo {
            name: n.into(),
            start_ns: None,
            fresh: true,
        };
        for pid in 0..100 {
            c.insert(pid, info("x"));
            assert!(c.young.len() + c.old.len() <= 4);
        }
        assert!(c.get(99).is_some());
        assert!(c.get(0).is_none());
        c.insert(7, info("seven"));
        c.insert(8, info("eight"));
        c.insert(9, info("nine"));
        // 7 moved to the old generation but a hit promotes it.
        assert_eq!(&*c.get(7).unwrap().name, "seven");
        assert!(c.remove(7).is_some());
        assert!(c.get(7).is_none());
    }

    #[test]
    fn program_names() {
        assert_eq!(program("/usr/bin/sleep 1"), "sleep");
        assert_eq!(program("bash"), "bash");
        assert_eq!(program("[kworker/0:1]"), "[kworker/0:1]");
        assert_eq!(program("<unknown>"), "<unknown>");
    }

    fn parse(args: &[&str]) -> Result<Cli, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn hostile_arguments_are_usage_errors() {
        for args in [
            &["--duration", "1e19"][..],
            &["--duration", "1e30"],
            &["--duration", "-1"],
            &["--duration", "NaN"],
            &["--duration", "inf"],
            &["--duration", ""],
            &["--duration"],
            &["-d", "1000000001"],
            &["--buffer", "0"],
            &["--buffer", "2G"],
            &["--buffer", "-5"],
            &["--buffer", "99999999999999999999"],
            &["--buffer", "18446744073709551615K"],
            &["--json=yes"],
            &["--stats=1"],
            &["--bogus"],
            &[""],
            &["-jx"],
            &["-e"],
            &["--events="],
            &["--events", "forks"],
            &["--container"],
            &["--container", ""],
            &["--container", "xyz"],
            &["--container", &"a".repeat(65)],
            &["--cgroup", "system.slice"],
            &["--cgroup="],
            &["--cgroup", "/a\nb"],
            &["--host-only=1"],
            &["--containers-only=yes"],
            &["--host-only", "--containers-only"],
            &["--host-only", "--container", "ab"],
            &["--enrich"],
            &["--enrich", "some"],
            &["--enrich", "off", "--containers-only"],
            &["--enrich=off", "--cgroup", "/"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff]);
        assert!(parse_args([bad.clone()]).is_err());
        assert!(parse_args([OsString::from("-d"), bad]).is_err());
    }

    #[test]
    fn good_arguments_parse() {
        let Ok(Cli::Run(a)) = parse(&["-j", "--duration=1e9", "-b", "1G", "-e", "exit"]) else {
            panic!("rejected");
        };
        assert!(a.json);
        assert_eq!(a.duration, Some(Duration::from_secs(1_000_000_000)));
        assert_eq!(a.buffer, 1 << 30);
        assert!(matches!(parse(&["--stats", "-h"]), Ok(Cli::Help)));
        let Ok(Cli::Run(a)) = parse(&["--container=ABC0", "--cgroup", "/system.slice/"]) else {
            panic!("rejected");
        };
        assert_eq!(a.enrich, Enrich::Full);
        assert_eq!(a.filter.container.as_deref(), Some("abc0"));
        assert_eq!(a.filter.cgroup.as_deref(), Some("/system.slice/"));
        let Ok(Cli::Run(a)) = parse(&["--enrich", "lazy", "--host-only"]) else {
            panic!("rejected");
        };
        assert_eq!(a.enrich, Enrich::Lazy);
        assert!(a.filter.host_only);
        let Ok(Cli::Run(a)) = parse(&["--enrich=off"]) else {
            panic!("rejected");
        };
        assert_eq!(a.enrich, Enrich::Off);
    }

    #[test]
    fn filters_apply_to_the_enriched_process() {
        let mut host = ProcessInfo::unknown();
        host.cgroup = Some("/user.slice/session-1.scope".into());
        let mut ctr = host.clone();
        let id = "0123456789abcdef".repeat(4);
        ctr.cgroup = Some(format!("/system.slice/docker-{id}.scope").into());
        ctr.container_id = Some(id.as_str().into());
        let f = |filter: Filter, i: Option<&ProcessInfo>| filter.matches(i);
        assert!(f(Filter::default(), None));
        assert!(f(Filter::default(), Some(&host)));
        let host_only = Filter {
            host_only: true,
            ..Filter::default()
        };
        assert!(f(host_only.clone(), Some(&host)));
        assert!(!f(host_only.clone(), Some(&ctr)));
        assert!(!f(host_only, None));
        let containers = Filter {
            containers_only: true,
            ..Filter::default()
        };
        assert!(!f(containers.clone(), Some(&host)));
        assert!(f(containers, Some(&ctr)));
        let by_id = |p: &str| Filter {
            container: Some(p.into()),
            ..Filter::default()
        };
        assert!(f(by_id("0123"), Some(&ctr)));
        assert!(f(by_id(&id), Some(&ctr)));
        assert!(!f(by_id("1234"), Some(&ctr)));
        assert!(!f(by_id("0123"), Some(&host)));
        let by_cg = |p: &str| Filter {
            cgroup: Some(p.into()),
            ..Filter::default()
        };
        assert!(f(by_cg("/user.slice"), Some(&host)));
        assert!(!f(by_cg("/user.slice"), Some(&ctr)));
        assert!(f(by_cg("/"), Some(&ctr)));
        assert!(!f(by_cg("/"), Some(&ProcessInfo::unknown())));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
