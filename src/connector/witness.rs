//! The witness of user-space multicasts on the proc connector's group 1.

use bytes::BytesMut;
use parking_lot::Mutex;

use crate::codec::proc::{request, McastOp};
use crate::codec::DatagramBuilder;
use crate::error::{Error, Result};
use crate::sys::{kernel_at_least, ConnectorSocket, Dest, DropCounter};

use crate::codec::proc::PROC_GROUP;

/// Datagrams [`Witness::total`] reads at most in one call: about 50 times what its 1 MiB
/// queue holds of the smallest user-space multicasts.
const MAX_READ: usize = 1 << 16;

/// The witness of user-space multicasts on group 1: a socket in group 1 that sent
/// `IGNORE` before joining, so the kernel sends it none of its events (its filter applies
/// before delivery) while user-space multicasts, which no filter stops, all reach it. What it
/// receives and drops is every user-space datagram on group 1; the receiving socket got some
/// of them, and the rest may be in its kernel drop counter.
///
/// Reading order makes the count sound: [`read`](Witness::read) reads the receiving socket's
/// drop counter, then the witness, then the socket's queue, with a membership barrier
/// between each, for `ProcListener`, `ProcStream` and the connector's settled snapshots
/// (`Counters::on_drained`) alike; it skips the barriers when nothing changed since its last
/// barriered reading. The owner must be the only reader of the receiving socket.
#[derive(Debug)]
pub(crate) struct Witness {
    sock: ConnectorSocket,
    drops: Mutex<DropCounter>,
    /// User-space datagrams received.
    seen: Mutex<u64>,
    /// The count just before the receiving socket joined.
    base: u64,
    /// No user-space datagram reached the witness while the receiving socket joined (else
    /// it cannot tell whether the receiving socket was a member for it: never settled).
    sound: bool,
    /// The last reading taken with the barriers; held through each [`read`](Self::read), so
    /// that readings do not interleave (a quick one checked against a barriered one taken
    /// meanwhile would not be backed by its barriers).
    last: Mutex<Option<Reading>>,
    /// Called once, in [`total`](Self::total), between the receipt of a datagram and its
    /// count (tests: a second caller comes in there).
    #[cfg(test)]
    pub(crate) after_recv: Hook,
}

/// A test's hook: called once, then gone.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Hook(pub(crate) Mutex<Option<Box<dyn FnOnce() + Send>>>);

#[cfg(test)]
impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// One reading of a receiving socket against the witness ([`Witness::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// The receiving socket's drop count (its owner's `DropCounter`), read first.
    pub drops: Option<u64>,
    /// The witness's count since it was opened: the user-space datagrams on group 1 it
    /// received or dropped.
    pub witness: u64,
    /// The user-space multicasts on group 1 the receiving socket's reader took (the
    /// caller's count, all read before the reading).
    pub received: u64,
    /// The receiving socket's queue was empty and its drop counter unchanged when read
    /// last: every datagram the witness counted was received or is in `drops`.
    pub settled: bool,
}

impl Witness {
    /// Opens a witness and runs `join` (the receiving socket joining group 1) between two
    /// of its counts. No witness (`None`) on kernels before 6.6, which count a socket's first
    /// `IGNORE` as a listener leaving (it would lower the kernel's listener count), or when
    /// the witness cannot be set up; `join`'s error is returned as is.
    pub(crate) fn around<R>(join: impl FnOnce() -> Result<R>) -> Result<(Option<Self>, R)> {
        let Some(mut w) = Self::open() else {
            return join().map(|r| (None, r));
        };
        let before = w.total();
        let r = join()?;
        let after = w.total();
        Ok(match (before, after) {
            (Some(b), Some(a)) => {
                w.base = b;
                w.sound = a == b;
                (Some(w), r)
            }
            _ => (None, r),
        })
    }

    /// A witness for a receive path that takes its own baselines at moments its socket's
    /// queue is empty (the connector's dispatcher, with [`read`](Self::read)).
    #[cfg(not(cnbus_loom))]
    pub(crate) fn standalone() -> Option<Self> {
        Self::open()
    }

    fn open() -> Option<Self> {
        if !kernel_at_least(6, 6) {
            return None;
        }
        let sock = ConnectorSocket::open().ok()?;
        // Unicasts refused: what it receives and drops is group 1's multicasts only.
        sock.connect_kernel().ok()?;
        sock.set_recv_buffer(1 << 20, true).ok()?;
        let mut d = DatagramBuilder::new(64).with_pid(sock.port_id());
        d.push(&request(McastOp::Ignore, None, 0, sock.port_id()))
            .ok()?;
        sock.send(d.as_bytes(), Dest::Kernel).ok()?;
        sock.join(PROC_GROUP).ok()?;
        let drops = Mutex::new(DropCounter::baseline(&sock).ok()?);
        Some(Self {
            sock,
            drops,
            seen: Mutex::new(0),
            base: 0,
            sound: false,
            last: Mutex::new(None),
            #[cfg(test)]
            after_recv: Hook::default(),
        })
    }

    /// Reads everything queued; returns the user-space datagrams seen plus those it lost,
    /// or `None` if it cannot tell: also when the queue did not run empty within
    /// [`MAX_READ`] datagrams (a sender faster than this reader: what is still queued is in
    /// no count, and a call must not be kept here for good).
    ///
    /// One caller at a time (the count is locked throughout): otherwise a second one could
    /// find the queue empty while the first holds a datagram it took and has not counted
    /// yet, and return a count short of it.
    fn total(&self) -> Option<u64> {
        let mut seen = self.seen.lock();
        let mut buf = BytesMut::with_capacity(128);
        for _ in 0..=MAX_READ {
            buf.clear();
            let r = self.sock.recv_max(&mut buf, 128, true);
            #[cfg(test)]
            if matches!(r, Ok(Some(_)) | Err(Error::Truncated { .. })) {
                if let Some(hook) = self.after_recv.0.lock().take() {
                    hook();
                }
            }
            match r {
                Ok(Some(meta)) if meta.port != 0 && meta.group == PROC_GROUP => *seen += 1,
                Ok(Some(_)) => {}
                // No kernel proc datagram comes near 128 bytes: a user-space one.
                Err(Error::Truncated { .. }) => *seen += 1,
                // What it dropped is in its drop counter.
                Err(Error::Overrun { .. }) => {}
                Ok(None) => {
                    let lost = self.drops.lock().update(&self.sock).ok().flatten()?;
                    return Some(*seen + lost);
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The user-space datagrams on group 1 since the receiving socket joined that it did
    /// not receive (`received`: the ones it did), and whether that count can settle. Reads
    /// the witness only (no receiving socket: for checking the join).
    pub(crate) fn unaccounted(&self, received: u64) -> Option<(u64, bool)> {
        let since = self.total()?.checked_sub(self.base)?;
        Some((since.saturating_sub(received), self.sound))
    }

    /// What `r` says of the receiving socket since it joined: the user-space datagrams on
    /// group 1 it did not receive, and whether that count can settle (the join was sound).
    pub(crate) fn unaccounted_in(&self, r: &Reading) -> Option<(u64, bool)> {
        let since = r.witness.checked_sub(self.base)?;
        Some((since.saturating_sub(r.received), self.sound))
    }

    /// A membership barrier: the witness joins group 1 again (a no-op for its membership).
    /// A membership change takes the netlink table for writing, which waits for every
    /// multicast under way (each holds it for reading while it visits the group's members,
    /// on any netlink socket): whatever was multicast before has reached every member.
    fn barrier(&self) -> bool {
        self.sock.join(PROC_GROUP).is_ok()
    }

    /// Reads the receiving socket `sock` against the witness, in the order that makes the
    /// figure exact; `received` is the user-space multicasts on group 1 its reader took, all
    /// of them read before this call, and `observe` turns the socket's raw kernel drop
    /// counter into its owner's count. `None` when the witness cannot tell (see `total`) or
    /// the socket cannot be read.
    ///
    /// The order (`proc::loss::witnessed` gives why each step is needed):
    /// 1. the socket's drop counter, then a barrier: every user-space datagram the socket
    ///    dropped until then has reached the witness too (it visits the members one after
    ///    the other);
    /// 2. the witness, then a barrier: every datagram the witness counted has reached the
    ///    socket, queued or dropped;
    /// 3. the socket's queue and drop counter: empty and unchanged means every datagram the
    ///    witness counted was received or is in the count of step 1 (settled). The drop
    ///    counter is checked too because a multicast under way as the owner's read emptied
    ///    the queue can still be dropped afterwards, and leave the socket congested (the
    ///    kernel then drops what comes, queue empty or not, until the next read).
    ///
    /// The barriers take the netlink table's write lock (two `setsockopt` calls), which
    /// stalls every netlink multicast on the host for a moment; so the same three reads are
    /// made first without them, and if drops, witness and `received` are what the last
    /// barriered reading found, that reading still holds, with the queue read now: no
    /// user-space multicast reached the witness, none was dropped and none was received
    /// since, and one under way that reached only the socket waits in its queue (not
    /// settled). So no barrier on a host without user-space multicasts and drops.
    /// Otherwise the barriered reading is taken and kept.
    pub(crate) fn read(
        &self,
        sock: &ConnectorSocket,
        received: u64,
        observe: impl Fn(Option<u32>) -> Option<u64>,
    ) -> Option<Reading> {
        // One reading at a time: a quick reading is checked against the last barriered one,
        // which must have been complete before it started.
        let mut last = self.last.lock();
        let once = |barriers: bool| {
            let before = sock.meminfo().ok()?;
            let drops = observe(before.drops);
            if barriers && !self.barrier() {
                return None;
            }
            let witness = self.total()?;
            if barriers && !self.barrier() {
                return None;
            }
            let after = sock.meminfo().ok()?;
            Some(Reading {
                drops,
                witness,
                received,
                settled: after.rmem_alloc == 0 && after.drops == before.drops,
            })
        };
        let quick = once(false)?;
        let same = |l: &Reading| {
            (l.drops, l.witness, l.received) == (quick.drops, quick.witness, quick.received)
        };
        if last.as_ref().is_some_and(same) {
            return Some(quick);
        }
        let r = once(true)?;
        *last = Some(r);
        Some(r)
    }
}
