//! The flusher's sleep/wake state ([`Doorbell`]) and the flush generations
//! ([`FlushTickets`]), on [`crate::sync`] types so that loom can check them.
//!
//! # Sleep and wake-up
//!
//! The flusher announces how it is about to sleep (`TIMED` or `IDLE`, a SeqCst store),
//! then looks at every shard again *under the shard's lock*, and parks only if that second
//! look finds no reason to drain. A producer pushes under the shard's lock, releases it,
//! then loads the state. The shard lock orders the two: either the flusher's locked look
//! comes after the push's unlock (it sees the message and does not park), or the push's
//! lock comes after the look's unlock, so the flusher's announcement happens-before the
//! producer's load, which then sees `TIMED`/`IDLE` (or a later `AWAKE` set by whoever
//! already woke it). A producer that sees a sleeper takes it with a compare-exchange to
//! `AWAKE` (so at most one `unpark` per sleep) and unparks; `park` keeps an unpark that
//! arrives before it, so a wake between the second look and `park` is not lost.
//!
//! # Flush generations
//!
//! [`Bus::flush`](super::Bus::flush) takes a ticket (SeqCst `fetch_add`), wakes the
//! flusher and waits until the completed generation reaches its ticket. The flusher reads
//! the requested generation (SeqCst) *before* a pass; the pass takes every shard's drain
//! right (so a producer that took messages and has not sent them yet finishes first) and
//! empties every shard; then the generation read is published under the mutex. Every
//! insert that happened before `flush()` happened before its ticket, so before the read,
//! so it is in a shard when the pass reaches it or was taken by a drainer that released
//! the drain right only after sending.
//!
//! # Loom
//!
//! The real shards (a byte buffer behind `sys::ShortLock`) and the socket cannot run under
//! loom, so the `loom_tests` below drive the real [`Doorbell`] and [`FlushTickets`] with a
//! model shard: a `sync::Mutex<usize>` message count in place of the shard lock and buffer,
//! a second `sync::Mutex` as the drain right, and an atomic counter as the socket. The
//! orderings are the bus's own: the models use these types' methods.

use crate::sync::{AtomicU64, AtomicU8, Condvar, Mutex};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

/// The flusher is draining, or about to decide how to sleep.
pub(crate) const AWAKE: u8 = 0;
/// The flusher is parked until the oldest message's deadline.
pub(crate) const TIMED: u8 = 1;
/// The flusher is parked with nothing queued.
pub(crate) const IDLE: u8 = 2;

/// What the flusher is doing; see the module docs.
#[derive(Debug)]
pub(crate) struct Doorbell {
    state: AtomicU8,
}

impl Doorbell {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU8::new(AWAKE),
        }
    }

    /// Producer side: the state, loaded after the push released the shard lock.
    #[inline]
    pub(crate) fn state(&self) -> u8 {
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

    /// A flush, a stop or a blocked inserter: the caller unparks the flusher after this,
    /// whatever the state was.
    pub(crate) fn ring(&self) {
        self.state.swap(AWAKE, SeqCst);
    }

    /// Flusher side: about to sleep as `how` (TIMED or IDLE); the second look follows.
    pub(crate) fn announce(&self, how: u8) {
        self.state.store(how, SeqCst);
    }

    /// Flusher side: awake (after a park, or when the second look found work).
    pub(crate) fn awake(&self) {
        self.state.store(AWAKE, SeqCst);
    }
}

/// Flush generations requested and completed; see the module docs.
#[derive(Debug)]
pub(crate) struct FlushTickets {
    requested: AtomicU64,
    /// Highest generation completed; `u64::MAX` once the flusher exited.
    done: Mutex<u64>,
    cv: Condvar,
}

impl FlushTickets {
    pub(crate) fn new() -> Self {
        Self {
            requested: AtomicU64::new(0),
            done: Mutex::new(0),
            cv: Condvar::new(),
        }
    }

    /// `flush()`: a new generation; wait for it with [`wait`](Self::wait) after waking
    /// the flusher.
    pub(crate) fn request(&self) -> u64 {
        self.requested.fetch_add(1, SeqCst) + 1
    }

    /// Flusher: the generation a pass starting now completes (read before the pass).
    pub(crate) fn requested(&self) -> u64 {
        self.requested.load(SeqCst)
    }

    /// Flusher: generation `gen` is complete (`u64::MAX`: it exited, release everyone).
    pub(crate) fn publish(&self, gen: u64) {
        let mut d = self.done.lock();
        *d = (*d).max(gen);
        self.cv.notify_all();
    }

    /// Waits until generation `gen` is complete.
    pub(crate) fn wait(&self, gen: u64) {
        let mut d = self.done.lock();
        while *d < gen {
            d = self.cv.wait(d);
        }
    }
}

#[cfg(all(test, cnbus_loom))]
mod loom_tests {
    //! Models of the bus protocols on the real `Doorbell` and `FlushTickets` (see the
    //! module docs for what is modelled). Run with
    //! `RUSTFLAGS="--cfg cnbus_loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom`.

    use super::*;
    use crate::sync::{Arc, AtomicBool};
    use loom::thread;

    /// A shard as the protocols see it: a message count behind the shard lock, and the
    /// drain right. The drain right is an atomic flag rather than a loom `Mutex`, because
    /// loom 0.7's `Mutex::try_lock` can block other threads spuriously
    /// (tokio-rs/loom#376); the flag has a lock's orderings (Acquire take, Release give).
    struct ModelShard {
        count: Mutex<usize>,
        drain: AtomicBool,
    }

    impl ModelShard {
        fn try_take_drain(&self) -> bool {
            self.drain
                .compare_exchange(false, true, SeqCst, Relaxed)
                .is_ok()
        }
        fn take_drain(&self) {
            while !self.try_take_drain() {
                thread::yield_now();
            }
        }
        fn give_drain(&self) {
            self.drain
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// A producer's lane as the protocols see it: messages published (the ring's tail,
    /// stored only by its producer) and messages taken (the head), with no lock.
    struct ModelLane {
        tail: AtomicU64,
        head: AtomicU64,
    }

    impl ModelLane {
        fn pending(&self) -> bool {
            self.tail.load(SeqCst) != self.head.load(SeqCst)
        }
    }

    struct Model {
        shard: ModelShard,
        lane: ModelLane,
        bell: Doorbell,
        tickets: FlushTickets,
        /// Messages handed to the "kernel".
        sent: AtomicU64,
        stop: AtomicBool,
    }

    impl Model {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                shard: ModelShard {
                    count: Mutex::new(0),
                    drain: AtomicBool::new(false),
                },
                lane: ModelLane {
                    tail: AtomicU64::new(0),
                    head: AtomicU64::new(0),
                },
                bell: Doorbell::new(),
                tickets: FlushTickets::new(),
                sent: AtomicU64::new(0),
                stop: AtomicBool::new(false),
            })
        }

        /// `Inner::try_push` + `after_push` without assistance: push under the shard
        /// lock, release it, then look at the state (watermark 1: every push counts).
        fn insert(&self, flusher: &thread::Thread) {
            *self.shard.count.lock() += 1;
            match self.bell.state() {
                AWAKE => {}
                from => {
                    if self.bell.take_sleeper(from) {
                        flusher.unpark();
                    }
                }
            }
        }

        /// `Producer::try_push` + `after_push`: publish with a `Release` store and no lock,
        /// the light fence, then look at the state. The light fence is modelled as the
        /// `SeqCst` fence it is where membarrier is unavailable; where it is available it
        /// is a compiler fence and the flusher's `heavy` gives the same guarantee (a full
        /// barrier on the producer's CPU between its store and its load), which loom
        /// cannot model directly.
        fn lane_insert(&self, flusher: &thread::Thread) {
            let t = self.lane.tail.load(Relaxed) + 1;
            self.lane
                .tail
                .store(t, std::sync::atomic::Ordering::Release);
            loom::sync::atomic::fence(SeqCst);
            match self.bell.state() {
                AWAKE => {}
                from => {
                    if self.bell.take_sleeper(from) {
                        flusher.unpark();
                    }
                }
            }
        }

        /// `drain_shard` while holding the drain right: take (under the shard lock), then
        /// send.
        fn drain_held(&self) {
            let n = std::mem::take(&mut *self.shard.count.lock());
            thread::yield_now(); // taken, not sent yet
            self.sent.fetch_add(n as u64, SeqCst);
        }

        /// A producer helping: try the drain right, drain if it got it.
        fn help(&self) {
            if self.shard.try_take_drain() {
                self.drain_held();
                self.shard.give_drain();
            }
        }

        /// Starts the flusher thread; returns its handle and `Thread` (to unpark).
        fn spawn_flusher(m: &Arc<Self>) -> (thread::JoinHandle<()>, thread::Thread) {
            let m = Arc::clone(m);
            let f = thread::spawn(move || m.flusher());
            let t = f.thread().clone();
            (f, t)
        }

        /// `Bus::stop` and the join in `Bus::drop`: set `stop`, wake the flusher, wait for
        /// it to exit.
        fn stop_flusher(&self, (f, t): (thread::JoinHandle<()>, thread::Thread)) {
            self.stop.store(true, SeqCst);
            self.bell.ring();
            t.unpark();
            f.join().unwrap();
        }

        /// `Bus::flush` (`wait_flushed`).
        fn flush(&self, flusher: &thread::Thread) {
            let gen = self.tickets.request();
            self.bell.ring();
            flusher.unpark();
            self.tickets.wait(gen);
        }

        /// `Flusher::run` + `sleep` (IDLE only; TIMED is the same handshake with a
        /// timeout), a flush pass taking the drain right even when the shard looks empty.
        fn flusher(&self) {
            let mut published = 0;
            loop {
                // sleep()
                loop {
                    if self.stop.load(SeqCst) || self.tickets.requested() > published {
                        break;
                    }
                    if *self.shard.count.lock() > 0 || self.lane.pending() {
                        break;
                    }
                    self.bell.announce(IDLE);
                    // `membarrier::heavy` (a SeqCst fence here, see `lane_insert`).
                    loom::sync::atomic::fence(SeqCst);
                    // The second look, under the shard lock, and at the lane.
                    if *self.shard.count.lock() > 0
                        || self.lane.pending()
                        || self.stop.load(SeqCst)
                        || self.tickets.requested() > published
                    {
                        self.bell.awake();
                        break;
                    }
                    thread::park();
                    self.bell.awake();
                }
                let stop = self.stop.load(SeqCst);
                let gen = self.tickets.requested();
                self.shard.take_drain();
                self.drain_held();
                self.shard.give_drain();
                // `drain_lane`: take what is published, send, give the bytes back.
                let t = self.lane.tail.load(SeqCst);
                let h = self.lane.head.load(Relaxed);
                self.sent.fetch_add(t - h, SeqCst);
                self.lane.head.store(t, SeqCst);
                if gen > published {
                    published = gen;
                    self.tickets.publish(gen);
                }
                if stop && *self.shard.count.lock() == 0 && !self.lane.pending() {
                    self.tickets.publish(u64::MAX);
                    return;
                }
            }
        }
    }

    fn bounded() -> loom::model::Builder {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b
    }

    /// Inserts one message with `insert` (a shard push or a lane publish) while the
    /// flusher runs, and waits for the flusher to send it by itself. If the wake-up were
    /// lost, the flusher would park forever and loom would report the deadlock (the main
    /// thread waits for `sent`).
    fn check_no_lost_wakeup(insert: fn(&Model, &thread::Thread)) {
        bounded().check(move || {
            let m = Model::new();
            let f = Model::spawn_flusher(&m);
            insert(&m, &f.1);
            while m.sent.load(SeqCst) < 1 {
                thread::yield_now();
            }
            m.stop_flusher(f);
            assert_eq!(m.sent.load(SeqCst), 1);
        });
    }

    /// (i) No lost wake-up: a message pushed while the flusher goes to sleep is sent
    /// without any flush or stop.
    #[test]
    fn loom_no_lost_wakeup_between_push_and_sleep() {
        check_no_lost_wakeup(Model::insert);
    }

    /// (i') The same through a producer's lane, which has no lock to order the push and
    /// the flusher's second look: the fence pair must.
    #[test]
    fn loom_no_lost_wakeup_between_lane_publish_and_sleep() {
        check_no_lost_wakeup(Model::lane_insert);
    }

    /// (ii) flush() returns only after everything inserted before it was handed off,
    /// even while another producer helping has taken those messages and not yet sent
    /// them.
    #[test]
    fn loom_flush_waits_for_everything_inserted_before_it() {
        bounded().check(|| {
            let m = Model::new();
            let f = Model::spawn_flusher(&m);
            let h = {
                let m = Arc::clone(&m);
                thread::spawn(move || m.help())
            };
            m.insert(&f.1);
            m.insert(&f.1);
            m.flush(&f.1);
            assert_eq!(m.sent.load(SeqCst), 2, "flush returned before the hand-off");
            h.join().unwrap();
            m.stop_flusher(f);
        });
    }
}
