//! Receiving on a [`ConnectorSocket`]: one datagram into spare capacity (`recvmsg` with
//! `MSG_TRUNC`, so a cut datagram is reported with its real length) or a batch into a
//! [`RecvBatch`] (`recvmmsg`).

use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::AsRawFd;

use bytes::BytesMut;

use super::{cvt, ConnectorSocket};
use crate::error::{Error, Op, Result};

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

    /// The most bytes all slots of a batch have together (256 MiB): `slot_len` is clamped
    /// to this divided by the number of slots, so that no request makes the batch
    /// overflow or fail to allocate.
    pub const MAX_BYTES: usize = 256 << 20;

    /// A batch of `slots` buffers (1..=[`MAX_SLOTS`](Self::MAX_SLOTS); clamped) of
    /// `slot_len` bytes each (at least 1, at most [`MAX_BYTES`](Self::MAX_BYTES) / slots;
    /// clamped, see [`slot_len`](Self::slot_len)): a datagram longer than a slot is reported
    /// as [`Error::Truncated`].
    pub fn new(slots: usize, slot_len: usize) -> Self {
        let slots = slots.clamp(1, Self::MAX_SLOTS);
        let slot = slot_len.clamp(1, Self::MAX_BYTES / slots);
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

    /// The size of each slot: the longest datagram received whole.
    pub fn slot_len(&self) -> usize {
        self.slot
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

impl ConnectorSocket {
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
}
