//! Waking a blocked receiver: an `eventfd` polled beside the socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::cvt;
use crate::error::{Error, Op, Result};

/// A non-blocking `eventfd`, used to wake a thread blocked in [`poll_read`] without
/// touching the socket it waits on.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates the eventfd (close-on-exec, non-blocking).
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
            .map_err(|e| Error::from_io(Op::Wake, e))?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the eventfd readable, waking any poller. Never blocks.
    pub fn wake(&self) -> Result<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which is valid for reads during the call.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        match cvt(r) {
            Ok(_) => Ok(()),
            // The counter is saturated: it is readable already, which is all we want.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Error::from_io(Op::Wake, e)),
        }
    }

    /// Resets the eventfd to not readable.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`, which is valid for writes.
        // A failure (EAGAIN: nothing to drain) leaves nothing to undo.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Which descriptors [`poll_read`] found readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// The socket has a datagram (or a pending error such as `ENOBUFS`).
    pub socket: bool,
    /// The eventfd was signalled.
    pub wake: bool,
}

/// Waits until `socket` or `wake` is readable, or `timeout` passes (`None`: no limit).
/// An interrupted wait returns nothing ready.
pub fn poll_read(
    socket: &impl AsFd,
    wake: &EventFd,
    timeout: Option<Duration>,
) -> Result<Readiness> {
    let mut fds = [
        libc::pollfd {
            fd: socket.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = match timeout {
        None => -1,
        // Round up so that a short timeout does not become a busy loop of zero waits.
        Some(d) => {
            libc::c_int::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
        }
    };
    // SAFETY: `fds` is a valid array of two pollfd and its length is passed.
    match cvt(unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) }) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Readiness::default()),
        Err(e) => return Err(Error::from_io(Op::Poll, e)),
    }
    let ready = |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    Ok(Readiness {
        socket: ready(&fds[0]),
        wake: ready(&fds[1]),
    })
}

/// As [`poll_write`], waiting at most `timeout`: true when `fd` accepts a write or reports
/// an error or a hang-up (which the next write then says), false when `timeout` ran out
/// first (a reader that holds the pipe but reads nothing: stopped, or stalled). An
/// interrupted wait is resumed for the time left.
pub fn poll_write_timeout(fd: &impl AsFd, timeout: Duration) -> Result<bool> {
    let end = std::time::Instant::now() + timeout;
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let left = end.saturating_duration_since(std::time::Instant::now());
        // Rounded up, so that a wait left under a millisecond is no busy loop.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `p` is one valid pollfd and the count passed is 1.
        match cvt(unsafe { libc::poll(&mut p, 1, ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(Op::Poll, e)),
        }
    }
}

/// Waits until `fd` accepts a write, or reports an error or a hang-up (which the next
/// write then says). For a writer whose descriptor another process sharing it made
/// non-blocking (`O_NONBLOCK` is a property of the open file, which a shell or a runtime
/// such as node may set on a pipe or terminal it shares): a write then fails with `EAGAIN`
/// where it would have waited. An interrupted wait returns early.
pub fn poll_write(fd: &impl AsFd) -> Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd and the count passed is 1.
    match cvt(unsafe { libc::poll(&mut p, 1, -1) }) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(Error::from_io(Op::Poll, e)),
    }
}
