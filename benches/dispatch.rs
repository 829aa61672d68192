//! Dispatch benchmark: cost per message and delivered messages per second, 64-byte payloads.
//!
//! ```sh
//! cargo bench --bench dispatch          # as root (SO_RCVBUFFORCE)
//! ```
//!
//! 1. In memory: parse a datagram of 32 messages and dispatch each to a counting callback,
//!    with the copy-on-write registry cnbus uses and with the alternative it was measured
//!    against (a read lock held across the lookup), idle and while another thread
//!    registers and unregisters continuously.
//! 2. The receive side, a raw loop against the `Connector`, in interleaved rounds of one
//!    run: a sender socket multicasts N messages of 64 B (32 per datagram, 64 datagrams
//!    per `sendmmsg`) into the receiver's queue, made large enough to hold them all; then
//!    the receiver reads until the queue is empty, so the sender is never the bottleneck
//!    and the figures are the receiver's alone. The raw loop is libc only: `recvmmsg` into
//!    reused buffers, a bounds-checked parse of nlmsghdr + cn_msg, a count by id. The
//!    `Connector` has one callback registered for the id, which counts (its first call
//!    holds the dispatcher until the queue is filled). Printed per round and as medians:
//!    messages/s over the drain, receiver CPU ns per message (`CLOCK_THREAD_CPUTIME_ID` of
//!    the reading thread: the raw loop's, the dispatcher's), the kernel drops of each
//!    receiving socket (`SO_MEMINFO`) and the Connector's sequence gaps, so that a faster
//!    figure cannot come from dropping more (delivered + 32 x drops is checked against N),
//!    and the ratios connector/raw of the rate and raw/connector of the CPU per message.
//!
//! Knobs: `BENCH_ONLY` (`m` in memory, `r` receive side; default both), `BENCH_MSGS`
//! (default 1 000 000), `BENCH_ROUNDS` (5), `BENCH_GROUP` (22), `BENCH_RCVBUF_MB` (256).

use std::collections::HashMap;
use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cnbus::codec::{messages, DatagramBuilder, Message};
use cnbus::connector::{Connector, Delivery, Event, Incoming, Registry, Source};
use cnbus::{CbId, CnMsg};
use parking_lot::{Mutex, RwLock};

const PAYLOAD: usize = 64;
const PER_DATAGRAM: usize = 32;

fn datagram(id: CbId) -> Bytes {
    let mut b = DatagramBuilder::new(1 << 16);
    for i in 0..PER_DATAGRAM {
        b.push(&CnMsg::new(id, vec![0u8; PAYLOAD]).with_seq(i as u32, 0))
            .unwrap();
    }
    Bytes::from(b.take())
}

type Cb = Arc<Mutex<Box<dyn FnMut(&Delivery<'_>) + Send>>>;

/// The alternative design: a `parking_lot` read lock around the lookup.
struct LockedRegistry {
    map: RwLock<HashMap<CbId, Vec<Cb>>>,
}

impl LockedRegistry {
    /// Holds the read lock while calling: cheapest, but a callback that registers (takes
    /// the write lock) deadlocks, so it is shown for reference only.
    fn dispatch_holding(&self, m: &Delivery<'_>) {
        let map = self.map.read();
        if let Some(v) = map.get(&m.id()) {
            for cb in v {
                (cb.lock())(m);
            }
        }
    }

    /// Copies the matching callbacks out under the read lock, then calls them unlocked.
    fn dispatch_cloning(&self, m: &Delivery<'_>) {
        let v: Vec<Cb> = self.map.read().get(&m.id()).cloned().unwrap_or_default();
        for cb in v {
            (cb.lock())(m);
        }
    }
}

/// ns per message to parse datagrams of 32 messages and hand each to `f`, as a hand-fed
/// registry is fed (an owned `Incoming` per message and its view); `per_datagram` runs
/// once per datagram and its result is passed along (for per-datagram snapshots).
fn per_msg_ns<S>(
    rounds: usize,
    mut per_datagram: impl FnMut() -> S,
    mut f: impl FnMut(&S, &Delivery<'_>),
) -> f64 {
    let id = CbId::new(0x5000_0001, 1);
    let d = datagram(id);
    let src = Source { port: 1, group: 0 };
    let t = Instant::now();
    for _ in 0..rounds {
        let s = per_datagram();
        for m in messages(d.clone()) {
            let Ok(Message::Connector(c)) = m else {
                unreachable!()
            };
            let m = Incoming {
                msg: c.msg,
                source: src,
            };
            f(&s, &m.as_delivery());
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * PER_DATAGRAM) as f64
}

fn in_memory() {
    let id = CbId::new(0x5000_0001, 1);
    let rounds = 100_000;
    let count = Arc::new(AtomicU64::new(0));
    println!("in-memory: parse a datagram of {PER_DATAGRAM} x {PAYLOAD} B messages and dispatch each to one counting callback (ns per message)");
    println!(
        "{:<34} {:>8} {:>12} {:>12} {:>14} {:>15}",
        "background", "parse", "cow/datagram", "cow/message", "rwlock+clone", "rwlock held*"
    );
    for churn_pause in [None, Some(Duration::from_micros(100)), Some(Duration::ZERO)] {
        let cow = Registry::new();
        let c = count.clone();
        let _keep = cow.register(id, move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        let locked = Arc::new(LockedRegistry {
            map: RwLock::new(HashMap::new()),
        });
        let c = count.clone();
        let cb: Cb = Arc::new(Mutex::new(Box::new(move |_: &Delivery<'_>| {
            c.fetch_add(1, Ordering::Relaxed);
        })));
        locked.map.write().insert(id, vec![cb]);

        let stop = Arc::new(AtomicBool::new(false));
        let churner = churn_pause.map(|pause| {
            let (cow, locked, stop) = (cow.clone(), locked.clone(), stop.clone());
            std::thread::spawn(move || {
                let other = CbId::new(0x5000_0002, 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    drop(cow.register(other, |_| {}));
                    let cb: Cb = Arc::new(Mutex::new(Box::new(|_: &Delivery<'_>| {})));
                    locked.map.write().insert(other, vec![cb]);
                    locked.map.write().remove(&other);
                    n += 1;
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                n
            })
        });
        let parse = per_msg_ns(rounds, || (), |_, _| {});
        let cow_dgram = per_msg_ns(
            rounds,
            || cow.snapshot(),
            |s, m| {
                s.dispatch(m);
            },
        );
        let cow_msg = per_msg_ns(
            rounds,
            || (),
            |_, m| {
                cow.dispatch(m);
            },
        );
        let cloning = per_msg_ns(rounds, || (), |_, m| locked.dispatch_cloning(m));
        let holding = per_msg_ns(rounds, || (), |_, m| locked.dispatch_holding(m));
        stop.store(true, Ordering::Relaxed);
        let churns = churner.map(|t| t.join().unwrap());
        let label = match (churn_pause, churns) {
            (None, _) => "idle".to_string(),
            (Some(p), Some(n)) if !p.is_zero() => format!("registrations every 100 us ({n})"),
            (_, Some(n)) => format!("registrations nonstop ({n})"),
            _ => unreachable!(),
        };
        println!("{label:<34} {parse:>8.1} {cow_dgram:>12.1} {cow_msg:>12.1} {cloning:>14.1} {holding:>15.1}");
    }
    println!(
        "* holding the read lock while calling deadlocks a callback that registers; reference only"
    );
}

// ---- 2. The receive side: a raw loop against the Connector ------------------------------

/// Encoded size of one message: nlmsghdr (16) + cn_msg (20) + payload.
const MSG_LEN: usize = 16 + 20 + PAYLOAD;
/// Datagrams per `recvmmsg` of the raw loop, and per `sendmmsg` of the sender.
const SLOTS: usize = 64;
/// Bytes per receive slot of the raw loop: the Connector's default `max_datagram`.
const SLOT_LEN: usize = 64 << 10;
const NLMSG_DONE: u16 = 3;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes it and nothing else.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: `ts` is valid for writes for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// A `NETLINK_CONNECTOR` socket with nothing but libc.
struct Raw {
    fd: libc::c_int,
    port: u32,
}

impl Raw {
    fn open() -> Raw {
        // SAFETY: plain system call, no pointers.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 11) };
        check(fd, "socket");
        // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
        let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let mut len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `sa` is a valid sockaddr_nl of `len` bytes.
        check(
            unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_nl).cast(), len) },
            "bind",
        );
        // SAFETY: `sa` and `len` are valid for writes; the kernel writes at most `len` bytes.
        check(
            unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_nl).cast(), &mut len) },
            "getsockname",
        );
        Raw {
            fd,
            port: sa.nl_pid,
        }
    }

    fn setopt(&self, level: libc::c_int, name: libc::c_int, v: libc::c_int, what: &str) {
        // SAFETY: `v` is a c_int valid for reads during the call.
        let r = unsafe {
            libc::setsockopt(
                self.fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        check(r, what);
    }

    /// The socket's kernel drop counter (`SO_MEMINFO`, `SK_MEMINFO_DROPS`).
    fn drops(&self) -> u32 {
        let mut m = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
        let mut len = mem::size_of_val(&m) as libc::socklen_t;
        // SAFETY: `m` is valid for writes of `len` bytes; the kernel writes at most `len`.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                m.as_mut_ptr().cast(),
                &mut len,
            )
        };
        check(r, "getsockopt(SO_MEMINFO)");
        m[libc::SK_MEMINFO_DROPS as usize]
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Multicasts `n` messages of `id` (64 B each, seq from 1) to `group` from socket `s`:
/// 32 messages per datagram, 64 datagrams per `sendmmsg`. Returns when the kernel has
/// queued (or dropped) them all at every member.
fn fill(s: &Raw, group: u32, id: CbId, n: usize) {
    // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
    let mut dst: libc::sockaddr_nl = unsafe { mem::zeroed() };
    dst.nl_family = libc::AF_NETLINK as u16;
    dst.nl_groups = 1 << (group - 1);
    let dgram = PER_DATAGRAM * MSG_LEN;
    let mut buf = vec![0u8; SLOTS * dgram];
    for m in buf.chunks_mut(MSG_LEN) {
        m[0..4].copy_from_slice(&(MSG_LEN as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        m[12..16].copy_from_slice(&s.port.to_ne_bytes());
        m[16..20].copy_from_slice(&id.idx.to_ne_bytes());
        m[20..24].copy_from_slice(&id.val.to_ne_bytes());
        m[32..34].copy_from_slice(&(PAYLOAD as u16).to_ne_bytes());
    }
    let mut seq = 1u32;
    let mut left = n.div_ceil(PER_DATAGRAM);
    while left > 0 {
        let k = left.min(SLOTS);
        for m in buf[..k * dgram].chunks_mut(MSG_LEN) {
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m[24..28].copy_from_slice(&seq.to_ne_bytes());
            seq += 1;
        }
        let mut iovs: Vec<libc::iovec> = buf
            .chunks_mut(dgram)
            .take(k)
            .map(|d| libc::iovec {
                iov_base: d.as_mut_ptr().cast(),
                iov_len: d.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data for which all-zero is valid.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; k];
        for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
            h.msg_hdr.msg_name = (&mut dst as *mut libc::sockaddr_nl).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let mut off = 0;
        while off < k {
            // SAFETY: headers `off..k` point at live iovecs over `buf` and at `dst`.
            let r = unsafe {
                libc::sendmmsg(s.fd, hdrs[off..].as_mut_ptr(), (k - off) as libc::c_uint, 0)
            };
            check(r, "sendmmsg");
            off += r as usize;
        }
        left -= k;
    }
}

/// Counts the connector messages of `id` in one datagram, checking every length first.
#[inline]
fn count_in(d: &[u8], id: CbId) -> u64 {
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut pos = 0;
    let mut n = 0;
    while d.len() - pos >= 16 {
        let len = u32_at(d, pos) as usize;
        if len < 16 || len > d.len() - pos {
            break;
        }
        let ty = u16::from_ne_bytes([d[pos + 4], d[pos + 5]]);
        if ty == NLMSG_DONE && len >= 36 {
            let cn = &d[pos + 16..pos + len];
            let data_len = usize::from(u16::from_ne_bytes([cn[16], cn[17]]));
            if 20 + data_len <= cn.len() && u32_at(cn, 0) == id.idx && u32_at(cn, 4) == id.val {
                n += 1;
            }
        }
        pos += (len + 3) & !3;
        pos = pos.min(d.len());
    }
    n
}

/// One receiver's figures for one round.
#[derive(Clone, Copy, Default)]
struct Round {
    /// Messages of the bench's id handed to the counting code.
    delivered: u64,
    /// Datagrams the kernel dropped for the receiving socket (32 messages each).
    drops: u64,
    /// Sequence gaps the Connector counted (messages; raw loop: not tracked).
    lost: u64,
    /// The messages `secs` and `cpu_ns` cover (all delivered, unless the receiver stalled).
    timed: u64,
    secs: f64,
    cpu_ns: u64,
}

impl Round {
    fn rate(&self) -> f64 {
        self.timed as f64 / self.secs / 1e6
    }
    fn ns_per_msg(&self) -> f64 {
        self.cpu_ns as f64 / self.timed.max(1) as f64
    }
}

/// The raw loop: `recvmmsg` into reused buffers, parse, count by id.
fn raw_round(group: u32, id: CbId, n: usize, rcvbuf: usize) -> Round {
    let r = Raw::open();
    r.setopt(
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        rcvbuf as libc::c_int,
        "SO_RCVBUFFORCE",
    );
    r.setopt(
        SOL_NETLINK,
        NETLINK_ADD_MEMBERSHIP,
        group as libc::c_int,
        "join",
    );
    let d0 = r.drops();
    let sender = Raw::open();
    fill(&sender, group, id, n);
    let drops = u64::from(r.drops().wrapping_sub(d0));
    let mut buf = vec![0u8; SLOTS * SLOT_LEN];
    // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
    let mut names: Vec<libc::sockaddr_nl> = vec![unsafe { mem::zeroed() }; SLOTS];
    let mut iovs: Vec<libc::iovec> = buf
        .chunks_mut(SLOT_LEN)
        .map(|d| libc::iovec {
            iov_base: d.as_mut_ptr().cast(),
            iov_len: d.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data for which all-zero is valid.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { mem::zeroed() }; SLOTS];
    for ((h, iov), name) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(names.iter_mut()) {
        h.msg_hdr.msg_name = (name as *mut libc::sockaddr_nl).cast();
        h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    let (t0, c0) = (Instant::now(), thread_cpu_ns());
    let mut delivered = 0;
    loop {
        // SAFETY: every header points at its own live iovec (a disjoint SLOT_LEN slice of
        // `buf`) and sockaddr_nl; the kernel writes within them. No timeout.
        let k = unsafe {
            libc::recvmmsg(
                r.fd,
                hdrs.as_mut_ptr(),
                SLOTS as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if k < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => break, // the queue is empty: done
                Some(libc::EINTR) | Some(libc::ENOBUFS) => continue,
                e => panic!("recvmmsg: errno {e:?}"),
            }
        }
        for ((h, d), name) in hdrs
            .iter()
            .zip(buf.chunks(SLOT_LEN))
            .zip(names.iter())
            .take(k as usize)
        {
            // Only the bench's sender: others may multicast on the group too.
            if name.nl_pid == sender.port {
                delivered += count_in(&d[..(h.msg_len as usize).min(SLOT_LEN)], id);
            }
        }
    }
    Round {
        delivered,
        drops,
        lost: 0,
        timed: delivered,
        secs: t0.elapsed().as_secs_f64(),
        cpu_ns: thread_cpu_ns() - c0,
    }
}

/// What the Connector's callback records on the dispatcher thread.
struct Probe {
    gate: Barrier,
    /// Messages to count before taking the end mark.
    expected: AtomicU64,
    count: AtomicU64,
    start: Mutex<Option<(Instant, u64)>>,
    /// The latest progress mark (time, thread CPU, messages), every 8192 messages and at
    /// the expected count.
    mark: Mutex<Option<(Instant, u64, u64)>>,
    done: AtomicBool,
}

/// The Connector: one counting callback registered for the id.
fn connector_round(group: u32, id: CbId, n: usize, rcvbuf: usize) -> Round {
    let sender = Raw::open();
    let port = sender.port;
    // The sequence gaps of the bench's own stream (other senders' gaps are in Stats::lost).
    let lost = Arc::new(AtomicU64::new(0));
    let l = lost.clone();
    let conn = Connector::builder()
        .recv_buffer(rcvbuf)
        .on_event(move |e| {
            if let Event::Lost { port: p, count, .. } = e {
                if *p == port {
                    l.fetch_add(u64::from(*count), Ordering::Relaxed);
                }
            }
        })
        .spawn()
        .unwrap();
    let _sub = conn.subscribe(group).unwrap();
    let probe = Arc::new(Probe {
        gate: Barrier::new(2),
        expected: AtomicU64::new(u64::MAX),
        count: AtomicU64::new(0),
        start: Mutex::new(None),
        mark: Mutex::new(None),
        done: AtomicBool::new(false),
    });
    let p = probe.clone();
    let mut mine = 0u64;
    let _reg = conn.register(id, move |m| {
        if m.source().port != port {
            return; // not the bench's sender
        }
        if mine == 0 {
            // The first message holds the dispatcher until the queue is full.
            p.gate.wait();
            *p.start.lock() = Some((Instant::now(), thread_cpu_ns()));
        }
        mine += 1;
        p.count.store(mine, Ordering::Relaxed);
        let end = mine == p.expected.load(Ordering::Relaxed);
        if end || mine.is_multiple_of(8192) {
            *p.mark.lock() = Some((Instant::now(), thread_cpu_ns(), mine));
            if end {
                p.done.store(true, Ordering::Release);
            }
        }
    });
    fill(&sender, group, id, n);
    let drops = conn.stats().kernel_drops.unwrap_or(0);
    probe
        .expected
        .store(n as u64 - drops * PER_DATAGRAM as u64, Ordering::Relaxed);
    probe.gate.wait();
    let mut last = (0, Instant::now());
    while !probe.done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
        let now = probe.count.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            println!("  ! connector: stalled at {now} messages; timed up to the last mark");
            break;
        }
    }
    let start = probe.start.lock().unwrap();
    let end = probe.mark.lock().unwrap_or((start.0, start.1, 0));
    let s = conn.stats();
    Round {
        delivered: probe.count.load(Ordering::Relaxed),
        drops: s.kernel_drops.unwrap_or(0),
        lost: lost.load(Ordering::Relaxed),
        timed: end.2,
        secs: end.0.duration_since(start.0).as_secs_f64(),
        cpu_ns: end.1.saturating_sub(start.1),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn receive_side() {
    let n = knob("BENCH_MSGS", 1_000_000) / PER_DATAGRAM * PER_DATAGRAM;
    let rounds = knob("BENCH_ROUNDS", 5).max(1);
    let group = knob("BENCH_GROUP", 22) as u32;
    let rcvbuf = knob("BENCH_RCVBUF_MB", 256) << 20;
    // An id of this run's own; each receiver also counts only its sender's port.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let salt = std::process::id().wrapping_mul(0x9e37_79b9) ^ now.subsec_nanos();
    let id = CbId::new(0x5000_0000 | (salt & 0x0fff_ffff), 1);
    println!(
        "receive side: {n} messages of {PAYLOAD} B ({PER_DATAGRAM} per datagram) multicast to group {group} and queued first (SO_RCVBUFFORCE {} MiB), then read until the queue is empty; {rounds} interleaved rounds",
        rcvbuf >> 20
    );
    println!(
        "  raw = recvmmsg ({SLOTS} x {} KiB reused buffers) + parse + count by id, no cnbus; connector = Connector + one counting callback",
        SLOT_LEN >> 10
    );
    println!(
        "  receiver CPU = CLOCK_THREAD_CPUTIME_ID of the reading thread over the drain; drops = the socket's kernel drop counter (datagrams); lost = the Connector's sequence gaps of the bench's stream (messages); only the bench sender's messages count"
    );
    println!(
        "{:>5} | {:>10} {:>8} {:>9} {:>6} | {:>10} {:>8} {:>9} {:>6} {:>6} | {:>10} {:>9}",
        "round",
        "raw M/s",
        "ns/msg",
        "delivered",
        "drops",
        "conn M/s",
        "ns/msg",
        "delivered",
        "drops",
        "lost",
        "ratio M/s",
        "ratio CPU"
    );
    let (mut rate_ratio, mut cpu_ratio) = (Vec::new(), Vec::new());
    let (mut raws, mut conns) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate the order, so a drift in the machine's load hits both alike.
        let (raw, conn) = if round % 2 == 0 {
            let r = raw_round(group, id, n, rcvbuf);
            (r, connector_round(group, id, n, rcvbuf))
        } else {
            let c = connector_round(group, id, n, rcvbuf);
            (raw_round(group, id, n, rcvbuf), c)
        };
        for (name, r) in [("raw", raw), ("connector", conn)] {
            let accounted = r.delivered + r.drops * PER_DATAGRAM as u64;
            if accounted != n as u64 {
                println!("  ! {name}: delivered + 32 x drops = {accounted}, sent {n}");
            }
        }
        let (rr, cr) = (
            conn.rate() / raw.rate(),
            raw.ns_per_msg() / conn.ns_per_msg(),
        );
        println!(
            "{:>5} | {:>10.2} {:>8.1} {:>9} {:>6} | {:>10.2} {:>8.1} {:>9} {:>6} {:>6} | {:>9.2}x {:>8.2}x",
            round + 1,
            raw.rate(),
            raw.ns_per_msg(),
            raw.delivered,
            raw.drops,
            conn.rate(),
            conn.ns_per_msg(),
            conn.delivered,
            conn.drops,
            conn.lost,
            rr,
            cr
        );
        rate_ratio.push(rr);
        cpu_ratio.push(cr);
        raws.push(raw);
        conns.push(conn);
    }
    let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    println!(
        "median| {:>10.2} {:>8.1} {:>9} {:>6} | {:>10.2} {:>8.1} {:>9} {:>6} {:>6} | {:>9.2}x {:>8.2}x   (target: connector >= 0.7x raw)",
        m(&raws, Round::rate),
        m(&raws, Round::ns_per_msg),
        "",
        "",
        m(&conns, Round::rate),
        m(&conns, Round::ns_per_msg),
        "",
        "",
        "",
        median(rate_ratio),
        median(cpu_ratio)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` compatibility
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "mr".into());
    if only.contains('m') {
        in_memory();
    }
    if only.contains('r') {
        receive_side();
    }
}
