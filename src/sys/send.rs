//! Sending on a [`ConnectorSocket`]: one datagram (`sendto`) or a batch (`sendmmsg`), waiting
//! or not.

use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
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

    /// Datagrams per `sendmmsg` system call: their headers live on the stack, as
    /// [`recv_many`](Self::recv_many)'s do ([`RecvBatch::MAX_SLOTS`](super::RecvBatch)).
    pub(crate) const SENDMMSG_MAX: usize = 64;

    /// Sends a batch of datagrams to one destination with `sendmmsg`, 64 per system call.
    /// Returns how many were sent; on an error after some were sent, returns the count so
    /// far (the caller can retry the rest), and the error only if none was sent. A unicast
    /// to a user-space socket whose receive queue is full waits until it has room
    /// (netlink's own behaviour).
    pub fn send_batch(&self, datagrams: &[IoSlice<'_>], dest: Dest) -> Result<usize> {
        self.sendmmsg(datagrams.len(), |i| [&datagrams[i], &[]], dest, 0, false)
    }

    /// [`send_batch`](Self::send_batch) without waiting (`MSG_DONTWAIT`): returns how many
    /// datagrams were sent, `Ok(0)` when the first one would have waited (a unicast
    /// receiver's queue is full).
    pub fn try_send_batch(&self, datagrams: &[IoSlice<'_>], dest: Dest) -> Result<usize> {
        self.sendmmsg(
            datagrams.len(),
            |i| [&datagrams[i], &[]],
            dest,
            libc::MSG_DONTWAIT,
            false,
        )
    }

    /// [`try_send_batch`](Self::try_send_batch) of the `count` datagrams `datagram(0..count)`
    /// (at most [`SENDMMSG_MAX`](Self::SENDMMSG_MAX)) in exactly one system call, even when
    /// it sends only some of them (then their count: the caller tries the rest), each given in two
    /// pieces that go out as one datagram, the first followed by the second (netlink copies
    /// a message's iovecs into one buffer); the second piece may be empty. For the bus's
    /// datagrams that continue past the end of its ring.
    pub(crate) fn try_send_pieces<'a>(
        &self,
        count: usize,
        datagram: impl Fn(usize) -> [&'a [u8]; 2],
        dest: Dest,
    ) -> Result<usize> {
        let count = count.min(Self::SENDMMSG_MAX);
        self.sendmmsg(count, datagram, dest, libc::MSG_DONTWAIT, true)
    }

    /// Sends `datagram(0..count)` (each in up to two pieces), [`SENDMMSG_MAX`] per system
    /// call: see [`send_batch`](Self::send_batch). With `once`, one system call whatever it
    /// sends (the caller counts its calls and handles a partial result).
    ///
    /// [`SENDMMSG_MAX`]: Self::SENDMMSG_MAX
    fn sendmmsg<'a>(
        &self,
        count: usize,
        datagram: impl Fn(usize) -> [&'a [u8]; 2],
        dest: Dest,
        flags: libc::c_int,
        once: bool,
    ) -> Result<usize> {
        const MAX: usize = ConnectorSocket::SENDMMSG_MAX;
        let mut sa = sockaddr(dest)?;
        // Only the first `n` of each are written (and read by the kernel): a call for a few
        // datagrams does not clear 6 KiB.
        let mut iovs = [const { MaybeUninit::<[libc::iovec; 2]>::uninit() }; MAX];
        let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; MAX];
        let mut sent = 0;
        while sent < count {
            let n = (count - sent).min(MAX);
            for (i, h) in hdrs.iter_mut().take(n).enumerate() {
                let pieces = datagram(sent + i);
                let iov = iovs[i].write(pieces.map(|piece| libc::iovec {
                    iov_base: piece.as_ptr().cast_mut().cast(),
                    iov_len: piece.len(),
                }));
                // SAFETY: mmsghdr is plain data for which all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
                m.msg_hdr.msg_name = (&mut sa as *mut libc::sockaddr_nl).cast();
                m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                m.msg_hdr.msg_iov = iov.as_mut_ptr();
                m.msg_hdr.msg_iovlen = if pieces[1].is_empty() { 1 } else { 2 };
                h.write(m);
            }
            // SAFETY: the first `n` headers (the `n` passed) are written; each points at `sa`
            // and at its own two iovecs in `iovs` (written, not moved since), which point at
            // the pieces `datagram` returned (borrowed for 'a, beyond the call); all alive for
            // the call. The kernel reads `msg_iovlen` iovecs of each, their bytes and the
            // name, and writes msg_len into `hdrs`, which we own.
            #[cfg(test)]
            SENDMMSG_CALLS.set(SENDMMSG_CALLS.get() + 1);
            let r = unsafe {
                libc::sendmmsg(
                    self.as_raw_fd(),
                    hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
                    n as libc::c_uint,
                    libc::MSG_NOSIGNAL | flags,
                )
            };
            match cvt(r) {
                Ok(0) => break,
                Ok(k) if once => return Ok(k as usize),
                Ok(k) => sent += k as usize,
                // The error will recur on the caller's retry of the rest.
                Err(_) if sent > 0 => break,
                // A signal while waiting for room: wait on, as `sendto` does (a single call,
                // `once`, leaves it to its caller, which retries transient errors).
                Err(e) if e.kind() == io::ErrorKind::Interrupted && !once => continue,
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

#[cfg(test)]
thread_local! {
    /// Test hook: `sendmmsg` system calls made by this thread.
    pub(crate) static SENDMMSG_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{messages_ref, CbId, CnMsg, DatagramBuilder, MessageRef};

    /// A blocking `send_batch` to a full unicast receiver, interrupted by a signal whose
    /// handler does not restart system calls: it goes on waiting (as `send` does), and
    /// sends once the receiver has room. Before the fix it returned `EINTR` with nothing
    /// sent (exit code 1). In a forked child: the handler is the child's own.
    #[test]
    #[cfg(not(cnbus_loom))]
    fn a_blocking_batch_interrupted_by_a_signal_goes_on_waiting() {
        extern "C" fn on_signal(_: libc::c_int) {}
        if ConnectorSocket::open().is_err() && std::env::var_os("CI").is_none() {
            return eprintln!("SKIPPED: no netlink connector socket");
        }
        let code = crate::sys::in_forked_child(
            || {
                // SAFETY: installs a handler that does nothing (async-signal-safe), without
                // SA_RESTART, for SIGUSR1 in this child only; `sa` is valid for reads.
                unsafe {
                    let mut sa: libc::sigaction = mem::zeroed();
                    sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    libc::sigemptyset(&mut sa.sa_mask);
                    libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
                }
                let (Ok(rx), Ok(tx)) = (ConnectorSocket::open(), ConnectorSocket::open()) else {
                    return 3;
                };
                let _ = rx.set_recv_buffer(4096, true);
                // Open until the send returned (a closed one refuses it).
                let rx = std::sync::Arc::new(rx);
                let rx2 = std::sync::Arc::clone(&rx);
                let to = Dest::Port(rx.port_id());
                let id = CbId::new(0x4000_0000 | (std::process::id() & 0xffff) << 8 | 0xe3, 1);
                let mut b = DatagramBuilder::new(4096);
                let _ = b.push(&CnMsg::new(id, vec![1u8; 64]));
                let d = b.take();
                while let Ok(Some(_)) = tx.try_send(&d, to) {}
                // SAFETY: gettid takes nothing.
                let tid = unsafe { libc::gettid() };
                // SAFETY: pthread_self takes nothing.
                let me = unsafe { libc::pthread_self() } as usize;
                let kicker = std::thread::spawn(move || {
                    // Once this thread sleeps (in the send), interrupt it a few times.
                    let stat = format!("/proc/self/task/{tid}/stat");
                    let asleep = || {
                        std::fs::read_to_string(&stat)
                            .ok()
                            .and_then(|s| {
                                s.rsplit_once(')')
                                    .map(|(_, r)| r.trim_start().starts_with('S'))
                            })
                            .unwrap_or(false)
                    };
                    while !asleep() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    for _ in 0..20 {
                        // SAFETY: `me` is the child's main thread, alive until we are joined.
                        unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    // Then room.
                    let mut buf = bytes::BytesMut::with_capacity(1 << 16);
                    while let Ok(Some(_)) = rx2.recv(&mut buf, true) {
                        buf.clear();
                    }
                });
                let r = tx.send_batch(&[IoSlice::new(&d)], to);
                let _ = kicker.join();
                match r {
                    Ok(1) => 0,
                    Err(e) if e.errno() == Some(libc::EINTR) => 1,
                    _ => 2,
                }
            },
            Duration::from_secs(60),
        );
        assert_eq!(code, Some(0), "None: the child hung (killed)");
    }

    /// More datagrams than one `sendmmsg` takes (the headers are reused for each 64), and
    /// datagrams in two pieces: every one arrives whole, in order, as one datagram.
    #[test]
    fn batches_beyond_one_call_and_datagrams_in_two_pieces_arrive_whole_in_order() {
        let (rx, tx) = match (ConnectorSocket::open(), ConnectorSocket::open()) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) if std::env::var_os("CI").is_some() => {
                panic!("no netlink socket: {e}")
            }
            _ => return eprintln!("SKIPPED: no netlink connector socket"),
        };
        rx.set_recv_buffer(4 << 20, true).unwrap();
        let to = Dest::Port(rx.port_id());
        let id = CbId::new(0x4000_0000 | (std::process::id() & 0xffff) << 8 | 0xe2, 1);
        let dgram = |seqs: std::ops::Range<u32>| {
            let mut d = DatagramBuilder::new(4096);
            for s in seqs {
                assert!(d
                    .push(&CnMsg::new(id, vec![s as u8; 5]).with_seq(s, 0))
                    .unwrap());
            }
            d.take()
        };
        // 150 datagrams of one message: three calls (64, 64, 22).
        let one: Vec<Vec<u8>> = (0..150).map(|s| dgram(s..s + 1)).collect();
        let slices: Vec<_> = one.iter().map(|d| IoSlice::new(d)).collect();
        assert_eq!(tx.send_batch(&slices, to).unwrap(), 150);
        // 70 datagrams of two messages each, cut between them (at most 64 per call).
        let two: Vec<Vec<u8>> = (0..70).map(|i| dgram(1000 + 2 * i..1002 + 2 * i)).collect();
        let half = |i: usize| {
            let (a, b) = two[i].split_at(two[i].len() / 2);
            [a, b]
        };
        assert_eq!(tx.try_send_pieces(70, half, to).unwrap(), 64);
        let rest = |i: usize| half(64 + i);
        assert_eq!(tx.try_send_pieces(6, rest, to).unwrap(), 6);
        let mut per = Vec::new();
        let mut seqs = Vec::new();
        let mut buf = bytes::BytesMut::with_capacity(1 << 16);
        while rx.recv(&mut buf, true).unwrap().is_some() {
            let before = seqs.len();
            for m in messages_ref(&buf) {
                match m {
                    Ok(MessageRef::Connector { cn, .. }) => seqs.push(cn.seq),
                    other => panic!("{other:?}"),
                }
            }
            per.push(seqs.len() - before);
            buf.clear();
        }
        let want: Vec<u32> = (0..150).chain(1000..1140).collect();
        assert_eq!(seqs, want);
        assert_eq!(per, [vec![1; 150], vec![2; 70]].concat());
    }
}
