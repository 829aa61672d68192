//! Reading and parsing `/proc/<pid>/{stat,status,cmdline,comm,cgroup,ns/pid}`. Plain
//! `std::fs`; every parser takes whatever bytes the file held (a process can exit between
//! two reads, a comm can hold spaces and parentheses) and answers `None` rather than panic.

use std::fmt::Write as _;
use std::io::Read as _;

/// What the enricher uses of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 4: the current parent (after any reparenting).
    pub ppid: u32,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
    /// Field 9 (the task's flags) has `PF_EXITING`: the task is exiting or a zombie, and
    /// the kernel shows it in the root of every cgroup v1 hierarchy.
    pub exiting: bool,
}

/// `PF_EXITING` in include/linux/sched.h.
const PF_EXITING: u64 = 0x4;

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid …`. The comm may hold spaces and
/// parentheses, so fields are counted after the **last** `)`.
pub(crate) fn parse_stat(buf: &[u8]) -> Option<Stat> {
    let close = buf.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&buf[close + 1..]).ok()?;
    let mut f = rest.split_ascii_whitespace();
    // After the comm: state(3) ppid(4) … flags(9) … starttime(22) is the 20th.
    let ppid = f.nth(1)?.parse().ok()?;
    let flags: u64 = f.nth(4)?.parse().ok()?;
    let start_ticks = f.nth(12)?.parse().ok()?;
    Some(Stat {
        ppid,
        start_ticks,
        exiting: flags & PF_EXITING != 0,
    })
}

/// The last field of the `NSpid:` line of `/proc/<pid>/status`: the pid as seen in the
/// process's innermost pid namespace.
pub(crate) fn parse_nspid(buf: &[u8]) -> Option<u32> {
    buf.split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"NSpid:"))
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.split_ascii_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// `/proc/<pid>/cmdline` as text: arguments joined by spaces, trailing NULs dropped,
/// invalid UTF-8 replaced. `None` when empty (a kernel thread, or a process whose memory
/// is already gone at exit).
pub(crate) fn parse_cmdline(buf: &[u8]) -> Option<String> {
    let mut b = buf;
    while let [rest @ .., 0] = b {
        b = rest;
    }
    if b.is_empty() {
        return None;
    }
    Some(
        String::from_utf8_lossy(b)
            .chars()
            .map(|c| if c == '\0' { ' ' } else { c })
            .collect(),
    )
}

/// `/proc/<pid>/comm` without its newline; `None` when empty.
pub(crate) fn parse_comm(buf: &[u8]) -> Option<String> {
    let b = buf.strip_suffix(b"\n").unwrap_or(buf);
    (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned())
}

/// The most of `/proc/<pid>/cgroup` read: one line per hierarchy, each path up to
/// `PATH_MAX` (4096) bytes, and a v1 host has a dozen hierarchies or more (this one: ten
/// lines). Only a cgroup tree made for it comes near.
const CGROUP_MAX: usize = 64 << 10;

/// A reader of small `/proc/<pid>/…` files with reused buffers.
#[derive(Debug)]
pub(crate) struct ProcFs {
    root: String,
    path: String,
    buf: Vec<u8>,
    /// Files read successfully.
    pub reads: u64,
    /// Files that could not be read (the process was gone, or never existed, or `/proc`
    /// refused).
    pub failed: u64,
    /// The last read failed because it was refused (`EACCES` / `EPERM`), not missing.
    pub denied: bool,
}

impl ProcFs {
    /// A reader of `root` (`/proc`, or a directory laid out like it in tests).
    pub fn new(root: &str) -> Self {
        ProcFs {
            root: root.trim_end_matches('/').to_string(),
            path: String::with_capacity(64),
            buf: Vec::with_capacity(4096),
            reads: 0,
            failed: 0,
            denied: false,
        }
    }

    fn set_path(&mut self, pid: u32, file: &str) {
        self.path.clear();
        let _ = write!(self.path, "{}/{pid}/{file}", self.root);
    }

    /// Reads at most `max` bytes of `<root>/<pid>/<file>`.
    pub fn read(&mut self, pid: u32, file: &str, max: usize) -> Option<&[u8]> {
        self.set_path(pid, file);
        self.buf.clear();
        let r = std::fs::File::open(&self.path).and_then(|mut f| {
            // One read of the whole (small) file is the usual case: `/proc` fills a read
            // as far as the file goes (seq_file and cmdline alike), so a read shorter than
            // asked for is the end. Only a full one needs the loop (open + read + close:
            // one system call fewer than reading on to the 0-byte end).
            let first = self.buf.capacity().max(1).min(max);
            self.buf.resize(first, 0);
            let n = loop {
                match f.read(&mut self.buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            self.buf.truncate(n);
            if n == first && n < max {
                f.take((max - n) as u64).read_to_end(&mut self.buf)?;
            }
            Ok(())
        });
        match r {
            Ok(_) => {
                self.reads += 1;
                self.denied = false;
                Some(&self.buf)
            }
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        self.failed += 1;
        self.denied = e.kind() == std::io::ErrorKind::PermissionDenied;
    }

    /// Field 4 and 22 of `stat`.
    pub fn stat(&mut self, pid: u32) -> Option<Stat> {
        self.read(pid, "stat", 1024).and_then(parse_stat)
    }

    /// The command line, at most `max` bytes of it.
    pub fn cmdline(&mut self, pid: u32, max: usize) -> Option<Option<String>> {
        self.read(pid, "cmdline", max).map(parse_cmdline)
    }

    /// The comm.
    pub fn comm(&mut self, pid: u32) -> Option<String> {
        self.read(pid, "comm", 64).and_then(parse_comm)
    }

    /// The cgroup path (see [`parse_cgroup`](super::container::parse_cgroup)); of an
    /// `exiting` task only the cgroup v2 line, since the v1 lines show it in the root.
    pub fn cgroup(&mut self, pid: u32, exiting: bool) -> Option<String> {
        let b = self.read(pid, "cgroup", CGROUP_MAX)?;
        // A file cut at the limit ends in part of a line, whose path would be a wrong
        // one (a prefix of the real path): only whole lines count.
        let whole = if b.len() >= CGROUP_MAX {
            b.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1)
        } else {
            b.len()
        };
        let text = String::from_utf8_lossy(&b[..whole]);
        let path = if exiting {
            super::container::cgroup_lines(&text).1
        } else {
            super::container::parse_cgroup(&text)
        };
        path.map(str::to_string)
    }

    /// The innermost pid-namespace pid (`NSpid` of `status`).
    pub fn ns_pid(&mut self, pid: u32) -> Option<u32> {
        self.read(pid, "status", 16384).and_then(parse_nspid)
    }

    /// The inode of the pid namespace (`ns/pid`).
    pub fn pidns(&mut self, pid: u32) -> Option<u64> {
        self.set_path(pid, "ns/pid");
        match crate::sys::ns_inode_of(&self.path) {
            Ok(ino) => {
                self.reads += 1;
                self.denied = false;
                Some(ino)
            }
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comms() {
        let tail = "S 77 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10 0\n";
        for comm in ["sh", "a b", "x) (y", ")", "((", "", "a\nb"] {
            let s = format!("42 ({comm}) {tail}");
            assert_eq!(
                parse_stat(s.as_bytes()),
                Some(Stat {
                    ppid: 77,
                    start_ticks: 123456,
                    exiting: false,
                }),
                "{comm:?}"
            );
        }
        // A zombie's flags (seen here: 0x40804c).
        let z = "42 (sh) Z 77 1 1 0 -1 4227148 100 0 0 0 1 2 0 0 20 0 1 0 123456 0 0 0\n";
        assert!(parse_stat(z.as_bytes()).unwrap().exiting);
        // Invalid UTF-8 in the comm does not matter.
        let mut b = b"42 (\xff\xfe) ".to_vec();
        b.extend_from_slice(tail.as_bytes());
        assert!(parse_stat(&b).is_some());
    }

    #[test]
    fn stat_garbage_is_none() {
        for b in [
            &b""[..],
            b"42 (sh",
            b"42 (sh) S 1 2 3",
            b"42 (sh) S x 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456",
            b"42 (sh) S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 -5",
            b"\xff\xff)\xff",
        ] {
            assert_eq!(parse_stat(b), None, "{:?}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn nspid() {
        let host = b"Name:\tsh\nTgid:\t42\nNSpid:\t42\nNSpgid:\t42\n";
        assert_eq!(parse_nspid(host), Some(42));
        let nested = b"Name:\tsh\nNStgid:\t10644\t1\nNSpid:\t10644\t1\n";
        assert_eq!(parse_nspid(nested), Some(1));
        assert_eq!(parse_nspid(b"NSpid:\t10644\t7\t3"), Some(3));
        assert_eq!(parse_nspid(b"Name:\tsh\n"), None);
        assert_eq!(parse_nspid(b"NSpid:\n"), None);
        assert_eq!(parse_nspid(b"NSpid:\tx\n"), None);
        assert_eq!(parse_nspid(b""), None);
    }

    #[test]
    fn cmdline_and_comm() {
        assert_eq!(
            parse_cmdline(b"sh\0-c\0sleep 1\0").as_deref(),
            Some("sh -c sleep 1")
        );
        assert_eq!(parse_cmdline(b"\0\0"), None);
        assert_eq!(parse_cmdline(b""), None);
        assert_eq!(parse_cmdline(b"a\xffb").as_deref(), Some("a\u{fffd}b"));
        assert_eq!(parse_comm(b"kworker/0:1\n").as_deref(), Some("kworker/0:1"));
        assert_eq!(parse_comm(b"\n"), None);
    }

    #[test]
    fn reads_this_process_and_misses_a_gone_one() {
        let mut p = ProcFs::new("/proc");
        let me = std::process::id();
        let st = p.stat(me).unwrap();
        assert!(st.start_ticks > 0);
        assert_eq!(st.ppid, std::os::unix::process::parent_id());
        assert!(p.cmdline(me, 4096).unwrap().is_some());
        assert!(p.comm(me).is_some());
        assert!(p.cgroup(me, false).is_some());
        assert!(!st.exiting);
        assert!(p.pidns(me).is_some());
        assert!(p.ns_pid(me).is_some());
        // A limit of 0 reads nothing (before, one byte); a small one cuts the text.
        assert_eq!(p.cmdline(me, 0), Some(None));
        assert!(p.cmdline(me, 3).unwrap().unwrap().len() <= 3);
        // pid_max is at most 2^22: this pid never exists.
        assert_eq!(p.stat(u32::MAX), None);
        assert_eq!(p.pidns(u32::MAX), None);
        assert!(p.failed >= 2);
    }
}
