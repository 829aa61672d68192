//! Writing to stderr without panicking, and how a failed write of the output ends a tool.

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

/// The exit status after a failed write of `what` by `program`: a closed pipe (`tool |
/// head`) ends the run quietly and successfully; any other error (a full disk) is reported
/// on stderr and is a failure (status 1).
pub fn write_failed(program: &str, what: &str, e: &io::Error) -> ExitCode {
    if e.kind() == io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    warn!("{program}: writing {what}: {e}");
    ExitCode::from(1)
}
