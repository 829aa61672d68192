//! Writing to stderr without panicking, waiting on an output another process made
//! non-blocking, how a failed write of the output ends a tool, and the termination signals
//! every tool blocks at start.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `warn!("fmt", args)`: one line to stderr with [`to_stderr`] (a slow reader waited for,
/// a stopped one at most [`STDERR_WAIT`](crate::output::STDERR_WAIT); a failed write counted, never a panic: `eprintln!` panics when stderr is
/// closed or full, and then there is nowhere left to report anything).
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => {{
        $crate::output::to_stderr(::std::format!("{}\n", ::std::format_args!($($t)*)).as_bytes());
    }};
}

/// Lines [`to_stderr`] failed to write, for the tools' final report.
static STDERR_LOST: AtomicU64 = AtomicU64::new(0);
/// Where stderr is for [`to_stderr`].
static STDERR_STATE: Bounded = Bounded::new();

/// The longest [`to_stderr`] waits for stderr to take a line: a reader that holds the pipe
/// but reads nothing (stopped with SIGSTOP or `^Z`, a `2>&1 | less` left alone, a stalled
/// log shipper) must not stop the tool. A blocking `write(2)` cannot be interrupted, and the
/// agent writes its counters from the loop that reads the events: waiting for ever there
/// turned a log problem into a monitoring outage (no events read, and no stop on SIGTERM).
pub const STDERR_WAIT: Duration = Duration::from_secs(5);

/// Writes `text` (whole lines) to stderr, the one way both tools write their messages and
/// counters there. A slow reader, or a stderr another process made non-blocking, is waited
/// for, but at most [`STDERR_WAIT`]; after that the lines not written are lost, and later
/// lines are not waited for until stderr takes a write again (one wait per stall, not one
/// per line). A line left half written is ended by a newline before the next one. Lines
/// lost (a wait run out, `2> /dev/full`, a reader gone: `EPIPE`) stop nothing and are
/// counted ([`stderr_lines_lost`]), which the tools report (the agent's counters,
/// proctrace's summary).
pub fn to_stderr(text: &[u8]) {
    let lost = write_bounded(&mut io::stderr().lock(), text, STDERR_WAIT, &STDERR_STATE);
    STDERR_LOST.fetch_add(lost, Ordering::Relaxed);
}

/// The lines [`to_stderr`] (and [`warn!`]) could not write so far.
pub fn stderr_lines_lost() -> u64 {
    STDERR_LOST.load(Ordering::Relaxed)
}

/// What [`write_bounded`] keeps between calls on one output (changed only under the lock
/// of that output).
struct Bounded {
    /// The last wait ran out and nothing was written since: do not wait again.
    stuck: AtomicBool,
    /// The last line was written only in part: end it before the next.
    torn: AtomicBool,
}

impl Bounded {
    const fn new() -> Bounded {
        Bounded {
            stuck: AtomicBool::new(false),
            torn: AtomicBool::new(false),
        }
    }
}

/// Writes `text` to `w` in pieces of at most `PIPE_BUF` bytes, each once `w` takes a write
/// (so that a blocking pipe or socket never blocks the write itself), waiting at most
/// `wait` in all (nothing when `state` says the last wait ran out). Returns the lines of
/// `text` not written whole (a line cut short counts).
fn write_bounded<W: Write + AsFd>(w: &mut W, text: &[u8], wait: Duration, state: &Bounded) -> u64 {
    let stuck = state.stuck.load(Ordering::Relaxed);
    let end = Instant::now() + if stuck { Duration::ZERO } else { wait };
    let prefix: &[u8] = if state.torn.load(Ordering::Relaxed) {
        b"\n"
    } else {
        b""
    };
    let all = [prefix, text].concat();
    let mut done = 0;
    while done < all.len() {
        let left = end.saturating_duration_since(Instant::now());
        match cnbus::sys::poll_write_timeout(w, left) {
            Ok(true) => {}
            Ok(false) => {
                state.stuck.store(true, Ordering::Relaxed);
                break;
            }
            Err(_) => break,
        }
        let piece = &all[done..all.len().min(done + libc::PIPE_BUF)];
        match w.write(piece) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                state.stuck.store(false, Ordering::Relaxed);
                state.torn.store(all[done - 1] != b'\n', Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => break,
        }
    }
    let rest = &text[done.saturating_sub(prefix.len())..];
    let cut = !rest.is_empty() && !rest.ends_with(b"\n");
    (rest.iter().filter(|&&b| b == b'\n').count() + usize::from(cut)) as u64
}

/// A writer that waits for its descriptor when another process sharing it made it
/// non-blocking, as a blocking one would, instead of failing with `EAGAIN`.
///
/// `O_NONBLOCK` belongs to the open file, not to the process: a shell or a runtime such as
/// node that shares a tool's pipe or terminal may set it. A write (or a `flush`, where
/// Rust's stdout writes what it kept after a short write) that would block is retried once
/// [`cnbus::sys::poll_write`] says the descriptor takes more; an error or a hang-up that
/// the poll reports is what the next write then returns. A tool's own timeout on a stalled
/// reader applies as for a blocking output.
#[derive(Debug)]
pub struct Patient<W>(pub W);

impl<W: Write + AsFd> Patient<W> {
    fn retry<T>(&mut self, mut op: impl FnMut(&mut W) -> io::Result<T>) -> io::Result<T> {
        loop {
            match op(&mut self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    cnbus::sys::poll_write(&self.0).map_err(io::Error::other)?;
                }
                r => return r,
            }
        }
    }
}

impl<W: Write + AsFd> Write for Patient<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(|w| w.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.retry(|w| w.flush())
    }
}

impl<W: AsFd> AsFd for Patient<W> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// True when the failed write `e` says that the output's reader is gone: a closed pipe
/// (`tool | head`), or, when the output is stdout (`stdout`: what it was at start), a
/// terminal that hung up ([`Terminals::stdout_hung_up`]). A tool then ends quietly and
/// successfully, as on SIGHUP.
pub fn reader_gone(e: &io::Error, stdout: Option<&Terminals>) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe || stdout.is_some_and(|t| t.stdout_hung_up(e))
}

/// The exit status after a failed write of `what` by `program`: a closed pipe (`tool |
/// head`) ends the run quietly and successfully; any other error (a full disk) is reported
/// on stderr and is a failure (status 1).
pub fn write_failed(program: &str, what: &str, e: &io::Error) -> ExitCode {
    if reader_gone(e, None) {
        return ExitCode::SUCCESS;
    }
    warn!("{program}: writing {what}: {e}");
    ExitCode::from(1)
}

/// Whether stdout and stderr were terminals when the tool started, to tell a terminal that
/// hung up (a closed terminal window, a dropped ssh session) from other failures. When a
/// terminal hangs up, the kernel first makes every operation on it fail with EIO (so it is
/// no terminal any more for `isatty`), then sends SIGHUP: the reader is gone, and a tool
/// stops as on SIGHUP, quietly and with status 0, rather than failing.
#[derive(Debug, Clone, Copy)]
pub struct Terminals {
    stdout: bool,
    stderr: bool,
}

impl Terminals {
    /// What stdout and stderr are now (call it at start).
    pub fn at_start() -> Terminals {
        use std::io::IsTerminal as _;
        Terminals {
            stdout: io::stdout().is_terminal(),
            stderr: io::stderr().is_terminal(),
        }
    }

    /// True when `e`, from a write to stdout, says that its terminal hung up: stdout was a
    /// terminal at start and the write failed with EIO.
    pub fn stdout_hung_up(&self, e: &io::Error) -> bool {
        self.stdout && e.raw_os_error() == Some(libc::EIO)
    }

    /// True when stdout or stderr was a terminal at start and is not one any more: its
    /// terminal hung up. A SIGHUP seen with this true came from the hang-up, not from
    /// `kill -HUP`.
    pub fn hung_up(&self) -> bool {
        use std::io::IsTerminal as _;
        (self.stdout && !io::stdout().is_terminal()) || (self.stderr && !io::stderr().is_terminal())
    }
}

/// The exit status after a failed write of `what` to stdout by `program`: as
/// [`write_failed`], and a terminal that hung up ([`Terminals::stdout_hung_up`]) ends the
/// run quietly and successfully too (the reader is gone, as with a closed pipe).
pub fn stdout_write_failed(
    program: &str,
    what: &str,
    e: &io::Error,
    terminals: &Terminals,
) -> ExitCode {
    if reader_gone(e, Some(terminals)) {
        return ExitCode::SUCCESS;
    }
    write_failed(program, what, e)
}

/// Blocks SIGINT, SIGTERM and SIGHUP ([`cnbus::sys::TermSignals`]), to be waited for by a
/// thread of the tool's own. Call it before any thread exists (threads inherit the mask).
/// A failure is reported (`program: error`) and is exit status 1.
pub fn block_term_signals(program: &str) -> Result<cnbus::sys::TermSignals, ExitCode> {
    cnbus::sys::TermSignals::block().map_err(|e| {
        warn!("{program}: {e}");
        ExitCode::from(1)
    })
}

/// Parses the command line with clap. On `--help` or `--version` the text goes to stdout
/// and the tool exits 0, or 1 with a message when writing it fails (`--help > /dev/full`;
/// clap's own `exit` ignores that), quietly 0 on a closed pipe. Any other error is clap's
/// usage message on stderr (ignoring a failure to write it) and status 2.
pub fn parse_args<P: clap::Parser>(program: &str) -> P {
    match P::try_parse() {
        Ok(p) => p,
        Err(e) => exit_on_parse_error(program, &e),
    }
}

/// Ends the tool for clap's `e` as [`parse_args`] describes.
pub fn exit_on_parse_error(program: &str, e: &clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let what = if e.kind() == ErrorKind::DisplayHelp {
            "the help to stdout"
        } else {
            "the version to stdout"
        };
        let r = e.print().and_then(|()| io::stdout().lock().flush());
        std::process::exit(match r {
            Ok(()) => 0,
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => 0,
            Err(err) => {
                warn!("{program}: writing {what}: {err}");
                1
            }
        });
    }
    e.exit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    /// The write end of a pipe opened again with `O_NONBLOCK` (a description of its own),
    /// and the read end.
    fn non_blocking_pipe() -> (std::fs::File, io::PipeReader) {
        use std::os::fd::AsRawFd;
        let (reader, writer) = io::pipe().unwrap();
        let w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
            .unwrap();
        (w, reader)
    }

    #[test]
    fn a_patient_writer_waits_for_a_full_non_blocking_pipe() {
        const LEN: usize = 1 << 20;
        // What it guards against: the plain writer fails once the pipe is full.
        let (mut plain, _r) = non_blocking_pipe();
        let err = plain.write_all(&vec![1u8; LEN]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        let (w, mut r) = non_blocking_pipe();
        let writer = std::thread::spawn(move || {
            let mut w = io::BufWriter::new(Patient(w));
            for chunk in vec![7u8; LEN].chunks(1000) {
                w.write_all(chunk).unwrap();
            }
            w.flush().unwrap();
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < LEN {
            // A slow reader: the writer meets a full pipe again and again.
            std::thread::sleep(std::time::Duration::from_micros(200));
            let n = r.read(&mut buf).unwrap();
            assert!(n > 0, "the writer ended early");
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(got.len() == LEN && got.iter().all(|&b| b == 7));
    }

    /// Regression: a stderr whose reader holds the pipe but reads nothing (SIGSTOP, a
    /// `2>&1 | less` left alone) blocked the tools' messages and counters for ever, a
    /// blocking stderr in `write(2)` and a non-blocking one in the wait for it (`Patient`),
    /// so that the agent read no events and did not stop on SIGTERM. Now it is waited for
    /// at most the bound, the lines not written counted; the next line is not waited for
    /// while it takes nothing; once the reader reads again, the lines go through, a line
    /// left half written ended first. (Before, the first write here never returned.)
    #[test]
    fn a_stopped_reader_is_waited_for_a_bounded_time_and_lines_lost_counted() {
        use std::os::fd::AsRawFd;
        let (mut reader, writer) = io::pipe().unwrap();
        // Filled through a non-blocking description of its own; `writer` stays blocking.
        let mut fill = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
            .unwrap();
        let mut filled = 0;
        while let Ok(n) = fill.write(&[b'.'; 4096]) {
            filled += n;
        }
        // One page free, so that a long line is written in part only.
        let mut page = vec![0u8; 4096];
        reader.read_exact(&mut page).unwrap();
        filled -= 4096;
        let (done, results) = std::sync::mpsc::channel();
        let mut w = writer;
        let stopped = std::thread::spawn(move || {
            let state = Bounded::new();
            let long = [vec![b'x'; 5000], b"\n".to_vec()].concat();
            let wait = Duration::from_millis(200);
            let first = write_bounded(&mut w, &long, wait, &state);
            let second = write_bounded(&mut w, b"a\nb\n", wait, &state);
            done.send((first, second, state.stuck.load(Ordering::Relaxed)))
                .unwrap();
            (w, state)
        });
        let (first, second, stuck) = results
            .recv_timeout(Duration::from_secs(120))
            .expect("a write to a pipe nobody reads never returned");
        let (mut w, state) = stopped.join().unwrap();
        assert_eq!((first, second, stuck), (1, 2, true));
        // The reader reads again: everything it holds, then the next line.
        let mut got = vec![0u8; filled + 4096];
        reader.read_exact(&mut got).unwrap();
        assert!(got[..filled].iter().all(|&b| b == b'.'));
        assert!(got[filled..].iter().all(|&b| b == b'x'));
        assert_eq!(
            write_bounded(&mut w, b"next\n", Duration::from_secs(60), &state),
            0
        );
        drop(w);
        drop(fill);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"\nnext\n");
        assert!(!state.stuck.load(Ordering::Relaxed));
    }

    /// A reader gone (`EPIPE`: Rust ignores SIGPIPE) loses the lines, counted, at once.
    #[test]
    fn a_reader_gone_loses_the_lines_counted() {
        let (r, mut w) = io::pipe().unwrap();
        drop(r);
        let state = Bounded::new();
        let lost = write_bounded(&mut w, b"a\nb\n", Duration::from_secs(60), &state);
        assert_eq!(lost, 2);
        assert!(!state.stuck.load(Ordering::Relaxed));
    }

    #[test]
    fn a_patient_writer_reports_a_reader_gone() {
        let (w, r) = non_blocking_pipe();
        drop(r);
        let err = Patient(w).write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
