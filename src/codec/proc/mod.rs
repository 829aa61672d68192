//! The proc connector's wire format (id 1.1) as plain data: decoding `struct proc_event`, the event-type set, and
//! the encoders of the `LISTEN` / `IGNORE` requests. Pure: no I/O, no `unsafe`.
//!
//! Layout (`include/uapi/linux/cn_proc.h`, described byte by byte in `proto/proc_event.md`):
//! a 16-byte header `{what: u32, cpu: u32, timestamp_ns: u64}` followed by a 24-byte union
//! whose member depends on `what`. The kernel always sends 40 bytes; the decoder requires only
//! the bytes the member it reads occupies, so it accepts longer payloads from future kernels.
//! Every integer is read with a byte copy: in a datagram `timestamp_ns` sits at offset 44,
//! which is not 8-aligned.
//!
//! Re-exported as [`cnbus::proc::event`](crate::proc::event) and from [`cnbus::proc`](crate::proc).
//! Split in files: the event kinds and the event set ([`EventKind`], [`EventSet`], their
//! names), the fields ([`Task`], [`ExitStatus`], [`Comm`]), and here the events
//! ([`ProcEvent`], [`EventBody`]: decode and encode) and the request builder ([`request`]).

use bytes::Bytes;

use crate::codec::{get_u32, get_u64, CbId, CnMsg};
use crate::codec::{DecodeError, DecodeErrorKind};

mod fields;
mod kind;
#[cfg(test)]
mod tests;

pub use fields::{Comm, ExitStatus, Task};
pub use kind::{EventKind, EventSet, UnknownEventName};

/// The multicast group of the proc connector (its events go to group 1).
pub const PROC_GROUP: u32 = 1;

/// `sizeof(struct proc_event)`: what the kernel sends.
pub const PROC_EVENT_LEN: usize = 40;
/// Size of the common header `{what, cpu, timestamp_ns}`.
pub const PROC_EVENT_HEADER_LEN: usize = 16;

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
    /// [`CpuSeqTracker`]: crate::proc::CpuSeqTracker
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
    /// [`ProcListener`](crate::proc::ProcListener), such as a connector-registry callback.
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
