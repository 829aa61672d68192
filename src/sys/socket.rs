//! The `NETLINK_CONNECTOR` socket: opening and binding it, groups, options. Sending is in
//! `send.rs`, receiving in `recv.rs`, the drop counter in `meminfo.rs`.
//!
//! Plain `libc` calls, without the `netlink-sys` crate: cnbus used its `Socket` only to
//! open, bind, connect and join, which here are four small calls over the same
//! `sockaddr`/`setsockopt` helpers the data path needs anyway, while its `Socket` derived
//! `Clone` and also closed its descriptor on drop (a clone would close it under the other
//! copy). The descriptor is an [`OwnedFd`], closed exactly once.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;
use crate::error::{Error, Op, Result};
use crate::seq::SeqSource;

/// The netlink protocol number of the connector.
pub const NETLINK_CONNECTOR: i32 = 11;

/// Highest multicast group of a connector socket (the kernel gives every netlink family at
/// least 32).
pub const MAX_GROUP: u32 = 32;

pub use crate::codec::Dest;

/// The socket address of `dest`.
pub(super) fn sockaddr(dest: Dest) -> Result<libc::sockaddr_nl> {
    // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
    let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    match dest {
        Dest::Kernel => {}
        Dest::Port(p) => sa.nl_pid = p,
        Dest::Group(g) => sa.nl_groups = group_mask(g)?,
    }
    Ok(sa)
}

fn group_mask(group: u32) -> Result<u32> {
    if (1..=MAX_GROUP).contains(&group) {
        Ok(1u32 << (group - 1))
    } else {
        Err(Error::InvalidArgument("multicast group must be in 1..=32"))
    }
}

/// The socket options of one of the two socket buffers.
#[derive(Clone, Copy)]
struct Buffer {
    /// `SO_RCVBUF` / `SO_SNDBUF`: capped by `net.core.{r,w}mem_max`.
    capped: libc::c_int,
    /// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`: not capped, needs `CAP_NET_ADMIN`.
    force: libc::c_int,
    /// The operation errors name.
    op: Op,
}

impl Buffer {
    const RECV: Self = Self {
        capped: libc::SO_RCVBUF,
        force: libc::SO_RCVBUFFORCE,
        op: Op::SetRecvBuffer,
    };
    const SEND: Self = Self {
        capped: libc::SO_SNDBUF,
        force: libc::SO_SNDBUFFORCE,
        op: Op::SetSendBuffer,
    };
}

/// A `NETLINK_CONNECTOR` socket bound to a kernel-assigned port id.
///
/// It is deliberately not `Clone`: it owns its file descriptor and closes it on drop.
/// Share it with `Arc`: every method takes `&self` and the kernel serialises concurrent
/// calls.
///
/// It also carries the sequence numbering of everything cnbus sends through it (one
/// counter per destination and id, see [`SeqSource`](crate::connector::SeqSource)), so
/// that buses and connectors sharing one socket number one sequence per destination and
/// id.
#[derive(Debug)]
pub struct ConnectorSocket {
    fd: OwnedFd,
    port: u32,
    /// The socket's numbering, and the send lock of numbered sends: held from taking
    /// numbers until the datagrams carrying them were handed to the kernel.
    numbering: parking_lot::Mutex<SeqSource>,
    /// The numbering's eviction count, readable without its lock.
    numbering_evictions: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ConnectorSocket {
    /// Opens a connector socket and binds it to a port id the kernel chooses, so that any
    /// number of sockets can coexist in one process.
    pub fn open() -> Result<Self> {
        // SAFETY: socket() takes no pointers.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        })
        .map_err(|e| Error::from_io(Op::Socket, e))?;
        // SAFETY: `raw` is the descriptor socket() just returned; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Port id 0: the kernel chooses one that is free.
        let sa = sockaddr(Dest::Kernel)?;
        // SAFETY: `sa` is a valid sockaddr_nl whose size is passed; it outlives the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })
        .map_err(|e| Error::from_io(Op::Bind, e))?;
        // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
        let mut bound: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `bound` and `len` are valid for writes and `len` holds the size of
        // `bound`; the kernel writes at most that many bytes.
        cvt(unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_nl).cast(),
                &mut len,
            )
        })
        .map_err(|e| Error::from_io(Op::LocalAddr, e))?;
        let numbering = SeqSource::default();
        Ok(Self {
            fd,
            port: bound.nl_pid,
            numbering_evictions: numbering.eviction_counter(),
            numbering: parking_lot::Mutex::new(numbering),
        })
    }

    /// The port id the kernel assigned.
    pub fn port_id(&self) -> u32 {
        self.port
    }

    /// The sequence numbers of this socket, which every numbered send through it
    /// takes under this lock (see [`SeqSource`](crate::connector::SeqSource)).
    pub(crate) fn numbering(&self) -> &parking_lot::Mutex<SeqSource> {
        &self.numbering
    }

    /// Sequences the numbering forgot because it was full, read without its lock.
    pub(crate) fn numbering_evictions(&self) -> u64 {
        self.numbering_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connects the socket to the kernel (port id 0). A connected netlink socket still
    /// receives every multicast of its groups and the kernel's messages, but the kernel
    /// refuses unicasts to it from any user-space port (their senders get
    /// `ECONNREFUSED`): for a socket that listens only to the kernel and a group, such as
    /// a proc-event listener, whose drop counter must not count datagrams that a stranger
    /// unicast to it. Sends still go wherever they are addressed.
    pub fn connect_kernel(&self) -> Result<()> {
        let sa = sockaddr(Dest::Kernel)?;
        // SAFETY: `sa` is a valid sockaddr_nl whose size is passed; it outlives the call.
        cvt(unsafe {
            libc::connect(
                self.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })
        .map(drop)
        .map_err(|e| Error::from_io(Op::Connect, e))
    }

    /// Joins multicast group `group` (1..=32). Joining needs `CAP_NET_ADMIN` for most
    /// groups; the proc connector's group accepts unprivileged listeners on recent kernels.
    pub fn join(&self, group: u32) -> Result<()> {
        group_mask(group)?;
        self.setsockopt(
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            group as libc::c_int,
        )
        .map_err(|e| Error::from_io(Op::Join(group), e))
    }

    /// Leaves multicast group `group`.
    pub fn leave(&self, group: u32) -> Result<()> {
        group_mask(group)?;
        self.setsockopt(
            libc::SOL_NETLINK,
            libc::NETLINK_DROP_MEMBERSHIP,
            group as libc::c_int,
        )
        .map_err(|e| Error::from_io(Op::Leave(group), e))
    }

    /// The multicast groups the socket is a member of, as the kernel says
    /// (`NETLINK_LIST_MEMBERSHIPS`): bit `g - 1` set for group `g`, groups 1..=32 (the
    /// connector has no others). Kernels before Linux 4.2 lack the option:
    /// an error with `ENOPROTOOPT` there.
    pub fn memberships(&self) -> Result<u32> {
        let mut v = [0u32];
        self.getsockopt_u32s(libc::SOL_NETLINK, libc::NETLINK_LIST_MEMBERSHIPS, &mut v)
            .map(|_| v[0])
            .map_err(|e| Error::from_io(Op::GetOption, e))
    }

    /// Sets the receive buffer to `bytes`. With `force`, tries `SO_RCVBUFFORCE` first (which
    /// needs `CAP_NET_ADMIN` and ignores `net.core.rmem_max`) and falls back to `SO_RCVBUF`
    /// when not permitted. Returns the size the kernel reports afterwards (it doubles the
    /// request to leave room for bookkeeping).
    pub fn set_recv_buffer(&self, bytes: usize, force: bool) -> Result<usize> {
        self.set_buffer(Buffer::RECV, bytes, force)
    }

    /// The receive buffer size the kernel reports (`SO_RCVBUF`).
    pub fn recv_buffer(&self) -> Result<usize> {
        self.buffer(Buffer::RECV)
    }

    /// Sets the send buffer, as [`set_recv_buffer`](Self::set_recv_buffer) does.
    pub fn set_send_buffer(&self, bytes: usize, force: bool) -> Result<usize> {
        self.set_buffer(Buffer::SEND, bytes, force)
    }

    /// The send buffer size the kernel reports (`SO_SNDBUF`).
    pub fn send_buffer(&self) -> Result<usize> {
        self.buffer(Buffer::SEND)
    }

    /// Sets buffer `b` to `bytes`: `SO_*BUFFORCE` first with `force`, falling back to the
    /// capped option when not permitted; returns the size the kernel reports afterwards.
    fn set_buffer(&self, b: Buffer, bytes: usize, force: bool) -> Result<usize> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        if force {
            match self.setsockopt(libc::SOL_SOCKET, b.force, v) {
                Ok(()) => return self.buffer(b),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => return Err(Error::from_io(b.op, e)),
            }
        }
        self.setsockopt(libc::SOL_SOCKET, b.capped, v)
            .map_err(|e| Error::from_io(b.op, e))?;
        self.buffer(b)
    }

    /// The size of buffer `b` the kernel reports.
    fn buffer(&self, b: Buffer) -> Result<usize> {
        let mut v = [0u32];
        self.getsockopt_u32s(libc::SOL_SOCKET, b.capped, &mut v)
            .map(|_| v[0] as usize)
            .map_err(|e| Error::from_io(Op::GetOption, e))
    }

    /// `NETLINK_NO_ENOBUFS`: when on, the kernel stops reporting receive-queue overflow with
    /// `ENOBUFS`. cnbus leaves it off by default, because that report is how loss is seen.
    pub fn set_no_enobufs(&self, on: bool) -> Result<()> {
        self.setsockopt(
            libc::SOL_NETLINK,
            libc::NETLINK_NO_ENOBUFS,
            libc::c_int::from(on),
        )
        .map_err(|e| Error::from_io(Op::SetOption("NETLINK_NO_ENOBUFS"), e))
    }

    fn setsockopt(&self, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
        // SAFETY: `v` is a c_int valid for reads for the duration of the call and its
        // exact size is passed.
        cvt(unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    /// `getsockopt` into `v` (an option of `u32` or `int` fields); returns how many whole
    /// fields the kernel wrote.
    pub(super) fn getsockopt_u32s(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        v: &mut [u32],
    ) -> io::Result<usize> {
        let mut len = mem::size_of_val(v) as libc::socklen_t;
        // SAFETY: `v` is valid for writes of `len` bytes and any bytes are a valid u32;
        // `len` is valid for writes. The kernel writes at most `len` bytes and stores the
        // length it wrote in `len`.
        cvt(unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                level,
                name,
                v.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        Ok(len as usize / mem::size_of::<u32>())
    }
}

impl AsRawFd for ConnectorSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for ConnectorSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `open` does with plain libc calls (it used `netlink_sys` before): a descriptor
    /// closed on exec, bound to a port the kernel chose (non-zero, distinct per socket),
    /// groups joined and left, and `connect_kernel` making the kernel refuse user-space
    /// unicasts to it.
    #[test]
    fn open_binds_a_kernel_chosen_port_and_connect_refuses_unicasts() {
        let a = ConnectorSocket::open().unwrap();
        let b = ConnectorSocket::open().unwrap();
        assert_ne!(a.port_id(), 0);
        assert_ne!(a.port_id(), b.port_id());
        // SAFETY: fcntl(F_GETFD) on a descriptor `a` owns takes no pointers.
        let flags = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0, "{flags}");

        a.join(27).unwrap();
        assert_eq!(a.memberships().unwrap(), 1 << 26);
        a.leave(27).unwrap();
        assert_eq!(a.memberships().unwrap(), 0);
        assert!(a.join(0).is_err() && a.join(MAX_GROUP + 1).is_err());

        // Before connecting, a unicast from b gets through; after, the kernel refuses it.
        b.send(b"\0\0\0\0", Dest::Port(a.port_id())).unwrap();
        a.connect_kernel().unwrap();
        let e = b.send(b"\0\0\0\0", Dest::Port(a.port_id())).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ECONNREFUSED), "{e}");
    }
}
