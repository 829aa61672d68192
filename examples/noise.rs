//! A hostile, busy host's connector traffic, for a bounded time at a bounded rate: a foreign
//! sender that multicasts valid and malformed datagrams on every user group (12..=32) and
//! spoofed proc events on group 1. `scripts/busy_host.sh` runs it (with a fork storm) around
//! a command, such as the test suite, to check that nothing assumes a quiet machine.
//!
//! ```sh
//! cargo run --release --example noise -- --seconds 60 --rate 2000 --proc-rate 200
//! ```
//!
//! What it sends, each tick of 10 ms, spread over the groups at random:
//!
//! - **valid** connector messages, alone or several to a datagram: copies of what real
//!   senders just sent (it listens on every group: the same id, to the same group, with a
//!   `seq` next to theirs), the ids the tests build (`0x4000_0000 | pid << 8 | salt` for the
//!   newest pids), and random ids above the kernel's idx range; small and random `seq`
//!   numbers, random data;
//! - **malformed** datagrams: shorter than a netlink header, `nlmsg_len` past the datagram
//!   or zero, `cn_msg.len` far past the payload, a garbage `nlmsg_type`, a payload shorter
//!   than a `cn_msg` header, a valid message followed by a broken one;
//! - **spoofed proc events** on group 1 (`--proc-rate` a second): well-formed 40-byte
//!   FORK / EXEC / EXIT events on idx 1 val 1 from a user-space socket (port id not 0),
//!   naming the pids of the kernel's latest events, live pids or random ones, on the real
//!   CPUs with the `seq` numbers the kernel will use next (or random ones).
//!
//! Only user-space listeners are disturbed: the kernel reads the first message of each
//! datagram, and it ignores user ids it has no callback for and proc payloads that are not a
//! 4- or 8-byte `LISTEN` / `IGNORE` request (these never are). Needs root (sending to a
//! multicast group). Stops by itself after `--seconds`; prints what it sent on stderr.
//! `--help` lists the options; a bad or out-of-range value is a usage error (exit status
//! 2); a socket that cannot be opened or join the groups is exit status 1.

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::codec::{encode, messages_ref, DatagramBuilder, MessageRef, NlHeader, NLMSG_DONE};
use cnbus::proc::{EventBody, ExitStatus, ProcEvent, Task};
use cnbus::sys::{ConnectorSocket, Dest};
use cnbus::{CbId, CnMsg};

const TICK: Duration = Duration::from_millis(10);
const TICKS_PER_SEC: u64 = 100;
const FIRST_USER_GROUP: u32 = 12;
const LAST_GROUP: u32 = 32;

/// A foreign sender of valid, malformed and spoofed connector traffic, for a bounded time.
#[derive(Parser)]
#[command(name = "noise")]
struct Args {
    /// Stop after this many seconds (1..=86400).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,
    /// Datagrams a second on the user groups 12..=32 (0..=100000).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    rate: u64,
    /// Spoofed proc events a second on group 1 (0..=100000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    proc_rate: u64,
}

/// xorshift64*: enough randomness for noise, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn u32(&mut self) -> u32 {
        self.next() as u32
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len() as u64) as usize])
    }
}

/// What the noise heard from real senders, to imitate them.
#[derive(Default)]
struct Heard {
    /// Recent (group, id, seq) of valid user messages, newest last.
    user: VecDeque<(u32, CbId, u32)>,
    /// Recent kernel proc events: (cpu, seq, pid named), newest last.
    proc: VecDeque<(u32, u32, u32)>,
    /// The newest live pids (most likely the tests' processes).
    newest: Vec<u32>,
}

const HEARD: usize = 256;
const RECV_PER_TICK: usize = 64;

impl Heard {
    /// Reads at most `RECV_PER_TICK` queued datagrams (the rest overflow, which is fine).
    fn listen(&mut self, sock: &ConnectorSocket, buf: &mut BytesMut) {
        for _ in 0..RECV_PER_TICK {
            buf.clear();
            buf.reserve(1 << 16);
            let meta = match sock.recv(buf, true) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(_) => continue, // ENOBUFS or a truncated datagram: keep listening
            };
            for m in messages_ref(buf).flatten() {
                let MessageRef::Connector { cn, data, .. } = m else {
                    continue;
                };
                if meta.group == 1 && meta.from_kernel() && cn.id == CbId::PROC {
                    if let Ok(ev) = ProcEvent::parse(data) {
                        let pid = ev.task().map_or(0, |t| t.pid);
                        push(&mut self.proc, (ev.cpu, cn.seq, pid));
                    }
                } else if meta.group >= FIRST_USER_GROUP && !cn.id.is_kernel_owned() {
                    push(&mut self.user, (meta.group, cn.id, cn.seq));
                }
            }
        }
    }
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == HEARD {
        q.pop_front();
    }
    q.push_back(v);
}

/// The pids of every live process (the numeric entries of /proc).
fn live_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A pid for a spoofed event or a test-like id: one of the newest mostly, else any live
/// one, else any in pid_max.
fn some_pid(rng: &mut Rng, h: &Heard, pids: &[u32]) -> u32 {
    match rng.below(4) {
        0 => 1 + rng.below(32_767) as u32,
        1 => rng.pick(pids).unwrap_or(1),
        _ => rng.pick(&h.newest).unwrap_or(1),
    }
}

/// The newest `n` pids (by start time, field 22 of /proc/<pid>/stat).
fn newest_pids(pids: &[u32], n: usize) -> Vec<u32> {
    let start = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split(' ').nth(19)?.parse().ok()
            })
            .unwrap_or(0)
    };
    let mut v: Vec<(u64, u32)> = pids.iter().map(|&p| (start(p), p)).collect();
    v.sort_unstable();
    v.iter().rev().take(n).map(|&(_, p)| p).collect()
}

/// An id a listener might be using: the tests' `test_idx` shape for a live pid, or any
/// user idx (above the kernel's 1..=10).
fn some_id(rng: &mut Rng, h: &Heard, pids: &[u32]) -> CbId {
    match rng.below(3) {
        0 | 1 => {
            let pid = some_pid(rng, h, pids);
            CbId::new(
                0x4000_0000 | ((pid & 0xffff) << 8) | rng.below(64) as u32,
                rng.below(16) as u32,
            )
        }
        _ => CbId::new(
            CbId::KERNEL_IDX_MAX + 1 + rng.below(u64::from(u32::MAX - 11)) as u32,
            rng.u32(),
        ),
    }
}

/// A sequence number a numbered stream might be at: small mostly, sometimes anything.
fn some_seq(rng: &mut Rng) -> u32 {
    match rng.below(4) {
        0 => rng.u32(),
        _ => rng.below(4096) as u32,
    }
}

fn valid_msg(rng: &mut Rng, h: &Heard, pids: &[u32]) -> CnMsg {
    let data: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    CnMsg::new(some_id(rng, h, pids), data).with_seq(some_seq(rng), 0)
}

fn one(msg: &CnMsg) -> Vec<u8> {
    let mut d = Vec::new();
    let nl = NlHeader {
        ty: NLMSG_DONE,
        seq: msg.seq,
        ..Default::default()
    };
    encode(nl, msg, &mut d).expect("a noise message fits in a datagram");
    d
}

fn put_u32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// A copy of something a real sender sent: its group, its id, a `seq` next to its own.
fn copycat(rng: &mut Rng, h: &Heard) -> Option<(u32, Vec<u8>)> {
    let &(group, id, seq) = h.user.get(rng.below(h.user.len() as u64) as usize)?;
    let seq = seq.wrapping_add(rng.below(6) as u32).wrapping_sub(2);
    let data: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    Some((group, one(&CnMsg::new(id, data).with_seq(seq, 0))))
}

/// One user-group datagram and its class name.
fn user_datagram(rng: &mut Rng, h: &Heard, pids: &[u32]) -> (&'static str, Vec<u8>) {
    let mut d = one(&valid_msg(rng, h, pids));
    let class = match rng.below(12) {
        0..=3 => "valid",
        4 | 5 => {
            let mut b = DatagramBuilder::new(4096);
            for _ in 0..2 + rng.below(7) {
                let _ = b.push(&valid_msg(rng, h, pids));
            }
            d = b.take();
            "valid-multi"
        }
        6 => {
            d.truncate(1 + rng.below(15) as usize);
            "truncated-header"
        }
        7 => {
            put_u32(
                &mut d,
                0,
                [0, 1 + rng.below(15) as u32, 60_000][rng.below(3) as usize],
            );
            "bad-nlmsg-len"
        }
        8 => {
            d[32..34].copy_from_slice(&(60_000 + rng.below(5000) as u16).to_ne_bytes());
            "huge-cn-len"
        }
        9 => {
            let ty = [0u16, 5, 0x10, 0x7777, 0xffff][rng.below(5) as usize];
            d[4..6].copy_from_slice(&ty.to_ne_bytes());
            "garbage-nlmsg-type"
        }
        10 => {
            let keep = 16 + rng.below(20) as usize;
            d.truncate(keep);
            put_u32(&mut d, 0, keep as u32);
            "short-cn-header"
        }
        _ => {
            let mut broken = one(&valid_msg(rng, h, pids));
            put_u32(&mut broken, 0, 5);
            d.extend_from_slice(&broken);
            d.extend_from_slice(&one(&valid_msg(rng, h, pids)));
            "valid-then-broken"
        }
    };
    (class, d)
}

/// A well-formed proc event on idx 1 val 1, as the kernel would lay it out.
fn spoofed_event(rng: &mut Rng, h: &Heard, pids: &[u32], cpus: u32) -> (&'static str, Vec<u8>) {
    // Half the time, imitate a real event just heard: its pid, its CPU, the next seq.
    let heard = match rng.below(2) {
        0 => h.proc.get(rng.below(h.proc.len() as u64) as usize).copied(),
        _ => None,
    };
    let p = match heard {
        Some((_, _, pid)) if pid != 0 => pid,
        _ => some_pid(rng, h, pids),
    };
    let task = |pid| Task { pid, tgid: pid };
    let parent = task(some_pid(rng, h, pids));
    let (class, body) = match rng.below(3) {
        0 => (
            "spoof-fork",
            EventBody::Fork {
                parent,
                child: task(p),
            },
        ),
        1 => ("spoof-exec", EventBody::Exec { process: task(p) }),
        _ => (
            "spoof-exit",
            EventBody::Exit {
                process: task(p),
                status: ExitStatus(rng.below(256) as u32 * 256),
                exit_signal: libc::SIGCHLD,
                parent: Some(parent),
            },
        ),
    };
    let ev = ProcEvent {
        seq: 0,
        ack: 0,
        cpu: heard.map_or(rng.below(u64::from(cpus)) as u32, |(cpu, _, _)| cpu),
        timestamp_ns: cnbus::sys::monotonic_ns(),
        body,
    };
    let mut data = Vec::new();
    ev.emit(&mut data);
    // The per-CPU sequence numbers the kernel is about to use, or anywhere.
    let seq = heard.map_or(some_seq(rng), |(_, seq, _)| {
        seq.wrapping_add(1 + rng.below(3) as u32)
    });
    let msg = CnMsg::new(CbId::PROC, data).with_seq(seq, 0);
    let mut b = DatagramBuilder::new(256);
    b.push(&msg).expect("a proc event fits");
    (class, b.take())
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::finish("noise", run(&args))
}

fn run(cfg: &Args) -> Result<(), cli::Stop> {
    let sock = ConnectorSocket::open()?;
    let cpus = cnbus::sys::num_cpus().max(1) as u32;
    let seed = cnbus::sys::monotonic_ns() ^ (u64::from(std::process::id()) << 32);
    let mut rng = Rng(seed | 1);
    let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for g in std::iter::once(1).chain(FIRST_USER_GROUP..=LAST_GROUP) {
        sock.join(g)?;
    }
    let mut heard = Heard::default();
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut pids = live_pids();
    heard.newest = newest_pids(&pids, 16);
    let start = Instant::now();
    let end = start + Duration::from_secs(cfg.seconds);
    let (mut tick, mut user_due, mut proc_due) = (0u64, 0u64, 0u64);
    warn!(
        "noise: pid {}, port {}, {} s, {} datagrams/s on groups {FIRST_USER_GROUP}..={LAST_GROUP}, \
         {} spoofed proc events/s on group 1",
        std::process::id(),
        sock.port_id(),
        cfg.seconds,
        cfg.rate,
        cfg.proc_rate
    );
    while Instant::now() < end {
        tick += 1;
        if tick % (TICKS_PER_SEC / 4) == 0 {
            pids = live_pids();
            heard.newest = newest_pids(&pids, 16);
        }
        heard.listen(&sock, &mut buf);
        // Spread each second's budget evenly over its ticks (exact over a second).
        let user_now = cfg.rate * tick / TICKS_PER_SEC - user_due;
        let proc_now = cfg.proc_rate * tick / TICKS_PER_SEC - proc_due;
        user_due += user_now;
        proc_due += proc_now;
        let mut send = |(class, d): (&'static str, Vec<u8>), dest| match sock.try_send(&d, dest) {
            Ok(_) => *sent.entry(class).or_default() += 1,
            Err(e) => *errors.entry(format!("{class}: {e}")).or_default() += 1,
        };
        for _ in 0..user_now {
            if rng.below(4) == 0 {
                if let Some((group, d)) = copycat(&mut rng, &heard) {
                    send(("copycat", d), Dest::Group(group));
                    continue;
                }
            }
            let group =
                FIRST_USER_GROUP + rng.below(u64::from(LAST_GROUP - FIRST_USER_GROUP + 1)) as u32;
            let d = user_datagram(&mut rng, &heard, &pids);
            send(d, Dest::Group(group));
        }
        for _ in 0..proc_now {
            let d = spoofed_event(&mut rng, &heard, &pids, cpus);
            send(d, Dest::Group(1));
        }
        let next = start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let total: u64 = sent.values().sum();
    warn!(
        "noise: sent {total} datagrams in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for (class, n) in &sent {
        warn!("  {class:<20} {n}");
    }
    for (what, n) in &errors {
        warn!("  send error: {what} x{n}");
    }
    Ok(())
}
