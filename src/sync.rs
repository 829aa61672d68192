//! Synchronisation primitives, swappable for `loom`'s model-checked ones.
//!
//! Normal builds use `parking_lot` locks and `std` atomics. Under `RUSTFLAGS="--cfg cnbus_loom"`
//! the same names are `loom`'s, so the loom tests explore every interleaving of the real
//! code (see `docs/RELIABILITY.md`). The wrappers give both the `parking_lot` calling
//! convention (`lock()` returns the guard; no poisoning).

#[cfg(not(cnbus_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
#[cfg(not(cnbus_loom))]
pub(crate) use std::sync::Arc;

#[cfg(cnbus_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
#[cfg(cnbus_loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(cnbus_loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard, RwLock};

/// `parking_lot::Condvar` with a by-value `wait`, the signature loom's can offer too.
#[cfg(not(cnbus_loom))]
#[derive(Debug, Default)]
pub(crate) struct Condvar(parking_lot::Condvar);

#[cfg(not(cnbus_loom))]
impl Condvar {
    pub(crate) fn new() -> Self {
        Self(parking_lot::Condvar::new())
    }
    /// Releases the guard's lock, waits for a notification, relocks.
    pub(crate) fn wait<'a, T>(&self, mut g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(&mut g);
        g
    }
    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
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

    /// `loom::sync::Condvar` with the shim's by-value `wait`.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(loom::sync::Condvar::new())
        }
        pub(crate) fn wait<'a, T>(
            &self,
            g: loom::sync::MutexGuard<'a, T>,
        ) -> loom::sync::MutexGuard<'a, T> {
            self.0.wait(g).unwrap_or_else(|e| e.into_inner())
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
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
pub(crate) use loom_locks::{Condvar, Mutex, RwLock};
