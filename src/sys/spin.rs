//! The shards' lock: a biased lock whose holder, once it has taken the lock many times in
//! a row, keeps it and enters with two plain stores and one load, no atomic
//! read-modify-write and no fence.
//!
//! The owner word is `FREE`, `LOCKED` (one section, taken with a compare-exchange, as a
//! spin lock), or a [`Holder`]: the lock is *biased* to that thread. The biased thread
//! enters by storing its own `busy` flag, a [`Light`] fence, and loading the owner word:
//! if it still names it, it is in. Another thread takes a biased lock away by a
//! compare-exchange from that holder to `LOCKED`, then a [`heavy`](Light::heavy)
//! barrier, then waiting until the holder's `busy` is clear: the asymmetric Dekker pair of
//! `sys::membarrier` (either the holder's load sees `LOCKED` and it backs off, or the
//! taker's load sees `busy` and waits for its `Release` clear), so a revocation costs a
//! system call and the biased path none. A thread that went through the slow path keeps
//! the lock when it leaves only after [`BIAS_AFTER`] sections in a row of its own, so
//! threads taking turns on one shard pay a compare-exchange each and at most one
//! revocation per `BIAS_AFTER` sections. A revocation whose barrier fails (see
//! `sys::membarrier`) cannot be proven safe, so it does not proceed: the bias is given
//! back to its holder, untouched, and [`BiasedLock::lock`] returns the error (the bus
//! then sends the message on the caller's thread). A thread finding the lock biased to
//! itself takes it without a barrier (its own sections are in program order).
//!
//! `busy` lives in the thread's [`Holder`], written only by that thread (so no other
//! thread's retreat can clear it). Holders are never freed: a thread's goes back to a
//! spare list when the thread ends and is reused by a later thread, which may then find a
//! lock still biased to it; the list's mutex orders the old thread's sections before the
//! new one's.
//!
//! Waiters spin briefly, then yield (`sched_yield`): the sections are a few tens of
//! nanoseconds, so a waiter only yields when the holder was preempted inside one.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crossbeam::utils::CachePadded;

use super::membarrier::Light;
use crate::sync::{spin_wait, AtomicBool, AtomicPtr};

/// Sections in a row by one thread, through the slow path, after which it keeps the lock
/// (under loom 1, so that the models also go through the lock being biased).
pub(crate) const BIAS_AFTER: u32 = if cfg!(cnbus_loom) { 1 } else { 256 };

/// A thread's identity for [`BiasedLock`]s: its `busy` flag (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Holder {
    /// Set by its thread while it is in a section of a lock biased to it (or about to
    /// check that it is). Stored only by that thread; cleared with `Release` after the
    /// section, loaded with `Acquire` by a thread taking the lock away.
    busy: CachePadded<AtomicBool>,
}

/// A thread's [`Holder`], owned: kept in a thread-local of the thread that uses it, and
/// handed back to the spare list when dropped (when that thread-local is destroyed, so
/// no later code of the thread can use it).
#[derive(Debug)]
pub(crate) struct HolderSlot(&'static Holder);

/// Holders of ended threads, for reuse. Fork-safe: a child forked while another thread
/// held the list starts an empty one of its own (those holders are only not reused).
static SPARE: super::ForkSafe<Vec<&'static Holder>> = super::ForkSafe::new(Vec::new(), Vec::new);

fn spare() -> parking_lot::MutexGuard<'static, Vec<&'static Holder>> {
    SPARE.lock()
}

/// Test hook: the spare list, held (as by a thread starting or ending when another forks).
#[cfg(all(test, not(cnbus_loom)))]
pub(crate) fn hold_spare() -> parking_lot::MutexGuard<'static, Vec<&'static Holder>> {
    SPARE.hold()
}

impl HolderSlot {
    /// A spare holder, or a new one (leaked: holders are never freed).
    pub(crate) fn new() -> Self {
        Self(spare().pop().unwrap_or_else(|| Box::leak(Box::default())))
    }

    /// The holder.
    #[inline(always)]
    pub(crate) fn get(&self) -> &'static Holder {
        self.0
    }
}

impl Drop for HolderSlot {
    fn drop(&mut self) {
        // Its thread is outside any section: `busy` is clear. The mutex orders everything
        // this thread did under a lock biased to the holder before a next user's sections.
        spare().push(self.0);
    }
}

/// The owner word's `LOCKED`: a one-section hold (never dereferenced).
fn locked() -> *mut Holder {
    ptr::without_provenance_mut(1)
}

/// A lock for sections of a few tens of nanoseconds; see the module docs.
pub(crate) struct BiasedLock<T> {
    /// Null (free), [`locked`], or the holder the lock is biased to.
    owner: AtomicPtr<Holder>,
    /// The last slow-path holder and its sections in a row (touched only by the holder).
    streak: UnsafeCell<(*const Holder, u32)>,
    value: UnsafeCell<T>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for BiasedLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BiasedLock").finish_non_exhaustive()
    }
}

// SAFETY: the value (and `streak`) is only reached through a guard, and at most one
// guard exists at a time: the owner word is taken with an `Acquire` compare-exchange and
// given back with a `Release` store, and a biased holder's sections are ordered against
// a taker's by the Dekker pair of the module docs (its `Release` clear of `busy`, the
// taker's `Acquire` load). So sharing the lock shares `T` only by moving access from one
// thread to another, which needs `T: Send`. The raw pointers are holders, never freed.
unsafe impl<T: Send> Sync for BiasedLock<T> {}
// SAFETY: as above; the pointers name `'static` holders.
unsafe impl<T: Send> Send for BiasedLock<T> {}

/// Exclusive access to a [`BiasedLock`]'s value; leaves the lock when dropped. Neither
/// `Send` nor `Sync`: it stays on the thread that took the lock.
pub(crate) struct BiasedGuard<'a, T> {
    lock: &'a BiasedLock<T>,
    me: Option<&'static Holder>,
    /// Entered through the bias: leaving clears `busy` and keeps the lock.
    biased: bool,
    _not_auto: PhantomData<*mut T>,
}

impl<T> BiasedLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            owner: AtomicPtr::new(ptr::null_mut()),
            streak: UnsafeCell::new((ptr::null(), 0)),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock for the thread `me` (its [`HolderSlot`]'s holder; `None`: a thread
    /// without one, which never biases the lock). Fails only when the lock is biased to
    /// another thread and the barrier of the revocation failed: the bias is left to that
    /// thread (see the module docs).
    #[inline(always)]
    pub(crate) fn lock(
        &self,
        me: Option<&'static Holder>,
        light: Light,
    ) -> std::io::Result<BiasedGuard<'_, T>> {
        match me.and_then(|h| self.try_biased(h, light)) {
            Some(g) => Ok(g),
            None => self.lock_slow(me, light),
        }
    }

    /// Enters if the lock is biased to `me` (no read-modify-write, no fence), else `None`.
    #[inline(always)]
    pub(crate) fn try_biased(
        &self,
        me: &'static Holder,
        light: Light,
    ) -> Option<BiasedGuard<'_, T>> {
        me.busy.store(true, Relaxed);
        // Our `busy` before our load of the owner word (vs a taker's heavy barrier).
        light.fence();
        if ptr::eq(self.owner.load(Relaxed), me) {
            return Some(BiasedGuard {
                lock: self,
                me: Some(me),
                biased: true,
                _not_auto: PhantomData,
            });
        }
        me.busy.store(false, Relaxed);
        None
    }

    #[cold]
    fn lock_slow(
        &self,
        me: Option<&'static Holder>,
        light: Light,
    ) -> std::io::Result<BiasedGuard<'_, T>> {
        let mut spins = 0u32;
        let mine = me.map_or(ptr::null(), ptr::from_ref);
        loop {
            // Free, or biased to another thread: take it.
            let cur = self.owner.load(Relaxed);
            if cur == locked() {
                spin_wait(&mut spins);
                continue;
            }
            if (self.owner)
                .compare_exchange(cur, locked(), Acquire, Relaxed)
                .is_err()
            {
                continue;
            }
            if !cur.is_null() && !ptr::eq(cur, mine) {
                // It was biased to another thread: wait until that thread is outside its
                // section. Without the barrier that cannot be proven: give the bias back
                // (while `LOCKED` no other thread stores the word) and fail.
                if let Err(e) = light.heavy() {
                    self.owner.store(cur, Release);
                    return Err(e);
                }
                // SAFETY: a biased owner word is a holder, and holders are never freed
                // (module docs).
                let prev = unsafe { &*cur };
                // Acquire: its section happens-before ours.
                while prev.busy.load(Acquire) {
                    spin_wait(&mut spins);
                }
            }
            break;
        }
        Ok(BiasedGuard {
            lock: self,
            me,
            biased: false,
            _not_auto: PhantomData,
        })
    }
}

impl<T> Deref for BiasedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see the `Sync` impl), so no `&mut T` exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for BiasedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the only one, and `&mut self` makes this the only
        // reference derived from it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for BiasedGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.biased {
            if let Some(h) = self.me {
                // Release: our section happens-before a taker's Acquire load of `busy`.
                h.busy.store(false, Release);
            }
            return;
        }
        // SAFETY: we hold the lock (`LOCKED`), so no other reference to `streak` exists.
        let (last, n) = unsafe { &mut *self.lock.streak.get() };
        let me = self.me.map_or(ptr::null(), |h| h as *const Holder);
        *n = if ptr::eq(*last, me) {
            n.saturating_add(1)
        } else {
            1
        };
        *last = me;
        let next = match self.me {
            Some(h) if *n >= BIAS_AFTER => ptr::from_ref(h).cast_mut(),
            _ => ptr::null_mut(),
        };
        // Release: everything done under the lock happens-before the next Acquire. While
        // `LOCKED` no other thread stores the word, so a plain store is enough.
        self.lock.owner.store(next, Release);
    }
}

#[cfg(all(test, not(cnbus_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Compile-time check: `BiasedGuard<T>` is not `Sync`, even for a `Sync` value. With
    /// the guard `Sync` the two impls below both apply and the call is ambiguous: the test
    /// does not compile.
    #[test]
    fn guard_is_not_sync() {
        trait AmbiguousIfSync<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfSync<()> for T {}
        impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
        <BiasedGuard<'static, std::cell::Cell<u8>> as AmbiguousIfSync<_>>::check();
        <BiasedGuard<'static, u64> as AmbiguousIfSync<_>>::check();
        fn is_sync<T: Sync>() {}
        is_sync::<BiasedLock<std::cell::Cell<u8>>>();
    }

    /// Threads taking turns in bursts long enough to bias the lock to each in turn (every
    /// burst after the first revokes the bias), short ones (never biased), and a thread
    /// without a holder: a non-atomic counter loses no increment.
    #[test]
    fn excludes_through_bias_revocation_and_plain_turns() {
        let light = super::super::membarrier::init();
        let l = Arc::new(BiasedLock::new(0u64));
        let per = 40_000u64;
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    let slot = HolderSlot::new();
                    let me = (t != 3).then(|| slot.get());
                    let burst = [1, BIAS_AFTER as u64 * 3, 7][t as usize % 3];
                    let mut done = 0;
                    while done < per {
                        for _ in 0..burst.min(per - done) {
                            *l.lock(me, light).unwrap() += 1;
                            done += 1;
                        }
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*l.lock(None, light).unwrap(), 4 * per);
    }

    /// A lone thread's lock is biased to it after `BIAS_AFTER` sections; another thread's
    /// section takes the bias away.
    #[test]
    fn a_lone_thread_ends_up_biased() {
        let light = super::super::membarrier::init();
        let l = BiasedLock::new(());
        let slot = HolderSlot::new();
        let me = Some(slot.get());
        for _ in 0..BIAS_AFTER {
            drop(l.lock(me, light).unwrap());
        }
        let g = l.lock(me, light).unwrap();
        assert!(g.biased, "the lock is biased to its only user");
        drop(g);
        std::thread::scope(|s| {
            s.spawn(|| drop(l.lock(Some(HolderSlot::new().get()), light).unwrap()));
        });
        assert!(
            !l.lock(me, light).unwrap().biased,
            "another thread took the bias away"
        );
    }

    /// A revocation whose barrier fails does not proceed: the taker gets the error (at
    /// once: a bounded number of tries), the lock stays biased to its holder, who enters
    /// it as before, and once the barrier works the revocation goes through. Before the
    /// fix the taker retried the barrier without end (this test hung).
    #[test]
    fn a_revocation_whose_barrier_fails_does_not_proceed() {
        use super::super::membarrier::{fail_heavy_here, init};
        let light = init();
        if !light.compiler_only_for_tests() {
            return; // no membarrier: a revocation needs no barrier here
        }
        let l = BiasedLock::new(0u32);
        let slot = HolderSlot::new();
        let me = Some(slot.get());
        for _ in 0..BIAS_AFTER {
            *l.lock(me, light).unwrap() += 1;
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let other = HolderSlot::new();
                fail_heavy_here(Some(libc::ENOMEM));
                let r = l.lock(Some(other.get()), light).map(|_| ());
                fail_heavy_here(None);
                assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOMEM));
            });
        });
        {
            let mut g = l.try_biased(slot.get(), light).expect("still biased to us");
            *g += 1;
        }
        std::thread::scope(|s| {
            s.spawn(|| *l.lock(Some(HolderSlot::new().get()), light).unwrap() += 1);
        });
        assert_eq!(*l.lock(me, light).unwrap(), BIAS_AFTER + 2);
    }
}

#[cfg(all(test, cnbus_loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell as Cell;
    use loom::sync::Arc;
    use loom::thread;

    fn holder() -> &'static Holder {
        Box::leak(Box::default())
    }

    /// A lock biased to one thread, taken away by another: their sections never overlap
    /// (loom's cell reports an access without happens-before), whatever the interleaving.
    #[test]
    fn loom_revocation_excludes_the_biased_holder() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(|| {
            let light = super::super::membarrier::init();
            let (a, c) = (holder(), holder());
            let l = Arc::new(BiasedLock::new(Cell::new(0u32)));
            // Biased to `a`, as after BIAS_AFTER sections.
            l.owner.store(ptr::from_ref(a).cast_mut(), Relaxed);
            let l2 = Arc::clone(&l);
            let t = thread::spawn(move || {
                for _ in 0..2 {
                    l2.lock(Some(a), light)
                        .unwrap()
                        .with_mut(|v| unsafe { *v += 1 });
                }
            });
            l.lock(Some(c), light)
                .unwrap()
                .with_mut(|v| unsafe { *v += 1 });
            t.join().unwrap();
            let n = l.lock(None, light).unwrap().with(|v| unsafe { *v });
            assert_eq!(n, 3);
        });
    }

    /// From a free lock, two threads each take it twice: every slow-path section leaves
    /// it biased to its taker (`BIAS_AFTER` is 1 under loom), so the model goes through
    /// the bias being given (the `Release` store of the owner word), used, taken away and
    /// given again: the sections never overlap.
    #[test]
    fn loom_bias_given_and_taken_away_excludes() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(|| {
            let light = super::super::membarrier::init();
            let l = Arc::new(BiasedLock::new(Cell::new(0u32)));
            let l2 = Arc::clone(&l);
            let t = thread::spawn(move || {
                let a = holder();
                for _ in 0..2 {
                    l2.lock(Some(a), light)
                        .unwrap()
                        .with_mut(|v| unsafe { *v += 1 });
                }
            });
            let c = holder();
            for _ in 0..2 {
                l.lock(Some(c), light)
                    .unwrap()
                    .with_mut(|v| unsafe { *v += 1 });
            }
            t.join().unwrap();
            let n = l.lock(None, light).unwrap().with(|v| unsafe { *v });
            assert_eq!(n, 4);
        });
    }
}
