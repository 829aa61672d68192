//! What the examples share on their command line and their output (each includes this file
//! with `#[path = "common/cli.rs"] #[macro_use] mod cli;`).
//!
//! * Value parsers for `clap`: integers in decimal or `0x` hex, durations in seconds and
//!   buffer sizes (those three shared with the tools: `tools/cnbus-cli/src/args.rs`), each
//!   range-checked, so that an out-of-range value is a usage error (exit
//!   status 2) rather than a silently wrapped number or a panic.
//! * [`out!`] writes a line to stdout and [`warn!`] one to stderr without panicking
//!   (`println!` and `eprintln!` panic when the stream is closed or full). A failed write to
//!   stdout becomes a [`Stop`]: [`Stop::ClosedPipe`] when the reader went away
//!   (`example | head`), a quiet successful end; [`Stop::Failed`] otherwise (a full disk),
//!   reported by [`finish`] with exit status 1.
#![allow(dead_code, unused_macros, unused_imports)]

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

// The range-checked parsers the tools use too, one copy (std only): integers, seconds,
// sizes, and their limits.
#[path = "../../tools/cnbus-cli/src/args.rs"]
mod args;
pub use args::{parse_secs, parse_size, parse_u64, MAX_BUFFER, MAX_SECS};

/// The last multicast group a connector socket can join.
const MAX_GROUP: u32 = 32;

/// A `u32` in decimal or `0x` hex (connector idx and val, sequence numbers).
pub fn parse_u32(s: &str) -> Result<u32, String> {
    let v = parse_u64(s)?;
    u32::try_from(v).map_err(|_| format!("{s} is out of range (0..=4294967295, 0xffffffff)"))
}

/// A connector idx a user-space sender may use: above 10, as the kernel's convention
/// (`CN_NETLINK_USERS` = 11) has it. 1..=10 belong to the kernel's own connector users
/// (a multicast on one is also delivered to the kernel's handler, and the library refuses
/// it unless `allow_kernel_ids`); 0 is none of them but no user id either.
pub fn parse_user_idx(s: &str) -> Result<u32, String> {
    let idx = parse_u32(s)?;
    if idx > cnbus::CbId::KERNEL_IDX_MAX {
        Ok(idx)
    } else {
        Err(format!(
            "idx {idx} is out of range: use above 10 (1..=10 belong to the kernel)"
        ))
    }
}

/// A multicast group a user-space sender may use: 12..=32 (lower ones belong to the
/// kernel's own connector users; 32 is the last group a socket can join).
pub fn parse_user_group(s: &str) -> Result<u32, String> {
    let g = parse_u32(s)?;
    if (12..=MAX_GROUP).contains(&g) {
        Ok(g)
    } else {
        Err(format!(
            "group {g} is out of range: use 12..=32 (lower groups belong to kernel users)"
        ))
    }
}

/// A group to listen on: 1..=32.
pub fn parse_group(s: &str) -> Result<u32, String> {
    let g = parse_u32(s)?;
    if (1..=MAX_GROUP).contains(&g) {
        Ok(g)
    } else {
        Err(format!("group {g} is out of range (1..=32)"))
    }
}

/// Why an example stops before its natural end.
#[derive(Debug)]
pub enum Stop {
    /// Its stdout's reader went away (`example | head`): a quiet, successful end.
    ClosedPipe,
    /// Something failed: the message says what.
    Failed(String),
}

impl From<cnbus::Error> for Stop {
    fn from(e: cnbus::Error) -> Self {
        Stop::Failed(e.to_string())
    }
}

/// Writes one line to stdout. A closed pipe is [`Stop::ClosedPipe`]; any other error
/// [`Stop::Failed`], naming stdout.
pub fn write_out(args: fmt::Arguments<'_>) -> Result<(), Stop> {
    let mut o = io::stdout().lock();
    o.write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => Stop::ClosedPipe,
            _ => Stop::Failed(format!("writing to stdout: {e}")),
        })
}

/// Writes one line to stderr, ignoring errors (there is nowhere left to report them).
pub fn write_err(args: fmt::Arguments<'_>) {
    let mut e = io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| e.write_all(b"\n"));
}

/// `out!("fmt", args)`: one line to stdout; evaluates to `Result<(), Stop>`.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

/// `warn!("fmt", args)`: one line to stderr, never panicking.
macro_rules! warn {
    ($($t:tt)*) => { $crate::cli::write_err(format_args!($($t)*)) };
}

/// The exit status of an example named `name`: 0 when it ended normally or its stdout's
/// reader went away, 1 (with the message on stderr) when something failed.
pub fn finish(name: &str, r: Result<(), Stop>) -> ExitCode {
    match r {
        Ok(()) | Err(Stop::ClosedPipe) => ExitCode::SUCCESS,
        Err(Stop::Failed(m)) => {
            write_err(format_args!("{name}: {m}"));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn numbers_are_range_checked() {
        assert_eq!(parse_u32("0x456"), Ok(0x456));
        assert_eq!(parse_u32("4294967295"), Ok(u32::MAX));
        assert!(parse_u32("4294967296").is_err());
        assert!(parse_u32("-1").is_err());
        assert!(parse_u32("").is_err());
        assert!(parse_u64("18446744073709551616").is_err());
        assert!(parse_user_group("11").is_err());
        for bad in ["0", "1", "10", "0xa"] {
            assert!(parse_user_idx(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_user_idx("11"), Ok(11));
        assert_eq!(parse_user_idx("0xffffffff"), Ok(u32::MAX));
        assert!(parse_user_group("33").is_err());
        assert_eq!(parse_user_group("24"), Ok(24));
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["1e19", "1e30", "-1", "NaN", "inf", "", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        for bad in ["0", "2G", "99999999999999999999", "-5", "", "K"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
