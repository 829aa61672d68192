//! Writing to stderr without panicking, how a failed write of the output ends a tool, and
//! the termination signals every tool blocks at start.

use std::io;
use std::process::ExitCode;

/// `warn!("fmt", args)`: one line to stderr, ignoring errors. (`eprintln!` panics when
/// stderr is closed or full, and then there is nowhere left to report anything.)
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => {{
        use ::std::io::Write as _;
        let _ = writeln!(::std::io::stderr().lock(), $($t)*);
    }};
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
    use std::io::Write as _;
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
