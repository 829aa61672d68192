//! Synchronisation primitives, swappable for `loom`'s model-checked ones.
//!
//! Normal builds use `parking_lot` locks and `std` atomics. Under `RUSTFLAGS="--cfg cnbus_loom"`
//! the same names are `loom`'s, so the loom tests explore every interleaving of the real
//! code (see `docs/RELIABILITY.md`). The wrappers give both the `parking_lot` calling
//! convention (`lock()` returns the guard; no poisoning).

#[cfg(not(cnbus_loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize,
};
#[cfg(not(cnbus_loom))]
pub(crate) use std::sync::Arc;

#[cfg(cnbus_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize,
};
#[cfg(cnbus_loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(cnbus_loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard, RwLock};

/// One step of a wait for another thread: a spin hint for the first 100 calls (`n` counts
/// them), then `sched_yield`, so that a waiter whose peer was preempted lets it run.
#[cfg(not(cnbus_loom))]
#[inline]
pub(crate) fn spin_wait(n: &mut u32) {
    if *n < 100 {
        *n += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Under loom every wait step yields, so that the model can run the peer.
#[cfg(cnbus_loom)]
pub(crate) fn spin_wait(_: &mut u32) {
    loom::thread::yield_now();
}

#[cfg(cnbus_loom)]
mod loom_locks {
    /// `loom::sync::Mutex` with `parking_lot`'s signature.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(v: T) -> Self {
            Self(loom::sync::Mutex::new(v))
        }
        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// `loom::sync::RwLock` with `parking_lot`'s signature.
    #[derive(Debug, Default)]
    pub(crate) struct RwLock<T>(loom::sync::RwLock<T>);

    impl<T> RwLock<T> {
        pub(crate) fn new(v: T) -> Self {
            Self(loom::sync::RwLock::new(v))
        }
        pub(crate) fn read(&self) -> loom::sync::RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(|e| e.into_inner())
        }
        pub(crate) fn write(&self) -> loom::sync::RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(|e| e.into_inner())
        }
    }
}

#[cfg(cnbus_loom)]
pub(crate) use loom_locks::{Mutex, RwLock};
