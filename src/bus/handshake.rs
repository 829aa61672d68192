//! The flusher's sleep/wake state ([`Doorbell`]), on [`crate::sync`] types so that loom
//! can check it.
//!
//! The protocol (sleep and wake-up; flush as a drain of every ring), why each side orders
//! as it does, and what the loom models below check: docs/BUS.md, "Memory orderings". Run them with
//! `RUSTFLAGS="--cfg cnbus_loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom`.

use crate::sync::AtomicU8;
use crate::sys::membarrier::Light;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

/// The flusher is draining, or about to decide how to sleep.
pub(crate) const AWAKE: u8 = 0;
/// The flusher is parked until the oldest message's deadline.
pub(crate) const TIMED: u8 = 1;
/// The flusher is parked with nothing queued.
pub(crate) const IDLE: u8 = 2;

/// What the flusher is doing (docs/BUS.md, "Memory orderings"); `AWAKE` (0) at first.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    state: AtomicU8,
}

impl Doorbell {
    /// Writer side, after a push published its message (the ring's tail): the light
    /// fence, then the state. Pairs with the heavy barrier in [`announce`](Self::announce).
    #[inline(always)]
    pub(crate) fn state_after_publish(&self, light: Light) -> u8 {
        light.fence();
        self.state.load(Relaxed)
    }

    /// Producer side: takes the sleeper out of `from` (TIMED or IDLE). True if this
    /// caller must unpark the flusher.
    #[inline]
    pub(crate) fn take_sleeper(&self, from: u8) -> bool {
        self.state
            .compare_exchange(from, AWAKE, SeqCst, Relaxed)
            .is_ok()
    }

    /// A stop, a blocked or rejected insert: the caller unparks the flusher after this,
    /// whatever the state was.
    pub(crate) fn ring(&self) {
        self.state.swap(AWAKE, SeqCst);
    }

    /// Flusher side: about to sleep as `how` (TIMED or IDLE); the heavy barrier against
    /// the writers' `light` if `barrier` (some writer may rely on seeing `how`), then the
    /// second look at every ring follows. An error (the barrier was not established) means
    /// the look may miss a push: the caller must not sleep without a timeout.
    pub(crate) fn announce(&self, how: u8, barrier: bool, light: Light) -> std::io::Result<()> {
        self.state.store(how, SeqCst);
        if barrier {
            light.heavy()?;
        }
        Ok(())
    }

    /// The state, for tests that wait for the flusher to park.
    #[cfg(test)]
    pub(crate) fn state(&self) -> u8 {
        self.state.load(SeqCst)
    }

    /// Flusher side: awake (after a park, or when the second look found work).
    pub(crate) fn awake(&self) {
        self.state.store(AWAKE, SeqCst);
    }
}

#[cfg(all(test, cnbus_loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex};
    use crate::sys::ring::{ring, Reader, Writer};
    use loom::thread;

    /// One ring as the flusher sees it: the real byte ring, its reading side behind the
    /// drain right, and the "socket" (messages sent). The drain right is an atomic flag
    /// with a lock's orderings (Acquire take, Release give) in front of the `Mutex`, so
    /// that the mutex is never contended: loom 0.7 can fail a contended lock spuriously
    /// ("expected to be able to acquire lock", tokio-rs/loom#376).
    struct Model {
        right: AtomicBool,
        reader: Mutex<Reader>,
        probe: crate::sys::ring::Probe,
        bell: Doorbell,
        sent: AtomicU64,
        stop: AtomicBool,
        light: Light,
        /// `Inner::drain_asked`.
        asked: AtomicBool,
    }

    impl Model {
        fn new() -> (Arc<Self>, Writer) {
            let (w, r) = ring(64).unwrap();
            let m = Self {
                right: AtomicBool::new(false),
                reader: Mutex::new(r),
                light: crate::sys::membarrier::init(),
                probe: w.probe(),
                bell: Doorbell::default(),
                sent: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                asked: AtomicBool::new(false),
            };
            (Arc::new(m), w)
        }

        /// `Ring::push` + `Inner::after_push`: publish an 8-byte message, then the light
        /// fence and the look at the state (watermark 1: every push counts).
        fn insert(&self, w: &mut Writer, flusher: &thread::Thread) {
            assert!(w.write(8, |b| b.fill(1)));
            self.wake(self.bell.state_after_publish(self.light), flusher);
        }

        fn wake(&self, state: u8, flusher: &thread::Thread) {
            if state != AWAKE && self.bell.take_sleeper(state) {
                flusher.unpark();
            }
        }

        /// `Inner::drain` with the right held: take what is published, "send", give back.
        fn drain(&self) {
            while self
                .right
                .compare_exchange(false, true, std::sync::atomic::Ordering::Acquire, Relaxed)
                .is_err()
            {
                thread::yield_now();
            }
            {
                let mut r = self.reader.lock();
                let (a, b) = r.readable();
                let n = (a.len() + b.len()) as u64;
                self.sent.fetch_add(n / 8, SeqCst);
                r.release(n as usize);
            }
            self.right
                .store(false, std::sync::atomic::Ordering::Release);
        }

        /// `flusher::run` + `sleep` (IDLE; TIMED is the same handshake with a timeout).
        fn flusher(&self) {
            loop {
                loop {
                    if self.stop.load(SeqCst) || self.probe.pending() > 0 {
                        break;
                    }
                    self.bell.announce(IDLE, true, self.light).unwrap();
                    if self.probe.pending() > 0 || self.stop.load(SeqCst) {
                        self.bell.awake();
                        break;
                    }
                    thread::park();
                    self.bell.awake();
                }
                if self.stop.load(SeqCst) {
                    return;
                }
                self.drain();
            }
        }

        fn spawn_flusher(m: &Arc<Self>) -> (thread::JoinHandle<()>, thread::Thread) {
            let m = Arc::clone(m);
            let f = thread::spawn(move || m.flusher());
            let t = f.thread().clone();
            (f, t)
        }

        fn stop_flusher(&self, (f, t): (thread::JoinHandle<()>, thread::Thread)) {
            self.stop.store(true, SeqCst);
            self.bell.ring();
            t.unpark();
            f.join().unwrap();
        }
    }

    impl Model {
        /// `Ring::push` + `Inner::after_push` of a rejecting insert at the watermark of an
        /// assisted ring (watermark 1: every push): it may not drain, so it asks the
        /// flusher (`Inner::ask_drain`) unless the request is up already, and then wakes
        /// a sleeping flusher as a writer without `assist` does (`wake_for`; without
        /// that, `false` here, the message could wait behind an IDLE flusher for good).
        fn reject_insert(&self, w: &mut Writer, flusher: &thread::Thread, wake_if_asked: bool) {
            assert!(w.write(8, |b| b.fill(1)));
            let state = self.bell.state_after_publish(self.light);
            if !self.asked.load(Relaxed) {
                self.asked.store(true, SeqCst);
                self.bell.ring();
                flusher.unpark();
            } else if wake_if_asked {
                self.wake(state, flusher);
            }
        }

        /// `flusher::run` + `sleep` with `assist` on: a ring is drained at once when a
        /// drain was asked for; else a pending ring is left to its deadline (a TIMED
        /// sleep without the barrier, here a yield, after which it is drained: a stalled
        /// ring waits at most that long), an empty bus parks IDLE (with the barrier). The
        /// request is cleared before each pass.
        fn assisted_flusher(&self) {
            loop {
                loop {
                    let pending = self.probe.pending() > 0;
                    if self.stop.load(SeqCst) || (pending && self.asked.load(SeqCst)) {
                        break;
                    }
                    let how = if pending { TIMED } else { IDLE };
                    self.bell.announce(how, how == IDLE, self.light).unwrap();
                    let pending = self.probe.pending() > 0;
                    if (pending && (how == IDLE || self.asked.load(SeqCst)))
                        || self.stop.load(SeqCst)
                    {
                        self.bell.awake();
                        continue;
                    }
                    if how == IDLE {
                        thread::park();
                        self.bell.awake();
                    } else {
                        // The deadline.
                        thread::yield_now();
                        self.bell.awake();
                        break;
                    }
                }
                if self.stop.load(SeqCst) {
                    return;
                }
                self.asked.store(false, SeqCst);
                self.drain();
            }
        }
    }

    /// Rejecting inserts at the watermark of an assisted ring (`Inner::after_push` with
    /// `help` false) never leave a message behind an IDLE flusher: the flusher can park
    /// IDLE with the request still up (asked after its clear, the ring drained by the
    /// same pass); a later insert that finds it up must still wake it. Three inserts and
    /// no flush: a message left behind parks the flusher for good while the main thread
    /// waits for it (loom fails the model: "exceeded maximum number of branches"). Fails
    /// with `wake_if_asked` false (the code before the fix).
    fn check_rejecting_inserts_at_the_watermark(wake_if_asked: bool) {
        bounded().check(move || {
            let (m, mut w) = Model::new();
            let f = {
                let m = Arc::clone(&m);
                let f = thread::spawn(move || m.assisted_flusher());
                let t = f.thread().clone();
                (f, t)
            };
            for _ in 0..3 {
                m.reject_insert(&mut w, &f.1, wake_if_asked);
            }
            while m.sent.load(SeqCst) < 3 {
                thread::yield_now();
            }
            m.stop_flusher(f);
            assert_eq!(m.sent.load(SeqCst), 3);
        });
    }

    #[test]
    fn loom_rejecting_inserts_at_the_watermark_always_get_drained() {
        check_rejecting_inserts_at_the_watermark(true);
    }

    fn bounded() -> loom::model::Builder {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b
    }

    /// No lost wake-up: a message published while the flusher goes to sleep is sent
    /// without any flush or stop (a lost wake-up parks the flusher for good, and loom
    /// reports the deadlock: the main thread waits for `sent`). The stop leaves the rest
    /// to the closing thread, as `Bus::stop` does.
    fn check_no_lost_wakeup(insert: fn(&Model, &mut Writer, &thread::Thread)) {
        bounded().check(move || {
            let (m, mut w) = Model::new();
            let f = Model::spawn_flusher(&m);
            insert(&m, &mut w, &f.1);
            while m.sent.load(SeqCst) < 1 {
                thread::yield_now();
            }
            m.stop_flusher(f);
            assert_eq!(m.sent.load(SeqCst), 1);
        });
    }

    /// Through any ring (a shard's writer pushes under its lock, then does the same):
    /// the light fence and the heavy barrier, both `SeqCst` fences under loom.
    #[test]
    fn loom_no_lost_wakeup_between_publish_and_sleep() {
        check_no_lost_wakeup(Model::insert);
    }

    /// A close racing a `Producer`'s insert (`Bus::stop`: `dead` set, the heavy barrier,
    /// the closing drain; the producer: publish, the light fence in
    /// `state_after_publish`, then the look at `dead` of `send_own_if_closed`, here
    /// `stop`): either the closing drain sends the message or the producer sees `dead`
    /// and drains its own ring. Fails without either barrier.
    #[test]
    fn loom_a_close_racing_a_producer_loses_nothing() {
        bounded().check(|| {
            let (m, mut w) = Model::new();
            let p = {
                let m = Arc::clone(&m);
                thread::spawn(move || {
                    assert!(w.write(8, |b| b.fill(1)));
                    let _ = m.bell.state_after_publish(m.light);
                    if m.stop.load(Relaxed) {
                        m.drain();
                    }
                })
            };
            m.stop.store(true, SeqCst);
            m.light.heavy().unwrap();
            m.drain();
            p.join().unwrap();
            assert_eq!(m.sent.load(SeqCst), 1, "the message was left in the ring");
        });
    }

    /// The same race when the close's barrier failed (`Bus::stop`'s fallback): the
    /// producer's light side is then only program order (no fence at all here), the
    /// close has only the SeqCst fence that `heavy` makes before the system call. The
    /// closing drain may miss the push and the producer may not see `dead` after it; the
    /// producer's drop (a SeqCst fence, then `dead`) then sends it. Fails without the
    /// drop's check.
    #[test]
    fn loom_a_close_without_its_barrier_leaves_a_missed_push_to_the_producers_drop() {
        bounded().check(|| {
            let (m, mut w) = Model::new();
            let p = {
                let m = Arc::clone(&m);
                thread::spawn(move || {
                    assert!(w.write(8, |b| b.fill(1)));
                    // `send_own_if_closed` after a compiler fence only.
                    if m.stop.load(Relaxed) {
                        m.drain();
                    }
                    // `Producer::drop`.
                    crate::sync::fence(SeqCst);
                    if m.stop.load(Relaxed) {
                        m.drain();
                    }
                })
            };
            m.stop.store(true, SeqCst);
            // `heavy`'s fence, then its failed system call.
            crate::sync::fence(SeqCst);
            m.drain();
            p.join().unwrap();
            assert_eq!(m.sent.load(SeqCst), 1, "the message was left in the ring");
        });
    }

    /// flush() (a drain of every ring on the caller's thread, waiting for each drain right)
    /// returns only after everything inserted before it was sent, even while a writer
    /// helping at the watermark holds the drain right.
    #[test]
    fn loom_flush_waits_for_everything_inserted_before_it() {
        bounded().check(|| {
            // No flusher: a flush does not involve it (and its state stays AWAKE, so the
            // inserts unpark nobody).
            let (m, mut w) = Model::new();
            let me = thread::current();
            m.insert(&mut w, &me);
            let h = {
                let m = Arc::clone(&m);
                thread::spawn(move || m.drain())
            };
            m.insert(&mut w, &me);
            m.drain();
            assert_eq!(m.sent.load(SeqCst), 2, "flush returned before the hand-off");
            h.join().unwrap();
        });
    }
}
