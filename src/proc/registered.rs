//! Proc events through a shared [`Connector`](crate::connector::Connector): the callback path.

use std::sync::Arc;

use parking_lot::Mutex;

use super::listener::REASON_NO_ACK;
use super::{request, EventSet, LossStats, McastOp, ProcDecoder, Received, DEFAULT_ACK_TIMEOUT};
use crate::codec::CbId;
use crate::connector::{ConnectorHandle, Registration, Subscription};
use crate::error::{Error, Op, Result};
use crate::sys::Dest;

/// A callback receiving proc events from a connector's dispatcher thread, for as long as
/// this lives. Dropping it unregisters the callback and sends `IGNORE`.
///
/// The connector's socket is shared with its other users, so the kernel is not asked to
/// filter (the filter would apply to the whole socket): the event set is applied in user
/// space with the kernel's rules, and per-CPU sequence gaps count lost events exactly.
/// Receive-queue overflows are counted by the connector ([`Stats::overruns`](crate::connector::Stats::overruns),
/// copied into [`stats`](Self::stats)); the events they cost show up as
/// [`Received::Lost`] gaps when each CPU's next event arrives.
#[must_use = "dropping a ProcRegistration stops the events at once"]
pub struct ProcRegistration {
    handle: ConnectorHandle,
    decoder: Arc<Mutex<ProcDecoder>>,
    reg: Option<Registration>,
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
    pub fn stats(&self) -> LossStats {
        let mut s = self.decoder.lock().stats();
        s.overruns = self.handle.stats().overruns;
        s
    }
}

impl Drop for ProcRegistration {
    fn drop(&mut self) {
        drop(self.reg.take());
        let ack = self.handle.next_seq(CbId::PROC);
        // Best effort: if it fails the socket is gone, and with it the kernel's count.
        let _ = self
            .handle
            .send(&request(McastOp::Ignore, None, 0, ack), Dest::Kernel);
    }
}

/// Calls `callback` on `connector`'s dispatcher thread for each proc event in `events`
/// (and each loss report), after joining group 1 and sending `LISTEN`.
///
/// Waits up to [`DEFAULT_ACK_TIMEOUT`] for the kernel's ACK, so it must not be called from
/// inside another callback of the same connector (the ACK would wait behind it).
///
/// ```no_run
/// use cnbus::connector::Connector;
/// use cnbus::proc::{self, EventSet, Received};
///
/// # fn main() -> cnbus::Result<()> {
/// let bus = Connector::builder().spawn()?;
/// let _events = proc::register(&bus, EventSet::FORK | EventSet::EXIT, |r| match r {
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
    let group = connector.subscribe(1)?;
    let decoder = Arc::new(Mutex::new(ProcDecoder::new(events, true)));
    // The kernel multicasts every ACK to every listener: make ours recognisable by mixing
    // this socket's port id (unique on the host) into the ack we send.
    let token = super::ack_token(connector.port_id(), connector.next_seq(CbId::PROC));
    let (ack_tx, ack_rx) = crossbeam::channel::bounded(1);
    let (d, mut cb) = (decoder.clone(), callback);
    let reg = connector.register(CbId::PROC, move |r| {
        let decoded = d.lock().decode(r.source.port, &r.msg);
        if let Some((ack, err)) = decoded.ack {
            if ack == token.wrapping_add(1) {
                let _ = ack_tx.try_send(err);
            }
        }
        for item in decoded {
            cb(item);
        }
    });
    connector.send(&request(McastOp::Listen, None, 0, token), Dest::Kernel)?;
    let registration = ProcRegistration {
        handle: connector.clone(),
        decoder,
        reg: Some(reg),
        _group: group,
    };
    match ack_rx.recv_timeout(DEFAULT_ACK_TIMEOUT) {
        Ok(0) => Ok(registration),
        Ok(errno) => Err(Error::from_io(
            Op::Request,
            std::io::Error::from_raw_os_error(errno as i32),
        )),
        Err(_) => Err(Error::ProcConnector {
            reason: REASON_NO_ACK,
        }),
    }
}
