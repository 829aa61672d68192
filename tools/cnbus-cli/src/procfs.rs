//! Small `/proc` reads the tools make besides the library's enricher: a process's `stat`
//! line, its command line for display, and the tool's own CPU time and memory.
//! Every read may fail (the process is gone, or hides it): `None`, never a panic.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

/// Reads up to `buf.len()` bytes of a `/proc` file; the bytes read. `None` when it cannot
/// be opened or read.
pub fn read_proc(path: &str, buf: &mut [u8]) -> Option<usize> {
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

/// What the tools use of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`...
    pub state: u8,
    /// Field 4.
    pub ppid: u32,
    /// Field 9: the task flags (`PF_*`).
    pub flags: u64,
    /// Field 22: start time, clock ticks since boot.
    pub start_ticks: u64,
}

/// `PF_EXITING` in [`Stat::flags`]: the task is exiting.
pub const PF_EXITING: u64 = 0x4;

impl Stat {
    /// A zombie, a dead task or one already exiting: its exit event may be gone already.
    pub fn is_exiting(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x') || self.flags & PF_EXITING != 0
    }

    /// Parses a `stat` line: "pid (comm) state ppid ...", where comm may hold spaces and
    /// parentheses (so it is split at the first '(' and the last ')').
    pub fn parse(s: &[u8]) -> Option<Stat> {
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
}

/// `/proc/<pid>/stat`.
pub fn read_stat(pid: u32) -> Option<Stat> {
    let mut buf = [0u8; 1024];
    let n = read_proc(&format!("/proc/{pid}/stat"), &mut buf)?;
    Stat::parse(&buf[..n])
}

/// The command line of `pid` for display (arguments joined by spaces, at most 256 bytes,
/// invalid UTF-8 replaced), or `[comm]` when it has none (kernel threads, an exiting
/// process), as `ps` shows it.
pub fn read_name(pid: u32) -> Option<Arc<str>> {
    let mut buf = [0u8; 256];
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

/// `(user + system CPU seconds, resident set in KiB)` of this process.
pub fn self_usage(ticks_per_sec: u64) -> (f64, u64) {
    let mut buf = [0u8; 2048];
    let cpu = read_proc("/proc/self/stat", &mut buf)
        .and_then(|n| {
            let s = std::str::from_utf8(&buf[..n]).ok()?;
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_ascii_whitespace().take(13).collect();
            let t: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(t as f64 / ticks_per_sec.max(1) as f64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let line = b"42 (a) b (c)) S 7 42 42 0 -1 4194564 0 0 0 0 1 2 0 0 20 0 1 0 12345 0 0";
        let st = Stat::parse(line).unwrap();
        assert_eq!(st.state, b'S');
        assert_eq!(st.ppid, 7);
        assert_eq!(st.flags, 4_194_564);
        assert!(st.is_exiting());
        assert_eq!(st.start_ticks, 12345);
        assert!(Stat::parse(b"42 (x) S 1").is_none());
        assert!(Stat::parse(b"42 )x( S").is_none());
        let me = read_stat(std::process::id()).unwrap();
        assert!(!me.is_exiting());
        assert!(read_name(std::process::id()).is_some());
        assert!(self_usage(100).1 > 0);
    }
}
