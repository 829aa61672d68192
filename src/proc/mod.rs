//! The proc connector (id `1.1`, group 1): typed process events.
//!
//! * [`event`]: decoding `struct proc_event` into [`ProcEvent`] (pure, never panics), the
//!   [`EventSet`] a listener subscribes to, and the `LISTEN` / `IGNORE` request encoder.
//! * [`ProcListener`]: a subscription. It chooses kernel-side filtering (Linux 6.6+
//!   `proc_input`) or user-space filtering at run time, never waits for an ACK the kernel
//!   does not send to a filtered socket, accepts events only from the kernel (port 0),
//!   reports lost events (`ENOBUFS`, and exact per-CPU sequence gaps when unfiltered), and
//!   sends `IGNORE` on drop. Use it as an iterator, or move it to a thread feeding a bounded
//!   channel ([`ProcListener::into_channel`]).
//! * [`ProcDecoder`]: the listener's decoding half (sender check, decoding, gap tracking,
//!   filtering, counters) for other receive paths, such as a callback registered for
//!   [`CbId::PROC`](crate::CbId::PROC) on a [`Connector`](crate::connector::Connector);
//!   [`ProcEvent::from_kernel`] and [`CpuSeqTracker`] are its parts.
//!
//! * [`Enricher`] ([`enrich`]): process attribution for events: a pid-reuse-safe
//!   [`ProcessKey`], cgroup and container id, pid namespace, command line, each with its
//!   [`InfoSource`].
//!
//! The design notes, including the facts observed on Linux 6.18, are in `docs/PROC.md`.

pub mod enrich;
/// The proc wire format: [`crate::codec::proc`], under its former name.
pub use crate::codec::proc as event;
mod decoder;
mod listener;
mod loss;
#[cfg(not(cnbus_loom))]
mod registered;
mod seq;
#[cfg(all(feature = "tokio", not(cnbus_loom)))]
mod stream;

pub use decoder::{Decoded, ProcDecoder};
pub use enrich::{EnrichConfig, EnrichStats, Enricher, InfoSource, ProcessInfo, ProcessKey};
pub use event::{
    request, Comm, EventBody, EventKind, EventSet, ExitStatus, McastOp, ProcEvent, Rejected, Task,
    UnknownEventName, PROC_EVENT_HEADER_LEN, PROC_EVENT_LEN,
};
pub use listener::{
    FilterMode, Filtering, Iter, ProcChannel, ProcListener, ProcListenerBuilder, ShutdownHandle,
    DEFAULT_ACK_TIMEOUT, DEFAULT_RECV_BUFFER,
};
pub use loss::{Loss, LossSource, LossStats, Received, SETTLE_TIMEOUT};
#[cfg(not(cnbus_loom))]
pub use registered::{register, ProcRegistration};
pub use seq::{CpuSeqTracker, SeqCheck};

#[cfg(all(feature = "tokio", not(cnbus_loom)))]
pub use stream::ProcStream;

/// An `ack` value for a proc-connector request that no other socket on the host uses: the
/// kernel multicasts every ACK to every listener, so a requester recognises its own by
/// `ack + 1`. Mixes the socket's port id (unique on the host) with a per-socket counter.
pub fn ack_token(port: u32, n: u32) -> u32 {
    port ^ n.rotate_right(8)
}
