//! The idx/val callback registry.
//!
//! ## Design
//!
//! The table of registrations is copy-on-write: readers (the dispatcher) take a snapshot,
//! an `Arc<Table>`, under a read lock held only for the pointer copy; writers build a new
//! table under a writer mutex and swap it in under the write lock, again only for the
//! pointer swap. So no lock that a registration holds is ever held while a callback runs,
//! and registering or unregistering from inside a callback cannot deadlock.
//!
//! Each registration's callback sits behind its own mutex, taken for the duration of each
//! call. Unregistering clears the entry's `active` flag and then takes that mutex once, so
//! when `unregister` returns on any thread other than the dispatching one, the callback is
//! not running and will not run again. On the dispatching thread (from inside a callback)
//! it cannot wait for itself; there the `active` flag alone stops later calls.
//!
//! `benches/dispatch.rs` compares this against holding a read lock during lookup.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::ThreadId;

use parking_lot::{Mutex, RwLock};

use super::Received;
use crate::codec::CbId;

/// Which messages a registration receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Match {
    /// Exactly one `{idx, val}`.
    Id(CbId),
    /// Every `val` of one `idx`.
    Idx(u32),
}

impl From<CbId> for Match {
    fn from(id: CbId) -> Self {
        Match::Id(id)
    }
}

type Callback = Box<dyn FnMut(&Received) + Send + 'static>;
type PanicHook = Box<dyn Fn(CbId, &str) + Send + Sync>;

/// One registration.
pub(crate) struct Entry {
    key: Match,
    /// Unique per registry; orders entries so dispatch order is registration order.
    serial: u64,
    /// Cleared once by `unregister`; checked under `callback`'s lock before every call.
    /// Release on the store pairs with the Acquire load in `call`.
    active: AtomicBool,
    callback: Mutex<Callback>,
}

impl Entry {
    /// Calls the callback unless unregistered. Returns `Err(message)` if it panicked.
    fn call(&self, msg: &Received) -> Result<bool, String> {
        let mut cb = self.callback.lock();
        if !self.active.load(Ordering::Acquire) {
            return Ok(false);
        }
        match catch_unwind(AssertUnwindSafe(|| (cb)(msg))) {
            Ok(()) => Ok(true),
            Err(p) => Err(panic_message(&*p)),
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[derive(Default, Clone)]
struct Table {
    exact: HashMap<CbId, Vec<Arc<Entry>>>,
    wildcard: HashMap<u32, Vec<Arc<Entry>>>,
}

impl Table {
    fn slot(&mut self, key: Match) -> &mut Vec<Arc<Entry>> {
        match key {
            Match::Id(id) => self.exact.entry(id).or_default(),
            Match::Idx(idx) => self.wildcard.entry(idx).or_default(),
        }
    }

    fn remove(&mut self, key: Match, serial: u64) {
        let empty = {
            let v = self.slot(key);
            v.retain(|e| e.serial != serial);
            v.is_empty()
        };
        if empty {
            match key {
                Match::Id(id) => drop(self.exact.remove(&id)),
                Match::Idx(idx) => drop(self.wildcard.remove(&idx)),
            }
        }
    }
}

/// What one dispatch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DispatchOutcome {
    /// Callbacks that ran to completion.
    pub delivered: usize,
    /// Callbacks that panicked (caught).
    pub panicked: usize,
}

/// A registry of callbacks by `{idx, val}`, independent of any socket.
///
/// [`Connector`](super::Connector) owns one and feeds it from its dispatcher thread; it can
/// also be fed by hand, for instance from another transport or in tests.
pub struct Registry {
    /// The current table. Readers clone the `Arc` under the read lock and release it.
    table: RwLock<Arc<Table>>,
    /// Serialises writers, so concurrent registrations do not lose each other's updates.
    writer: Mutex<()>,
    next_serial: AtomicU64,
    /// The thread that runs callbacks, if any (set by the dispatcher at start).
    dispatch_thread: RwLock<Option<ThreadId>>,
    /// Called with the id and message of each callback panic.
    on_panic: Mutex<Option<PanicHook>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.read().clone();
        f.debug_struct("Registry")
            .field("exact_ids", &t.exact.len())
            .field("wildcard_idxs", &t.wildcard.len())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            writer: Mutex::new(()),
            next_serial: AtomicU64::new(1),
            dispatch_thread: RwLock::new(None),
            on_panic: Mutex::new(None),
        }
    }

    /// Registers `callback` for the messages `key` matches. The callback runs on the
    /// dispatching thread; it may register, unregister and send, but should not block for
    /// long, since it holds up every other delivery.
    ///
    /// Several registrations may match one message; each is called, in registration order,
    /// exact matches before wildcards.
    pub fn register<F>(self: &Arc<Self>, key: impl Into<Match>, callback: F) -> Registration
    where
        F: FnMut(&Received) + Send + 'static,
    {
        let key = key.into();
        let entry = Arc::new(Entry {
            key,
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            active: AtomicBool::new(true),
            callback: Mutex::new(Box::new(callback)),
        });
        self.update(|t| t.slot(key).push(entry.clone()));
        Registration {
            registry: Arc::downgrade(self),
            entry: Some(entry),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Table)) {
        let _w = self.writer.lock();
        let mut next = Table::clone(&self.table.read());
        f(&mut next);
        *self.table.write() = Arc::new(next);
    }

    /// Delivers `msg` to every active registration that matches it.
    pub fn dispatch(&self, msg: &Received) -> DispatchOutcome {
        self.snapshot().dispatch(msg)
    }

    /// The registrations as they are now, for delivering several messages (a datagram's
    /// worth) with one look at the shared table. Registrations made after the snapshot are
    /// not in it; registrations removed after it are skipped (each call checks that its
    /// registration is still active).
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            registry: self,
            table: self.table.read().clone(),
        }
    }

    /// True when some registration matches `id`.
    pub fn matches(&self, id: CbId) -> bool {
        let t = self.table.read().clone();
        t.exact.contains_key(&id) || t.wildcard.contains_key(&id.idx)
    }

    /// Number of live registrations.
    pub fn len(&self) -> usize {
        let t = self.table.read().clone();
        t.exact
            .values()
            .chain(t.wildcard.values())
            .map(Vec::len)
            .sum()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Declares the calling thread the one that runs callbacks (see [`Registration::unregister`]).
    pub fn set_dispatch_thread(&self) {
        *self.dispatch_thread.write() = Some(std::thread::current().id());
    }

    /// Sets the function told about each callback panic (after it is caught).
    pub fn on_panic(&self, f: impl Fn(CbId, &str) + Send + Sync + 'static) {
        *self.on_panic.lock() = Some(Box::new(f));
    }

    fn remove(&self, entry: &Arc<Entry>) {
        // Release: a dispatcher that sees `false` (Acquire, under the callback lock) also
        // sees that the registration is over.
        entry.active.store(false, Ordering::Release);
        self.update(|t| t.remove(entry.key, entry.serial));
        let on_dispatcher = *self.dispatch_thread.read() == Some(std::thread::current().id());
        if !on_dispatcher {
            // Wait out a call in progress; later calls see `active == false`.
            drop(entry.callback.lock());
        }
    }
}

/// A view of a [`Registry`]'s registrations at one moment; see [`Registry::snapshot`].
pub struct Snapshot<'a> {
    registry: &'a Registry,
    table: Arc<Table>,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot<'_> {
    /// Delivers `msg` to every registration of the snapshot that matches it and is still
    /// active: exact matches first, then wildcards, each in registration order.
    pub fn dispatch(&self, msg: &Received) -> DispatchOutcome {
        let mut out = DispatchOutcome::default();
        let exact = self
            .table
            .exact
            .get(&msg.msg.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let wild = self
            .table
            .wildcard
            .get(&msg.msg.id.idx)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for e in exact.iter().chain(wild) {
            match e.call(msg) {
                Ok(true) => out.delivered += 1,
                Ok(false) => {}
                Err(text) => {
                    out.panicked += 1;
                    if let Some(f) = &*self.registry.on_panic.lock() {
                        f(msg.msg.id, &text);
                    }
                }
            }
        }
        out
    }
}

/// A live registration. Dropping it unregisters.
#[must_use = "dropping a Registration unregisters it at once"]
pub struct Registration {
    registry: Weak<Registry>,
    entry: Option<Arc<Entry>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.entry.as_ref().map(|e| e.key))
            .finish()
    }
}

impl Registration {
    /// What this registration matches.
    pub fn key(&self) -> Option<Match> {
        self.entry.as_ref().map(|e| e.key)
    }

    /// Unregisters. When this returns on any thread but the dispatching one, the callback
    /// is not running and never runs again. Called from inside a callback (on the
    /// dispatching thread), it stops every later call but cannot wait for the current one,
    /// which is the caller itself.
    pub fn unregister(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(e) = self.entry.take() {
            if let Some(r) = self.registry.upgrade() {
                r.remove(&e);
            } else {
                e.active.store(false, Ordering::Release);
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}
