//! [`ProcChannel`]: a listener on a thread of its own, feeding a bounded channel.

use super::*;

impl ProcListener {
    /// Moves the listener to a reader thread that forwards what it receives into a bounded
    /// channel of `capacity` items (at least 1: 0 makes a channel of one item, not a
    /// rendezvous, so that the reader can put an item in without a consumer waiting). When the consumer falls behind, the reader waits, the
    /// socket's queue fills, and the kernel's drops are reported as losses like any other.
    pub fn into_channel(self, capacity: usize) -> Result<ProcChannel> {
        let shutdown = self.shutdown_handle();
        let filtering = self.filtering;
        let fed = Arc::new(Mutex::new(Fed {
            stats: self.stats(),
            ..Fed::default()
        }));
        let (tx, rx) = channel::bounded(capacity.max(1));
        let f = fed.clone();
        let thread = std::thread::Builder::new()
            .name("cnbus-proc".into())
            .spawn(move || reader(self, tx, f))
            .map_err(|e| Error::from_io(Op::Spawn, e))?;
        Ok(ProcChannel {
            rx,
            shutdown,
            fed,
            filtering,
            thread: Some(thread),
        })
    }
}

/// What the reader thread shares with its [`ProcChannel`]: its counters, and what it put
/// into the channel, so that a snapshot can tell the events the consumer took from those
/// still queued.
#[derive(Debug, Default)]
struct Fed {
    /// The reader's counters as of its last update.
    stats: LossStats,
    /// Items put into the channel.
    items: u64,
    /// Events among them.
    events: u64,
    /// The numbers (from 0, in channel order) of the items put into the channel that are
    /// not events (loss reports, an error), until they are known to be taken.
    others: VecDeque<u64>,
    /// Such items known to be taken.
    others_taken: u64,
    /// The reader has stopped and the channel was emptied: `stats` is final.
    closed: bool,
}

impl Fed {
    /// The counters with `events` (taken by the consumer) and `queued` (still in the
    /// channel) as of `in_channel` items in the channel, read while this is locked (the
    /// reader puts items in only under the lock, so none came in meanwhile). The channel
    /// is first in, first out: the items taken are the first `items - in_channel`.
    fn snapshot(&mut self, in_channel: usize) -> LossStats {
        if self.closed {
            return self.stats.clone();
        }
        let taken = self.taken(in_channel);
        let events = taken - self.others_taken;
        LossStats {
            events,
            queued: self.events - events,
            ..self.stats.clone()
        }
    }
}

impl Fed {
    /// The items taken by the consumer with `in_channel` items in the channel (read while
    /// this is locked); forgets the numbers of the non-events among them, so that `others`
    /// never holds more than the channel does.
    fn taken(&mut self, in_channel: usize) -> u64 {
        let taken = self.items.saturating_sub(in_channel as u64);
        while self.others.front().is_some_and(|&n| n < taken) {
            self.others.pop_front();
            self.others_taken += 1;
        }
        taken
    }
}

/// Puts `item` into the channel, under `fed`'s lock (so that a snapshot sees the channel
/// and the count of what was put into it at one instant), waiting for room while it is
/// full without holding the lock (pauses of 20 µs doubling to 1 ms). `Err(item)` when
/// the listener was stopped while the consumer was not taking, `Ok(false)` when the
/// channel is gone.
fn put(
    stop: &AtomicBool,
    tx: &Sender<Result<Received>>,
    fed: &Mutex<Fed>,
    mut item: Result<Received>,
) -> std::result::Result<bool, Result<Received>> {
    let event = matches!(item, Ok(Received::Event(_)));
    let mut wait = crate::sys::RoomWait::new(STOP_CHECK);
    loop {
        let mut f = fed.lock();
        match tx.try_send(item) {
            Ok(()) => {
                if !event {
                    let n = f.items;
                    f.others.push_back(n);
                }
                f.items += 1;
                f.events += u64::from(event);
                // Bounded by the channel, even if no one ever asks for a snapshot.
                f.taken(tx.len());
                return Ok(true);
            }
            Err(channel::TrySendError::Disconnected(_)) => return Ok(false),
            Err(channel::TrySendError::Full(back)) => item = back,
        }
        drop(f);
        match wait.next_pause() {
            Some(pause) => std::thread::sleep(pause),
            None if stop.load(Ordering::Relaxed) => return Err(item),
            None => wait = crate::sys::RoomWait::new(STOP_CHECK),
        }
    }
}

/// How often a reader waiting for room in a full channel checks for a shutdown.
const STOP_CHECK: Duration = Duration::from_millis(100);

fn reader(mut l: ProcListener, tx: Sender<Result<Received>>, fed: Arc<Mutex<Fed>>) {
    let mut since = 0u32;
    loop {
        let item = match l.recv_timeout(Some(Duration::from_millis(200))) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                fed.lock().stats = l.stats();
                continue;
            }
            Err(Error::Closed) => break,
            Err(e) => Err(e),
        };
        let fatal = item.is_err();
        since += 1;
        if fatal || since >= 64 || matches!(item, Ok(Received::Lost(_))) {
            fed.lock().stats = l.stats();
            since = 0;
        }
        match put(&l.shared.stop, &tx, &fed, item) {
            Ok(true) => {}
            Ok(false) => break,
            Err(back) => {
                // Stopped while the consumer was not taking: never handed out.
                if let Ok(r) = &back {
                    l.core.pending.unread(r);
                }
                break;
            }
        }
        if fatal {
            break;
        }
    }
    // IGNORE, and the queue read empty: the final, settled figures.
    fed.lock().stats = l.finish();
}

/// A [`ProcListener`] running on its own thread, feeding a bounded channel (see
/// [`ProcListener::into_channel`]). Dropping it stops the thread, which sends `IGNORE`.
#[derive(Debug)]
pub struct ProcChannel {
    rx: Receiver<Result<Received>>,
    shutdown: ShutdownHandle,
    fed: Arc<Mutex<Fed>>,
    filtering: Filtering,
    thread: Option<JoinHandle<()>>,
}

impl ProcChannel {
    /// The channel, for `select!` and friends. A fatal receive error arrives as an `Err`
    /// item, after which the channel disconnects.
    pub fn receiver(&self) -> &Receiver<Result<Received>> {
        &self.rx
    }

    /// Waits for the next item; [`Error::Closed`] once the reader has stopped.
    pub fn recv(&self) -> Result<Received> {
        self.rx.recv().map_err(|_| Error::Closed)?
    }

    /// Waits up to `timeout`; `Ok(None)` when it ran out.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r.map(Some),
            Err(channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(channel::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// How events are filtered.
    pub fn filtering(&self) -> Filtering {
        self.filtering
    }

    /// The reader's counters, as of its last update (every 64 items, every loss, and every
    /// 200 ms of quiet), with the channel's part as of this call: [`LossStats::events`] is
    /// the events the consumer has taken from the channel (through [`recv`](Self::recv),
    /// [`recv_timeout`](Self::recv_timeout) or [`receiver`](Self::receiver)), and
    /// [`LossStats::queued`] those the reader put into it that are still there. At the end
    /// ([`close`](Self::close)), those still in it, which no one took, move to
    /// [`LossStats::unread`], so the final `events` is what the consumer received and the
    /// final `queued` is 0. The loss figure is exact at every call (see
    /// [`ProcListener::stats`]), as of the reader's last update.
    pub fn stats(&self) -> LossStats {
        let mut f = self.fed.lock();
        let in_channel = self.rx.len();
        f.snapshot(in_channel)
    }

    /// A handle that stops the reader.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the reader (which sends `IGNORE` and reads the queue empty, see
    /// [`ProcListener::finish`]) and returns the final counters. The events still in the
    /// channel are discarded and counted in [`LossStats::unread`], not in
    /// [`LossStats::events`].
    pub fn close(mut self) -> LossStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            // The reader is gone, and its sender with it: the events still in the channel
            // were put into it, but no consumer took them (taking them here also takes them
            // from any clone of the receiver).
            let unread = self
                .rx
                .try_iter()
                .filter(|r| matches!(r, Ok(Received::Event(_))))
                .count() as u64;
            let mut f = self.fed.lock();
            let all = f.events;
            let s = &mut f.stats;
            s.events = all - unread;
            s.queued = 0;
            s.unread += unread;
            f.closed = true;
        }
    }
}

impl Drop for ProcChannel {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the numbers of the loss reports put into the channel were forgotten only
    /// by a `stats()` snapshot, so a run with many loss reports (an overloaded host) and no
    /// snapshot kept every one of them: memory growing without bound. Now each put forgets
    /// those taken: never more than the channel holds. The snapshot still counts right.
    #[test]
    fn the_reports_put_are_forgotten_once_taken_without_any_snapshot() {
        let stop = AtomicBool::new(false);
        let fed = Mutex::new(Fed::default());
        let (tx, rx) = channel::bounded(4);
        for i in 0..10_000u64 {
            let item = if i % 3 == 0 {
                Ok(Received::Lost(Loss::Overrun))
            } else {
                Ok(Received::Event(crate::proc::ProcEvent {
                    seq: 0,
                    ack: 0,
                    cpu: 0,
                    timestamp_ns: 0,
                    body: crate::proc::EventBody::Ack { err: 0 },
                }))
            };
            assert!(matches!(put(&stop, &tx, &fed, item), Ok(true)));
            rx.recv().unwrap().unwrap();
            assert!(
                fed.lock().others.len() <= 4,
                "{i}: {}",
                fed.lock().others.len()
            );
        }
        assert!(matches!(
            put(&stop, &tx, &fed, Ok(Received::Lost(Loss::Overrun))),
            Ok(true)
        ));
        let s = fed.lock().snapshot(rx.len());
        assert_eq!((s.events, s.queued), (6_666, 0));
    }
}
