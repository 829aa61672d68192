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
//! call; the connector's dispatcher, delivering a run of messages of one id that exactly
//! one registration matches, takes it once for the run (see `Targets`), checking `active`
//! before every call. Unregistering clears the entry's `active` flag and then takes that mutex once, so
//! when `unregister` returns outside a callback, the callback is not running and will not
//! run again. Inside a callback (of any registry, on whatever thread dispatches: the
//! connector's dispatcher or a thread driving a registry by hand), it does not wait: the
//! running call may be its own, whose mutex this very thread holds, or another thread's
//! callback that waits for this one; there the `active` flag alone stops later calls. A
//! per-thread count of the callbacks running on it tells the two cases apart.
//!
//! `benches/dispatch.rs` compares this against holding a read lock during lookup.
//!
//! (Over 600 lines with its loom models and unit tests, about 470 without: the models
//! drive the registry's private table and per-thread state, so they live here.)

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

#[cfg(not(cnbus_loom))]
use super::Delivery;
#[cfg(all(test, not(cnbus_loom)))]
use super::{Incoming, Source};
use crate::codec::CbId;
#[cfg(cnbus_loom)]
use crate::delivery::Delivery;
#[cfg(all(test, cnbus_loom))]
use crate::delivery::{Incoming, Source};
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, RwLock};

#[cfg(not(cnbus_loom))]
std::thread_local! {
    /// How many registry callbacks the current thread is running (nested dispatches count
    /// each).
    static IN_CALLBACK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[cfg(cnbus_loom)]
loom::thread_local! {
    static IN_CALLBACK: std::cell::Cell<u32> = std::cell::Cell::new(0);
}

/// Marks the current thread as running a callback while it lives (also across a panic).
struct InCallback;

impl InCallback {
    fn enter() -> Self {
        IN_CALLBACK.with(|n| n.set(n.get() + 1));
        InCallback
    }

    /// True when the current thread is running a registry callback.
    fn here() -> bool {
        IN_CALLBACK.with(|n| n.get() > 0)
    }

    /// A token of the current thread, never 0, distinct among live threads (the address of
    /// its `IN_CALLBACK`), for [`Entry::holder`].
    fn thread_token() -> u64 {
        IN_CALLBACK.with(|n| n as *const std::cell::Cell<u32> as usize as u64)
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

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

type Callback = Box<dyn FnMut(&Delivery<'_>) + Send + 'static>;
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
    /// The [`InCallback::thread_token`] of the thread holding `callback`'s lock, 0 when
    /// none: a dispatch that this very callback makes (re-entering the registry with a
    /// message its own registration matches) skips it instead of waiting for its own lock
    /// forever. Only ever compared with the reader's own token, which only the reader
    /// writes, so `Relaxed` is enough.
    holder: AtomicU64,
}

impl Entry {
    /// True when the current thread holds this entry's callback lock (is running it).
    fn held_here(&self) -> bool {
        self.holder.load(Ordering::Relaxed) == InCallback::thread_token()
    }

    /// Calls the callback unless unregistered, or running on this thread already (a
    /// re-entrant dispatch). Returns `Err(message)` if it panicked.
    fn call(&self, msg: &Delivery<'_>) -> Result<bool, String> {
        if self.held_here() {
            return Ok(false);
        }
        let mut cb = self.callback.lock();
        if !self.active.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _inside = InCallback::enter();
        self.holder
            .store(InCallback::thread_token(), Ordering::Relaxed);
        let r = catch_unwind(AssertUnwindSafe(|| (cb)(msg)));
        self.holder.store(0, Ordering::Relaxed);
        match r {
            Ok(()) => Ok(true),
            Err(p) => Err(caught(p)),
        }
    }
}

/// The lock of a lone registration's callback, held for a run (see [`Targets`]), with the
/// thread marked as running a callback and as the entry's holder.
struct Held<'a> {
    entry: &'a Entry,
    guard: Guard<'a, Callback>,
    _inside: InCallback,
}

impl<'a> Held<'a> {
    fn take(entry: &'a Entry) -> Self {
        let guard = entry.callback.lock();
        let inside = InCallback::enter();
        entry
            .holder
            .store(InCallback::thread_token(), Ordering::Relaxed);
        Held {
            entry,
            guard,
            _inside: inside,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Before the lock goes (the fields drop after this).
        self.entry.holder.store(0, Ordering::Relaxed);
    }
}

/// The message of a caught panic's payload, which is then dropped without letting a panic
/// in its `Drop` escape (`panic_any` of a value whose drop panics would otherwise unwind out
/// of the dispatcher after all): such a payload's own payload is leaked.
pub(crate) fn caught(p: Box<dyn std::any::Any + Send>) -> String {
    let message = panic_message(&*p);
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(p))) {
        std::mem::forget(again);
    }
    message
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
/// also be fed by hand, for instance from another transport or in tests. Cloning gives
/// another handle to the same registry.
#[derive(Clone, Default)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    /// The current table. Readers clone the `Arc` under the read lock and release it.
    table: RwLock<Arc<Table>>,
    /// Serialises writers, so concurrent registrations do not lose each other's updates.
    writer: Mutex<()>,
    next_serial: AtomicU64,
    /// Called with the id and message of each callback panic.
    on_panic: Mutex<Option<PanicHook>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.shared.table.read().clone();
        f.debug_struct("Registry")
            .field("exact_ids", &t.exact.len())
            .field("wildcard_idxs", &t.wildcard.len())
            .finish()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            writer: Mutex::new(()),
            next_serial: AtomicU64::new(1),
            on_panic: Mutex::new(None),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `callback` for the messages `key` matches. The callback runs on the
    /// dispatching thread; it may register, unregister (itself or others, see
    /// [`Registration::unregister`]) and send, but should not block for long, since it
    /// holds up every other delivery.
    ///
    /// Several registrations may match one message; each is called, in registration order,
    /// exact matches before wildcards. A callback that dispatches a message its own
    /// registration matches (re-entering the registry) does not reach itself: it is
    /// running, and the nested dispatch skips it.
    pub fn register<F>(&self, key: impl Into<Match>, callback: F) -> Registration
    where
        F: FnMut(&Delivery<'_>) + Send + 'static,
    {
        let key = key.into();
        let entry = Arc::new(Entry {
            key,
            serial: self.shared.next_serial.fetch_add(1, Ordering::Relaxed),
            active: AtomicBool::new(true),
            callback: Mutex::new(Box::new(callback)),
            holder: AtomicU64::new(0),
        });
        self.shared.update(|t| t.slot(key).push(entry.clone()));
        Registration {
            registry: self.shared.clone(),
            entry: Some(entry),
        }
    }

    /// Delivers `msg` to every active registration that matches it. An owned message is
    /// delivered as its view, [`Incoming::as_delivery`](super::Incoming::as_delivery).
    pub fn dispatch(&self, msg: &Delivery<'_>) -> DispatchOutcome {
        self.snapshot().dispatch(msg)
    }

    /// The registrations as they are now, for delivering several messages (a datagram's
    /// worth) with one look at the shared table. Registrations made after the snapshot are
    /// not in it; registrations removed after it are skipped (each call checks that its
    /// registration is still active).
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            registry: &self.shared,
            table: self.shared.table.read().clone(),
        }
    }

    /// True when some registration matches `id`.
    pub fn matches(&self, id: CbId) -> bool {
        let t = self.shared.table.read().clone();
        t.exact.contains_key(&id) || t.wildcard.contains_key(&id.idx)
    }

    /// Number of live registrations.
    pub fn len(&self) -> usize {
        let t = self.shared.table.read().clone();
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

    /// Formerly declared the thread that runs callbacks. Not needed any more, and does
    /// nothing: [`Registration::unregister`] knows by itself whether it runs inside a
    /// callback, on whatever thread the registry is dispatched.
    #[deprecated(note = "not needed: unregister knows whether it runs inside a callback")]
    pub fn set_dispatch_thread(&self) {}

    /// Sets the function told about each callback panic (after it is caught).
    pub fn on_panic(&self, f: impl Fn(CbId, &str) + Send + Sync + 'static) {
        *self.shared.on_panic.lock() = Some(Box::new(f));
    }
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Table)) {
        let _w = self.writer.lock();
        let mut next = Table::clone(&self.table.read());
        f(&mut next);
        *self.table.write() = Arc::new(next);
    }

    fn remove(&self, entry: &Arc<Entry>) {
        // Release: a dispatcher that sees `false` (Acquire, under the callback lock) also
        // sees that the registration is over.
        entry.active.store(false, Ordering::Release);
        self.update(|t| t.remove(entry.key, entry.serial));
        if !InCallback::here() {
            // Wait out a call in progress; later calls see `active == false`. Not from
            // inside a callback: that call may be this thread's own (its mutex is held
            // here), or another thread's callback waiting for ours.
            drop(entry.callback.lock());
        }
    }
}

/// A view of a [`Registry`]'s registrations at one moment; see [`Registry::snapshot`].
pub struct Snapshot<'a> {
    registry: &'a Shared,
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
    pub fn dispatch(&self, msg: &Delivery<'_>) -> DispatchOutcome {
        self.targets(msg.id()).dispatch(msg)
    }

    /// The registrations of the snapshot that match `id`: one lookup for a run of messages
    /// of one id.
    pub(crate) fn targets(&self, id: CbId) -> Targets<'_> {
        let exact = self.table.exact.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let wild = self
            .table
            .wildcard
            .get(&id.idx)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let lone = match (exact, wild) {
            ([e], []) | ([], [e]) => Some(&**e),
            _ => None,
        };
        Targets {
            registry: self.registry,
            exact,
            wild,
            lone,
            held: None,
        }
    }
}

#[cfg(not(cnbus_loom))]
type Guard<'a, T> = crate::sync::MutexGuard<'a, T>;
#[cfg(cnbus_loom)]
type Guard<'a, T> = loom::sync::MutexGuard<'a, T>;

/// The registrations of a [`Snapshot`] that match one id, for a run of messages of that id.
///
/// When exactly one registration matches (the common case), its callback's lock is taken
/// at the first call and held, with the thread marked as running a callback, until the
/// run ends ([`release`](Self::release) or drop) or the callback panics: one lock for the
/// run instead of one per message. Each call still checks that the registration is
/// active, so an `unregister` on another thread stops the next call at once and returns
/// when the run ends. The caller must release before running any other user code (an
/// event handler), which could otherwise wait for this very lock.
pub(crate) struct Targets<'a> {
    registry: &'a Shared,
    exact: &'a [Arc<Entry>],
    wild: &'a [Arc<Entry>],
    /// The registration, when exactly one matches.
    lone: Option<&'a Entry>,
    held: Option<Held<'a>>,
}

impl<'a> Targets<'a> {
    /// Delivers `msg` (of the id these targets were looked up for) to each registration
    /// still active: exact matches first, then wildcards, each in registration order.
    pub(crate) fn dispatch(&mut self, msg: &Delivery<'_>) -> DispatchOutcome {
        let mut out = DispatchOutcome::default();
        if let Some(e) = self.lone {
            if self.held.is_none() && e.held_here() {
                // A dispatch from inside this very callback: it is running.
                return out;
            }
            let cb = &mut self.held.get_or_insert_with(|| Held::take(e)).guard;
            if !e.active.load(Ordering::Acquire) {
                return out;
            }
            match catch_unwind(AssertUnwindSafe(|| (cb)(msg))) {
                Ok(()) => out.delivered = 1,
                Err(p) => {
                    // Unlocked before the hook runs someone else's code.
                    self.held = None;
                    out.panicked = 1;
                    self.panicked(msg.id(), &caught(p));
                }
            }
            return out;
        }
        for e in self.exact.iter().chain(self.wild) {
            match e.call(msg) {
                Ok(true) => out.delivered += 1,
                Ok(false) => {}
                Err(text) => {
                    out.panicked += 1;
                    self.panicked(msg.id(), &text);
                }
            }
        }
        out
    }

    /// Ends the run: unlocks the lone registration's callback.
    pub(crate) fn release(&mut self) {
        self.held = None;
    }

    fn panicked(&self, id: CbId, text: &str) {
        if let Some(f) = &*self.registry.on_panic.lock() {
            f(id, text);
        }
    }
}

/// A live registration. Dropping it unregisters.
#[must_use = "dropping a Registration unregisters it at once"]
pub struct Registration {
    registry: Arc<Shared>,
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

    /// Unregisters. Called outside any callback, it waits for a call in progress: when it
    /// returns, the callback is not running and never runs again. Called from inside a
    /// callback (of any registry, on whichever thread dispatches it: the connector's
    /// dispatcher or a thread calling [`Registry::dispatch`] by hand), it stops every later
    /// call but does not wait, since the call in progress may be the caller itself; so a
    /// callback may drop its own registration, or another callback's, without deadlock.
    ///
    /// Outside a callback, the wait is for the callback to return: a callback must not
    /// wait for a thread that is unregistering it.
    pub fn unregister(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(e) = self.entry.take() {
            self.registry.remove(&e);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}

/// An empty message of `id` from port 1, for the tests and the loom models (the connector's
/// `Incoming`, which the loom build has as `crate::delivery`).
#[cfg(test)]
fn msg(id: CbId) -> Incoming {
    Incoming {
        msg: crate::codec::CnMsg::new(id, bytes::Bytes::new()),
        source: Source { port: 1, group: 0 },
    }
}

/// Model checks of the registry's concurrency protocol: every interleaving of the real
/// code, explored by loom. Run with
/// `RUSTFLAGS="--cfg cnbus_loom" cargo test --release --lib loom`.
#[cfg(all(test, cnbus_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::Ordering::SeqCst;

    /// After `unregister` returns on another thread, the callback is not running and
    /// never runs again.
    #[test]
    fn unregister_waits_out_a_running_callback() {
        loom::model(|| {
            let id = CbId::new(100, 1);
            let r = Arc::new(Registry::new());
            let gone = Arc::new(AtomicBool::new(false));
            let late = Arc::new(AtomicBool::new(false));
            let (g, l) = (gone.clone(), late.clone());
            // (A panic here would be caught by the registry, so record the fault instead.)
            let reg = r.register(id, move |_| {
                if g.load(SeqCst) {
                    l.store(true, SeqCst);
                }
            });
            let r2 = r.clone();
            let t = loom::thread::spawn(move || {
                r2.dispatch(&msg(id).as_delivery());
                r2.dispatch(&msg(id).as_delivery());
            });
            reg.unregister();
            gone.store(true, SeqCst);
            t.join().unwrap();
            assert!(!late.load(SeqCst), "callback ran after unregister returned");
            assert!(r.is_empty());
        });
    }

    /// The dispatcher's way: a run of two messages through one `Targets` (the lone
    /// registration's lock taken once) against `unregister` on another thread: after it
    /// returns, the callback is not running and never runs again.
    #[test]
    fn unregister_waits_out_a_run() {
        loom::model(|| {
            let id = CbId::new(100, 5);
            let r = Arc::new(Registry::new());
            let gone = Arc::new(AtomicBool::new(false));
            let late = Arc::new(AtomicBool::new(false));
            let (g, l) = (gone.clone(), late.clone());
            let reg = r.register(id, move |_| {
                if g.load(SeqCst) {
                    l.store(true, SeqCst);
                }
            });
            let r2 = r.clone();
            let t = loom::thread::spawn(move || {
                let snap = r2.snapshot();
                let mut run = snap.targets(id);
                run.dispatch(&msg(id).as_delivery());
                run.dispatch(&msg(id).as_delivery());
            });
            reg.unregister();
            gone.store(true, SeqCst);
            t.join().unwrap();
            assert!(!late.load(SeqCst), "callback ran after unregister returned");
        });
    }

    /// Concurrent registrations are never lost, and a dispatch racing them sees each one
    /// either entirely or not at all.
    #[test]
    fn concurrent_registrations_are_not_lost() {
        loom::model(|| {
            let r = Arc::new(Registry::new());
            let hits = Arc::new(AtomicU64::new(0));
            let spawn_reg = |val: u32| {
                let (r, hits) = (r.clone(), hits.clone());
                loom::thread::spawn(move || {
                    r.register(CbId::new(7, val), move |_| {
                        hits.fetch_add(1, SeqCst);
                    })
                })
            };
            let a = spawn_reg(1);
            let b = spawn_reg(2);
            let seen = r.dispatch(&msg(CbId::new(7, 1)).as_delivery()).delivered;
            assert!(seen <= 1);
            let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
            assert_eq!(r.len(), 2);
            assert_eq!(r.dispatch(&msg(CbId::new(7, 2)).as_delivery()).delivered, 1);
            drop((ra, rb));
            assert!(r.is_empty());
        });
    }

    /// A registry driven by hand on two threads: a callback that drops its own
    /// registration does not wait for itself (loom reports a deadlock if it does), runs
    /// once, and a dispatch racing it never calls it after the drop.
    #[test]
    fn a_callback_dropping_its_own_registration_does_not_deadlock() {
        loom::model(|| {
            let id = CbId::new(100, 2);
            let r = Arc::new(Registry::new());
            let slot: Arc<Mutex<Option<Registration>>> = Arc::new(Mutex::new(None));
            let calls = Arc::new(AtomicU64::new(0));
            let (s, c) = (slot.clone(), calls.clone());
            let reg = r.register(id, move |_| {
                c.fetch_add(1, SeqCst);
                let mine = s.lock().take();
                drop(mine);
            });
            *slot.lock() = Some(reg);
            let r2 = r.clone();
            let t = loom::thread::spawn(move || {
                r2.dispatch(&msg(id).as_delivery());
            });
            r.dispatch(&msg(id).as_delivery());
            t.join().unwrap();
            assert_eq!(calls.load(SeqCst), 1);
            assert!(r.is_empty());
        });
    }

    /// Two callbacks, dispatched by hand on two threads, each dropping the other's
    /// registration: neither waits inside a callback, so no deadlock.
    #[test]
    fn callbacks_dropping_each_others_registrations_do_not_deadlock() {
        loom::model(|| {
            let (a, b) = (CbId::new(100, 3), CbId::new(100, 4));
            let r = Arc::new(Registry::new());
            let slots: Arc<[Mutex<Option<Registration>>; 2]> =
                Arc::new([Mutex::new(None), Mutex::new(None)]);
            let (sa, sb) = (slots.clone(), slots.clone());
            let ra = r.register(a, move |_| drop(sa[1].lock().take()));
            let rb = r.register(b, move |_| drop(sb[0].lock().take()));
            *slots[0].lock() = Some(ra);
            *slots[1].lock() = Some(rb);
            let r2 = r.clone();
            let t = loom::thread::spawn(move || {
                r2.dispatch(&msg(b).as_delivery());
            });
            r.dispatch(&msg(a).as_delivery());
            t.join().unwrap();
            assert!(r.len() <= 1);
            drop(slots[0].lock().take());
            drop(slots[1].lock().take());
            assert!(r.is_empty());
        });
    }

    /// A wildcard and an exact registration made and dropped on two threads while a third
    /// dispatches: the table ends empty and nothing is delivered after both drops.
    #[test]
    fn register_drop_race_with_dispatch() {
        loom::model(|| {
            let r = Arc::new(Registry::new());
            let id = CbId::new(9, 3);
            let r1 = r.clone();
            let t = loom::thread::spawn(move || {
                let w = r1.register(Match::Idx(9), |_| {});
                drop(w);
            });
            let e = r.register(id, |_| {});
            let d = r.dispatch(&msg(id).as_delivery());
            assert!(d.delivered >= 1 && d.delivered <= 2);
            drop(e);
            t.join().unwrap();
            assert!(r.is_empty());
            assert_eq!(r.dispatch(&msg(id).as_delivery()).delivered, 0);
        });
    }
}

#[cfg(all(test, not(cnbus_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    /// A run holds the lone registration's lock: an `unregister` on another thread stops
    /// the next call of the run at once, and returns only when the run is released.
    #[test]
    fn unregister_during_a_run_stops_the_next_call_and_waits_for_the_run_to_end() {
        let id = CbId::new(100, 7);
        let r = Registry::new();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let reg = r.register(id, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let snap = r.snapshot();
        let mut run = snap.targets(id);
        assert_eq!(run.dispatch(&msg(id).as_delivery()).delivered, 1);
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let (tx, rx) = mpsc::channel();
        let unregistering = std::thread::spawn(move || {
            tx.send(()).unwrap();
            reg.unregister();
            d.store(true, Ordering::SeqCst);
        });
        rx.recv().unwrap();
        // Calls go on until the other thread has cleared the registration's flag; then
        // none, while it waits for the run.
        while run.dispatch(&msg(id).as_delivery()).delivered == 1 {
            std::thread::yield_now();
        }
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(
            run.dispatch(&msg(id).as_delivery()),
            DispatchOutcome::default()
        );
        assert!(
            !done.load(Ordering::SeqCst),
            "unregister returned inside the run"
        );
        run.release();
        unregistering.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(calls.load(Ordering::SeqCst), before);
        assert!(r.is_empty());
    }

    /// A callback that dispatches a message its own registration matches (re-entering the
    /// registry) does not reach itself again, whether it is the one registration for the
    /// id (a run's lock) or one of several: the nested dispatch skips it and reaches the
    /// others. (Before, the nested dispatch waited for the lock its own thread held: the
    /// thread hung for good, and the watchdog fired.)
    #[test]
    fn a_callback_re_entering_the_registry_does_not_wait_for_itself() {
        for others in [false, true] {
            let id = CbId::new(100, 9);
            let r = Registry::new();
            let (r2, calls) = (r.clone(), Arc::new(AtomicU32::new(0)));
            let (c, nested) = (calls.clone(), Arc::new(Mutex::new(Vec::new())));
            let n = nested.clone();
            let _reg = r.register(id, move |m| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    n.lock().push(r2.dispatch(m));
                }
            });
            let wild = Arc::new(AtomicU32::new(0));
            let w = wild.clone();
            let _other = others.then(|| {
                r.register(Match::Idx(100), move |_| {
                    w.fetch_add(1, Ordering::SeqCst);
                })
            });
            let (tx, rx) = mpsc::channel();
            let r3 = r.clone();
            std::thread::spawn(move || {
                let _ = tx.send(r3.dispatch(&msg(id).as_delivery()));
            });
            let out = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the re-entrant dispatch hung");
            let inner = nested.lock()[0];
            assert_eq!(calls.load(Ordering::SeqCst), 1, "it did not reach itself");
            assert_eq!(out.delivered, 1 + usize::from(others));
            assert_eq!(
                inner.delivered,
                usize::from(others),
                "the others are reached"
            );
            assert_eq!(wild.load(Ordering::SeqCst), 2 * u32::from(others));
        }
    }

    /// The panic hook runs with the run's lock released, so it may wait for another thread
    /// that unregisters the registration that panicked (which waits for that lock).
    #[test]
    fn the_panic_hook_may_wait_for_a_thread_unregistering_the_registration_that_panicked() {
        let id = CbId::new(100, 8);
        let r = Registry::new();
        let slot: Arc<Mutex<Option<Registration>>> = Arc::new(Mutex::new(None));
        let s = slot.clone();
        r.on_panic(move |_, _| {
            let s = s.clone();
            std::thread::spawn(move || drop(s.lock().take()))
                .join()
                .unwrap();
        });
        *slot.lock() = Some(r.register(id, |_| panic!("boom")));
        let snap = r.snapshot();
        let mut run = snap.targets(id);
        let out = run.dispatch(&msg(id).as_delivery());
        assert_eq!((out.delivered, out.panicked), (0, 1));
        assert_eq!(
            run.dispatch(&msg(id).as_delivery()),
            DispatchOutcome::default()
        );
        assert!(r.is_empty());
    }
}
