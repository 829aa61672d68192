//! A single-producer, single-consumer byte ring: the storage of every bus ring (a per-CPU
//! shard's, whose writers take turns under the shard's lock, and a
//! [`Producer`](crate::bus::Producer)'s).
//!
//! One [`Writer`] and one [`Reader`] share a power-of-two buffer and two monotonic
//! positions (wrapping `usize` byte counts):
//!
//! * `tail`: bytes the writer has published. Stored only by the writer, with `Release`,
//!   after it wrote them; the reader loads it with `Acquire` before it reads (or rewrites)
//!   them.
//! * `head`: bytes the reader has given back. Stored only by the reader, with `Release`,
//!   after it is done with them (for the bus: after the `sendmmsg` that read them
//!   returned); the writer loads it with `Acquire` before it writes over them.
//!
//! So the writer owns `[tail, head + size)` and the reader owns `[head, tail)`: disjoint
//! parts of the buffer, each touched by one thread at a time, handed over by those two
//! stores. Neither side ever makes a mutable reference to the whole buffer, only slices
//! of its own part, so the two sides never alias (the shared `&[UnsafeCell<u8>]` the
//! slices are cut from asserts nothing about the bytes). The writer's hot path makes no atomic
//! read-modify-write and no fence: on x86 a `Release` store and an `Acquire` load are
//! plain moves. The writer caches `head` and reloads it only when its cached view is
//! short of space.
//!
//! A region written is always contiguous: one that would cross the end of the buffer goes
//! at its start, after a skip word ([`SKIP`]` | n`) filling the `n` bytes up to the end.
//! The reader therefore sees at most two slices, before and after the end.

use std::cell::UnsafeCell;
use std::sync::atomic::Ordering;

// Loom's atomics under `cfg(cnbus_loom)`, so that the bus's loom model runs this ring.
use crate::sync::{Arc, AtomicUsize};

use crossbeam::utils::CachePadded;

struct Shared {
    /// The bytes. Never borrowed as a whole: each side makes slices of its own part only.
    buf: Box<[UnsafeCell<u8>]>,
    mask: usize,
    /// Published by the writer (see the module docs).
    tail: CachePadded<AtomicUsize>,
    /// Given back by the reader (see the module docs).
    head: CachePadded<AtomicUsize>,
}

// SAFETY: the buffer's bytes are reached only through the one `Writer` and the one
// `Reader` (neither is `Clone`; both take `&mut self`), each in the part of the buffer it
// owns, and ownership of a byte moves between them only through the `Release` store and
// `Acquire` load of `tail` or `head` (see the module docs). So no byte is accessed by two
// threads without a happens-before edge between the accesses.
unsafe impl Sync for Shared {}

impl Shared {
    /// `len` bytes from buffer offset `at`, or `None` if they are not all in the buffer.
    ///
    /// # Safety
    /// The caller must own those bytes (writer: free space it reserved; reader: published
    /// bytes it has not given back) and must not hold another slice over them.
    // The exclusivity comes from the caller's ownership of these bytes (the ring's
    // protocol), not from `&self`: that is the contract this `unsafe fn` states.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn slice_mut(&self, at: usize, len: usize) -> Option<&mut [u8]> {
        let cells = self.buf.get(at..at.checked_add(len)?)?;
        // SAFETY: the cells are in bounds (`get`); `UnsafeCell<u8>` has the layout of
        // `u8`, and writing through the pointer is allowed because it comes from the
        // cells (`raw_get`); the caller guarantees exclusive ownership of these bytes for
        // the slice's lifetime.
        Some(unsafe {
            std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), cells.len())
        })
    }
}

/// High bit of a skip word `SKIP | n`: the next `n` bytes (up to the end of the buffer) hold
/// nothing. Written in host order at the start of a region; the writer's regions start
/// with a length word of their own, below this bit.
pub(crate) const SKIP: u32 = 1 << 31;

/// `n` zeroed cells, or `None` when the allocator refuses (or `n` exceeds what a slice can
/// hold) instead of aborting the process as `vec![0; n]` does. From `alloc_zeroed`
/// (`calloc`): large buffers are zeroed lazily by the kernel, page by page.
fn zeroed(n: usize) -> Option<Box<[UnsafeCell<u8>]>> {
    let layout = std::alloc::Layout::array::<UnsafeCell<u8>>(n).ok()?;
    if n == 0 {
        return None;
    }
    // SAFETY: the layout has a non-zero size (checked above).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<UnsafeCell<u8>>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a live allocation of `n` cells from the global allocator with the
    // layout of `[UnsafeCell<u8>; n]` (`repr(transparent)` over `u8`), all initialised
    // (zeroed), owned by nothing else: the box takes it and frees it with that layout.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) })
}

/// A ring of at least `min_size` bytes (rounded up to a power of two, at least 64), or
/// `None` when that size overflows or cannot be allocated.
pub(crate) fn ring(min_size: usize) -> Option<(Writer, Reader)> {
    let size = min_size.max(64).checked_next_power_of_two()?;
    let s = Arc::new(Shared {
        buf: zeroed(size)?,
        mask: size - 1,
        tail: CachePadded::new(AtomicUsize::new(0)),
        head: CachePadded::new(AtomicUsize::new(0)),
    });
    Some((
        Writer {
            s: Arc::clone(&s),
            tail: 0,
            head: 0,
            size,
        },
        Reader {
            s,
            head: 0,
            tail: 0,
        },
    ))
}

/// The writing side of a [`ring`].
pub(crate) struct Writer {
    s: Arc<Shared>,
    /// Our copy of `tail` (we are its only writer).
    tail: usize,
    /// The last `head` we loaded: at least this much has been given back.
    head: usize,
    /// The buffer's size (a power of two), kept here to spare a look through the `Arc`.
    size: usize,
}

impl Writer {
    /// The buffer's size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Writes `len` contiguous bytes (a multiple of 4) with `f` and publishes them, after
    /// a skip word if they would cross the end of the buffer. False, calling nothing, when
    /// the free bytes (after loading `head` once) are too few. `f` finds whatever the
    /// bytes held before.
    #[inline(always)]
    pub(crate) fn write(&mut self, len: usize, f: impl FnOnce(&mut [u8])) -> bool {
        let (tail, size) = (self.tail, self.size);
        let at = tail & (size - 1);
        let skip = if len > size - at { size - at } else { 0 };
        let need = len.saturating_add(skip);
        if tail.wrapping_sub(self.head).saturating_add(need) > size {
            // Acquire: the reader's accesses to these bytes happen-before our writes.
            self.head = self.s.head.load(Ordering::Acquire);
            if tail.wrapping_sub(self.head).saturating_add(need) > size {
                return false;
            }
        }
        // SAFETY: the `need` bytes from `tail` are free (checked against `head` above), so
        // the reader does not own them; each slice lives only for its statement (or the
        // call of `f`), and we make no other slice meanwhile.
        unsafe {
            if let Some(w) = self.s.slice_mut(at, skip).and_then(|b| b.get_mut(..4)) {
                w.copy_from_slice(&(SKIP | skip as u32).to_ne_bytes());
            }
            match self.s.slice_mut(tail.wrapping_add(skip) & (size - 1), len) {
                Some(region) => f(region),
                None => return false,
            }
        }
        let end = tail.wrapping_add(need);
        self.tail = end;
        // Release: our writes of these bytes happen-before the reader's Acquire load.
        self.s.tail.store(end, Ordering::Release);
        true
    }

    /// Bytes published so far (a monotonic, wrapping position): the end of the last write.
    #[inline(always)]
    pub(crate) fn position(&self) -> usize {
        self.tail
    }

    /// A look at the ring from outside: for threads that hold neither side.
    pub(crate) fn probe(&self) -> Probe {
        Probe {
            s: Arc::clone(&self.s),
        }
    }
}

/// The reading side of a [`ring`].
pub(crate) struct Reader {
    s: Arc<Shared>,
    /// Our copy of `head` (we are its only writer).
    head: usize,
    /// The `tail` loaded by the last [`readable`](Self::readable).
    tail: usize,
}

impl Reader {
    /// The published bytes not given back yet (loads `tail`): the part before the end of
    /// the buffer, and the part after it (empty unless they wrap).
    pub(crate) fn readable(&mut self) -> (&mut [u8], &mut [u8]) {
        // Acquire: the writer's writes of these bytes happen-before our reads.
        self.tail = self.s.tail.load(Ordering::Acquire);
        let n = self.tail.wrapping_sub(self.head);
        let at = self.head & self.s.mask;
        let first = n.min(self.s.buf.len() - at);
        // SAFETY: `[head, tail)` is published and not given back, so the writer does not
        // touch it; the two parts are disjoint (`first` stops at the end of the buffer,
        // the second starts at 0 and has `n - first <= at` bytes since `n <= size`), and
        // both borrow `self` mutably, so no other slice of ours exists.
        unsafe {
            (
                self.s.slice_mut(at, first).unwrap_or_default(),
                self.s.slice_mut(0, n - first).unwrap_or_default(),
            )
        }
    }

    /// Gives the first `n` bytes of what the last [`readable`](Self::readable) returned
    /// back to the writer (at most all of it).
    pub(crate) fn release(&mut self, n: usize) {
        let n = n.min(self.tail.wrapping_sub(self.head));
        self.head = self.head.wrapping_add(n);
        // Release: our reads of these bytes (and the system call that read them)
        // happen-before the writer's Acquire load and its writes over them.
        self.s.head.store(self.head, Ordering::Release);
    }
}

/// Looks at a ring without owning either side.
#[derive(Clone)]
pub(crate) struct Probe {
    s: Arc<Shared>,
}

impl Probe {
    /// Published bytes not given back yet, as seen now.
    pub(crate) fn pending(&self) -> usize {
        let head = self.s.head.load(Ordering::Acquire);
        let tail = self.s.tail.load(Ordering::Acquire);
        tail.wrapping_sub(head)
    }

    /// True once the reader has given back every byte up to position `end` (a
    /// [`Writer::position`]). Acquire: what the reader did before giving them back (for the
    /// bus, the send) happens-before the caller's next step.
    #[inline(always)]
    pub(crate) fn released(&self, end: usize) -> bool {
        self.s.head.load(Ordering::Acquire).wrapping_sub(end) as isize >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_sizes_are_refused_not_aborted() {
        assert!(ring(usize::MAX).is_none(), "power of two overflows");
        assert!(ring(1 << 62).is_none(), "no allocator gives 4 EiB");
        assert!(zeroed(isize::MAX as usize + 1).is_none());
        assert!(zeroed(usize::MAX).is_none());
        let b = zeroed(1 << 20).unwrap();
        assert!(b.len() == 1 << 20 && b.iter().all(|x| unsafe { *x.get() } == 0));
    }

    #[test]
    fn regions_are_contiguous_and_bounded() {
        let (mut w, mut r) = ring(100).unwrap();
        assert_eq!(w.size(), 128);
        assert!(w.write(100, |b| b.fill(1)));
        // 28 bytes free: 40 do not fit.
        assert!(!w.write(40, |_| unreachable!()));
        let (a, b) = r.readable();
        assert_eq!((a.len(), b.len()), (100, 0));
        assert!(a.iter().all(|&x| x == 1));
        r.release(100);
        // All free now, but 40 bytes from offset 100 would cross the end: a skip of 28.
        assert!(w.write(40, |b| b.fill(3)));
        assert_eq!(w.probe().pending(), 68);
        // Full: nothing fits until the reader gives bytes back.
        assert!(w.write(60, |b| b.fill(4)));
        assert!(!w.write(4, |_| unreachable!()));
        let (a, b) = r.readable();
        assert_eq!((a.len(), b.len()), (28, 100));
        assert_eq!(a[..4], (SKIP | 28).to_ne_bytes());
        assert!(b[..40].iter().all(|&x| x == 3) && b[40..].iter().all(|&x| x == 4));
        r.release(usize::MAX); // clamped to what is readable
        assert_eq!(w.probe().pending(), 0);
    }

    /// A writer thread streams numbered records of varying length through a small ring
    /// while a reader checks every byte: no loss, no reordering, no torn record.
    #[test]
    fn concurrent_stream_arrives_intact() {
        const N: u32 = 200_000;
        let (mut w, mut r) = ring(256).unwrap();
        let writer = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < N {
                let len = 8 + (i as usize % 5) * 4;
                let ok = w.write(len, |rec| {
                    rec[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                    rec[4..8].copy_from_slice(&i.to_ne_bytes());
                    rec[8..].fill(i as u8);
                });
                if ok {
                    i += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        let mut next = 0u32;
        while next < N {
            let (a, b) = r.readable();
            let mut used = 0;
            for part in [a, b] {
                let mut p = 0;
                while p < part.len() {
                    let word = u32::from_ne_bytes(part[p..p + 4].try_into().unwrap());
                    let n = (word & !SKIP) as usize;
                    if word & SKIP == 0 {
                        let rec = &part[p..p + n];
                        assert_eq!(u32::from_ne_bytes(rec[4..8].try_into().unwrap()), next);
                        assert!(rec[8..].iter().all(|&x| x == next as u8));
                        next += 1;
                    }
                    p += n;
                }
                used += part.len();
            }
            r.release(used);
        }
        writer.join().unwrap();
    }
}
