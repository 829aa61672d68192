//! [`ProcChannel`]: a listener on a thread of its own, feeding a bounded channel.

use super::*;

impl ProcListener {
    /// Moves the listener to a reader thread that forwards what it receives into a bounded
    /// channel of `capacity` items. When the consumer falls behind, the reader waits, the
    /// socket's queue fills, and the kernel's drops are reported as losses like any other.
    pub fn into_channel(self, capacity: usize) -> Result<ProcChannel> {
        let shutdown = self.shutdown_handle();
        let filtering = self.filtering;
        let stats = Arc::new(Mutex::new(self.stats()));
        let (tx, rx) = channel::bounded(capacity.max(1));
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("cnbus-proc".into())
            .spawn(move || reader(self, tx, st))
            .map_err(|e| Error::from_io(Op::Spawn, e))?;
        Ok(ProcChannel {
            rx,
            shutdown,
            stats,
            filtering,
            thread: Some(thread),
        })
    }
}

fn reader(mut l: ProcListener, tx: Sender<Result<Received>>, stats: Arc<Mutex<LossStats>>) {
    let mut since = 0u32;
    'run: loop {
        let item = match l.recv_timeout(Some(Duration::from_millis(200))) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                *stats.lock() = l.stats();
                continue;
            }
            Err(Error::Closed) => break,
            Err(e) => Err(e),
        };
        let fatal = item.is_err();
        since += 1;
        if fatal || since >= 64 || matches!(item, Ok(Received::Lost(_))) {
            *stats.lock() = l.stats();
            since = 0;
        }
        let mut item = item;
        loop {
            match tx.send_timeout(item, Duration::from_millis(100)) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(back)) => {
                    if l.shared.stop.load(Ordering::Relaxed) {
                        // Stopped while the consumer was not taking: never handed out.
                        l.discarded += u64::from(matches!(back, Ok(Received::Event(_))));
                        break 'run;
                    }
                    item = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => break 'run,
            }
        }
        if fatal {
            break;
        }
    }
    // IGNORE, and the queue read empty: the final, settled figures.
    *stats.lock() = l.finish();
}

/// A [`ProcListener`] running on its own thread, feeding a bounded channel (see
/// [`ProcListener::into_channel`]). Dropping it stops the thread, which sends `IGNORE`.
#[derive(Debug)]
pub struct ProcChannel {
    rx: Receiver<Result<Received>>,
    shutdown: ShutdownHandle,
    stats: Arc<Mutex<LossStats>>,
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
    /// 200 ms of quiet). Until the end, [`LossStats::events`] counts the events the reader
    /// put into the channel; at the end ([`close`](Self::close)), those still in it, which
    /// no one took, move to [`LossStats::unread`], so the final `events` is what the
    /// consumer received.
    pub fn stats(&self) -> LossStats {
        self.stats.lock().clone()
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
            // were counted as handed out, but no consumer took them (taking them here also
            // takes them from any clone of the receiver).
            let unread = self
                .rx
                .try_iter()
                .filter(|r| matches!(r, Ok(Received::Event(_))))
                .count() as u64;
            let mut s = self.stats.lock();
            s.events = s.events.saturating_sub(unread);
            s.unread += unread;
        }
    }
}

impl Drop for ProcChannel {
    fn drop(&mut self) {
        self.stop();
    }
}
