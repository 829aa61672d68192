//! Proc-connector events as plain data: decoding `struct proc_event`, the event-type set, and
//! the encoders of the `LISTEN` / `IGNORE` requests. Pure: no I/O, no `unsafe`.
//!
//! Layout (`include/uapi/linux/cn_proc.h`, described byte by byte in `proto/proc_event.md`):
//! a 16-byte header `{what: u32, cpu: u32, timestamp_ns: u64}` followed by a 24-byte union
//! whose member depends on `what`. The kernel always sends 40 bytes; the decoder requires only
//! the bytes the member it reads occupies, so it accepts longer payloads from future kernels.
//! Every integer is read with a byte copy: in a datagram `timestamp_ns` sits at offset 44,
//! which is not 8-aligned.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};
use std::str::FromStr;

use bytes::Bytes;

use crate::codec::{get_u32, get_u64, CbId, CnMsg};
use crate::error::{DecodeError, DecodeErrorKind};

/// `sizeof(struct proc_event)`: what the kernel sends.
pub const PROC_EVENT_LEN: usize = 40;
/// Size of the common header `{what, cpu, timestamp_ns}`.
pub const PROC_EVENT_HEADER_LEN: usize = 16;

const WHAT_NONE: u32 = 0;
const WHAT_FORK: u32 = 0x1;
const WHAT_EXEC: u32 = 0x2;
const WHAT_UID: u32 = 0x4;
const WHAT_GID: u32 = 0x40;
const WHAT_SID: u32 = 0x80;
const WHAT_PTRACE: u32 = 0x100;
const WHAT_COMM: u32 = 0x200;
const WHAT_NONZERO_EXIT: u32 = 0x2000_0000;
const WHAT_COREDUMP: u32 = 0x4000_0000;
const WHAT_EXIT: u32 = 0x8000_0000;
const WHAT_ALL: u32 = WHAT_FORK
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
    const fn body_len(self) -> usize {
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
pub struct Comm([u8; 16]);

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

/// The typed body of an event: one variant per `what`, with every field the kernel sends.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "event", rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventBody {
    /// The kernel's reply to a `LISTEN` / `IGNORE`. Matched to its request by
    /// `cn_msg.ack == request.ack + 1` (see [`ProcEvent::ack`]).
    Ack {
        /// 0 on success, else a positive errno (22 `EINVAL`: unknown op).
        err: u32,
    },
    /// A task was created: a process (`child.pid == child.tgid`) or a thread of process
    /// `child.tgid`.
    Fork {
        /// The new task's real parent. For a new thread the kernel gives the real parent of
        /// its whole process (`CLONE_THREAD` reuses it), not the thread that created it.
        parent: Task,
        /// The new task.
        child: Task,
    },
    /// A successful `execve`.
    Exec {
        /// The task that exec'd.
        process: Task,
    },
    /// Real / effective uid changed (in the initial user namespace).
    Uid {
        /// The task.
        process: Task,
        /// New real uid.
        ruid: u32,
        /// New effective uid.
        euid: u32,
    },
    /// Real / effective gid changed (in the initial user namespace).
    Gid {
        /// The task.
        process: Task,
        /// New real gid.
        rgid: u32,
        /// New effective gid.
        egid: u32,
    },
    /// `setsid`: `process.tgid` is the new session id.
    Sid {
        /// The task.
        process: Task,
    },
    /// ptrace attach (`tracer` is `Some`) or detach (`None`).
    Ptrace {
        /// The traced task.
        process: Task,
        /// The tracer on attach; the kernel sends 0 on detach.
        tracer: Option<Task>,
    },
    /// The task name changed (`prctl(PR_SET_NAME)`, a write to `/proc/<pid>/comm`).
    Comm {
        /// The task.
        process: Task,
        /// The new name.
        comm: Comm,
    },
    /// A core dump starts (sent whether or not a core file is then written).
    Coredump {
        /// The dumping task.
        process: Task,
        /// The real parent; `None` when the kernel sent 0 (task no longer alive).
        parent: Option<Task>,
    },
    /// A task exits.
    Exit {
        /// The exiting task.
        process: Task,
        /// The raw wait status.
        status: ExitStatus,
        /// The signal the parent is sent (17 `SIGCHLD` for a child process; -1 for a thread
        /// that is not its group's leader).
        exit_signal: i32,
        /// The real parent; `None` when the kernel sent 0 (task already unhashed).
        parent: Option<Task>,
    },
}

/// One process event.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcEvent {
    /// `cn_msg.seq`: the kernel's per-CPU message counter (see [`CpuSeqTracker`]). 0 when
    /// the event was decoded from bare `proc_event` bytes by [`ProcEvent::parse`].
    ///
    /// [`CpuSeqTracker`]: super::CpuSeqTracker
    pub seq: u32,
    /// `cn_msg.ack`: 0 for events, the request's `ack + 1` for an ACK.
    pub ack: u32,
    /// The CPU the kernel built the message on (the key of `seq`). Older kernels sent
    /// `u32::MAX` (-1) in ACKs; 6.x kernels overwrite it with the real CPU.
    pub cpu: u32,
    /// `ktime_get_ns()` when the event was built: `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
    /// The typed body.
    pub body: EventBody,
}

fn task(d: &[u8], at: usize) -> Task {
    Task {
        pid: get_u32(d, at),
        tgid: get_u32(d, at + 4),
    }
}

fn opt_task(d: &[u8], at: usize) -> Option<Task> {
    let t = task(d, at);
    (t.pid != 0 || t.tgid != 0).then_some(t)
}

impl ProcEvent {
    /// Decodes a `struct proc_event` (the `cn_msg` data). Checks every length before reading
    /// and never panics. Error offsets are relative to the start of `data`; see
    /// [`parse_at`](Self::parse_at) for datagram offsets.
    pub fn parse(data: &[u8]) -> Result<ProcEvent, DecodeError> {
        Self::parse_at(data, 0)
    }

    /// As [`parse`](Self::parse), reporting error offsets as `base + offset in data`
    /// (`base` is 36 plus the message's offset for data in a received datagram).
    pub fn parse_at(d: &[u8], base: usize) -> Result<ProcEvent, DecodeError> {
        if d.len() < PROC_EVENT_HEADER_LEN {
            return Err(DecodeError::new(
                base,
                DecodeErrorKind::ShortPayload {
                    what: "proc_event header",
                    need: PROC_EVENT_HEADER_LEN,
                    have: d.len(),
                },
            ));
        }
        let what = get_u32(d, 0);
        let kind = EventKind::from_what(what).ok_or(DecodeError::new(
            base,
            DecodeErrorKind::UnknownValue {
                what: "proc_event.what",
                value: what,
            },
        ))?;
        let need = PROC_EVENT_HEADER_LEN + kind.body_len();
        if d.len() < need {
            return Err(DecodeError::new(
                base + PROC_EVENT_HEADER_LEN,
                DecodeErrorKind::ShortPayload {
                    what: body_name(kind),
                    need,
                    have: d.len(),
                },
            ));
        }
        let b = PROC_EVENT_HEADER_LEN;
        let body = match kind {
            EventKind::Ack => EventBody::Ack { err: get_u32(d, b) },
            EventKind::Fork => EventBody::Fork {
                parent: task(d, b),
                child: task(d, b + 8),
            },
            EventKind::Exec => EventBody::Exec {
                process: task(d, b),
            },
            EventKind::Uid => EventBody::Uid {
                process: task(d, b),
                ruid: get_u32(d, b + 8),
                euid: get_u32(d, b + 12),
            },
            EventKind::Gid => EventBody::Gid {
                process: task(d, b),
                rgid: get_u32(d, b + 8),
                egid: get_u32(d, b + 12),
            },
            EventKind::Sid => EventBody::Sid {
                process: task(d, b),
            },
            EventKind::Ptrace => EventBody::Ptrace {
                process: task(d, b),
                tracer: opt_task(d, b + 8),
            },
            EventKind::Comm => EventBody::Comm {
                process: task(d, b),
                comm: Comm::new(&d[b + 8..b + 24]),
            },
            EventKind::Coredump => EventBody::Coredump {
                process: task(d, b),
                parent: opt_task(d, b + 8),
            },
            EventKind::Exit => EventBody::Exit {
                process: task(d, b),
                status: ExitStatus(get_u32(d, b + 8)),
                exit_signal: get_u32(d, b + 12) as i32,
                parent: opt_task(d, b + 16),
            },
        };
        Ok(ProcEvent {
            seq: 0,
            ack: 0,
            cpu: get_u32(d, 4),
            timestamp_ns: get_u64(d, 8),
            body,
        })
    }

    /// Appends this event as the kernel lays out `struct proc_event` (40 bytes, host byte
    /// order, the unused part of the union zero): the inverse of [`parse`](Self::parse), so
    /// `parse(emit(e)) == e` (with `seq` and `ack`, which live in the `cn_msg`, as 0).
    /// Useful to build test events and to check decoders.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let put = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_ne_bytes());
        let put_task = |out: &mut Vec<u8>, t: Task| {
            out.extend_from_slice(&t.pid.to_ne_bytes());
            out.extend_from_slice(&t.tgid.to_ne_bytes());
        };
        let none = Task { pid: 0, tgid: 0 };
        put(out, self.kind().what());
        put(out, self.cpu);
        out.extend_from_slice(&self.timestamp_ns.to_ne_bytes());
        match self.body {
            EventBody::Ack { err } => put(out, err),
            EventBody::Fork { parent, child } => {
                put_task(out, parent);
                put_task(out, child);
            }
            EventBody::Exec { process } | EventBody::Sid { process } => put_task(out, process),
            EventBody::Uid {
                process,
                ruid: a,
                euid: b,
            }
            | EventBody::Gid {
                process,
                rgid: a,
                egid: b,
            } => {
                put_task(out, process);
                put(out, a);
                put(out, b);
            }
            EventBody::Ptrace { process, tracer } => {
                put_task(out, process);
                put_task(out, tracer.unwrap_or(none));
            }
            EventBody::Comm { process, comm } => {
                put_task(out, process);
                out.extend_from_slice(&comm.0);
            }
            EventBody::Coredump { process, parent } => {
                put_task(out, process);
                put_task(out, parent.unwrap_or(none));
            }
            EventBody::Exit {
                process,
                status,
                exit_signal,
                parent,
            } => {
                put_task(out, process);
                put(out, status.0);
                put(out, exit_signal as u32);
                put_task(out, parent.unwrap_or(none));
            }
        }
        out.resize(start + PROC_EVENT_LEN, 0);
    }

    /// Decodes a connector message as a proc event **only if the kernel sent it**: `port` is
    /// the sender's port id from `recvmsg` ([`RecvMeta::port`](crate::sys::RecvMeta)); only
    /// the kernel sends from port 0, so a user-space process multicasting fake events on
    /// group 1 is rejected with [`Rejected::NotFromKernel`]. Fills in `seq` and `ack` from
    /// the message. This is the entry point for receive paths other than
    /// [`ProcListener`](super::ProcListener), such as a connector-registry callback.
    pub fn from_kernel(port: u32, msg: &CnMsg) -> Result<ProcEvent, Rejected> {
        if port != 0 {
            return Err(Rejected::NotFromKernel { port });
        }
        if msg.id != CbId::PROC {
            return Err(Rejected::NotProc { id: msg.id });
        }
        let mut ev = ProcEvent::parse(&msg.data)?;
        ev.seq = msg.seq;
        ev.ack = msg.ack;
        Ok(ev)
    }

    /// The event's kind.
    pub const fn kind(&self) -> EventKind {
        match self.body {
            EventBody::Ack { .. } => EventKind::Ack,
            EventBody::Fork { .. } => EventKind::Fork,
            EventBody::Exec { .. } => EventKind::Exec,
            EventBody::Uid { .. } => EventKind::Uid,
            EventBody::Gid { .. } => EventKind::Gid,
            EventBody::Sid { .. } => EventKind::Sid,
            EventBody::Ptrace { .. } => EventKind::Ptrace,
            EventBody::Comm { .. } => EventKind::Comm,
            EventBody::Coredump { .. } => EventKind::Coredump,
            EventBody::Exit { .. } => EventKind::Exit,
        }
    }

    /// The task the event is about: the child of a fork, the traced task of a ptrace event,
    /// the process of every other event; `None` for an ACK.
    pub const fn task(&self) -> Option<Task> {
        match self.body {
            EventBody::Ack { .. } => None,
            EventBody::Fork { child, .. } => Some(child),
            EventBody::Exec { process }
            | EventBody::Uid { process, .. }
            | EventBody::Gid { process, .. }
            | EventBody::Sid { process }
            | EventBody::Ptrace { process, .. }
            | EventBody::Comm { process, .. }
            | EventBody::Coredump { process, .. }
            | EventBody::Exit { process, .. } => Some(process),
        }
    }

    /// True for an ACK.
    pub const fn is_ack(&self) -> bool {
        matches!(self.body, EventBody::Ack { .. })
    }

    /// The raw wait status of an exit event, 0 for every other event (what the kernel's
    /// filter looks at).
    pub const fn exit_status_raw(&self) -> u32 {
        match self.body {
            EventBody::Exit { status, .. } => status.0,
            _ => 0,
        }
    }
}

fn body_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Ack => "proc_event ack",
        EventKind::Fork => "proc_event fork",
        EventKind::Exec => "proc_event exec",
        EventKind::Uid => "proc_event uid",
        EventKind::Gid => "proc_event gid",
        EventKind::Sid => "proc_event sid",
        EventKind::Ptrace => "proc_event ptrace",
        EventKind::Comm => "proc_event comm",
        EventKind::Coredump => "proc_event coredump",
        EventKind::Exit => "proc_event exit",
    }
}

/// Why [`ProcEvent::from_kernel`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The sender was a user-space socket (port id ≠ 0): a spoofed event.
    #[error("proc event from user-space port {port}, not the kernel: rejected as spoofed")]
    NotFromKernel {
        /// The sender's port id.
        port: u32,
    },
    /// The message is not for the proc connector's id 1.1.
    #[error("message for connector id {id}, not the proc connector 1.1")]
    NotProc {
        /// The id it carried.
        id: CbId,
    },
    /// The data is not a valid `proc_event`.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// `enum proc_cn_mcast_op`: what a request asks of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum McastOp {
    /// `PROC_CN_MCAST_LISTEN` (1): start receiving events; the kernel's listener count goes up.
    Listen = 1,
    /// `PROC_CN_MCAST_IGNORE` (2): stop; the listener count goes down.
    Ignore = 2,
}

/// Builds a request to the proc connector. With `filter` `None`, the data is the 4-byte op
/// that every kernel understands (and that means "all events"); with `Some(set)` it is the
/// 8-byte `struct proc_input {mcast_op, event_type}` of Linux 6.6+, which older kernels
/// silently ignore. `ack` comes back as `ack + 1` in the kernel's ACK.
pub fn request(op: McastOp, filter: Option<EventSet>, seq: u32, ack: u32) -> CnMsg {
    let mut data = Vec::with_capacity(8);
    data.extend_from_slice(&(op as u32).to_ne_bytes());
    if let Some(set) = filter {
        data.extend_from_slice(&set.bits().to_ne_bytes());
    }
    CnMsg::new(CbId::PROC, Bytes::from(data)).with_seq(seq, ack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(what: u32, body: &[u32]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&what.to_ne_bytes());
        d.extend_from_slice(&3u32.to_ne_bytes());
        d.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_ne_bytes());
        for w in body {
            d.extend_from_slice(&w.to_ne_bytes());
        }
        d.resize(PROC_EVENT_LEN, 0);
        d
    }

    #[test]
    fn decodes_every_kind() {
        let p = |w, b: &[u32]| ProcEvent::parse(&ev(w, b)).unwrap();
        let e = p(WHAT_FORK, &[10, 10, 11, 10]);
        assert_eq!(e.cpu, 3);
        assert_eq!(e.timestamp_ns, 0x0123_4567_89ab_cdef);
        assert_eq!(
            e.body,
            EventBody::Fork {
                parent: Task { pid: 10, tgid: 10 },
                child: Task { pid: 11, tgid: 10 }
            }
        );
        assert!(e.task().unwrap().is_thread());
        assert_eq!(p(WHAT_NONE, &[22]).body, EventBody::Ack { err: 22 });
        assert!(matches!(p(WHAT_EXEC, &[5, 5]).body, EventBody::Exec { .. }));
        assert_eq!(
            p(WHAT_UID, &[5, 5, 65534, 0]).body,
            EventBody::Uid {
                process: Task { pid: 5, tgid: 5 },
                ruid: 65534,
                euid: 0
            }
        );
        assert!(matches!(
            p(WHAT_GID, &[5, 5, 1, 2]).body,
            EventBody::Gid {
                rgid: 1,
                egid: 2,
                ..
            }
        ));
        assert!(matches!(p(WHAT_SID, &[5, 5]).body, EventBody::Sid { .. }));
        assert!(matches!(
            p(WHAT_PTRACE, &[5, 5, 0, 0]).body,
            EventBody::Ptrace { tracer: None, .. }
        ));
        assert!(matches!(
            p(WHAT_PTRACE, &[5, 5, 7, 7]).body,
            EventBody::Ptrace {
                tracer: Some(Task { pid: 7, tgid: 7 }),
                ..
            }
        ));
        let mut c = ev(WHAT_COMM, &[5, 5]);
        c[24..29].copy_from_slice(b"hello");
        let e = ProcEvent::parse(&c).unwrap();
        let EventBody::Comm { comm, .. } = e.body else {
            panic!()
        };
        assert_eq!(comm.as_bytes(), b"hello");
        assert!(matches!(
            p(WHAT_COREDUMP, &[5, 5, 1, 1]).body,
            EventBody::Coredump {
                parent: Some(_),
                ..
            }
        ));
        let e = p(WHAT_EXIT, &[5, 5, 0x300, 17, 1, 1]);
        let EventBody::Exit {
            status,
            exit_signal,
            ..
        } = e.body
        else {
            panic!()
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(exit_signal, 17);
        let e = p(WHAT_EXIT, &[6, 5, 9, u32::MAX, 0, 0]);
        let EventBody::Exit {
            status,
            exit_signal,
            parent,
            ..
        } = e.body
        else {
            panic!()
        };
        assert_eq!(status.signal(), Some(9));
        assert_eq!(status.code(), None);
        assert_eq!(exit_signal, -1);
        assert_eq!(parent, None);
    }

    #[test]
    fn exit_status_decoding() {
        assert_eq!(ExitStatus(0).code(), Some(0));
        assert!(ExitStatus(0).success());
        assert_eq!(ExitStatus(0x0500).code(), Some(5));
        assert_eq!(ExitStatus(0x86).signal(), Some(6));
        assert!(ExitStatus(0x86).core_dumped());
        assert!(!ExitStatus(0x06).core_dumped());
        assert_eq!(ExitStatus(0x06).to_string(), "signal 6");
        assert_eq!(ExitStatus(0x86).to_string(), "signal 6 (core dumped)");
        assert_eq!(ExitStatus(0x0300).to_string(), "exit code 3");
        // A stopped status (0x7f low byte) is neither exited nor signaled.
        assert_eq!(ExitStatus(0x137f).code(), None);
        assert_eq!(ExitStatus(0x137f).signal(), None);
    }

    #[test]
    fn short_and_unknown_are_errors_with_offsets() {
        let e = ProcEvent::parse_at(&[0; 15], 36).unwrap_err();
        assert_eq!(e.offset, 36);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::ShortPayload {
                need: 16,
                have: 15,
                ..
            }
        ));
        let d = ev(WHAT_EXIT, &[]);
        let e = ProcEvent::parse_at(&d[..39], 36).unwrap_err();
        assert_eq!(e.offset, 52);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::ShortPayload {
                what: "proc_event exit",
                need: 40,
                have: 39
            }
        ));
        // An exec needs only 24 bytes.
        assert!(ProcEvent::parse(&ev(WHAT_EXEC, &[1, 1])[..24]).is_ok());
        let e = ProcEvent::parse(&ev(0x3, &[])).unwrap_err();
        assert!(matches!(
            e.kind,
            DecodeErrorKind::UnknownValue { value: 3, .. }
        ));
        // NONZERO_EXIT is a filter bit, never a `what`.
        assert!(ProcEvent::parse(&ev(WHAT_NONZERO_EXIT, &[])).is_err());
    }

    #[test]
    fn from_kernel_rejects_user_space_senders() {
        let msg = CnMsg::new(CbId::PROC, ev(WHAT_EXEC, &[9, 9])).with_seq(77, 0);
        assert_eq!(
            ProcEvent::from_kernel(1234, &msg),
            Err(Rejected::NotFromKernel { port: 1234 })
        );
        let e = ProcEvent::from_kernel(0, &msg).unwrap();
        assert_eq!(e.seq, 77);
        let other = CnMsg::new(CbId::new(2, 1), ev(WHAT_EXEC, &[9, 9]));
        assert!(matches!(
            ProcEvent::from_kernel(0, &other),
            Err(Rejected::NotProc { .. })
        ));
    }

    #[test]
    fn filter_matches_the_kernel() {
        let exit = |code| ProcEvent::parse(&ev(WHAT_EXIT, &[5, 5, code, 17, 1, 1])).unwrap();
        let fork = ProcEvent::parse(&ev(WHAT_FORK, &[1, 1, 2, 2])).unwrap();
        let ack = ProcEvent::parse(&ev(WHAT_NONE, &[0])).unwrap();
        let nz = EventSet::NONZERO_EXIT;
        assert!(nz.matches(&exit(0x100)));
        assert!(!nz.matches(&exit(0)));
        assert!(!nz.matches(&fork));
        assert!(!nz.matches(&ack));
        let both = EventSet::NONZERO_EXIT | EventSet::EXIT;
        assert!(both.matches(&exit(0)));
        assert!(EventSet::ALL.matches(&ack));
        let all_but_comm = EventSet::from_bits_truncate(WHAT_ALL & !WHAT_COMM);
        assert!(!all_but_comm.matches(&ack));
        assert!((EventSet::FORK | EventSet::EXEC).matches(&fork));
    }

    #[test]
    fn event_set_text() {
        let s: EventSet = "fork, exec,nonzero-exit".parse().unwrap();
        assert_eq!(s, EventSet::FORK | EventSet::EXEC | EventSet::NONZERO_EXIT);
        assert_eq!(s.to_string(), "fork,exec,nonzero-exit");
        assert_eq!("all".parse::<EventSet>().unwrap(), EventSet::ALL);
        assert_eq!(EventSet::ALL.bits(), 0xE000_03C7);
        assert!("forks".parse::<EventSet>().is_err());
        assert_eq!(EventSet::from_bits_truncate(0xffff_ffff), EventSet::ALL);
    }

    #[test]
    fn request_encoding() {
        let m = request(McastOp::Listen, None, 1, 2);
        assert_eq!(&m.data[..], &1u32.to_ne_bytes());
        assert_eq!((m.seq, m.ack), (1, 2));
        let m = request(McastOp::Ignore, Some(EventSet::NONZERO_EXIT), 0, 0);
        assert_eq!(&m.data[..4], &2u32.to_ne_bytes());
        assert_eq!(&m.data[4..], &0x2000_0000u32.to_ne_bytes());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = ProcEvent::parse(&data);
        }

        #[test]
        fn parse_accepts_every_known_what(
            kind in 0usize..10,
            rest in proptest::collection::vec(proptest::num::u8::ANY, 36),
        ) {
            let mut d = EventKind::ALL[kind].what().to_ne_bytes().to_vec();
            d.extend_from_slice(&rest);
            let e = ProcEvent::parse(&d).unwrap();
            proptest::prop_assert_eq!(e.kind(), EventKind::ALL[kind]);
        }
    }
}
