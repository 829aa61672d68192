//! The `NETLINK_CONNECTOR` socket.

use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use bytes::BytesMut;

use super::cvt;
use crate::error::{Error, Op, Result};
use crate::seq::SeqSource;

/// The netlink protocol number of the connector.
pub const NETLINK_CONNECTOR: i32 = 11;

/// Highest multicast group of a connector socket (the kernel gives every netlink family at
/// least 32).
pub const MAX_GROUP: u32 = 32;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_NO_ENOBUFS: libc::c_int = 5;

pub use crate::codec::Dest;

/// The socket address of `dest`.
fn sockaddr(dest: Dest) -> Result<libc::sockaddr_nl> {
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

/// What `recv` learned about a datagram besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes received (at most the buffer's capacity).
    pub len: usize,
    /// The sender's port id; 0 is the kernel.
    pub port: u32,
    /// The multicast group it was sent to, or 0 for a unicast.
    pub group: u32,
}

impl RecvMeta {
    /// True when the kernel sent this datagram (port id 0). Only the kernel can send from
    /// port 0: user-space sockets always have a non-zero port id.
    pub fn from_kernel(&self) -> bool {
        self.port == 0
    }
}

/// Receive buffers for [`ConnectorSocket::recv_many`]: a number of equal slots, one per
/// datagram, and what the last call received in them.
///
/// The memory is allocated once, zeroed (for large batches the allocator maps fresh
/// pages, and only the parts the kernel writes become resident).
#[derive(Debug)]
pub struct RecvBatch {
    data: Vec<u8>,
    slot: usize,
    names: Vec<libc::sockaddr_nl>,
    metas: Vec<Slot>,
    got: usize,
}

/// One received datagram of a [`RecvBatch`].
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    len: usize,
    real: usize,
    truncated: bool,
    port: u32,
    group: u32,
}

impl RecvBatch {
    /// The most slots a batch has (more are clamped to this).
    pub const MAX_SLOTS: usize = 64;

    /// A batch of `slots` buffers (1..=[`MAX_SLOTS`](Self::MAX_SLOTS); clamped) of
    /// `slot_len` bytes each (at least 1; clamped): a datagram longer than `slot_len` is
    /// reported as [`Error::Truncated`].
    pub fn new(slots: usize, slot_len: usize) -> Self {
        let slots = slots.clamp(1, Self::MAX_SLOTS);
        let slot = slot_len.max(1);
        // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
        let name: libc::sockaddr_nl = unsafe { mem::zeroed() };
        RecvBatch {
            data: vec![0; slots.saturating_mul(slot)],
            slot,
            names: vec![name; slots],
            metas: vec![Slot::default(); slots],
            got: 0,
        }
    }

    /// The number of slots: the most datagrams one [`ConnectorSocket::recv_many`] reads.
    pub fn slots(&self) -> usize {
        self.metas.len()
    }

    /// The number of datagrams the last [`ConnectorSocket::recv_many`] received.
    pub fn len(&self) -> usize {
        self.got
    }

    /// True when the last [`ConnectorSocket::recv_many`] received nothing.
    pub fn is_empty(&self) -> bool {
        self.got == 0
    }

    /// The datagrams the last [`ConnectorSocket::recv_many`] received, in order: each its
    /// bytes and [`RecvMeta`], or [`Error::Truncated`] (with its real length) for one longer
    /// than a slot (consumed; its cut bytes are not handed out).
    pub fn iter(&self) -> impl Iterator<Item = Result<(&[u8], RecvMeta)>> + '_ {
        self.metas[..self.got]
            .iter()
            .zip(self.data.chunks(self.slot))
            .map(|(m, d)| {
                if m.truncated {
                    Err(Error::Truncated {
                        op: Op::Recv,
                        len: m.real,
                        capacity: self.slot,
                    })
                } else {
                    Ok((
                        &d[..m.len],
                        RecvMeta {
                            len: m.len,
                            port: m.port,
                            group: m.group,
                        },
                    ))
                }
            })
    }
}

/// A `NETLINK_CONNECTOR` socket bound to a kernel-assigned port id.
///
/// It is deliberately not `Clone`: it owns its file descriptor and closes it on drop.
/// (`netlink_sys::Socket`, which it wraps, derives `Clone` while also closing on drop, so a
/// clone would close the descriptor under the other copy.) Share it with `Arc`: every method
/// takes `&self` and the kernel serialises concurrent calls.
///
/// It also carries the sequence numbering of everything cnbus sends through it (one
/// counter per destination and id, see [`SeqSource`](crate::connector::SeqSource)), so
/// that buses and connectors sharing one socket number one sequence per destination and
/// id.
#[derive(Debug)]
pub struct ConnectorSocket {
    /// Why `netlink_sys` stays: it opens the socket (`SOCK_CLOEXEC`), binds it to a
    /// kernel-chosen port and reads the port back (`bind` + `getsockname`), joins and leaves
    /// groups (`NETLINK_ADD/DROP_MEMBERSHIP`) and owns the descriptor; that is five system
    /// calls, each an `unsafe` block more here, for a dependency that brings only `bytes`,
    /// `libc` and `log`. Everything on the data path (`sendto`, `sendmmsg`, `recvmsg` with
    /// `MSG_TRUNC` into spare capacity, `SO_MEMINFO`, buffer options) is this file's own,
    /// because `netlink_sys` offers none of it.
    inner: netlink_sys::Socket,
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
        let mut inner = netlink_sys::Socket::new(NETLINK_CONNECTOR as isize)
            .map_err(|e| Error::from_io(Op::Socket, e))?;
        let addr = inner.bind_auto().map_err(|e| Error::from_io(Op::Bind, e))?;
        let numbering = SeqSource::default();
        Ok(Self {
            inner,
            port: addr.port_number(),
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
        self.inner
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(|e| Error::from_io(Op::Connect, e))
    }

    /// Joins multicast group `group` (1..=32). Joining needs `CAP_NET_ADMIN` for most
    /// groups; the proc connector's group accepts unprivileged listeners on recent kernels.
    pub fn join(&self, group: u32) -> Result<()> {
        group_mask(group)?;
        self.inner
            .add_membership(group)
            .map_err(|e| Error::from_io(Op::Join(group), e))
    }

    /// Leaves multicast group `group`.
    pub fn leave(&self, group: u32) -> Result<()> {
        group_mask(group)?;
        self.inner
            .drop_membership(group)
            .map_err(|e| Error::from_io(Op::Leave(group), e))
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
        self.getsockopt(libc::SOL_SOCKET, b.capped)
            .map(|v| v as usize)
            .map_err(|e| Error::from_io(Op::GetOption, e))
    }

    /// `NETLINK_NO_ENOBUFS`: when on, the kernel stops reporting receive-queue overflow with
    /// `ENOBUFS`. cnbus leaves it off by default, because that report is how loss is seen.
    pub fn set_no_enobufs(&self, on: bool) -> Result<()> {
        self.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, libc::c_int::from(on))
            .map_err(|e| Error::from_io(Op::SetOption("NETLINK_NO_ENOBUFS"), e))
    }

    /// Sends one datagram. Returns the bytes sent. A unicast to a user-space socket whose
    /// receive queue is full waits until it has room (netlink's own behaviour).
    pub fn send(&self, datagram: &[u8], dest: Dest) -> Result<usize> {
        self.sendto(datagram, dest, 0).map(|n| n.unwrap_or(0))
    }

    /// Sends one datagram without waiting: `Ok(None)` when the destination's queue (or this
    /// socket's send buffer) is full.
    pub fn try_send(&self, datagram: &[u8], dest: Dest) -> Result<Option<usize>> {
        self.sendto(datagram, dest, libc::MSG_DONTWAIT)
    }

    fn sendto(&self, datagram: &[u8], dest: Dest, flags: libc::c_int) -> Result<Option<usize>> {
        let sa = sockaddr(dest)?;
        loop {
            // SAFETY: `datagram` is valid for reads of its length and `sa` is a valid
            // sockaddr_nl whose size is passed; both outlive the call.
            let r = unsafe {
                libc::sendto(
                    self.as_raw_fd(),
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    libc::MSG_NOSIGNAL | flags,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            match cvt(r) {
                Ok(n) => return Ok(Some(n as usize)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && flags & libc::MSG_DONTWAIT != 0 =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(Error::from_io(Op::Send, e)),
            }
        }
    }

    /// Sends a batch of datagrams to one destination with `sendmmsg`, as many per system
    /// call as the kernel takes (`UIO_MAXIOV`). Returns how many were sent; on an error
    /// after some were sent, returns the count so far (the caller can retry the rest), and
    /// the error only if none was sent. A unicast to a user-space socket whose receive
    /// queue is full waits until it has room (netlink's own behaviour).
    pub fn send_batch(&self, datagrams: &[IoSlice<'_>], dest: Dest) -> Result<usize> {
        self.sendmmsg(datagrams, dest, 0)
    }

    /// [`send_batch`](Self::send_batch) without waiting (`MSG_DONTWAIT`): returns how many
    /// datagrams were sent, `Ok(0)` when the first one would have waited (a unicast
    /// receiver's queue is full).
    pub fn try_send_batch(&self, datagrams: &[IoSlice<'_>], dest: Dest) -> Result<usize> {
        self.sendmmsg(datagrams, dest, libc::MSG_DONTWAIT)
    }

    fn sendmmsg(&self, datagrams: &[IoSlice<'_>], dest: Dest, flags: libc::c_int) -> Result<usize> {
        const MAX_BATCH: usize = 1024;
        let mut sa = sockaddr(dest)?;
        let mut sent = 0;
        while sent < datagrams.len() {
            let chunk = &datagrams[sent..(sent + MAX_BATCH).min(datagrams.len())];
            // SAFETY: mmsghdr is plain data for which all-zero is valid.
            let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; chunk.len()];
            for (h, d) in hdrs.iter_mut().zip(chunk) {
                h.msg_hdr.msg_name = (&mut sa as *mut libc::sockaddr_nl).cast();
                h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                // IoSlice is ABI-compatible with iovec (guaranteed by std on Unix).
                h.msg_hdr.msg_iov = (d as *const IoSlice<'_>).cast_mut().cast();
                h.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: every header points at `sa` and at one IoSlice of `chunk`, all alive
            // for the call; the kernel only reads the iovecs and the name, and writes
            // msg_len into `hdrs`, which we own. The count passed is hdrs.len().
            let r = unsafe {
                libc::sendmmsg(
                    self.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    hdrs.len() as libc::c_uint,
                    libc::MSG_NOSIGNAL | flags,
                )
            };
            match cvt(r) {
                Ok(0) => break,
                Ok(n) => sent += n as usize,
                // The error will recur on the caller's retry of the rest.
                Err(_) if sent > 0 => break,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && flags & libc::MSG_DONTWAIT != 0 =>
                {
                    break
                }
                Err(e) => return Err(Error::from_io(Op::SendBatch, e)),
            }
        }
        Ok(sent)
    }

    /// Receives one datagram, appending it to `buf`'s spare capacity (reserve first: at
    /// most `buf.capacity() - buf.len()` bytes are read). A datagram longer than that is
    /// cut, consumed, and reported as [`Error::Truncated`] with its real length.
    ///
    /// With `nonblocking`, returns `Ok(None)` instead of waiting when nothing is queued.
    /// A receive-queue overflow is [`Error::Overrun`]; the socket stays usable.
    pub fn recv(&self, buf: &mut BytesMut, nonblocking: bool) -> Result<Option<RecvMeta>> {
        self.recv_max(buf, usize::MAX, nonblocking)
    }

    /// As [`recv`](Self::recv), reading at most `max` bytes even when `buf` has more room,
    /// so that the largest datagram accepted does not depend on the buffer's history.
    pub fn recv_max(
        &self,
        buf: &mut BytesMut,
        max: usize,
        nonblocking: bool,
    ) -> Result<Option<RecvMeta>> {
        // SAFETY: sockaddr_nl and msghdr are plain data for which all-zero is valid.
        let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
        let capacity = spare.len().min(max);
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: capacity,
        };
        // SAFETY: as above.
        let mut mh: libc::msghdr = unsafe { mem::zeroed() };
        mh.msg_name = (&mut sa as *mut libc::sockaddr_nl).cast();
        mh.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let n = loop {
            // SAFETY: `mh` points at `sa` and at `iov`, which covers exactly the spare
            // capacity of `buf`; all three outlive the call. The kernel writes at most
            // iov_len bytes there and at most msg_namelen bytes into `sa`.
            let r = unsafe { libc::recvmsg(self.as_raw_fd(), &mut mh, flags) };
            match cvt(r) {
                Ok(n) => break n as usize,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => return Ok(None),
                Err(e) => return Err(Error::from_io(Op::Recv, e)),
            }
        };
        // With MSG_TRUNC the return value is the datagram's real length.
        let got = n.min(capacity);
        // SAFETY: the kernel initialised `got` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + got) };
        if n > capacity || mh.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(Error::Truncated {
                op: Op::Recv,
                len: n,
                capacity,
            });
        }
        Ok(Some(RecvMeta {
            len: got,
            port: sa.nl_pid,
            group: match sa.nl_groups {
                0 => 0,
                m => m.trailing_zeros() + 1,
            },
        }))
    }

    /// Receives up to [`RecvBatch::slots`] datagrams with one `recvmmsg` system call,
    /// each into its own slot of `batch` (read them with [`RecvBatch::iter`]). Returns how
    /// many were received: `Ok(0)` only with `nonblocking` when nothing is queued. A
    /// blocking call waits for the first datagram only (`MSG_WAITFORONE`).
    ///
    /// Every datagram is received as by [`recv`](Self::recv): one longer than a slot is cut,
    /// consumed, and reported by the batch as [`Error::Truncated`] with its real length. A
    /// receive-queue overflow is [`Error::Overrun`], at the same point of the stream as
    /// `recv` reports it: the kernel returns the datagrams read before it and reports the
    /// `ENOBUFS` on the next call.
    pub fn recv_many(&self, batch: &mut RecvBatch, nonblocking: bool) -> Result<usize> {
        batch.got = 0;
        let n = batch.metas.len();
        let slot = batch.slot;
        let base = batch.data.as_mut_ptr();
        // SAFETY: iovec and mmsghdr are plain data for which all-zero is valid.
        let mut iovs: [libc::iovec; RecvBatch::MAX_SLOTS] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; RecvBatch::MAX_SLOTS] = unsafe { mem::zeroed() };
        for (i, ((iov, h), name)) in iovs
            .iter_mut()
            .zip(hdrs.iter_mut())
            .zip(batch.names.iter_mut())
            .enumerate()
        {
            // SAFETY: i < n <= data.len() / slot, so the slot [i * slot, (i + 1) * slot)
            // lies inside `data`.
            iov.iov_base = unsafe { base.add(i * slot) }.cast();
            iov.iov_len = slot;
            h.msg_hdr.msg_name = (name as *mut libc::sockaddr_nl).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let flags = libc::MSG_TRUNC
            | if nonblocking {
                libc::MSG_DONTWAIT
            } else {
                libc::MSG_WAITFORONE
            };
        let got = loop {
            // SAFETY: the first `n` headers point at their own iovec (one disjoint slot of
            // `batch.data` each) and at their own sockaddr_nl in `batch.names`; all outlive
            // the call. The kernel writes at most iov_len bytes per slot, at most
            // msg_namelen bytes per name, and msg_len / msg_flags into `hdrs`. No timeout.
            let r = unsafe {
                libc::recvmmsg(
                    self.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            match cvt(r) {
                Ok(k) => break k as usize,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => return Ok(0),
                Err(e) => return Err(Error::from_io(Op::Recv, e)),
            }
        };
        for (m, (h, name)) in batch
            .metas
            .iter_mut()
            .zip(hdrs.iter().zip(batch.names.iter()))
            .take(got)
        {
            // With MSG_TRUNC, msg_len is the datagram's real length.
            let real = h.msg_len as usize;
            *m = Slot {
                len: real.min(slot),
                real,
                truncated: real > slot || h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                port: name.nl_pid,
                group: match name.nl_groups {
                    0 => 0,
                    g => g.trailing_zeros() + 1,
                },
            };
        }
        batch.got = got;
        Ok(got)
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

    fn getsockopt(&self, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes; `len` holds the size of `v`.
        cvt(unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(v)
    }
}

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
        let mut len = mem::size_of_val(&v) as libc::socklen_t;
        // SAFETY: `v` is valid for writes of `len` bytes and `len` is valid for writes; the
        // kernel writes at most `len` bytes and stores the length it wrote in `len`.
        cvt(unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                v.as_mut_ptr().cast(),
                &mut len,
            )
        })
        .map_err(|e| Error::from_io(Op::GetOption, e))?;
        let fields = (len as usize / mem::size_of::<u32>()).min(SK_MEMINFO_VARS);
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

impl AsRawFd for ConnectorSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl AsFd for ConnectorSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}
