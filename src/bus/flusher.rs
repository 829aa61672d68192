//! The flusher thread: drains every ring, and sleeps as long as the oldest queued message
//! allows.

use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::Duration;

use super::handshake::{IDLE, TIMED};
use super::ring::Ring;
use super::stats::Counters;
use super::Inner;

/// Test hook ([`Config::panic_at`](super::Config)): where a panic is injected, to check
/// that the bus contains it and still accounts for every message.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PanicAt {
    /// In a drain, before the bus's `n`-th send system call (1-based).
    Syscall(u64),
    /// In the flusher's loop, outside any drain, at its `n`-th pass (1-based).
    Pass(u64),
}

/// The shortest sleep of a flusher whose barrier failed (see `sleep`): without the
/// barrier it polls at its aim, which a `max_latency` of 0 (or a few microseconds) makes
/// a loop without a sleep, a busy CPU (every normal thread's on it starved, under
/// [`flusher_realtime`](super::BusBuilder::flusher_realtime)). A push that such a flusher
/// misses waits at most this long past its deadline (docs/BUS.md, "Memory orderings").
pub(crate) const BARRIERLESS_POLL: Duration = Duration::from_micros(200);

/// Starts the flusher thread. A panic in a drain is contained there; one elsewhere in the
/// loop ends the flusher and is recorded, and `flush`/`close` then drain on their own
/// threads. Either way the bus is then dead and every waiter released.
pub(crate) fn spawn(inner: &Arc<Inner>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let inner = Arc::clone(inner);
    std::thread::Builder::new()
        .name("cnbus-flusher".into())
        .spawn(move || {
            // Deadlines to the microsecond rather than the default 50 µs slack (a failure
            // only costs that slack).
            let _ = crate::sys::set_timer_slack_ns(1);
            #[cfg(all(test, not(cnbus_loom)))]
            if let Some((errno, calls)) = &inner.cfg.flusher_barrier_fails {
                crate::sys::membarrier::fail_heavy_here(Some(*errno));
                crate::sys::membarrier::count_calls_here(Arc::clone(calls));
            }
            inner.contain("bus flusher", || run(&inner));
            inner.dead.store(true, SeqCst);
            let _g = inner.space_lock.lock();
            inner.space_cv.notify_all();
        })
}

/// The thread's main loop: sleep until there is a reason to drain, drain, repeat. Returns
/// at a stop request: the closing thread drains what is left (`Bus::stop`).
fn run(inner: &Inner) {
    // Our copy of the rings (taken before each look, so that the drains run without the
    // rings' lock).
    let mut rings = Vec::new();
    #[cfg(test)]
    let mut passes = 0;
    loop {
        sleep(inner, &mut rings);
        inner.bell.awake();
        if inner.stop.load(SeqCst) {
            return;
        }
        #[cfg(test)]
        {
            passes += 1;
            if inner.cfg.panic_at == Some(PanicAt::Pass(passes)) {
                panic!("test hook: the flusher panics");
            }
        }
        // Before the pass: a request after this point asks for another one.
        inner.drain_asked.store(false, SeqCst);
        rings.clone_from(&inner.rings.lock());
        for ring in rings.iter().filter(|r| r.pending()) {
            inner.drain(ring, true);
        }
        inner.prune_rings();
    }
}

/// Sleeps until there is a reason to drain: a ring past the watermark (unless its writers
/// drain it themselves, [`assist`](super::BusBuilder::assist)), the oldest queued
/// message's deadline, a stop request, an inserter blocked or rejected on a full ring or
/// asking for a drain at the watermark ([`Inner::ask_drain`]).
/// Parks indefinitely when every ring is empty. Wake-up protocol: docs/BUS.md, "Memory
/// orderings".
fn sleep(inner: &Inner, rings: &mut Vec<Arc<Ring>>) {
    let wm = inner.cfg.watermark as u64;
    // Aim a quarter of the bound early (at most 1 ms): the wake-up delay and the send
    // then fit in the bound. Saturating: beyond u64 nanoseconds (584 years) is "never".
    let bound = u64::try_from(inner.cfg.max_latency.as_nanos()).unwrap_or(u64::MAX);
    let aim = bound - (bound / 4).min(1_000_000);
    // A stop, or a blocked inserter or a request for a drain and a non-empty ring: now.
    let urgent = |rings: &[Arc<Ring>]| {
        inner.stop.load(SeqCst)
            || ((inner.space_waiters.load(SeqCst) > 0 || inner.drain_asked.load(SeqCst))
                && rings.iter().any(|r| r.pending()))
    };
    // A ring the flusher drains at the watermark (writers that `assist` drain their own).
    let past_wm = |r: &Ring| !inner.cfg.assist && r.queued() >= wm;
    loop {
        rings.clone_from(&inner.rings.lock());
        if urgent(rings) {
            return;
        }
        let now = inner.now_ns();
        let (mut oldest, mut over) = (u64::MAX, false);
        for r in rings.iter().filter(|r| r.pending()) {
            oldest = oldest.min(match r.since.load(Relaxed) {
                0 => now,
                t => t,
            });
            over |= past_wm(r);
        }
        if over {
            return;
        }
        // Everything empty: park until a writer wakes us (IDLE); else until the
        // oldest message's deadline (TIMED).
        let (how, mut timeout) = match oldest.checked_add(aim) {
            _ if oldest == u64::MAX => (IDLE, None),
            Some(d) if d <= now => return,
            d => (TIMED, d.map(|d| Duration::from_nanos(d - now))),
        };
        // Announce (with the heavy barrier), then look again: a push either is seen, or
        // sees the announcement and unparks us; a ring added after our copy wakes us
        // (`add_ring`). Without the barrier (it failed: counted), look again after `aim`
        // (at least `BARRIERLESS_POLL`), which keeps the latency bound (that much late at
        // most) without relying on a wake-up. Writers
        // wake a TIMED flusher only at the watermark without `assist` (`after_push`): a
        // TIMED sleep with it needs no barrier (under a steady stream, the flusher sleeps
        // TIMED once per deadline, and the barrier interrupts every CPU running the
        // process).
        let barrier = how == IDLE || !inner.cfg.assist;
        if inner.bell.announce(how, barrier, inner.light).is_err() {
            Counters::add(&inner.stats.barrier_failures, 1);
            let poll = Duration::from_nanos(aim).max(BARRIERLESS_POLL);
            timeout = Some(timeout.map_or(poll, |t| t.min(poll)));
        }
        rings.clone_from(&inner.rings.lock());
        let wm_or_any = |r: &Arc<Ring>| r.pending() && (how == IDLE || past_wm(r));
        if rings.iter().any(wm_or_any) || urgent(rings) {
            inner.bell.awake();
            continue;
        }
        match timeout {
            None => std::thread::park(),
            Some(t) => std::thread::park_timeout(t),
        }
        inner.bell.awake();
        Counters::add(&inner.stats.flusher_wakeups, 1);
    }
}
