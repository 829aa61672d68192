//! Draining one shard: take its datagrams (a buffer swap), number them, send them with
//! `sendmmsg` where they lie, publish the producers' `done` counts. Run by whoever holds the shard's drain right
//! ([`Shard::drain`](super::shard::Shard::drain)): the flusher thread, or a producer whose
//! insert found its shard at the watermark (producer-assisted draining, see the module docs
//! of [`super`]).

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{fence, Ordering::*};
use std::time::Duration;

use crate::codec::CbId;

use super::shard::{u32_at, Drainer};
use super::stats::Counters;
use super::Inner;

/// How often a transient send error (`ENOBUFS`, `EAGAIN`, `EINTR`, `ENOMEM`) is retried
/// before the datagram is counted as failed.
const TRANSIENT_RETRIES: u32 = 2;

/// The per-id sequence counters of one bus. Kept behind the bus's send lock, which is held
/// from numbering a batch until its `sendmmsg` returned, so numbers follow wire order per
/// id whichever drainer sends.
#[derive(Debug, Default)]
pub(crate) struct Seqs {
    last: HashMap<CbId, u32>,
}

impl Seqs {
    /// The next number of `id` (1, 2, 3, ...; wraps after `u32::MAX` to 0).
    pub(crate) fn next(&mut self, id: CbId) -> u32 {
        let n = self.last.entry(id).or_insert(0);
        *n = n.wrapping_add(1);
        *n
    }

    /// Writes consecutive numbers into `nlmsg_seq` (offset 8) and `cn_msg.seq` (offset 24)
    /// of the messages at `offsets` of `arena`, in order.
    fn number(&mut self, arena: &mut [u8], offsets: &[usize]) {
        // Messages of one id tend to come in runs: look the counter up once per run.
        let mut run: Option<(CbId, u32)> = None;
        for &at in offsets {
            let Some(m) = arena.get_mut(at..at + 28) else {
                continue;
            };
            let id = CbId::new(u32_at(m, 16), u32_at(m, 20));
            let n = match run {
                Some((rid, last)) if rid == id => last.wrapping_add(1),
                _ => {
                    if let Some((rid, last)) = run {
                        self.last.insert(rid, last);
                    }
                    self.last.get(&id).copied().unwrap_or(0).wrapping_add(1)
                }
            };
            m[8..12].copy_from_slice(&n.to_ne_bytes());
            m[24..28].copy_from_slice(&n.to_ne_bytes());
            run = Some((id, n));
        }
        if let Some((rid, last)) = run {
            self.last.insert(rid, last);
        }
    }
}

impl Inner {
    /// Drains shard `i`, whose drain right the caller holds as `d`: takes everything the
    /// shard holds now (an O(1) swap, so producers cannot keep a drainer here), numbers
    /// and sends it, and publishes `done`. Returns the number of messages taken.
    pub(crate) fn drain_shard(&self, i: usize, d: &mut Drainer) -> u64 {
        let Some(shard) = self.shards.get(i) else {
            return 0;
        };
        let (n, stamp) = shard.take(&mut d.batch);
        if n == 0 {
            return 0;
        }
        if stamp != 0 {
            let delay = self.now_ns().saturating_sub(stamp);
            Counters::max(&self.stats.max_queue_delay_ns, delay);
        }
        Counters::max(&self.stats.high_water, n as u64);
        // Space was freed: wake blocked inserters (SeqCst pairs with their increment of
        // `space_waiters` before their retry, which takes the shard lock after ours).
        fence(SeqCst);
        if self.space_waiters.load(SeqCst) > 0 {
            let _g = self.space_lock.lock();
            self.space_cv.notify_all();
        }
        d.batch.close_open();
        self.send(d);
        d.batch.clear();
        n as u64
    }

    /// Numbers and sends every datagram of the batch, `max_batch` per `sendmmsg`, then
    /// publishes the producers' `done` counts.
    fn send(&self, d: &mut Drainer) {
        let b = &mut d.batch;
        let st = &self.stats;
        {
            // The send lock: numbering and sending of one batch are not interleaved with
            // another drainer's, so per-id numbers follow wire order.
            let mut seqs = self.seqs.lock();
            if !b.numbered.is_empty() {
                seqs.number(&mut b.bytes, &b.numbered);
            }
            let slices: Vec<IoSlice<'_>> = b
                .bounds
                .iter()
                .filter_map(|&(s, e, _)| b.bytes.get(s..e).map(IoSlice::new))
                .collect();
            let max_batch = self.cfg.max_batch.max(1);
            let mut off = 0;
            let mut tries = 0;
            while off < slices.len() {
                Counters::add(&st.syscalls, 1);
                let end = (off + max_batch).min(slices.len());
                let r = self.sock.send_batch(&slices[off..end], self.dest);
                match r {
                    Ok(k) if k > 0 => {
                        let msgs: u64 = b.bounds[off..off + k].iter().map(|x| x.2).sum();
                        Counters::add(&st.sent_datagrams, k as u64);
                        Counters::add(&st.sent_messages, msgs);
                        off += k;
                        tries = 0;
                    }
                    other => {
                        let err = match other {
                            Err(e) => e,
                            Ok(_) => crate::Error::from_io(
                                crate::Op::SendBatch,
                                std::io::Error::from_raw_os_error(libc::EAGAIN),
                            ),
                        };
                        let errno = err.errno().unwrap_or(libc::EIO);
                        st.send_error(errno);
                        let transient = matches!(
                            errno,
                            libc::ENOBUFS | libc::EAGAIN | libc::EINTR | libc::ENOMEM
                        );
                        if transient && tries < TRANSIENT_RETRIES {
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(50 << tries));
                            continue;
                        }
                        // Give up on this datagram: count it, keep the error, go on. Its
                        // numbers are used up, so a receiver counts its messages as lost.
                        Counters::add(&st.failed_datagrams, 1);
                        Counters::add(&st.failed_messages, b.bounds[off].2);
                        self.record_error(err);
                        off += 1;
                        tries = 0;
                    }
                }
            }
        }
        if let Some(max) = b.runs.iter().map(|r| r.0).max() {
            if d.cells.len() <= max as usize {
                self.registry.refresh(&mut d.cells);
            }
            for &(i, n) in &b.runs {
                // Release: the take and the send above happen-before the owner's Acquire
                // load that lets it change shard.
                if let Some(c) = d.cells.get(i as usize) {
                    c.done.fetch_add(n, Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_is_per_id_and_consecutive() {
        // Three 36-byte messages: ids a, a, b; then a again in a second batch.
        let a = CbId::new(1, 2);
        let b = CbId::new(3, 4);
        let mut arena = vec![0u8; 36 * 3];
        for (k, id) in [a, a, b].iter().enumerate() {
            arena[k * 36 + 16..k * 36 + 20].copy_from_slice(&id.idx.to_ne_bytes());
            arena[k * 36 + 20..k * 36 + 24].copy_from_slice(&id.val.to_ne_bytes());
        }
        let mut s = Seqs::default();
        s.number(&mut arena, &[0, 36, 72]);
        let seq = |ar: &[u8], k: usize| (u32_at(ar, k * 36 + 8), u32_at(ar, k * 36 + 24));
        assert_eq!(seq(&arena, 0), (1, 1));
        assert_eq!(seq(&arena, 1), (2, 2));
        assert_eq!(seq(&arena, 2), (1, 1));
        s.number(&mut arena, &[0]);
        assert_eq!(seq(&arena, 0), (3, 3));
        assert_eq!(s.next(b), 2);
        // Out-of-range offsets are skipped, not a panic.
        s.number(&mut arena, &[1000]);
    }
}
