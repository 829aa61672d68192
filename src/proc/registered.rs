//! Proc events through a shared [`Connector`](crate::connector::Connector): the callback path.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::listener::{AckWatch, LISTEN_TRIES, REASON_NO_ACK};
use super::{
    request, EventSet, Loss, LossStats, McastOp, ProcDecoder, Received, DEFAULT_ACK_TIMEOUT,
};
use crate::codec::CbId;
use crate::connector::stats::Settled;
use crate::connector::{ConnectorHandle, Registration, Subscription};
use crate::error::{Error, Op, Result};
use crate::sys::Dest;

/// A callback receiving proc events from a connector's dispatcher thread, for as long as
/// this lives. Dropping it unregisters the callback; dropping the last proc registration
/// of the connector sends `IGNORE`.
///
/// The connector's socket is shared with its other users, so the kernel is not asked to
/// filter (the filter would apply to the whole socket): the event set is applied in user
/// space with the kernel's rules, and per-CPU sequence gaps count lost events.
/// Each overflow of the connector's receive queue (`ENOBUFS`, which may have cost proc
/// events, whatever traffic filled the queue) reaches the callback as one
/// [`Received::Lost`] of [`Loss::Overrun`] at that point of the stream, as with a
/// [`ProcListener`](super::ProcListener), whether or not the connector has an event handler
/// (which gets its [`Event::Overrun`](crate::connector::Event::Overrun) right after). The
/// connector counts them ([`Stats::overruns`](crate::connector::Stats::overruns), copied
/// into [`stats`](Self::stats)); the events they cost show up as [`Loss::Gap`] reports when
/// each CPU's next event arrives, and in full (the end of a run included) in the kernel's
/// drop counter, see [`stats`](Self::stats).
///
/// The kernel keeps one proc subscription per socket, and `IGNORE` stops every proc event
/// for the socket: the connector counts its proc registrations, sends `LISTEN` for the
/// first and `IGNORE` when the last one drops.
#[must_use = "dropping a ProcRegistration stops the events at once"]
pub struct ProcRegistration {
    handle: ConnectorHandle,
    decoder: Arc<Mutex<ProcDecoder>>,
    /// The connector's kernel drop count when this registration started.
    drops_base: Option<u64>,
    /// The first settled snapshot after this registration started (see
    /// [`stats`](Self::stats)), filled by the dispatcher; `None` inside without a witness.
    settled_base: Option<Arc<Mutex<Option<Settled>>>>,
    reg: Option<Registration>,
    /// Reports each overrun to the callback.
    overruns: Option<Registration>,
    _group: Subscription,
}

impl std::fmt::Debug for ProcRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcRegistration")
            .field("events", &self.decoder.lock().events())
            .finish()
    }
}

impl ProcRegistration {
    /// Loss and event counters; `overruns` are the connector's.
    ///
    /// `kernel_drops` is the connector socket's kernel drop counter since this registration
    /// started, when that counter counts proc events only: the connector opened its socket
    /// itself and never subscribed a group other than 1. Otherwise (the socket also carries
    /// other traffic, whose drops the kernel counts alike) it is `None`, and after an
    /// overrun [`LossStats::lost`] is `None` too: the gaps are a lower bound, since the
    /// events lost at the end of each CPU's stream show no gap.
    ///
    /// User-space multicasts on group 1 are counted by the kernel alike. On Linux 6.6+ the
    /// connector keeps a witness of them for its proc registrations, and the dispatcher
    /// takes a snapshot each time it finds the socket's queue empty. From the first such
    /// moment after this registration started, `kernel_drops` counts from that snapshot, and
    /// while no drop happened since the last snapshot the figure is settled
    /// ([`LossStats::foreign_settled`]): [`LossStats::lost`] is then exact.
    pub fn stats(&self) -> LossStats {
        let mut s = self.decoder.lock().stats();
        let c = self.handle.stats();
        s.overruns = c.overruns;
        if !self.handle.proc_only() {
            return s;
        }
        let base = self.settled_base.as_ref().and_then(|b| *b.lock());
        match (base, self.handle.proc_settled(), c.kernel_drops) {
            (Some(b), Some(last), Some(now)) => {
                s.kernel_drops = Some(now.saturating_sub(b.drops));
                // Only while nothing was dropped since the last snapshot does it cover
                // every drop.
                if now == last.drops {
                    let seen = last.witness.saturating_sub(b.witness);
                    let got = last.foreign.saturating_sub(b.foreign);
                    s.foreign_unaccounted = Some(seen.saturating_sub(got));
                    s.foreign_settled = true;
                }
            }
            (_, _, now) => {
                s.kernel_drops = match (now, self.drops_base) {
                    (Some(now), Some(base)) => Some(now.saturating_sub(base)),
                    _ => None,
                }
            }
        }
        s
    }
}

impl Drop for ProcRegistration {
    fn drop(&mut self) {
        drop(self.reg.take());
        drop(self.overruns.take());
        let handle = &self.handle;
        handle.proc_unlisten(|| {
            let ack = handle.next_seq(CbId::PROC);
            // Best effort: if it fails the socket is gone, and with it the kernel's count.
            let _ = handle.send(&request(McastOp::Ignore, None, 0, ack), Dest::Kernel);
        });
    }
}

/// Calls `callback` on `connector`'s dispatcher thread for each proc event in `events`
/// (and each loss report: [`Loss::Overrun`] at each overrun of the connector's socket,
/// [`Loss::Gap`] at each per-CPU sequence gap), after joining group 1 and, for the connector's first proc
/// registration, sending `LISTEN`.
///
/// The first registration waits up to [`DEFAULT_ACK_TIMEOUT`] for the kernel's ACK, so it
/// must not be called from inside another callback of the same connector (the ACK would
/// wait behind it). The ACK travels through the connector's queue like an event: when none
/// came and the socket lost something meanwhile (an overrun, or a drop the kernel counted),
/// `LISTEN` is sent again, up to 3 times, as [`ProcListener`](super::ProcListener) does.
/// Later registrations find the socket subscribed already and do not wait.
///
/// ```no_run
/// use cnbus::connector::Connector;
/// use cnbus::proc::{self, EventSet, Received};
///
/// # fn main() -> cnbus::Result<()> {
/// let conn = Connector::builder().spawn()?;
/// let _events = proc::register(&conn, EventSet::FORK | EventSet::EXIT, |r| match r {
///     Received::Event(ev) => println!("{:?}", ev.body),
///     Received::Lost(loss) => eprintln!("lost: {loss:?}"),
/// })?;
/// # Ok(()) }
/// ```
pub fn register<F>(
    connector: &ConnectorHandle,
    events: EventSet,
    callback: F,
) -> Result<ProcRegistration>
where
    F: FnMut(Received) + Send + 'static,
{
    // One callback, for the events and for the overrun reports: both come on the
    // dispatcher thread, one at a time. Overruns are watched before the group is joined,
    // so that every overrun of the socket from then on is reported.
    let callback = Arc::new(Mutex::new(callback));
    let cb = callback.clone();
    let overruns = connector.on_overrun(move || (cb.lock())(Received::Lost(Loss::Overrun)));
    let group = connector.subscribe(1)?;
    let decoder = Arc::new(Mutex::new(ProcDecoder::new(events, true)));
    // The kernel multicasts every ACK to every listener: make ours recognisable by mixing
    // this socket's port id (unique on the host) into the ack we send. Each try has its
    // own token, and only the ACK of the try being awaited is passed on, so a late ACK of
    // an earlier try is ignored.
    let new_token = || super::ack_token(connector.port_id(), connector.next_seq(CbId::PROC));
    let token = new_token();
    let awaited = Arc::new(AtomicU32::new(token.wrapping_add(1)));
    let (ack_tx, ack_rx) = crossbeam::channel::bounded(1);
    let (d, cb, want) = (decoder.clone(), callback, awaited.clone());
    let reg = connector.register(CbId::PROC, move |r| {
        let decoded = d
            .lock()
            .decode_parts(r.source().port, r.id(), r.seq(), r.ack(), r.data(), 0);
        if let Some((ack, err)) = decoded.ack {
            if ack == want.load(Ordering::SeqCst) {
                let _ = ack_tx.try_send((ack, err));
            }
        }
        let mut cb = cb.lock();
        for item in decoded {
            (*cb)(item);
        }
    });
    let overruns_now = || connector.stats().overruns;
    let mut watch = AckWatch::new(connector.socket(), overruns_now());
    let first = connector
        .proc_listen(|| connector.send(&request(McastOp::Listen, None, 0, token), Dest::Kernel))?;
    let registration = ProcRegistration {
        handle: connector.clone(),
        decoder,
        drops_base: connector.stats().kernel_drops,
        settled_base: if connector.proc_only() {
            connector.proc_baseline()
        } else {
            None
        },
        reg: Some(reg),
        overruns: Some(overruns),
        _group: group,
    };
    if !first {
        return Ok(registration);
    }
    // The ACK travels like an event, so an overflow of the connector's queue can drop it:
    // when the socket lost something while no ACK came (`AckWatch`), ask again, up to
    // `LISTEN_TRIES` times, as `ProcListener` and `ProcStream` do. The registration holds
    // the connector's proc count meanwhile, so no `IGNORE` can cross a repeat.
    for attempt in 1..=LISTEN_TRIES {
        let want = awaited.load(Ordering::SeqCst);
        // A timeout too long to add to the clock is no limit (never a panic).
        let deadline = Instant::now().checked_add(DEFAULT_ACK_TIMEOUT);
        let got = loop {
            let r = match deadline {
                Some(d) => ack_rx.recv_deadline(d).ok(),
                None => ack_rx.recv().ok(),
            };
            match r {
                // An earlier try's ACK that slipped in before the token changed.
                Some((ack, _)) if ack != want => continue,
                r => break r.map(|(_, err)| err),
            }
        };
        match got {
            Some(0) => return Ok(registration),
            Some(errno) => {
                return Err(Error::from_io(
                    Op::Request,
                    std::io::Error::from_raw_os_error(errno as i32),
                ))
            }
            None => {}
        }
        if attempt == LISTEN_TRIES || !watch.ack_may_be_dropped(connector.socket(), overruns_now())
        {
            break;
        }
        let token = new_token();
        awaited.store(token.wrapping_add(1), Ordering::SeqCst);
        watch = AckWatch::new(connector.socket(), overruns_now());
        connector.send(&request(McastOp::Listen, None, 0, token), Dest::Kernel)?;
    }
    Err(Error::ProcConnector {
        reason: REASON_NO_ACK,
    })
}
