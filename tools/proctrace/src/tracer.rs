//! The tracer: turns each received item (an event or a loss) into one output line, text
//! or JSON, naming processes with the enricher's attribution or from `/proc`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use cnbus::proc::{
    Enricher, EventBody, EventKind, InfoSource, Loss, ProcEvent, ProcessInfo, Received,
};
use cnbus_cli::clock::{push_time_of_day, Clocks};
use cnbus_cli::event::{EventLine, LostLine};
use cnbus_cli::json;
use cnbus_cli::procfs::{read_name, read_stat, Stat};

use crate::cache::{Cache, ProcInfo};
use crate::cli::Filter;
use crate::records::ProctraceFields;

pub const UNKNOWN: &str = "<unknown>";
/// A burst of at least this many events makes the tracer pause before its next wait...
pub const COALESCE_AFTER: u32 = 4;
/// ...for this long, so that the next wake-up finds several events queued. The 16 MiB
/// receive queue holds tens of thousands of events: far more than arrive in this time.
pub const COALESCE_DELAY: Duration = Duration::from_micros(500);
/// During a burst the output is written once this much is buffered (about 70 JSON lines)
/// rather than at every wake-up. A burst goes on only while each sleep brings
/// COALESCE_AFTER events or more (70 lines then come within about 9 ms); when it ends,
/// everything is flushed before blocking.
pub const FLUSH_IN_BURST: usize = 32 << 10;
/// At most this many queued items are printed after the stop: far more than a 16 MiB
/// receive queue holds, so it only bounds a flood of user-space datagrams on group 1.
pub const DRAIN_LIMIT: usize = 1 << 20;
pub const MAX_STAT_NAMES: usize = 4096;
/// The `--stats` table's key (and row) for the kernel's ACKs: no program name can be it,
/// since [`program`] cuts a name at its first space.
pub const ACK_ROW: &str = "(kernel ack)";
/// The `--stats` table's row for the processes whose program name is empty (an empty
/// `argv[0]`, one ending in `/`, an empty comm); no program name can be it either.
pub const NO_NAME_ROW: &str = "(no name)";

/// Where the tracer reads what it shows of a process by itself (names, start times):
/// `/proc`, unless that belongs to another pid namespace, where the events' pids (the
/// initial namespace's) name other processes: then nothing is read.
#[derive(Debug, Clone, Copy)]
pub struct Procfs {
    pub usable: bool,
}

impl Procfs {
    fn name(self, pid: u32) -> Option<Arc<str>> {
        self.usable.then(|| read_name(pid)).flatten()
    }

    fn stat(self, pid: u32) -> Option<Stat> {
        self.usable.then(|| read_stat(pid)).flatten()
    }
}

pub struct Tracer {
    pub json: bool,
    pub stats: bool,
    pub filter: Filter,
    /// Exec events are traced, so names inherited at fork get refreshed by them.
    pub exec_traced: bool,
    pub cache: Cache,
    pub clocks: Clocks,
    /// The line being formatted (reused).
    pub line: Vec<u8>,
    /// Per process name: counts per event kind (indexed like `EventKind::ALL`).
    pub counts: HashMap<Arc<str>, [u64; 10]>,
    pub other_counts: [u64; 10],
    pub lost_reports: u64,
    /// Process attribution (`None` with `--enrich off`).
    pub enricher: Option<Enricher>,
    /// A process in a container was shown: the text output has the container column.
    pub containers_seen: bool,
    pub procfs: Procfs,
}

/// Appends `record`'s JSON line to `line`. The tracer's records (strings, numbers,
/// options) always serialise; should one ever not, that is said on stderr rather than
/// written as a line that is not JSON.
fn push_json(line: &mut Vec<u8>, record: &impl serde::Serialize) {
    if let Err(e) = json::push_line(line, record) {
        cnbus_cli::warn!("proctrace: an event line could not be serialised: {e}");
    }
}

/// The name shown for a process the enricher described: its command line, `[comm]` when
/// only the task name was left, `<unknown>` when it was gone (or unreadable).
fn enriched_name(info: &ProcessInfo) -> Arc<str> {
    match (&info.cmdline, info.cmdline_source) {
        (Some(c), InfoSource::Comm) => format!("[{c}]").into(),
        (Some(c), _) => c.clone(),
        (None, _) => UNKNOWN.into(),
    }
}

impl Tracer {
    /// The enricher's name for the process when enriching, else [`Self::name_of`].
    pub fn name_or(&mut self, known: &Option<Arc<str>>, tgid: u32) -> Arc<str> {
        match known {
            Some(n) => n.clone(),
            None => self.name_of(tgid),
        }
    }

    pub fn name_of(&mut self, tgid: u32) -> Arc<str> {
        if let Some(i) = self.cache.get(tgid) {
            if !i.fresh {
                i.fresh = true;
                if let Some(n) = self.procfs.name(tgid) {
                    i.name = n;
                }
            }
            return i.name.clone();
        }
        match self.procfs.name(tgid) {
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
    pub fn count(&mut self, name: &str, kind: EventKind) {
        let k = EventKind::ALL.iter().position(|x| *x == kind).unwrap_or(0);
        let prog = if kind == EventKind::Ack {
            ACK_ROW
        } else {
            program(name)
        };
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
    pub fn event(&mut self, ev: &ProcEvent) {
        let json = self.json;
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
        // The JSON line's own fields (the shared schema takes the rest from the event).
        let mut old_name: Option<Option<String>> = None;
        let mut duration_ns: Option<u64> = None;
        let mut kind_name = ev.kind().name();
        let subject = ev.task().unwrap_or_default();
        let name: Arc<str>;
        match ev.body {
            EventBody::Ack { err } => {
                name = "".into();
                info!("ack err {err}");
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
            }
            EventBody::Exec { process } => {
                let n = match &known {
                    Some(n) => n.clone(),
                    None => self
                        .procfs
                        .name(process.tgid)
                        .unwrap_or_else(|| self.name_of(process.tgid)),
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
            }
            EventBody::Gid {
                process: _,
                rgid,
                egid,
            } => {
                name = self.name_or(&known, subject.tgid);
                info!("gid {rgid} egid {egid}");
            }
            EventBody::Sid { process } => {
                name = self.name_or(&known, subject.tgid);
                info!("sid {}", process.tgid);
            }
            EventBody::Ptrace { process: _, tracer } => {
                name = self.name_or(&known, subject.tgid);
                match tracer {
                    Some(t) => {
                        info!("attach by {}", t.tgid);
                    }
                    None => {
                        info!("detach");
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
                    old_name = Some((&*old != UNKNOWN).then(|| old.to_string()));
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
                }
            }
            EventBody::Exit {
                process, status, ..
            } => {
                if process.is_thread() {
                    name = self.name_or(&known, process.tgid);
                    info!("thread {} ", process.pid);
                } else {
                    let cached = self.cache.remove(process.tgid);
                    let start = cached.as_ref().and_then(|i| i.start_ns).or_else(|| {
                        match &pinfo {
                            // The start time is in the key: no read.
                            Some(p) => p
                                .process_key
                                .map(|k| self.clocks.boot_ns_of_ticks(k.start_ticks)),
                            None => self
                                .procfs
                                .stat(process.tgid)
                                .map(|s| self.clocks.boot_ns_of_ticks(s.start_ticks)),
                        }
                    });
                    duration_ns = start.map(|s| ev.timestamp_ns.saturating_sub(s));
                    name = match cached {
                        _ if known.is_some() => known.clone().unwrap_or_else(|| UNKNOWN.into()),
                        Some(i) if i.fresh && self.exec_traced => i.name,
                        // Without exec events any cached name may be stale: use what /proc
                        // still says (at exit the command line is gone but the comm is not,
                        // shown as [comm] like ps does), else the cached name.
                        Some(i) => self.procfs.name(process.tgid).unwrap_or(i.name),
                        None => self
                            .procfs
                            .name(process.tgid)
                            .unwrap_or_else(|| UNKNOWN.into()),
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
            }
        }
        self.line.clear();
        if !self.filter.matches(pinfo.as_ref()) {
            return;
        }
        self.count(&name, ev.kind());
        let wall = self.clocks.wall_of_event(ev.timestamp_ns);
        let cid = pinfo.as_ref().and_then(|p| p.container_id.as_deref());
        let line = &mut self.line;
        if !json && cid.is_some() && !self.containers_seen {
            // From now on the text lines have a container column, under a new header.
            self.containers_seen = true;
            push_header(line, true);
            line.push(b'\n');
        }
        if json {
            let extra = ProctraceFields {
                name: (&*name != UNKNOWN).then_some(&*name),
                old_name,
            };
            let mut record = EventLine::new(ev, wall, extra, pinfo.as_ref());
            record.data.duration(duration_ns);
            push_json(line, &record);
        } else {
            push_time_of_day(line, wall);
            let dur = match duration_ns {
                Some(ns) => format!("{:.3}s", ns as f64 / 1e9),
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
            line.extend_from_slice(printable(&name).as_bytes());
            line.push(b'\n');
        }
    }

    /// Formats `r` and writes its line to `out` (nothing when the filters drop it).
    pub fn print(&mut self, r: Received, out: &mut impl Write) -> io::Result<()> {
        match r {
            Received::Event(ev) => self.event(&ev),
            Received::Lost(loss) => self.lost(loss),
        }
        out.write_all(&self.line)
    }

    pub fn lost(&mut self, loss: Loss) {
        self.lost_reports += 1;
        // An exit may be among the lost, and the fork of the next process given the same
        // pid: the enricher re-checks its cached processes before reuse, and the tracer's
        // own names and start times are forgotten (read again from /proc where needed).
        if let Some(e) = self.enricher.as_mut() {
            e.note_loss();
        }
        self.cache.clear();
        let wall = self.clocks.now();
        let line = &mut self.line;
        line.clear();
        if self.json {
            push_json(line, &LostLine::new(loss, wall));
            return;
        }
        push_time_of_day(line, wall);
        let _ = match loss {
            Loss::Overrun => writeln!(
                line,
                " lost           - receive queue overflowed (ENOBUFS); events dropped"
            ),
            Loss::Gap { cpu, count } => {
                writeln!(line, " lost           - {count} events of cpu {cpu}")
            }
        };
    }
}

/// `s` with control characters (a newline in an argument, say) and the Unicode characters
/// that reorder text on a terminal (bidirectional embeddings, overrides and isolates: a
/// command line with U+202E reads backwards and can make the rest of the line, or a pid,
/// look like something else) shown as `?`, so that one event stays one line of text that
/// reads as it is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    fn hidden(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if s.chars().any(hidden) {
        s.chars()
            .map(|c| if hidden(c) { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// The program name of a command line: the base name of its first word (`[comm]` and
/// `<unknown>` stay as they are).
pub fn program(name: &str) -> &str {
    if name.starts_with('[') || name.starts_with('<') {
        return name;
    }
    let first = name.split(' ').next().unwrap_or(name);
    first.rsplit('/').next().unwrap_or(first)
}

/// The text output's column header (without the newline).
pub fn push_header(out: &mut impl Write, container: bool) {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cnbus::proc::{ExitStatus, Task};

    /// Regression: a command line with a right-to-left override (U+202E) or an isolate
    /// reached the text output as it was, and a terminal showed the rest of the line
    /// reversed ("Trojan Source" style): now shown as `?`, as control characters are.
    #[test]
    fn bidirectional_controls_are_shown_as_question_marks() {
        assert_eq!(printable("ls \u{202e}txt.exe"), "ls ?txt.exe");
        assert_eq!(
            printable("a\u{2066}b\u{2069}c\u{200f}d\u{061c}e\nf"),
            "a?b?c?d?e?f"
        );
        // Other non-ASCII text stays as it is.
        assert_eq!(printable("café 日本 \u{1f600}"), "café 日本 \u{1f600}");
    }

    /// A tracer of JSON lines without enrichment (the summary's tests use it too).
    pub(crate) fn tracer() -> Tracer {
        Tracer {
            json: true,
            stats: false,
            filter: Filter::default(),
            exec_traced: true,
            cache: Cache::new(8192),
            clocks: Clocks::new(),
            line: Vec::new(),
            counts: HashMap::new(),
            other_counts: [0; 10],
            lost_reports: 0,
            enricher: None,
            containers_seen: false,
            procfs: Procfs { usable: true },
        }
    }

    fn event(timestamp_ns: u64, body: EventBody) -> ProcEvent {
        ProcEvent {
            timestamp_ns,
            ..crate::records::tests::ev(body)
        }
    }

    /// The JSON line of `r`, parsed.
    fn line(t: &mut Tracer, r: Received) -> serde_json::Value {
        let mut out = Vec::new();
        t.print(r, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    /// Regression: a comm event of a process whose name was unknown said
    /// `"old_name": "<unknown>"` (the text output's placeholder), where every unknown name
    /// in a JSON line is `null`.
    #[test]
    fn an_unknown_old_name_is_null() {
        let gone = 0x7fff_0000 | (std::process::id() & 0xffff);
        let body = EventBody::Comm {
            process: Task {
                pid: gone,
                tgid: gone,
            },
            comm: cnbus::proc::Comm::new(b"new"),
        };
        let v = line(&mut tracer(), Received::Event(event(1, body)));
        assert_eq!(v["name"], "new", "{v}");
        assert!(v["old_name"].is_null(), "{v}");
        assert!(v.as_object().unwrap().contains_key("old_name"), "{v}");
    }

    /// Regression: what the tracer remembered of a process (its name, and the time of its
    /// fork or exec for the exit's duration) outlived a loss. The lost events can be the
    /// process's exit and the fork of the next process given its pid (a fork storm while
    /// proctrace is stopped or descheduled cycles the pids), so that process's exit was
    /// shown with the name and the start time of the one before: a wrong `duration_ms`
    /// (here 4 s; the process really is unknown: its pid, above `pid_max`, is nobody's).
    #[test]
    fn nothing_remembered_before_a_loss_is_used_after_it() {
        let gone = 0x7fff_0000 | (std::process::id() & 0xffff);
        let me = std::process::id();
        let fork = EventBody::Fork {
            parent: Task { pid: me, tgid: me },
            child: Task {
                pid: gone,
                tgid: gone,
            },
        };
        let exit = EventBody::Exit {
            process: Task {
                pid: gone,
                tgid: gone,
            },
            status: ExitStatus(0),
            exit_signal: 17,
            parent: None,
        };
        // Without a loss, the fork's time and name are the exit's.
        let mut t = tracer();
        line(&mut t, Received::Event(event(1_000_000_000, fork)));
        let v = line(&mut t, Received::Event(event(5_000_000_000, exit)));
        assert_eq!(v["duration_ms"].as_f64(), Some(4000.0), "{v}");
        assert!(v["name"].is_string(), "{v}");
        // With a loss in between, neither: the exit may be another process's.
        for loss in [
            Loss::Gap {
                cpu: 0,
                count: 40_000,
            },
            Loss::Overrun,
        ] {
            let mut t = tracer();
            line(&mut t, Received::Event(event(1_000_000_000, fork)));
            line(&mut t, Received::Lost(loss));
            let v = line(&mut t, Received::Event(event(5_000_000_000, exit)));
            assert!(v["duration_ms"].is_null(), "{loss:?}: {v}");
            assert!(v["name"].is_null(), "{loss:?}: {v}");
        }
    }
}
