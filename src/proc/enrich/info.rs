//! What the enricher reports: a process's attributes ([`ProcessInfo`]), where each came
//! from ([`InfoSource`]), and the enricher's counters ([`EnrichStats`]).

use std::fmt;
use std::sync::Arc;

use super::ProcessKey;
#[cfg(doc)] // names in doc links
use super::{container_id, EnrichConfig, Enricher, RUNTIME_PATTERNS};

/// Where an attribute of a [`ProcessInfo`] came from. Serialised in lower case.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InfoSource {
    /// Read from `/proc/<pid>/…` for this process (for the command line: for its current
    /// image, after the event's exec if any).
    Proc,
    /// Copied from the parent at fork, not read for this process.
    Inherited,
    /// Command line only: the command line was empty (a kernel thread, or a process whose
    /// memory was already released at exit); the value is the 16-byte task name.
    Comm,
    /// The process was gone before it could be read: the value is `None`.
    Exited,
    /// `/proc` refused the read (`EACCES`: `hidepid`, or the ptrace access check on a
    /// namespace link, which even root can fail for a protected process): the value is
    /// `None` although the process may be alive.
    Denied,
}

impl InfoSource {
    /// `proc`, `inherited`, `comm`, `exited` or `denied`.
    pub const fn name(self) -> &'static str {
        match self {
            InfoSource::Proc => "proc",
            InfoSource::Inherited => "inherited",
            InfoSource::Comm => "comm",
            InfoSource::Exited => "exited",
            InfoSource::Denied => "denied",
        }
    }
}

impl fmt::Display for InfoSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the [`Enricher`] knows about the process an event is about. Serialised with these
/// field names; `None` is `null`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The process's key; `None` only when its fork was not seen and it was gone before
    /// `/proc/<pid>/stat` could be read.
    pub process_key: Option<ProcessKey>,
    /// The key of the parent: the one named by the fork event when the fork was seen,
    /// else the current parent (`/proc/<pid>/stat` field 4); `None` for pid 1 and kernel
    /// threads' parent 0, or when it could not be read.
    pub parent_key: Option<ProcessKey>,
    /// The 64-hex container id when `cgroup` is a known container runtime's path
    /// ([`RUNTIME_PATTERNS`]); `None` on the host or when `cgroup` is `None`. Its source is
    /// `cgroup_source`.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub container_id: Option<Arc<str>>,
    /// The cgroup path: the `name=systemd` line of `/proc/<pid>/cgroup` on a cgroup v1 or
    /// hybrid host, else the v2 `0::` line.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub cgroup: Option<Arc<str>>,
    /// Where `cgroup` and `container_id` came from (`proc`, `inherited`, `exited` or
    /// `denied`).
    pub cgroup_source: InfoSource,
    /// The pid in the process's own (innermost) pid namespace: the last field of `NSpid`
    /// in `/proc/<pid>/status` (equal to the host pid in the initial namespace).
    pub ns_pid: Option<u32>,
    /// The inode number of the process's pid namespace (`/proc/<pid>/ns/pid`).
    pub pidns: Option<u64>,
    /// Where `ns_pid` and `pidns` came from (`proc`, `inherited`, `exited` or `denied`).
    pub pidns_source: InfoSource,
    /// The command line, arguments joined by spaces (capped at
    /// [`EnrichConfig::max_cmdline`] bytes), or the task name when `cmdline_source` is
    /// `comm`.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub cmdline: Option<Arc<str>>,
    /// Where `cmdline` came from: `proc`, `inherited`, `comm`, `exited` or `denied`.
    pub cmdline_source: InfoSource,
}

impl ProcessInfo {
    /// Nothing known: every attribute `None` with [`InfoSource::Exited`].
    pub fn unknown() -> Self {
        ProcessInfo {
            process_key: None,
            parent_key: None,
            container_id: None,
            cgroup: None,
            cgroup_source: InfoSource::Exited,
            ns_pid: None,
            pidns: None,
            pidns_source: InfoSource::Exited,
            cmdline: None,
            cmdline_source: InfoSource::Exited,
        }
    }

    /// True when the process is in a container ([`container_id`](Self::container_id) is
    /// `Some`).
    pub fn in_container(&self) -> bool {
        self.container_id.is_some()
    }
}

#[cfg(feature = "serde")]
mod opt_arc_str {
    use std::sync::Arc;

    pub fn serialize<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&**v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<str>>, D::Error> {
        let v: Option<std::borrow::Cow<'de, str>> = serde::Deserialize::deserialize(d)?;
        Ok(v.map(|s| Arc::from(&*s)))
    }
}

/// Counters of an [`Enricher`].
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnrichStats {
    /// Events enriched.
    pub events: u64,
    /// Events whose process was in the cache.
    pub hits: u64,
    /// Events whose process was not in the cache and was read from `/proc`.
    pub misses: u64,
    /// Of those, processes already gone (the event's attributes are `None`).
    pub gone: u64,
    /// `/proc` files read.
    pub proc_reads: u64,
    /// `/proc` files that could not be read (the process was gone).
    pub proc_read_failures: u64,
    /// Forks whose timestamp fell in the uncertain window after a clock tick, so the start
    /// time was read from `/proc/<pid>/stat`.
    pub start_time_reads: u64,
    /// Forks whose child read as being in the root cgroup while its parent was not: read
    /// before the kernel attached the child to its cgroup; the parent's cgroup was used
    /// (marked inherited).
    pub unattached_cgroup_reads: u64,
    /// Cache entries dropped to stay within [`EnrichConfig::capacity`].
    pub evictions: u64,
    /// Cache entries found stale (their pid was reused: an exit was lost) and replaced.
    pub stale: u64,
    /// Processes in the cache now.
    pub cached: u64,
}
