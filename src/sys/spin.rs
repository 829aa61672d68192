//! A short-section lock for the bus's shards: taking it is one compare-exchange, releasing
//! it one plain `Release` store (a parking mutex's release must look for sleepers). Waiters
//! spin briefly, then yield (`sched_yield`): the sections are a few tens of nanoseconds, so
//! a waiter only yields when the holder was preempted inside one.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// A lock for sections of a few tens of nanoseconds; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct ShortLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard exists at a
// time (the `locked` flag, taken with an Acquire compare-exchange and released with a
// Release store), so sharing the lock between threads shares `T` only by moving access
// from one thread to another, which needs `T: Send`.
unsafe impl<T: Send> Sync for ShortLock<T> {}

/// Exclusive access to a [`ShortLock`]'s value; releases the lock when dropped. Neither
/// `Send` nor `Sync` (`PhantomData<*mut T>`): it stays on the thread that took the lock,
/// so that no bound on `T` has to be argued for sharing or sending it.
pub(crate) struct ShortGuard<'a, T> {
    lock: &'a ShortLock<T>,
    _not_auto: PhantomData<*mut T>,
}

impl<T> ShortLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock, spinning then yielding while another thread holds it.
    #[inline]
    pub(crate) fn lock(&self) -> ShortGuard<'_, T> {
        let mut spins = 0u32;
        while (self.locked)
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Wait for a release before trying again, reading only (no cache-line
            // ping-pong from failed compare-exchanges).
            while self.locked.load(Ordering::Relaxed) {
                if spins < 100 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        ShortGuard {
            lock: self,
            _not_auto: PhantomData,
        }
    }
}

impl<T> Deref for ShortGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see the `Sync` impl), so no `&mut T` exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for ShortGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the only one, and `&mut self` makes this the only
        // reference derived from it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for ShortGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Release: everything done under the lock happens-before the next Acquire.
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Compile-time check: `ShortGuard<T>` is not `Sync`, even for a `Sync` value (the
    /// guard of a `Cell`, `Send` but not `Sync`, was before a fix). With the guard `Sync`
    /// the two impls below both apply and the call is ambiguous: the test does not compile.
    #[test]
    fn guard_is_not_sync() {
        trait AmbiguousIfSync<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfSync<()> for T {}
        impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
        <ShortGuard<'static, std::cell::Cell<u8>> as AmbiguousIfSync<_>>::check();
        <ShortGuard<'static, u64> as AmbiguousIfSync<_>>::check();
        fn is_sync<T: Sync>() {}
        is_sync::<ShortLock<std::cell::Cell<u8>>>();
    }

    #[test]
    fn excludes() {
        let l = Arc::new(ShortLock::new(0u64));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*l.lock(), 80_000);
    }
}
