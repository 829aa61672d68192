//! The event kinds (`what`) and the set of kinds a listener subscribes to, with their names.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};
use std::str::FromStr;

use super::ProcEvent;

pub(super) const WHAT_NONE: u32 = 0;
pub(super) const WHAT_FORK: u32 = 0x1;
pub(super) const WHAT_EXEC: u32 = 0x2;
pub(super) const WHAT_UID: u32 = 0x4;
pub(super) const WHAT_GID: u32 = 0x40;
pub(super) const WHAT_SID: u32 = 0x80;
pub(super) const WHAT_PTRACE: u32 = 0x100;
pub(super) const WHAT_COMM: u32 = 0x200;
pub(super) const WHAT_NONZERO_EXIT: u32 = 0x2000_0000;
pub(super) const WHAT_COREDUMP: u32 = 0x4000_0000;
pub(super) const WHAT_EXIT: u32 = 0x8000_0000;
pub(super) const WHAT_ALL: u32 = WHAT_FORK
    | WHAT_EXEC
    | WHAT_UID
    | WHAT_GID
    | WHAT_SID
    | WHAT_PTRACE
    | WHAT_COMM
    | WHAT_NONZERO_EXIT
    | WHAT_COREDUMP
    | WHAT_EXIT;

/// The kind of an event: the `what` field of `struct proc_event`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// `PROC_EVENT_NONE` (0): the kernel's acknowledgement of a `LISTEN` / `IGNORE`.
    Ack,
    /// `PROC_EVENT_FORK` (0x1): a process or thread was created.
    Fork,
    /// `PROC_EVENT_EXEC` (0x2): a successful `execve`.
    Exec,
    /// `PROC_EVENT_UID` (0x4): real or effective uid changed.
    Uid,
    /// `PROC_EVENT_GID` (0x40): real or effective gid changed.
    Gid,
    /// `PROC_EVENT_SID` (0x80): `setsid`.
    Sid,
    /// `PROC_EVENT_PTRACE` (0x100): ptrace attach or detach.
    Ptrace,
    /// `PROC_EVENT_COMM` (0x200): the task name changed.
    Comm,
    /// `PROC_EVENT_COREDUMP` (0x40000000): a core dump starts.
    Coredump,
    /// `PROC_EVENT_EXIT` (0x80000000): a task (each thread) exits.
    Exit,
}

impl EventKind {
    /// Every kind, in `what` order.
    pub const ALL: [EventKind; 10] = [
        EventKind::Ack,
        EventKind::Fork,
        EventKind::Exec,
        EventKind::Uid,
        EventKind::Gid,
        EventKind::Sid,
        EventKind::Ptrace,
        EventKind::Comm,
        EventKind::Coredump,
        EventKind::Exit,
    ];

    /// The kind of a `what` value, if it is one the kernel sends.
    pub const fn from_what(what: u32) -> Option<Self> {
        Some(match what {
            WHAT_NONE => EventKind::Ack,
            WHAT_FORK => EventKind::Fork,
            WHAT_EXEC => EventKind::Exec,
            WHAT_UID => EventKind::Uid,
            WHAT_GID => EventKind::Gid,
            WHAT_SID => EventKind::Sid,
            WHAT_PTRACE => EventKind::Ptrace,
            WHAT_COMM => EventKind::Comm,
            WHAT_COREDUMP => EventKind::Coredump,
            WHAT_EXIT => EventKind::Exit,
            _ => return None,
        })
    }

    /// The `what` value on the wire.
    pub const fn what(self) -> u32 {
        match self {
            EventKind::Ack => WHAT_NONE,
            EventKind::Fork => WHAT_FORK,
            EventKind::Exec => WHAT_EXEC,
            EventKind::Uid => WHAT_UID,
            EventKind::Gid => WHAT_GID,
            EventKind::Sid => WHAT_SID,
            EventKind::Ptrace => WHAT_PTRACE,
            EventKind::Comm => WHAT_COMM,
            EventKind::Coredump => WHAT_COREDUMP,
            EventKind::Exit => WHAT_EXIT,
        }
    }

    /// Lower-case name: `ack`, `fork`, `exec`, `uid`, `gid`, `sid`, `ptrace`, `comm`,
    /// `coredump`, `exit`.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Ack => "ack",
            EventKind::Fork => "fork",
            EventKind::Exec => "exec",
            EventKind::Uid => "uid",
            EventKind::Gid => "gid",
            EventKind::Sid => "sid",
            EventKind::Ptrace => "ptrace",
            EventKind::Comm => "comm",
            EventKind::Coredump => "coredump",
            EventKind::Exit => "exit",
        }
    }

    /// The body size this kind needs after the 16-byte header.
    pub(super) const fn body_len(self) -> usize {
        match self {
            EventKind::Ack => 4,
            EventKind::Exec | EventKind::Sid => 8,
            EventKind::Fork
            | EventKind::Uid
            | EventKind::Gid
            | EventKind::Ptrace
            | EventKind::Coredump => 16,
            EventKind::Comm | EventKind::Exit => 24,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of event types, as the kernel's `enum proc_cn_event` bits: what a listener
/// subscribes to (`struct proc_input.event_type`).
///
/// [`EventSet::NONZERO_EXIT`] is a filter bit only: it selects exit events whose wait status
/// is not 0, which still arrive as [`EventKind::Exit`]. With both `EXIT` and `NONZERO_EXIT`
/// every exit is delivered. ACKs are delivered only to a listener whose set is
/// [`EventSet::ALL`], as the kernel does.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventSet(u32);

impl EventSet {
    /// No event.
    pub const EMPTY: EventSet = EventSet(0);
    /// Process / thread creation.
    pub const FORK: EventSet = EventSet(WHAT_FORK);
    /// `execve`.
    pub const EXEC: EventSet = EventSet(WHAT_EXEC);
    /// uid changes.
    pub const UID: EventSet = EventSet(WHAT_UID);
    /// gid changes.
    pub const GID: EventSet = EventSet(WHAT_GID);
    /// `setsid`.
    pub const SID: EventSet = EventSet(WHAT_SID);
    /// ptrace attach / detach.
    pub const PTRACE: EventSet = EventSet(WHAT_PTRACE);
    /// Task name changes.
    pub const COMM: EventSet = EventSet(WHAT_COMM);
    /// Exits with a non-zero wait status (filter bit `PROC_EVENT_NONZERO_EXIT`).
    pub const NONZERO_EXIT: EventSet = EventSet(WHAT_NONZERO_EXIT);
    /// Core dumps.
    pub const COREDUMP: EventSet = EventSet(WHAT_COREDUMP);
    /// Every exit.
    pub const EXIT: EventSet = EventSet(WHAT_EXIT);
    /// Everything (`PROC_EVENT_ALL` = 0xE00003C7), ACKs included.
    pub const ALL: EventSet = EventSet(WHAT_ALL);

    const NAMES: [(&'static str, EventSet); 10] = [
        ("fork", EventSet::FORK),
        ("exec", EventSet::EXEC),
        ("uid", EventSet::UID),
        ("gid", EventSet::GID),
        ("sid", EventSet::SID),
        ("ptrace", EventSet::PTRACE),
        ("comm", EventSet::COMM),
        ("nonzero-exit", EventSet::NONZERO_EXIT),
        ("coredump", EventSet::COREDUMP),
        ("exit", EventSet::EXIT),
    ];

    /// The bits, as sent in `proc_input.event_type`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// A set from bits, dropping bits the kernel does not know (its `valid_event`).
    pub const fn from_bits_truncate(bits: u32) -> Self {
        EventSet(bits & WHAT_ALL)
    }

    /// True when every bit of `other` is in `self`.
    pub const fn contains(self, other: EventSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// True for the empty set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True for [`EventSet::ALL`].
    pub const fn is_all(self) -> bool {
        self.0 == WHAT_ALL
    }

    /// Whether a listener subscribed to `self` receives `ev`: exactly the kernel's per-socket
    /// filter (`cn_filter` in `drivers/connector/cn_proc.c`), so that filtering in user space
    /// gives the same results as filtering in the kernel.
    pub fn matches(self, ev: &ProcEvent) -> bool {
        self.matches_raw(ev.kind().what(), ev.exit_status_raw())
    }

    /// [`matches`](Self::matches) on the raw `what` and exit status.
    pub const fn matches_raw(self, what: u32, exit_code: u32) -> bool {
        if self.0 == WHAT_ALL {
            return true;
        }
        if self.0 & WHAT_NONZERO_EXIT != 0 && what == WHAT_EXIT && exit_code != 0 {
            return true;
        }
        self.0 & what != 0
    }
}

impl BitOr for EventSet {
    type Output = EventSet;
    fn bitor(self, rhs: EventSet) -> EventSet {
        EventSet(self.0 | rhs.0)
    }
}

impl BitOrAssign for EventSet {
    fn bitor_assign(&mut self, rhs: EventSet) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for EventSet {
    type Output = EventSet;
    fn bitand(self, rhs: EventSet) -> EventSet {
        EventSet(self.0 & rhs.0)
    }
}

impl fmt::Debug for EventSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventSet({self})")
    }
}

impl fmt::Display for EventSet {
    /// `all`, `none`, or the names joined by `,` (the syntax [`FromStr`] reads).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all");
        }
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for (name, bit) in Self::NAMES {
            if self.contains(bit) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// A name in an event list that is not an event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}; known: all, fork, exec, uid, gid, sid, ptrace, comm, nonzero-exit, coredump, exit")]
pub struct UnknownEventName(pub String);

impl FromStr for EventSet {
    type Err = UnknownEventName;

    /// Parses a comma-separated list of names (`fork,exec,nonzero-exit`, or `all`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = EventSet::EMPTY;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let name = name.to_ascii_lowercase();
            if name == "all" {
                set |= EventSet::ALL;
                continue;
            }
            let name = if name == "nonzero_exit" {
                "nonzero-exit"
            } else {
                &name
            };
            match Self::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, bit)) => set |= *bit,
                None => return Err(UnknownEventName(name.to_string())),
            }
        }
        Ok(set)
    }
}
