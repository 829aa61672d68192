//! The fields of a proc event: tasks, exit statuses, command names.

use std::fmt;

/// A task as the kernel names it: `pid` is the task id (what user space calls the thread id,
/// TID) and `tgid` the thread-group id (what user space calls the process id, PID). Both are
/// numbers in the initial pid namespace.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Task {
    /// Task id (TID).
    pub pid: u32,
    /// Thread-group id (PID).
    pub tgid: u32,
}

impl Task {
    /// True when this task is not its process's main thread.
    pub const fn is_thread(&self) -> bool {
        self.pid != self.tgid
    }
}

/// A wait status as `waitpid` returns it: what the kernel puts in the exit event.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExitStatus(pub u32);

impl ExitStatus {
    /// The raw status.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The exit code when the task exited normally (`WIFEXITED` / `WEXITSTATUS`).
    pub const fn code(self) -> Option<u8> {
        if self.0 & 0x7f == 0 {
            Some(((self.0 >> 8) & 0xff) as u8)
        } else {
            None
        }
    }

    /// The signal that killed the task (`WIFSIGNALED` / `WTERMSIG`).
    pub const fn signal(self) -> Option<u8> {
        let sig = self.0 & 0x7f;
        if sig != 0 && sig != 0x7f {
            Some(sig as u8)
        } else {
            None
        }
    }

    /// True when the task was killed by a signal and dumped core (`WCOREDUMP`).
    pub const fn core_dumped(self) -> bool {
        self.signal().is_some() && self.0 & 0x80 != 0
    }

    /// True for status 0 (exit code 0).
    pub const fn success(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code(), self.signal()) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) if self.core_dumped() => write!(f, "signal {s} (core dumped)"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => write!(f, "status {:#x}", self.0),
        }
    }
}

/// A task name (`comm`): at most 15 bytes, as the kernel's `char comm[16]`. With the
/// `serde` feature it is a string (invalid UTF-8 replaced).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub(super) [u8; 16]);

#[cfg(feature = "serde")]
impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string_lossy())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Comm::new(s.as_bytes()))
    }
}

impl Comm {
    /// A name from bytes, cut at 15 bytes or the first NUL.
    pub fn new(name: &[u8]) -> Self {
        let mut c = [0u8; 16];
        let n = name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name.len())
            .min(15);
        c[..n].copy_from_slice(&name[..n]);
        Comm(c)
    }

    /// The name's bytes, up to the first NUL (at most 16 when the kernel sent no NUL).
    pub fn as_bytes(&self) -> &[u8] {
        let n = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        &self.0[..n]
    }

    /// The name as text, invalid UTF-8 replaced.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Comm({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}
