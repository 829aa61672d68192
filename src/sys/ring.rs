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
//! A region written is always contiguous: [`Writer::write`] fails when the bytes would
//! cross the end of the buffer, and the caller then fills the rest of the buffer with a
//! marker of its own (see the bus's rings) and writes again at the start. The reader
//! therefore sees at most two slices, before and after the end.

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

/// `n` zero bytes on the heap, or `None` when the allocator refuses (or `n` exceeds what
/// a slice can hold) instead of aborting the process as `vec![0; n]` does. The memory
/// comes from `alloc_zeroed` (`calloc`), so large buffers are zeroed lazily by the kernel,
/// page by page as they are first touched.
pub(crate) fn zeroed_bytes(n: usize) -> Option<Box<[u8]>> {
    if n == 0 {
        return Some(Box::default());
    }
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: the layout has a non-zero size (checked above).
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a live allocation of `n` bytes from the global allocator with the
    // layout of `[u8; n]` (align 1), all initialised (zeroed), owned by nothing else: the
    // box takes ownership and frees it with the same layout.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) })
}

/// A ring of at least `min_size` bytes (rounded up to a power of two, at least 64), or
/// `None` when that size overflows or cannot be allocated.
pub(crate) fn ring(min_size: usize) -> Option<(Writer, Reader)> {
    let size = min_size.max(64).checked_next_power_of_two()?;
    let bytes = Box::into_raw(zeroed_bytes(size)?);
    // SAFETY: `UnsafeCell<u8>` is `repr(transparent)` over `u8`, so a `[u8]` allocation is
    // a valid `[UnsafeCell<u8>]` of the same length and layout; the box is rebuilt from
    // the pointer `Box::into_raw` just gave up.
    let buf: Box<[UnsafeCell<u8>]> = unsafe { Box::from_raw(bytes as *mut [UnsafeCell<u8>]) };
    let s = Arc::new(Shared {
        buf,
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

/// Why [`Writer::write`] wrote nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Short {
    /// Not enough free bytes.
    Full,
    /// The bytes would cross the end of the buffer: fill the rest
    /// ([`Writer::until_end`] bytes) first.
    End,
}

impl Writer {
    /// The buffer's size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Bytes from the tail to the end of the buffer: the most one region can hold now.
    #[inline(always)]
    pub(crate) fn until_end(&self) -> usize {
        self.size - (self.tail & (self.size - 1))
    }

    /// Writes `len` contiguous bytes at the tail with `f` and publishes them. Fails,
    /// calling nothing, when fewer than `len` bytes are free (after loading `head` once:
    /// [`Short::Full`]), or else when the bytes would cross the end of the buffer
    /// ([`Short::End`], see [`until_end`](Self::until_end)). `f` finds whatever the bytes
    /// held before.
    #[inline(always)]
    pub(crate) fn write(&mut self, len: usize, f: impl FnOnce(&mut [u8])) -> Result<(), Short> {
        let (tail, size) = (self.tail, self.size);
        if tail.wrapping_sub(self.head) + len > size {
            // Acquire: the reader's accesses to these bytes happen-before our writes.
            self.head = self.s.head.load(Ordering::Acquire);
            if tail.wrapping_sub(self.head) + len > size {
                return Err(Short::Full);
            }
        }
        // SAFETY: the `len` bytes from `tail` are free (checked against `head` above), so
        // the reader does not own them; the slice lives only for the call of `f`, and we
        // make no other slice meanwhile. `None`: they would cross the end.
        let Some(region) = (unsafe { self.s.slice_mut(tail & (size - 1), len) }) else {
            return Err(Short::End);
        };
        f(region);
        let end = tail.wrapping_add(len);
        self.tail = end;
        // Release: our writes of these bytes happen-before the reader's Acquire load.
        self.s.tail.store(end, Ordering::Release);
        Ok(())
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
        assert!(zeroed_bytes(isize::MAX as usize + 1).is_none());
        assert!(zeroed_bytes(usize::MAX).is_none());
        let b = zeroed_bytes(1 << 20).unwrap();
        assert!(b.len() == 1 << 20 && b.iter().all(|&x| x == 0));
        assert!(zeroed_bytes(0).unwrap().is_empty());
    }

    #[test]
    fn regions_are_contiguous_and_bounded() {
        let (mut w, mut r) = ring(100).unwrap();
        assert_eq!(w.size(), 128);
        w.write(100, |b| b.fill(1)).unwrap();
        // 28 bytes free: 40 do not fit.
        assert_eq!(w.write(40, |_| unreachable!()), Err(Short::Full));
        let (a, b) = r.readable();
        assert_eq!((a.len(), b.len()), (100, 0));
        assert!(a.iter().all(|&x| x == 1));
        r.release(100);
        // All free now, but 40 bytes from offset 100 would cross the end.
        assert_eq!(w.until_end(), 28);
        assert_eq!(w.write(40, |_| unreachable!()), Err(Short::End));
        w.write(28, |b| b.fill(2)).unwrap();
        w.write(100, |b| b.fill(3)).unwrap();
        assert_eq!(w.probe().pending(), 128);
        // Full: nothing fits until the reader gives bytes back.
        assert_eq!(w.write(4, |_| unreachable!()), Err(Short::Full));
        let (a, b) = r.readable();
        assert_eq!((a.len(), b.len()), (28, 100));
        assert!(a.iter().all(|&x| x == 2) && b.iter().all(|&x| x == 3));
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
                let n = w.until_end();
                let r = w.write(len, |rec| {
                    rec[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                    rec[4..8].copy_from_slice(&i.to_ne_bytes());
                    rec[8..].fill(i as u8);
                });
                match r {
                    Ok(()) => {}
                    Err(Short::End) => {
                        // Fill the rest with a skip record (length with the high bit).
                        let _ = w.write(n, |rec| {
                            rec[..4].copy_from_slice(&(n as u32 | 1 << 31).to_ne_bytes())
                        });
                        continue;
                    }
                    Err(Short::Full) => {
                        std::hint::spin_loop();
                        continue;
                    }
                }
                i += 1;
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
                    let n = (word & !(1 << 31)) as usize;
                    if word & 1 << 31 == 0 {
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
