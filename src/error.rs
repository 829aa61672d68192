//! Error types.
//!
//! Every fallible operation in cnbus returns [`Error`], a plain enum that callers can
//! match on. I/O failures keep the [`Op`] that failed and the raw errno, in the spirit of
//! `mdlayher/netlink`'s `OpError`: a log line says *what* cnbus was doing, and a program can
//! still branch on the errno. Malformed wire data is a [`DecodeError`] (the codec's,
//! re-exported here), which says what was wrong and at which byte offset of the datagram.

use std::fmt;
use std::io;

use crate::codec::TooLarge;
pub use crate::codec::{DecodeError, DecodeErrorKind};

/// The operation that failed, kept inside [`Error`] so messages say what cnbus was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `socket(AF_NETLINK, SOCK_RAW, NETLINK_CONNECTOR)`.
    Socket,
    /// `bind` to a kernel-assigned port id.
    Bind,
    /// `connect` to the kernel (port id 0), so that user-space unicasts are refused.
    Connect,
    /// `getsockname`, to learn the port id.
    LocalAddr,
    /// `NETLINK_ADD_MEMBERSHIP` for a multicast group.
    Join(u32),
    /// `NETLINK_DROP_MEMBERSHIP` for a multicast group.
    Leave(u32),
    /// `SO_RCVBUF` / `SO_RCVBUFFORCE`.
    SetRecvBuffer,
    /// `SO_SNDBUF` / `SO_SNDBUFFORCE`.
    SetSendBuffer,
    /// Reading a socket option back.
    GetOption,
    /// Setting a socket option other than the ones above.
    SetOption(&'static str),
    /// `sendto` / `sendmsg` of one datagram.
    Send,
    /// `sendmmsg` of a batch of datagrams.
    SendBatch,
    /// `recvmsg`.
    Recv,
    /// `poll` on the socket and the wake-up event.
    Poll,
    /// Creating or signalling the `eventfd` used to wake a blocked receiver.
    Wake,
    /// Spawning a worker thread.
    Spawn,
    /// Waiting for a reply to a request.
    Request,
    /// `membarrier(2)`, the bus's asymmetric memory barrier.
    Membarrier,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Socket => f.write_str("socket"),
            Op::Bind => f.write_str("bind"),
            Op::Connect => f.write_str("connect"),
            Op::LocalAddr => f.write_str("getsockname"),
            Op::Join(g) => write!(f, "join group {g}"),
            Op::Leave(g) => write!(f, "leave group {g}"),
            Op::SetRecvBuffer => f.write_str("set receive buffer"),
            Op::SetSendBuffer => f.write_str("set send buffer"),
            Op::GetOption => f.write_str("getsockopt"),
            Op::SetOption(name) => write!(f, "setsockopt {name}"),
            Op::Send => f.write_str("send"),
            Op::SendBatch => f.write_str("sendmmsg"),
            Op::Recv => f.write_str("recv"),
            Op::Poll => f.write_str("poll"),
            Op::Wake => f.write_str("eventfd"),
            Op::Spawn => f.write_str("spawn thread"),
            Op::Request => f.write_str("request"),
            Op::Membarrier => f.write_str("membarrier"),
        }
    }
}

/// The error type of cnbus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed. `source` carries the errno (see [`Error::errno`]).
    #[error("{op}: {source}")]
    Io {
        /// What cnbus was doing.
        op: Op,
        /// The OS error, with its errno.
        #[source]
        source: io::Error,
    },
    /// The socket's receive queue overflowed (`ENOBUFS`): the kernel dropped messages
    /// addressed to this socket. The socket stays usable.
    #[error(
        "{op}: receive queue overflowed (ENOBUFS): the kernel dropped messages for this socket"
    )]
    Overrun {
        /// What cnbus was doing.
        op: Op,
    },
    /// The caller lacks the privilege the operation needs (`EPERM` / `EACCES`): joining the
    /// proc connector's group, sending to the kernel and forcing buffer sizes need
    /// `CAP_NET_ADMIN` (root).
    #[error("{op}: permission denied (errno {errno}); the connector needs CAP_NET_ADMIN for this")]
    PermissionDenied {
        /// What cnbus was doing.
        op: Op,
        /// `EPERM` or `EACCES`.
        errno: i32,
    },
    /// The kernel side of the connector is not reachable (`ECONNREFUSED`). The kernel creates
    /// its connector socket only in the initial network namespace, so a process in any other
    /// network namespace (a container, `unshare -n`) cannot talk to it.
    #[error(
        "{op}: the kernel connector refused the message (ECONNREFUSED): it exists only in the \
         initial network namespace; is this process in a container or another netns?"
    )]
    NoKernelConnector {
        /// What cnbus was doing.
        op: Op,
    },
    /// A unicast to a user-space port was refused (`ECONNREFUSED`): no socket holds that
    /// port id (its owner closed it or exited), or the socket there is connected to the
    /// kernel and takes only the kernel's messages (as proc listeners are). Not a
    /// namespace problem: that is [`Error::NoKernelConnector`], for sends to the kernel.
    #[error(
        "{op}: port {port} refused the message (ECONNREFUSED): no socket holds that port id \
         (its owner closed it or exited), or the socket there takes only the kernel's messages"
    )]
    Refused {
        /// What cnbus was doing.
        op: Op,
        /// The destination port id.
        port: u32,
    },
    /// A received datagram was longer than the receive buffer and was cut (`MSG_TRUNC`).
    #[error("{op}: datagram of {len} bytes truncated to the {capacity}-byte receive buffer")]
    Truncated {
        /// What cnbus was doing.
        op: Op,
        /// The datagram's real length.
        len: usize,
        /// The buffer size it was cut to.
        capacity: usize,
    },
    /// A message is too large for the limit that applies to it.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The encoded size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A multicast on an id or group the kernel owns (idx 1..=10, groups below 12). Netlink
    /// hands every multicast to the kernel's connector too, which would run the kernel's
    /// handler for that idx; allow it explicitly if that is intended.
    #[error(
        "refusing to multicast id {id} on group {group}: idx 1..=10 and groups below 12 belong \
         to the kernel's connector users (use idx > 10 and groups 12..=32, or allow it explicitly)"
    )]
    KernelOwned {
        /// The message's id.
        id: crate::codec::CbId,
        /// The group.
        group: u32,
    },
    /// Malformed wire data.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An argument is out of range (for example a multicast group outside 1..=32).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A request got no reply before its deadline.
    #[error("{op}: no reply before the deadline")]
    TimedOut {
        /// What cnbus was doing.
        op: Op,
    },
    /// The call would wait for something only the calling thread can do: a
    /// [`request`](crate::connector::ConnectorHandle::request) made on the connector's
    /// dispatcher thread (from a callback or the event handler) would wait for a reply that
    /// only that thread reads. Make the request from another thread.
    #[error("{op}: made on the dispatcher thread, the one that reads the reply: it would wait for nothing")]
    WouldDeadlock {
        /// What cnbus was asked to do.
        op: Op,
    },
    /// The object has been shut down.
    #[error("shut down")]
    Closed,
    /// A thread of cnbus panicked (a bug). The panic was caught and what it held was
    /// accounted for (the bus counts the messages it could not send as failed).
    #[error("{thread} panicked: {message}")]
    Panicked {
        /// Which thread or task: for example `"bus flusher"`.
        thread: &'static str,
        /// The panic's message.
        message: String,
    },
    /// The proc connector cannot serve this process; `reason` says why (outside the initial
    /// pid or user namespace, no `cn_proc` in the kernel, no kernel-side filtering).
    #[error("proc connector: {reason}")]
    ProcConnector {
        /// Why, in words meant for the user.
        reason: &'static str,
    },
}

impl From<TooLarge> for Error {
    fn from(e: TooLarge) -> Self {
        Error::TooLarge {
            len: e.len,
            limit: e.limit,
        }
    }
}

impl Error {
    /// Classifies an OS error from a send to `dest`: as [`from_io`](Self::from_io), but
    /// a unicast refused by a user-space port is [`Error::Refused`], not a missing kernel
    /// connector.
    pub fn from_send(op: Op, dest: crate::codec::Dest, source: io::Error) -> Self {
        match (dest, source.raw_os_error()) {
            (crate::codec::Dest::Port(port), Some(libc::ECONNREFUSED)) if port != 0 => {
                Error::Refused { op, port }
            }
            _ => Self::from_io(op, source),
        }
    }

    /// Classifies an OS error from `op`: the errnos callers care about get their own variant.
    pub fn from_io(op: Op, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOBUFS) if matches!(op, Op::Recv | Op::Poll) => Error::Overrun { op },
            Some(e @ (libc::EPERM | libc::EACCES)) => Error::PermissionDenied { op, errno: e },
            Some(libc::ECONNREFUSED) => Error::NoKernelConnector { op },
            _ => Error::Io { op, source },
        }
    }

    /// The errno behind this error, if it came from the OS.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::Overrun { .. } => Some(libc::ENOBUFS),
            Error::PermissionDenied { errno, .. } => Some(*errno),
            Error::NoKernelConnector { .. } | Error::Refused { .. } => Some(libc::ECONNREFUSED),
            Error::TimedOut { .. } => Some(libc::ETIMEDOUT),
            Error::WouldDeadlock { .. } => Some(libc::EDEADLK),
            _ => None,
        }
    }

    /// The operation that failed, if the error came from one.
    pub fn op(&self) -> Option<Op> {
        match self {
            Error::Io { op, .. }
            | Error::Overrun { op }
            | Error::PermissionDenied { op, .. }
            | Error::NoKernelConnector { op }
            | Error::Refused { op, .. }
            | Error::Truncated { op, .. }
            | Error::TimedOut { op }
            | Error::WouldDeadlock { op } => Some(*op),
            _ => None,
        }
    }
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
