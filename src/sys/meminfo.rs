//! A socket's memory accounting and the kernel's exact drop counter (`SO_MEMINFO`), and
//! [`DropCounter`], its widened running total.

use super::ConnectorSocket;
use crate::error::{Error, Op, Result};

/// `SO_MEMINFO` (`asm-generic/socket.h`; sparc numbers it differently).
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_MEMINFO: libc::c_int = 55;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_MEMINFO: libc::c_int = 0x39;
/// Number of `u32` fields of `SO_MEMINFO` (`SK_MEMINFO_VARS`) that cnbus reads.
const SK_MEMINFO_VARS: usize = 9;

/// A socket's memory accounting and drop counter, as `getsockopt(SOL_SOCKET, SO_MEMINFO)`
/// reports them (`sk_get_meminfo()` in the kernel's `net/core/sock.c`). Sizes are bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    /// Bytes of queued datagrams (`sk_rmem_alloc`, counted in buffer "truesize").
    pub rmem_alloc: u32,
    /// The receive buffer limit (`sk_rcvbuf`).
    pub rcvbuf: u32,
    /// Bytes of datagrams sent but not yet freed (`sk_wmem_alloc`).
    pub wmem_alloc: u32,
    /// The send buffer limit (`sk_sndbuf`).
    pub sndbuf: u32,
    /// Memory reserved ahead (`sk_forward_alloc`).
    pub fwd_alloc: u32,
    /// Bytes queued for sending (`sk_wmem_queued`).
    pub wmem_queued: u32,
    /// Option memory (`sk_omem_alloc`).
    pub optmem: u32,
    /// Backlog length (`sk_backlog.len`).
    pub backlog: u32,
    /// `sk_drops`: datagrams the kernel dropped for this socket, since it was created.
    /// Netlink counts one for every datagram it could not queue because the receive queue
    /// was full (or congested since an overflow), whether the sender was the kernel or a
    /// user-space multicast, and for a kernel unicast it could not deliver. A `u32` that
    /// wraps; [`DropCounter`] widens it. `None` on kernels that do not report it (before
    /// 4.13, `SO_MEMINFO` had 8 fields).
    pub drops: Option<u32>,
}

impl ConnectorSocket {
    /// The socket's memory accounting and drop counter (`SO_MEMINFO`).
    pub fn meminfo(&self) -> Result<MemInfo> {
        let mut v = [0u32; SK_MEMINFO_VARS];
        let fields = self
            .getsockopt_u32s(libc::SOL_SOCKET, SO_MEMINFO, &mut v)
            .map_err(|e| Error::from_io(Op::GetOption, e))?
            .min(SK_MEMINFO_VARS);
        let f = |i: usize| if i < fields { v[i] } else { 0 };
        Ok(MemInfo {
            rmem_alloc: f(libc::SK_MEMINFO_RMEM_ALLOC as usize),
            rcvbuf: f(libc::SK_MEMINFO_RCVBUF as usize),
            wmem_alloc: f(libc::SK_MEMINFO_WMEM_ALLOC as usize),
            sndbuf: f(libc::SK_MEMINFO_SNDBUF as usize),
            fwd_alloc: f(libc::SK_MEMINFO_FWD_ALLOC as usize),
            wmem_queued: f(libc::SK_MEMINFO_WMEM_QUEUED as usize),
            optmem: f(libc::SK_MEMINFO_OPTMEM as usize),
            backlog: f(libc::SK_MEMINFO_BACKLOG as usize),
            drops: (fields > libc::SK_MEMINFO_DROPS as usize)
                .then(|| v[libc::SK_MEMINFO_DROPS as usize]),
        })
    }

    /// The kernel's count of datagrams dropped for this socket since it was created
    /// (`sk_drops`, see [`MemInfo::drops`]); `None` when this kernel does not report it.
    /// It wraps at 2³²: [`DropCounter`] keeps a widened running total from a baseline.
    pub fn drops(&self) -> Result<Option<u32>> {
        self.meminfo().map(|m| m.drops)
    }
}

/// A running total of a socket's kernel drop counter ([`ConnectorSocket::drops`]) since a
/// baseline, widened to `u64` (the kernel's counter is a wrapping `u32`; read it at least
/// once per 2³² drops, as cnbus does after every overrun).
///
/// Every datagram netlink could not queue for the socket counts once, so for the proc
/// connector (one event per datagram) it counts lost events exactly, including the ones at
/// the end of a run that no later sequence number reveals; and it counts only what the
/// kernel actually sent to this socket (events a kernel-side filter removed are not sent,
/// so not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCounter {
    last: Option<u32>,
    total: u64,
}

impl DropCounter {
    /// Starts counting from the socket's current value (a socket handed over may have
    /// dropped datagrams already). If the kernel does not report drops, the counter stays
    /// unavailable ([`total`](Self::total) is `None`).
    pub fn baseline(socket: &ConnectorSocket) -> Result<Self> {
        Ok(Self {
            last: socket.drops()?,
            total: 0,
        })
    }

    /// A counter that never counts (for when no socket is there to read).
    pub fn unavailable() -> Self {
        Self {
            last: None,
            total: 0,
        }
    }

    /// Reads the socket's counter and adds what it dropped since the last read. Returns the
    /// total since the baseline, or `None` when unavailable.
    pub fn update(&mut self, socket: &ConnectorSocket) -> Result<Option<u64>> {
        Ok(self.observe(socket.drops()?))
    }

    /// As [`update`](Self::update), with a value of the counter already read (for instance
    /// [`MemInfo::drops`]).
    pub fn observe(&mut self, now: Option<u32>) -> Option<u64> {
        if let (Some(last), Some(now)) = (self.last, now) {
            self.total += u64::from(now.wrapping_sub(last));
            self.last = Some(now);
        }
        self.total()
    }

    /// Datagrams dropped since the baseline, as of the last [`update`](Self::update).
    pub fn total(&self) -> Option<u64> {
        self.last.map(|_| self.total)
    }
}
