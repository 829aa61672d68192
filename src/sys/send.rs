//! Sending on a [`ConnectorSocket`]: one datagram (`sendto`) or a batch (`sendmmsg`), waiting
//! or not.

use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::AsRawFd;

use super::socket::sockaddr;
use super::{cvt, ConnectorSocket, Dest};
use crate::error::{Error, Op, Result};

impl ConnectorSocket {
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
                Err(e) => return Err(Error::from_send(Op::Send, dest, e)),
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
                Err(e) => return Err(Error::from_send(Op::SendBatch, dest, e)),
            }
        }
        Ok(sent)
    }
}
