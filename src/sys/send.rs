//! Sending on a [`ConnectorSocket`]: one datagram (`sendto`) or a batch (`sendmmsg`), waiting
//! or not.

use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

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

/// A sender's wait for room at a unicast peer whose receive queue is full: netlink offers no
/// readiness for that (a sender's writability is its own send buffer's), so the sender
/// tries again (with `MSG_DONTWAIT`) after a pause, 20 µs doubling up to 1 ms, never past
/// the wait's deadline. The one schedule of every such wait: the connector's sends
/// (blocking, and async on tokio's timer) and the bus's drains.
#[derive(Debug, Clone)]
pub(crate) struct RoomWait {
    /// `None`: no end (a timeout too long to represent).
    deadline: Option<Instant>,
    pause: Duration,
}

impl RoomWait {
    const FIRST_PAUSE: Duration = Duration::from_micros(20);
    const MAX_PAUSE: Duration = Duration::from_millis(1);

    /// A wait that ends `timeout` from now.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now().checked_add(timeout),
            pause: Self::FIRST_PAUSE,
        }
    }

    /// Ends the wait by `deadline` if that is sooner (a shutdown's).
    pub(crate) fn end_by(&mut self, deadline: Instant) {
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }

    /// The pause before the next attempt, or `None` when the time is up.
    pub(crate) fn next_pause(&mut self) -> Option<Duration> {
        let pause = match self.deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(self.pause),
            None => self.pause,
        };
        self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        (!pause.is_zero()).then_some(pause)
    }

    /// Sleeps the next pause: `false` (at once) when the time is up.
    pub(crate) fn sleep(&mut self) -> bool {
        self.next_pause().map(std::thread::sleep).is_some()
    }
}
