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
/// Reading order makes the count sound. `ProcListener` and `ProcStream` read the receiving
/// socket's drop counter, then the witness, then the socket's queue, with a membership
/// barrier between each (`proc::loss::witnessed`: a multicast reaches the group's members
/// one after the other, and the barrier waits for one under way). The connector's
/// statistics (`Counters::on_drained`) read the witness first, then the socket's counter
/// and queue, without barriers (it runs whenever the dispatcher empties its queue): a
/// user-space datagram sent in between is in neither count, or waits in the receiving
/// queue (not empty: not settled), or was dropped from a full queue (again not empty);
/// only one under way as the witness is read can make that figure one off. The owner must
/// be the only reader of the receiving socket.
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

    /// A witness for a receive path that takes its own baselines (with [`count`](Self::count))
    /// at moments its socket's queue is empty (the connector's dispatcher).
    #[cfg(not(cnbus_loom))]
    pub(crate) fn standalone() -> Option<Self> {
        Self::open()
    }

    /// The user-space datagrams on group 1 it received or dropped since it was opened.
    #[cfg(not(cnbus_loom))]
    pub(crate) fn count(&self) -> Option<u64> {
        self.total()
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
        })
    }

    /// Reads everything queued; returns the user-space datagrams seen plus those it lost,
    /// or `None` if it cannot tell: also when the queue did not run empty within
    /// [`MAX_READ`] datagrams (a sender faster than this reader: what is still queued is in
    /// no count, and a call must not be kept here for good).
    fn total(&self) -> Option<u64> {
        let mut buf = BytesMut::with_capacity(128);
        for _ in 0..=MAX_READ {
            buf.clear();
            match self.sock.recv_max(&mut buf, 128, true) {
                Ok(Some(meta)) if meta.port != 0 && meta.group == PROC_GROUP => {
                    *self.seen.lock() += 1
                }
                Ok(Some(_)) => {}
                // No kernel proc datagram comes near 128 bytes: a user-space one.
                Err(Error::Truncated { .. }) => *self.seen.lock() += 1,
                // What it dropped is in its drop counter.
                Err(Error::Overrun { .. }) => {}
                Ok(None) => {
                    let lost = self.drops.lock().update(&self.sock).ok().flatten()?;
                    return Some(*self.seen.lock() + lost);
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The user-space datagrams on group 1 since the receiving socket joined that it did
    /// not receive (`received`: the ones it did), and whether that count can settle. Read
    /// it before the receiving socket's counter and queue.
    pub(crate) fn unaccounted(&self, received: u64) -> Option<(u64, bool)> {
        let since = self.total()?.checked_sub(self.base)?;
        Some((since.saturating_sub(received), self.sound))
    }
}
