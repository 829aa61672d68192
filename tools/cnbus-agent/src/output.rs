//! Where the agent's output goes: the event log (stdout or an appended file, reopened on
//! SIGHUP), atomic snapshots (counters file, table dump), and what a failed write means.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cnbus_cli::output::{reader_gone, Patient, Terminals};
use cnbus_cli::warn;

/// Writes `data` to `path` atomically for readers: to `path.tmp`, then renamed over `path`
/// (a reader sees the old or the new content, never a mix). No fsync: these are snapshots.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, path)
}

/// The event log: `path` appended, or stdout; waited for when another process made it
/// non-blocking ([`Patient`]), as proctrace's output is.
pub fn open_output(path: Option<&Path>) -> io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(Patient(
            OpenOptions::new().create(true).append(true).open(p)?,
        )),
        None => Box::new(Patient(io::stdout())),
    })
}

/// Reports a failed write to the event log; true when it is a failure (exit status 1),
/// false when the log's reader is gone, which ends the agent quietly and successfully: a
/// closed pipe (`cnbus-agent | head`), or, for a log on stdout (`stdout`: what stdout was at
/// start), a terminal that hung up.
pub fn log_error(e: &io::Error, stdout: Option<&Terminals>) -> bool {
    if reader_gone(e, stdout) {
        return false;
    }
    warn!("cnbus-agent: writing the event log: {e}");
    true
}
