//! `proctrace`: a process tracer on the proc connector, in the spirit of `forkstat`.
//!
//! One line per event (time, event, pid, info, duration on exit, process name or command
//! line), or one JSON object per line with `--json`. Event types are chosen with `--events`
//! and filtered in the kernel where it can (Linux 6.6+). Lost events are reported in the
//! stream and counted (exactly, from the socket's kernel drop counter, in every filter mode);
//! `--stats` prints per-process counts and loss totals at the end. SIGINT / SIGTERM / SIGHUP
//! end it cleanly, with the summary.
//!
//! Run `proctrace --help` for the options and output fields; `docs/PROC.md` has the design
//! notes. The files: `cli` (options), `tracer` (one line per item), `records` (JSON
//! lines), `cache` (names by pid), `summary` (the end-of-run report), this one (the loop).

mod cache;
mod cli;
mod records;
mod summary;
mod tracer;

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use cnbus::proc::{EnrichConfig, Enricher, EventSet, ProcListener};
use cnbus::Error;
use cnbus_cli::clock::Clocks;
use cnbus_cli::output::{Patient, Terminals};
use cnbus_cli::warn;

use cache::Cache;
use cli::{Cli, Enrich};
use tracer::{
    push_header, Procfs, Tracer, COALESCE_AFTER, COALESCE_DELAY, DRAIN_LIMIT, FLUSH_IN_BURST,
};

/// After a stop (a signal, the end of `--duration`), the longest one `write` of the events
/// or of the summary may block before proctrace gives up on its output (a reader that holds
/// the pipe but stopped reading: `proctrace | less` left alone, a stalled pipeline) and
/// exits with status 1 and a message, rather than never.
const STALLED_OUTPUT: Duration = Duration::from_secs(2);

/// How long the watchdog waits for its own message to be written before it exits anyway:
/// stderr can be stalled as well (`proctrace 2>&1 | less`: the same pipe as the events).
const MESSAGE_WAIT: Duration = Duration::from_secs(1);

/// Why nothing is read from `/proc` in another pid namespace's `/proc`.
const FOREIGN_PROC: &str = "/proc here belongs to another pid namespace, in which the \
     events' pids (the initial namespace's) are other processes or none";

/// Where the run is, for the watchdog of [`STALLED_OUTPUT`].
const RUNNING: u8 = 0;
/// The loop has ended: the rest of the events are being written.
const ENDING: u8 = 1;
/// The summary is being written to stderr.
const SUMMARY: u8 = 2;
/// Everything written (or given up): nothing left to watch.
const DONE: u8 = 3;

/// Stdout or stderr, noting when a `write` to it began (for the watchdog of
/// [`STALLED_OUTPUT`]); a non-blocking one is waited for ([`Patient`]), and that wait is
/// watched too.
struct Watched<W> {
    inner: Patient<W>,
    /// Milliseconds since `base` at which the current `write` began, plus 1; 0 when none
    /// is in progress.
    writing_since: Arc<AtomicU64>,
    base: Instant,
}

fn millis_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

impl<W: Write + AsFd> Watched<W> {
    /// Runs `op` (a write or a flush) noting when it began.
    fn watched<T>(&mut self, op: impl FnOnce(&mut Patient<W>) -> io::Result<T>) -> io::Result<T> {
        self.writing_since
            .store(millis_since(self.base), Ordering::SeqCst);
        let r = op(&mut self.inner);
        self.writing_since.store(0, Ordering::SeqCst);
        r
    }
}

impl<W: Write + AsFd> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watched(|w| w.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.watched(|w| w.flush())
    }
}

/// Once the run is to stop (a signal in `caught`, the `deadline`, or the loop's end in
/// `stage`): exits the process (status 1, a message) if a `write` of the events or of the
/// summary blocks for [`STALLED_OUTPUT`] (counted from the stop at the earliest) before
/// `stage` is [`DONE`]. The main thread cannot be interrupted in a blocking `write`, and a
/// reader that never reads again would otherwise keep proctrace alive forever after
/// SIGTERM or `--duration`. (Time spent without writing, in the final drain of a queue
/// whose events the filters drop, is not a stall.) The message itself is given at most
/// [`MESSAGE_WAIT`]: stderr may be the stalled pipe.
fn watch_the_output(
    caught: &AtomicI32,
    deadline: Option<Instant>,
    writing_since: &AtomicU64,
    base: Instant,
    stage: &AtomicU8,
) {
    const TICK: Duration = Duration::from_millis(50);
    while caught.load(Ordering::SeqCst) == 0
        && deadline.is_none_or(|d| Instant::now() < d)
        && stage.load(Ordering::SeqCst) == RUNNING
    {
        std::thread::sleep(TICK);
    }
    let stopped_at = millis_since(base);
    let grace = u64::try_from(STALLED_OUTPUT.as_millis()).unwrap_or(u64::MAX);
    while stage.load(Ordering::SeqCst) != DONE {
        std::thread::sleep(TICK);
        let since = writing_since.load(Ordering::SeqCst);
        let blocked = since != 0 && millis_since(base) - since.max(stopped_at) >= grace;
        let at = stage.load(Ordering::SeqCst);
        if blocked && at != DONE {
            let why = match caught.load(Ordering::SeqCst) {
                0 if deadline.is_some_and(|d| Instant::now() >= d) => {
                    "at the end of --duration".to_string()
                }
                0 => "at the end of the run".to_string(),
                sig => format!("stopped by signal {sig}"),
            };
            let (what, without) = if at == SUMMARY {
                ("stderr", "the rest of the summary")
            } else {
                (
                    "the output",
                    "the rest of the events and without the summary",
                )
            };
            let message = format!(
                "proctrace: {why}, but {what} accepted nothing for {} s (its reader is not \
                 reading): exiting without {without}",
                STALLED_OUTPUT.as_secs()
            );
            let (said, written) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                warn!("{message}");
                let _ = said.send(());
            });
            let _ = written.recv_timeout(MESSAGE_WAIT);
            std::process::exit(1);
        }
    }
}

/// The exit status after a failed write to stdout: a closed pipe (`proctrace | head`) ends
/// the run quietly and successfully, and so does a terminal that hung up (a closed terminal
/// window or a dropped ssh session fails every write with EIO, and SIGHUP comes with it or
/// soon after): the reader is gone either way. Any other error (a full disk) is reported
/// and is a failure.
fn output_failed(e: &io::Error, terminals: &Terminals) -> ExitCode {
    cnbus_cli::output::stdout_write_failed("proctrace", "the events to stdout", e, terminals)
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
    let cli = Cli::parse_checked();
    if let Some(g) = &cli.generate {
        return g.run("proctrace", Cli::command());
    }
    let args = cli.args;
    // Block the termination signals before any thread exists, so only the waiter gets them.
    let signals = match cnbus_cli::output::block_term_signals("proctrace") {
        Ok(s) => s,
        Err(status) => return status,
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
    // Names and attribution are read from /proc by the events' pids, the initial pid
    // namespace's: another namespace's /proc would describe other processes under them.
    let procfs = Procfs {
        usable: cnbus::sys::proc_is_initial_pid_ns() != Some(false),
    };
    if !procfs.usable {
        if !args.filter().is_empty() {
            warn!("proctrace: {FOREIGN_PROC}: --container, --cgroup, --host-only and --containers-only cannot be applied");
            return ExitCode::from(1);
        }
        warn!("proctrace: warning: {FOREIGN_PROC}: no process names or attribution are shown");
    }
    let caught = Arc::new(AtomicI32::new(0));
    let writing_since = Arc::new(AtomicU64::new(0));
    let stage = Arc::new(AtomicU8::new(RUNNING));
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
        json: args.json,
        stats: args.stats,
        filter: args.filter(),
        exec_traced: args.events.contains(EventSet::EXEC),
        cache: Cache::new(8192),
        clocks: Clocks::new(),
        line: Vec::with_capacity(512),
        counts: HashMap::new(),
        other_counts: [0; 10],
        lost_reports: 0,
        enricher: match args.enrich {
            _ if !procfs.usable => None,
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
        procfs,
    };
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    {
        let (caught, since, stage) = (caught.clone(), writing_since.clone(), stage.clone());
        std::thread::spawn(move || watch_the_output(&caught, deadline, &since, started, &stage));
    }
    let terminal = Terminals::at_start();
    let stdout = Watched {
        inner: Patient(io::stdout().lock()),
        writing_since: writing_since.clone(),
        base: started,
    };
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    if !t.json {
        push_header(&mut out, false);
        let _ = writeln!(out);
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
                    status = output_failed(&e, &terminal);
                    output_closed = true;
                    break;
                }
                t.clocks.sync();
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
            status = output_failed(&e, &terminal);
            output_closed = true;
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    stage.store(ENDING, Ordering::SeqCst);
    // Events that reached the tracer before the stop (a signal, --duration) are printed
    // too: IGNORE first, so that only what is already queued is left, then all of it.
    if !output_closed {
        for r in listener.drain_queued(DRAIN_LIMIT) {
            if let Err(e) = t.print(r, &mut out) {
                status = output_failed(&e, &terminal);
                output_closed = true;
                break;
            }
        }
    }
    if !output_closed {
        if let Err(e) = out.flush() {
            status = output_failed(&e, &terminal);
        }
    }
    drop(out);
    let elapsed = started.elapsed();
    // Sends IGNORE and reads the queue empty, so the loss figure is final (and exact).
    let stats = listener.finish();
    drop(listener);
    // The summary line always goes to stderr; the tables only with --stats. Watched as
    // the events were: a stderr that accepts nothing ends the run too.
    stage.store(SUMMARY, Ordering::SeqCst);
    {
        let mut err = Watched {
            inner: Patient(io::stderr().lock()),
            writing_since,
            base: started,
        };
        let _ = err.write_all(t.summary(&stats, elapsed, filtering).as_bytes());
        let sig = caught.load(Ordering::SeqCst);
        if sig != 0 {
            let _ = writeln!(err, "proctrace: stopped by signal {sig}");
        }
    }
    stage.store(DONE, Ordering::SeqCst);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{BorrowedFd, OwnedFd};

    /// A writer like a non-blocking stdout's `LineWriter` after a short write: it holds
    /// bytes, and its `flush` fails with `EAGAIN` while the pipe is full (here: the first
    /// `busy` times), although the pipe (`fd`) accepts writes again.
    struct Holding {
        fd: OwnedFd,
        busy: u32,
    }

    impl Write for Holding {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            if self.busy > 0 {
                self.busy -= 1;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        }
    }

    impl AsFd for Holding {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
    }

    /// Regression: a non-blocking stdout was waited for in `write` only. Rust's stdout is a
    /// `LineWriter`, which keeps up to 1 KiB of lines after a short write to a non-blocking
    /// pipe and writes them at the next `flush`: that `flush` met the full pipe, failed
    /// with `EAGAIN`, and ended the run with status 1 ("Resource temporarily
    /// unavailable"), as before the wait in `write`. Now `flush` waits as `write` does.
    #[test]
    fn a_flush_that_meets_a_full_non_blocking_pipe_waits() {
        let (_reader, writer) = std::io::pipe().unwrap();
        let mut w = Watched {
            inner: Patient(Holding {
                fd: writer.into(),
                busy: 3,
            }),
            writing_since: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
        };
        w.write_all(b"line\n").unwrap();
        w.flush().unwrap();
        assert_eq!(w.inner.0.busy, 0);
        assert_eq!(w.writing_since.load(Ordering::SeqCst), 0);
    }
}
