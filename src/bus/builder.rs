//! The bus's public configuration and refusals: [`InsertError`], [`FullPolicy`],
//! [`Framing`], and [`BusBuilder`], which checks the numbers, allocates the shards'
//! rings and starts the flusher.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam::utils::CachePadded;
use parking_lot::{Condvar, Mutex};

use crate::codec::{nlmsg_align, CbId, CN_MSG_HDRLEN, CONNECTOR_MAX_MSG_SIZE, NLMSG_HDRLEN};
use crate::error::{Error, Op, Result};
use crate::sys::{self, ConnectorSocket, Dest};

use super::ring::Ring;
use super::stats::Counters;
use super::{flusher, Bus, Inner, Shard};

/// Most shards a bus may have ([`BusBuilder::shards`]).
const MAX_SHARDS: usize = 1 << 16;

/// What the kernel keeps of a netlink sender's send buffer: a datagram longer than
/// `SO_SNDBUF` less this fails with `EMSGSIZE` (`netlink_sendmsg`).
const SNDBUF_OVERHEAD: usize = 32;

/// Default of [`BusBuilder::send_timeout`].
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A message the bus did not accept, handed back to the caller.
#[derive(Debug, thiserror::Error)]
pub enum InsertError<M> {
    /// The caller's ring is full ([`FullPolicy::Reject`]); or, for that policy, its
    /// shard's lock stays with another thread, which only a failed `membarrier(2)` causes
    /// (the other policies then send on the caller's thread: docs/BUS.md, "Memory
    /// orderings"), or, from a thread-local's destructor after the bus's own thread-local
    /// state is gone, other shards still hold messages (the other policies flush them
    /// first, to keep the thread's order), so that a rejecting insert never blocks.
    #[error("bus queue is full")]
    Full(M),
    /// The ring stayed full until the blocking insert's timeout.
    #[error("bus queue stayed full until the timeout")]
    Timeout(M),
    /// The bus's flusher is gone (it stopped or panicked): nothing would send the message.
    #[error("bus is closed")]
    Closed(M),
    /// The message can never fit in one datagram of this bus (or in `cn_msg.len`).
    #[error("message of {len} bytes exceeds the bus's datagram size of {limit} bytes")]
    TooLarge {
        /// The message.
        msg: M,
        /// Its encoded size.
        len: usize,
        /// The bus's datagram size.
        limit: usize,
    },
    /// The id's idx (1..=10) belongs to the kernel's connector users, and the bus sends to
    /// a group, which the kernel receives too: refused unless
    /// [`BusBuilder::allow_kernel_ids`] is on (as [`Connector`](crate::connector::Connector)
    /// refuses it).
    #[error("idx 1..=10 belongs to the kernel's connector users (BusBuilder::allow_kernel_ids)")]
    KernelOwned(M),
    /// [`FullPolicy::SendDirect`]: the direct send failed. Counted in
    /// [`BusStats::rejected_send`](super::BusStats::rejected_send) (and its errno in
    /// `send_errors`).
    #[error("direct send failed: {error}")]
    Send {
        /// The message.
        msg: M,
        /// Why.
        #[source]
        error: Error,
    },
}

impl<M> InsertError<M> {
    /// The message that was not accepted.
    pub fn into_inner(self) -> M {
        match self {
            Self::Full(m) | Self::Timeout(m) | Self::Closed(m) | Self::KernelOwned(m) => m,
            Self::TooLarge { msg, .. } | Self::Send { msg, .. } => msg,
        }
    }
}

/// What an insert does when the caller's ring (its shard's, or its Producer's) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// Hand the message back at once: [`InsertError::Full`]. Never blocks on another
    /// thread's drain or send: also when the shard's lock cannot be taken without a
    /// failed barrier, or during thread teardown (see [`InsertError::Full`]). With
    /// [`assist`](BusBuilder::assist), an accepted insert that brings its ring to the
    /// watermark drains it as any insert does (without waiting for another drain or a
    /// send lock it finds held), except to a [`Dest::Port`] receiver (not the kernel),
    /// whose full queue a send may wait for: there it wakes the flusher to drain it at
    /// once.
    Reject,
    /// Wait for space without limit (the default: backpressure). The waiting thread sleeps
    /// on a condition variable; it does not spin. It fails only with
    /// [`InsertError::Closed`] if the flusher is gone.
    #[default]
    Block,
    /// Wait for space at most this long, then hand the message back as
    /// [`InsertError::Timeout`].
    BlockFor(Duration),
    /// Send the message on the caller's thread, in a datagram of its own, after waiting
    /// for the caller's own queued messages to be sent (so its order is kept). Costs one
    /// system call, and the wait of a [`Bus::flush`] when the caller had messages queued.
    SendDirect,
}

/// How messages are packed into datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Many messages per datagram, up to the datagram size: for cnbus receivers (which
    /// read every message of a datagram). The default for groups and ports.
    #[default]
    Coalesce,
    /// One message per datagram (still many datagrams per `sendmmsg`): what the kernel
    /// and receivers that read only the first message need. Forced for [`Dest::Kernel`].
    OnePerDatagram,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub shards: usize,
    pub capacity: usize,
    pub watermark: usize,
    pub max_latency: Duration,
    pub datagram_size: usize,
    pub max_batch: usize,
    pub framing: Framing,
    pub policy: FullPolicy,
    /// Producers drain their own shard at the watermark (see [`BusBuilder::assist`]).
    pub assist: bool,
    /// The flusher's `SCHED_FIFO` priority, 0: the normal scheduler
    /// ([`BusBuilder::flusher_realtime`]).
    pub flusher_realtime: u8,
    /// How long a send waits for room at a full unicast receiver ([`BusBuilder::send_timeout`]).
    pub send_timeout: Duration,
    /// Kernel-owned ids and groups may be multicast ([`BusBuilder::allow_kernel_ids`]).
    pub allow_kernel_ids: bool,
    /// Inserts refuse kernel-owned ids: a group destination without `allow_kernel_ids`
    /// (set by `build`).
    pub refuse_kernel_ids: bool,
    /// Test hook: where a panic is injected.
    #[cfg(test)]
    pub panic_at: Option<flusher::PanicAt>,
    /// Test hook: the flusher's barriers fail with this errno (fault injection), each
    /// system call counted in the counter.
    #[cfg(all(test, not(cnbus_loom)))]
    pub flusher_barrier_fails: Option<(i32, Arc<std::sync::atomic::AtomicU64>)>,
}

/// Moves the flusher to `SCHED_FIFO` if the configuration asks for it. Not `from_io`:
/// its `EPERM` is the connector's missing `CAP_NET_ADMIN`, where here `CAP_SYS_NICE` is
/// missing.
fn cfg_realtime(cfg: &Config, flusher: &std::thread::JoinHandle<()>) -> Result<()> {
    use std::os::unix::thread::JoinHandleExt;
    if cfg.flusher_realtime == 0 {
        return Ok(());
    }
    crate::sys::set_realtime(flusher.as_pthread_t(), cfg.flusher_realtime).map_err(|source| {
        Error::Io {
            op: Op::Spawn,
            source,
        }
    })
}

/// The builder's setters: `name(arg: Type) => field = value;`, each with its rustdoc.
macro_rules! setters {
    ($($(#[$m:meta])* $name:ident($v:ident: $t:ty) => $($f:ident).+ = $val:expr;)*) => {
        $($(#[$m])* pub fn $name(mut self, $v: $t) -> Self {
            self.$($f).+ = $val;
            self
        })*
    };
}

/// Configures and starts a [`Bus`].
#[derive(Debug, Clone)]
pub struct BusBuilder {
    dest: Dest,
    socket: Option<Arc<ConnectorSocket>>,
    pub(super) cfg: Config,
    watermark: Option<usize>,
    numbered_ids: Option<usize>,
}

impl BusBuilder {
    /// A bus sending to `dest`, with the defaults: one shard per configured CPU, 1024
    /// messages per shard, watermark a quarter of that, 1 ms maximum latency, 8 KiB
    /// datagrams (16 KiB, `CONNECTOR_MAX_MSG_SIZE`, cap for the kernel), 64 datagrams per
    /// `sendmmsg`, [`FullPolicy::Block`], [`Framing::Coalesce`] (one message per datagram
    /// for [`Dest::Kernel`]).
    pub fn new(dest: Dest) -> Self {
        Self {
            dest,
            socket: None,
            cfg: Config {
                shards: sys::configured_cpus(),
                capacity: 1024,
                watermark: 256,
                max_latency: Duration::from_millis(1),
                datagram_size: 8192,
                max_batch: 64,
                framing: if dest.is_kernel() {
                    Framing::OnePerDatagram
                } else {
                    Framing::Coalesce
                },
                policy: FullPolicy::Block,
                assist: !matches!(dest, Dest::Port(p) if p != 0),
                flusher_realtime: 0,
                send_timeout: DEFAULT_SEND_TIMEOUT,
                allow_kernel_ids: false,
                refuse_kernel_ids: false,
                #[cfg(test)]
                panic_at: None,
                #[cfg(all(test, not(cnbus_loom)))]
                flusher_barrier_fails: None,
            },
            watermark: None,
            numbered_ids: None,
        }
    }

    setters! {
        /// Sends through `socket` instead of a socket of the bus's own (for example to share
        /// one port id between several buses, or between a bus and a receiver). The socket's
        /// sequence numbering is shared too: everything sending on it numbers one sequence
        /// per destination and id.
        socket(socket: Arc<ConnectorSocket>) => socket = Some(socket);
        /// How many `(destination, id)` sequences the socket's numbering remembers (default
        /// [`DEFAULT_NUMBERED_IDS`](crate::connector::DEFAULT_NUMBERED_IDS), for everything
        /// sending on the socket). Past it the least recently used are forgotten (counted in
        /// `BusStats::numbering_evictions`) and restart at 1: `reordered`, not loss.
        numbered_ids(n: usize) => numbered_ids = Some(n);
        /// Number of shards, 1 to 65 536 ([`build`](Self::build) fails otherwise). A thread on
        /// CPU `c` uses shard `c % shards`.
        shards(n: usize) => cfg.shards = n;
        /// Messages each ring (a shard's or a [`Producer`](super::Producer)'s) holds (at least
        /// 1). A ring also holds at most `capacity * 100` bytes, rounded up to a power of two
        /// and at least two datagrams, at most 1 GiB: larger messages fill it sooner. Reserved
        /// up front; `build` fails, rather than aborting, when that is too large.
        capacity(n: usize) => cfg.capacity = n;
        /// Ring occupancy at which an insert drains the ring itself ([`assist`](Self::assist))
        /// or wakes the flusher (default capacity / 4; at least 1). Above the capacity: never.
        watermark(n: usize) => watermark = Some(n);
        /// Longest time a message waits in a ring (default 1 ms): the flusher aims a quarter of
        /// it early (at most 1 ms) to absorb its wake-up delay. Beyond 584 years: never.
        max_latency(d: Duration) => cfg.max_latency = d;
        /// Largest datagram the flusher builds, in bytes (at least one 36-byte message:
        /// [`build`](Self::build) fails below that). The receivers' buffers must hold this
        /// much. Above about 200 KiB (the default send buffer, less 32 bytes) `build` raises
        /// the socket's send buffer to hold one datagram (beyond `net.core.wmem_max` only
        /// with `CAP_NET_ADMIN`), or fails: the kernel would refuse every datagram
        /// (`EMSGSIZE`).
        datagram_size(bytes: usize) => cfg.datagram_size = bytes;
        /// Datagrams per `sendmmsg` (1..=1024, default 64; [`build`](Self::build) fails
        /// otherwise). One call takes at most 64 (its headers are on the stack): more acts
        /// as 64.
        max_batch(n: usize) => cfg.max_batch = n;
        /// How long a send waits for room at a full [`Dest::Port`] receiver (default 1 s). Sends
        /// never block (`MSG_DONTWAIT`): a full receiver is retried with sleeps up to 1 ms
        /// apart; if it takes nothing within `send_timeout`, the datagram is counted as failed
        /// (`EAGAIN`) and the receiver as stalled (not waited for until it takes one again). So
        /// [`Bus::flush`], [`Bus::close`] and drop return within about `send_timeout` whatever
        /// the receiver does, while a slow reader still paces the producers. Direct sends wait
        /// the same way ([`InsertError::Send`] on timeout). Groups and the kernel never wait.
        /// A timeout too large for [`Instant`] (`Duration::MAX`) means no limit: then a
        /// flush, close or drop waits for a receiver that stopped reading until it reads
        /// again, forever if it never does; only the `exit()` hook still ends its wait, at
        /// [`EXIT_BUDGET`](super::EXIT_BUDGET).
        send_timeout(d: Duration) => cfg.send_timeout = d;
        /// Allows multicasting on the kernel's ids (idx 1..=10) and groups (below 12), which
        /// the kernel's connector and its listeners receive too. Off by default: `build`
        /// refuses a kernel group and an insert on a kernel id is [`InsertError::KernelOwned`].
        allow_kernel_ids(on: bool) => cfg.allow_kernel_ids = on;
        /// Packing of messages into datagrams. Ignored for [`Dest::Kernel`], which always gets
        /// one message per datagram.
        framing(f: Framing) => cfg.framing = f;
        /// The policy of [`Bus::insert`] and [`Bus::insert_msg`] when the shard is full.
        on_full(p: FullPolicy) => cfg.policy = p;
        /// Writer-assisted draining (default: on for groups and the kernel, off for
        /// [`Dest::Port`], where a full receiver would stall the inserting thread). An insert
        /// that brings its ring to the [`watermark`](Self::watermark), or a blocking insert
        /// that finds it full, drains the ring itself if no one else is (a rejecting one,
        /// [`FullPolicy::Reject`], to a [`Dest::Port`] receiver, which a send may wait
        /// for, wakes the flusher instead): a single fast
        /// producer then runs like a hand-written `sendmmsg` loop, and the flusher keeps the
        /// latency deadline. Such an insert pays the system call.
        assist(on: bool) => cfg.assist = on;
        /// Runs the flusher thread under `SCHED_FIFO` at `priority` (1..=99; 0, the default:
        /// the normal scheduler). Where CPU-bound threads (of this process or others) keep
        /// the CPUs busy, a normal flusher waits for a CPU after each wake-up, and messages
        /// then wait well past [`max_latency`](Self::max_latency) (tens of milliseconds
        /// measured on a loaded 2-CPU host: docs/BUS.md, "Latency under CPU overload"); a
        /// real-time flusher runs at once. It still waits for a send lock held by an
        /// inserting thread that was preempted while draining
        /// ([`assist`](Self::assist)). `build` fails with [`Error::Io`] of
        /// [`Op::Spawn`](crate::Op::Spawn) (`EPERM`) without `CAP_SYS_NICE` or an
        /// `RLIMIT_RTPRIO` of at least `priority` (the flusher it started stopped and
        /// joined), and with [`Error::InvalidArgument`] for a `priority` above 99.
        flusher_realtime(priority: u8) => cfg.flusher_realtime = priority;
    }

    /// Checks the configuration, allocates the shards' rings, opens the socket if none was
    /// given and starts the flusher. [`Error::InvalidArgument`] when a number is out of
    /// range or the memory cannot be had: no setting makes it panic or abort.
    pub fn build(self) -> Result<Bus> {
        let mut cfg = self.cfg;
        if !(1..=MAX_SHARDS).contains(&cfg.shards) {
            return Err(Error::InvalidArgument("bus shards must be in 1..=65536"));
        }
        if cfg.capacity == 0 {
            return Err(Error::InvalidArgument("bus capacity must be at least 1"));
        }
        if cfg.flusher_realtime > 99 {
            return Err(Error::InvalidArgument(
                "bus flusher_realtime priority must be in 0..=99",
            ));
        }
        if let Dest::Group(g) = self.dest {
            if !(1..=32).contains(&g) {
                return Err(Error::InvalidArgument("multicast group must be in 1..=32"));
            }
            if !cfg.allow_kernel_ids && g < crate::codec::FIRST_USER_GROUP {
                return Err(Error::KernelOwned {
                    id: CbId::new(0, 0),
                    group: g,
                });
            }
            cfg.refuse_kernel_ids = !cfg.allow_kernel_ids;
        }
        if self.watermark == Some(0) {
            return Err(Error::InvalidArgument("bus watermark must be at least 1"));
        }
        if !(1..=1024).contains(&cfg.max_batch) {
            return Err(Error::InvalidArgument("bus max_batch must be in 1..=1024"));
        }
        if cfg.datagram_size < nlmsg_align(NLMSG_HDRLEN + CN_MSG_HDRLEN) {
            return Err(Error::InvalidArgument(
                "bus datagram_size must hold one 36-byte message",
            ));
        }
        cfg.watermark = self.watermark.unwrap_or((cfg.capacity / 4).max(1));
        if self.dest.is_kernel() {
            cfg.framing = Framing::OnePerDatagram;
            cfg.datagram_size = cfg.datagram_size.min(CONNECTOR_MAX_MSG_SIZE);
        }
        let too_big = || {
            Error::InvalidArgument(
                "bus shards too large: shards x capacity x 100 bytes (or the datagram size) \
                 overflows, exceeds 1 GiB per ring or cannot be allocated",
            )
        };
        // The total must be addressable before anything is tried.
        let ring_bytes = Ring::bytes(cfg.capacity, cfg.datagram_size)
            .filter(|b| {
                b.checked_mul(cfg.shards)
                    .is_some_and(|t| t <= isize::MAX as usize)
            })
            .ok_or_else(too_big)?;
        let mut shards = Vec::new();
        if shards.try_reserve_exact(cfg.shards).is_err() {
            return Err(too_big());
        }
        for _ in 0..cfg.shards {
            let (ring, tail) = Ring::new(ring_bytes).ok_or_else(too_big)?;
            shards.push(Shard {
                tail: CachePadded::new(crate::sys::BiasedLock::new(tail)),
                ring,
            });
        }
        let sock = match self.socket {
            Some(s) => s,
            None => Arc::new(ConnectorSocket::open()?),
        };
        // The kernel refuses a datagram longer than the sender's send buffer less 32 bytes
        // (`EMSGSIZE`): every datagram would fail. Raise the buffer to hold one, or refuse.
        let need = cfg.datagram_size.saturating_add(SNDBUF_OVERHEAD);
        if sock.send_buffer()? < need {
            // The kernel doubles the request.
            let _ = sock.set_send_buffer(need.div_ceil(2), true);
            if sock.send_buffer()? < need {
                return Err(Error::InvalidArgument(
                    "bus datagram_size exceeds what the socket can send (its send buffer less \
                     32 bytes) and the send buffer could not be raised",
                ));
            }
        }
        if let Some(n) = self.numbered_ids {
            sock.numbering().lock().set_capacity(n);
        }
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let inner = Arc::new(Inner {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rings: Mutex::new(shards.iter().map(|s| Arc::clone(&s.ring)).collect()),
            shards: shards.into_boxed_slice(),
            ring_bytes,
            pid: sock.port_id(),
            sock,
            dest: self.dest,
            epoch: Instant::now(),
            bell: CachePadded::default(),
            light: crate::sys::membarrier::init(),
            flusher: OnceLock::new(),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            fork: crate::sys::ForkStamp::now(),
            stop_deadline: Mutex::new(None),
            stalled: AtomicBool::new(false),
            space_waiters: AtomicUsize::new(0),
            drain_asked: AtomicBool::new(false),
            space_lock: Mutex::new(()),
            space_cv: Condvar::new(),
            stats: Counters::default(),
            last_error: Mutex::new(None),
            cfg,
        });
        let handle = flusher::spawn(&inner).map_err(|e| Error::from_io(Op::Spawn, e))?;
        let _ = inner.flusher.set(handle.thread().clone());
        super::register(&inner);
        let realtime = cfg_realtime(&inner.cfg, &handle);
        let bus = Bus {
            inner,
            flusher: Some(handle),
        };
        // On failure the bus (empty) is dropped: its flusher stops and is joined.
        realtime.map(|()| bus)
    }
}
