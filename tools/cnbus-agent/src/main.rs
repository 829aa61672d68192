//! `cnbus-agent`: a process-monitoring agent built on `cnbus::proc`, the way a real one
//! embeds the library.
//!
//! It keeps a table of live processes from proc events (keyed by the enricher's
//! `process_key`, with a pid index), writes every event as a JSON line for a log shipper,
//! reports counters periodically, survives and reports lost events (a `/proc` resync
//! repairs the table), and stops cleanly. `cnbus-agent --help` documents every option and
//! output field; docs/AGENT.md has the rules, the guarantees and the systemd unit.
//!
//! How it uses cnbus: a [`ProcListener`] subscribed to every event (so that gaps are
//! counted exactly); the loop alternates [`ProcListener::try_recv`] (drain what is queued)
//! and [`ProcListener::recv_timeout`] (wait, at most 100 ms so that the signal flags and the
//! counters tick are checked); [`ProcListener::stats`] and [`ProcListener::finish`] give the
//! loss figures; an [`Enricher`](cnbus::proc::Enricher) attributes every event; and
//! [`TermSignals::block`](cnbus::sys::TermSignals::block) (through
//! `cnbus_cli::output::block_term_signals`) runs before any thread starts, with a thread
//! waiting for the signals.
//!
//! The files: `cli` (options and help), `table` (the table and the `/proc` scan), `events`
//! (events to table changes and lines), `records` (the JSON lines), `output` (event log and
//! snapshots), `nats` (the JetStream sink of `--nats`), this one (the loop).

mod cli;
mod events;
mod nats;
mod output;
mod records;
mod table;

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use cnbus::proc::{ProcListener, Received};
use cnbus_cli::output::Terminals;
use cnbus_cli::warn;
use nats::{Ship, Shipper};

use cli::{Cli, Command};
use output::{log_error, open_output, write_atomic};
use table::Agent;

/// Minimum time between two loss-triggered resyncs.
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// Longest wait in the main loop, so signals and ticks are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How long the final drain of queued events may take.
const DRAIN_FOR: Duration = Duration::from_secs(1);

type Log = BufWriter<Box<dyn Write + Send>>;

/// Writes one line to the event log and, once written, hands it to the NATS sink.
fn emit(
    out: &mut Log,
    shipper: &mut Option<Shipper>,
    line: &[u8],
    what: Ship<'_>,
) -> io::Result<()> {
    out.write_all(line)?;
    if let Some(s) = shipper {
        s.ship(line, what);
    }
    Ok(())
}

/// Writes a `dropped` line when the NATS sink dropped lines since the last one (`now`:
/// at most once a second; `None`: now).
fn report_drops(
    agent: &mut Agent,
    out: &mut Log,
    shipper: &mut Option<Shipper>,
    now: Option<Instant>,
) {
    if let Some((count, total)) = shipper.as_mut().and_then(|s| s.drops_due(now)) {
        agent.dropped_line(count, total);
        let _ = emit(out, shipper, &agent.line, Ship::Own("dropped"));
    }
}

fn main() -> ExitCode {
    let cli: Cli = cnbus_cli::output::parse_args("cnbus-agent");
    match &cli.command {
        Some(Command::Generate(g)) => return g.run("cnbus-agent", Cli::command()),
        Some(Command::RequeueDeadLetters { spool }) => return nats::requeue_dead_letters(spool),
        None => {}
    }
    let args = cli.args;
    // Before any thread exists: every thread inherits the blocked mask, so only the waiter
    // below receives SIGINT / SIGTERM / SIGHUP.
    let signals = match cnbus_cli::output::block_term_signals("cnbus-agent") {
        Ok(s) => s,
        Err(status) => return status,
    };
    // Subscribe first, then start the sink, then scan: the sink's start can wait for the
    // server (up to its connect timeout, 5 s), and whatever happens meanwhile and during the
    // scan is queued as events (or counted as lost if the socket's queue overflows).
    let mut listener = match ProcListener::builder().recv_buffer(args.buffer).open() {
        Ok(l) => l,
        Err(e) => {
            warn!("cnbus-agent: cannot subscribe to the proc connector: {e}");
            if matches!(e, cnbus::Error::PermissionDenied { .. }) {
                warn!("cnbus-agent: on this kernel the proc connector needs CAP_NET_ADMIN (root)");
            }
            return ExitCode::from(1);
        }
    };
    // A configuration the sink refuses ends the agent before it writes its log; the sink's
    // thread inherits the blocked signal mask.
    let mut shipper = match &args.nats.nats {
        None => None,
        Some(url) => {
            let boot = cnbus::proc::enrich::boot_id().unwrap_or(0);
            match Shipper::start(&args.nats, url, boot) {
                Ok(s) => {
                    if let Some(why) = s.unreachable() {
                        warn!(
                            "cnbus-agent: warning: NATS server {url} is not reachable at start \
                             ({why}): lines are spooled in {} and sent once it is",
                            s.spool.display()
                        );
                    }
                    Some(s)
                }
                Err(e) => {
                    warn!("cnbus-agent: --nats: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    let mut out = match open_output(args.output.as_deref()) {
        Ok(w) => BufWriter::with_capacity(1 << 16, w),
        Err(e) => {
            warn!("cnbus-agent: --output: {e}");
            return ExitCode::from(1);
        }
    };
    // SIGHUP reopens the log; the first SIGINT / SIGTERM stops the agent, a second one
    // stops its waiting for the NATS server (whatever is not sent stays in the spool). A
    // SIGHUP from the hang-up of the terminal the agent runs on (stdout or stderr was a
    // terminal at start and is none any more: a dropped ssh session) stops it too, as
    // SIGTERM would: nobody reads that terminal again, and the agent must not run on
    // unseen; it never counts as the second signal.
    let terminals = Terminals::at_start();
    let log_on_stdout = args.output.is_none().then_some(&terminals);
    let stop = Arc::new(AtomicBool::new(false));
    let reopen = Arc::new(AtomicBool::new(false));
    let aborted = Arc::new(AtomicBool::new(false));
    {
        let (stop, reopen, aborted) = (stop.clone(), reopen.clone(), aborted.clone());
        let abort = shipper.as_ref().map(Shipper::abort_handle);
        std::thread::spawn(move || loop {
            if signals.wait() == libc::SIGHUP {
                if terminals.hung_up() {
                    stop.store(true, Ordering::SeqCst);
                } else {
                    reopen.store(true, Ordering::SeqCst);
                }
            } else if stop.swap(true, Ordering::SeqCst) {
                aborted.store(true, Ordering::SeqCst);
                if let Some(a) = &abort {
                    a.abort();
                }
            }
        });
    }

    let mut agent = Agent::new(args.recent_exits);
    let started = Instant::now();
    let (added, removed) = agent.resync("start");
    agent.resync_line("start", added, removed);
    let _ = emit(&mut out, &mut shipper, &agent.line, Ship::Own("resync"));

    let deadline = args.duration.map(|d| started + d);
    let mut next_tick = started + args.interval;
    let mut last_total = 0u64;
    let mut last_tick = started;
    let mut burst = 0u32;
    let mut last_drops_look = started;
    let mut failed = false;
    // The event log cannot be written any more (its reader closed the pipe, or a write
    // failed): the agent stops.
    let mut log_closed = false;
    let handle = |agent: &mut Agent,
                  r: Received,
                  out: &mut Log,
                  shipper: &mut Option<Shipper>|
     -> io::Result<()> {
        match r {
            Received::Event(ev) => {
                agent.event(&ev);
                emit(out, shipper, &agent.line, Ship::Event(&ev))
            }
            Received::Lost(loss) => {
                agent.lost(loss);
                emit(out, shipper, &agent.line, Ship::Own("lost"))
            }
        }
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
        report_drops(&mut agent, &mut out, &mut shipper, Some(now));
        if now >= next_tick {
            let total: u64 = agent.n.by_kind.iter().sum();
            let rate = (total - last_total) as f64 / now.duration_since(last_tick).as_secs_f64();
            let nats = shipper.as_mut().map(|s| nats::counters(&s.stats(), None));
            let line = agent.stats_line(&listener.stats(), started, rate, false, nats);
            match &args.stats_file {
                Some(p) => {
                    if let Err(e) = write_atomic(p, &line) {
                        warn!("cnbus-agent: --stats-file: {e}");
                    }
                }
                None => {
                    cnbus_cli::output::to_stderr(&line);
                }
            }
            (last_total, last_tick) = (total, now);
            while next_tick <= now {
                next_tick += args.interval;
            }
        }
        if now.duration_since(last_drops_look) >= RESYNC_EVERY {
            last_drops_look = now;
            agent.note_drops(listener.stats().kernel_drops);
        }
        if agent.resync_pending
            && agent
                .last_resync
                .is_none_or(|t| t.elapsed() >= RESYNC_EVERY)
        {
            let (a, r) = agent.resync("loss");
            agent.resync_line("loss", a, r);
            let _ = emit(&mut out, &mut shipper, &agent.line, Ship::Own("resync"));
        }
        let r = match listener.try_recv() {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => {
                // Idle: flush the log (and hand its lines to the NATS sink) before waiting,
                // and re-read the clock offsets.
                if let Some(s) = &mut shipper {
                    s.flush();
                }
                if let Err(e) = out.flush() {
                    failed = log_error(&e, log_on_stdout);
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
                if let Err(e) = handle(&mut agent, r, &mut out, &mut shipper) {
                    // The log's reader is gone (a closed pipe: quietly) or the disk is
                    // full (loudly): stop.
                    failed = log_error(&e, log_on_stdout);
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
            if let Err(e) = handle(&mut agent, r, &mut out, &mut shipper) {
                failed = log_error(&e, log_on_stdout);
                log_closed = true;
                break;
            }
            if Instant::now() >= drain_until || aborted.load(Ordering::SeqCst) {
                // Events left unread may hold forks and exits: the table goes by /proc.
                agent.resync_pending = true;
                break;
            }
        }
    }
    // Drops no loss report told of (see `Agent::note_drops`), up to the stop.
    agent.note_drops(listener.stats().kernel_drops);
    if agent.resync_pending {
        let (a, r) = agent.resync("shutdown");
        agent.resync_line("shutdown", a, r);
        let _ = emit(&mut out, &mut shipper, &agent.line, Ship::Own("resync"));
    }
    // The drops so far in a last `dropped` line; the sink's shutdown below can still drop
    // (spool full), which only the final counters and a warning can then tell.
    if !log_closed {
        report_drops(&mut agent, &mut out, &mut shipper, None);
    }
    if !log_closed {
        if let Err(e) = out.flush() {
            failed |= log_error(&e, log_on_stdout);
        }
    }
    // Sends IGNORE and reads the queue empty: the final, settled loss figures.
    let stats = listener.finish();
    drop(listener);
    let nats = shipper.map(|mut s| {
        let deadline = args.nats.shutdown_deadline;
        let reported = s.reported_dropped();
        let spool = s.spool.clone();
        let left = s.left();
        if left > 0 && !deadline.is_zero() && !aborted.load(Ordering::SeqCst) {
            warn!(
                "cnbus-agent: sending the last {left} lines to NATS (at most {} s, \
                 --shutdown-deadline; a second SIGINT or SIGTERM stops waiting and keeps them \
                 in the spool)",
                deadline.as_secs_f64()
            );
        }
        let report = s.shutdown(deadline);
        if report.dropped > reported {
            warn!(
                "cnbus-agent: the NATS sink dropped {} lines after the last dropped line (spool full or failed, or lines the server or stream refuses)",
                report.dropped - reported
            );
        }
        if report.stats.maybe_stored > 0 {
            warn!(
                "cnbus-agent: {} lines refused for good by NATS after an unacknowledged publish may be in the stream (not counted as dropped; kept in the dead-letter file)",
                report.stats.maybe_stored
            );
        }
        if report.stats.dead_lettered > 0 {
            warn!(
                "cnbus-agent: {} lines refused for good by NATS (over the stream's size limit, a bad request) are kept in {}",
                report.stats.dead_lettered,
                spool.join(cnbus_nats::DEAD_LETTER_FILE).display()
            );
        }
        if report.unsent > 0 {
            let within = if aborted.load(Ordering::SeqCst) {
                "before the second signal"
            } else {
                "within --shutdown-deadline"
            };
            warn!(
                "cnbus-agent: {} lines not acknowledged by NATS {within} are kept in {} for the next start",
                report.unsent,
                spool.display()
            );
        }
        warn!(
            "cnbus-agent: NATS sink: sent {}, unsent {}, dropped {}",
            report.sent, report.unsent, report.dropped
        );
        nats::counters(&report.stats, Some(&report))
    });
    let total: u64 = agent.n.by_kind.iter().sum();
    let rate = (total - last_total) as f64 / last_tick.elapsed().as_secs_f64().max(1e-3);
    let line = agent.stats_line(&stats, started, rate, true, nats);
    if let Some(p) = &args.stats_file {
        let _ = write_atomic(p, &line);
    }
    cnbus_cli::output::to_stderr(&line);
    if let Some(p) = &args.dump_table {
        if let Err(e) = write_atomic(p, &agent.table_dump()) {
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
