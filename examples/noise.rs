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
//! - **valid** connector messages, alone or several to a datagram, with random ids above the
//!   kernel's idx range, and with the ids the tests build (`0x4000_0000 | pid << 8 | salt`
//!   for every live pid), small and random `seq` numbers, random data;
//! - **malformed** datagrams: shorter than a netlink header, `nlmsg_len` past the datagram
//!   or zero, `cn_msg.len` far past the payload, a garbage `nlmsg_type`, a payload shorter
//!   than a `cn_msg` header, a valid message followed by a broken one;
//! - **spoofed proc events** on group 1 (`--proc-rate` a second): well-formed 40-byte
//!   FORK / EXEC / EXIT events on idx 1 val 1 naming live pids (or random ones), with
//!   plausible per-CPU `seq` numbers, from a user-space socket (port id not 0).
//!
//! Only user-space listeners are disturbed: the kernel reads the first message of each
//! datagram, and it ignores user ids it has no callback for and proc payloads that are not a
//! 4- or 8-byte `LISTEN` / `IGNORE` request (these never are). Needs root (sending to a
//! multicast group). Stops by itself after `--seconds`; prints what it sent. Exits 2 on a
//! bad argument, 1 when the socket cannot be opened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cnbus::codec::{encode, DatagramBuilder, NlHeader, NLMSG_DONE};
use cnbus::proc::{EventBody, ExitStatus, ProcEvent, Task};
use cnbus::sys::{ConnectorSocket, Dest};
use cnbus::{CbId, CnMsg};

const USAGE: &str = "\
usage: noise [--seconds S] [--rate N] [--proc-rate N]
  --seconds S     stop after S seconds (1..=86400; default 60)
  --rate N        datagrams a second on the user groups 12..=32 (0..=100000; default 2000)
  --proc-rate N   spoofed proc events a second on group 1 (0..=100000; default 200)
  -h, --help      this text";

const TICK: Duration = Duration::from_millis(10);
const TICKS_PER_SEC: u64 = 100;
const FIRST_USER_GROUP: u32 = 12;
const LAST_GROUP: u32 = 32;

struct Config {
    seconds: u64,
    rate: u64,
    proc_rate: u64,
}

fn bad_usage(msg: &str) -> ! {
    eprintln!("noise: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Config {
    let mut c = Config {
        seconds: 60,
        rate: 2000,
        proc_rate: 200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (slot, max, min) = match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--seconds" => (&mut c.seconds, 86_400, 1),
            "--rate" => (&mut c.rate, 100_000, 0),
            "--proc-rate" => (&mut c.proc_rate, 100_000, 0),
            other => bad_usage(&format!("unknown argument {other:?}")),
        };
        let v = args
            .next()
            .unwrap_or_else(|| bad_usage(&format!("{a} wants a value")));
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => *slot = n,
            _ => bad_usage(&format!("{a}: {v:?} is not a number in {min}..={max}")),
        }
    }
    c
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

/// The pids of every live process (the numeric entries of /proc).
fn live_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A pid for a spoofed event or a test-like id: a live one mostly, else any in pid_max.
fn some_pid(rng: &mut Rng, pids: &[u32]) -> u32 {
    match rng.below(4) {
        0 => 1 + rng.below(32_767) as u32,
        _ => rng.pick(pids).unwrap_or(1),
    }
}

/// An id a listener might be using: the tests' `test_idx` shape for a live pid, or any
/// user idx (above the kernel's 1..=10).
fn some_id(rng: &mut Rng, pids: &[u32]) -> CbId {
    match rng.below(3) {
        0 | 1 => {
            let pid = some_pid(rng, pids);
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

fn valid_msg(rng: &mut Rng, pids: &[u32]) -> CnMsg {
    let data: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    CnMsg::new(some_id(rng, pids), data).with_seq(some_seq(rng), 0)
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

/// One user-group datagram and its class name.
fn user_datagram(rng: &mut Rng, pids: &[u32]) -> (&'static str, Vec<u8>) {
    let mut d = one(&valid_msg(rng, pids));
    let class = match rng.below(12) {
        0..=3 => "valid",
        4 | 5 => {
            let mut b = DatagramBuilder::new(4096);
            for _ in 0..2 + rng.below(7) {
                let _ = b.push(&valid_msg(rng, pids));
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
            let mut broken = one(&valid_msg(rng, pids));
            put_u32(&mut broken, 0, 5);
            d.extend_from_slice(&broken);
            d.extend_from_slice(&one(&valid_msg(rng, pids)));
            "valid-then-broken"
        }
    };
    (class, d)
}

/// A well-formed proc event on idx 1 val 1, as the kernel would lay it out.
fn spoofed_event(rng: &mut Rng, pids: &[u32], cpus: u32) -> (&'static str, Vec<u8>) {
    let p = some_pid(rng, pids);
    let task = |pid| Task { pid, tgid: pid };
    let parent = task(some_pid(rng, pids));
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
        cpu: rng.below(u64::from(cpus)) as u32,
        timestamp_ns: cnbus::sys::monotonic_ns(),
        body,
    };
    let mut data = Vec::new();
    ev.emit(&mut data);
    // Per-CPU sequence numbers near where a real listener's are, or anywhere.
    let msg = CnMsg::new(CbId::PROC, data).with_seq(some_seq(rng), 0);
    let mut b = DatagramBuilder::new(256);
    b.push(&msg).expect("a proc event fits");
    (class, b.take())
}

fn main() {
    let cfg = parse_args();
    let sock = match ConnectorSocket::open() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("noise: {e}");
            std::process::exit(1);
        }
    };
    let cpus = cnbus::sys::num_cpus().max(1) as u32;
    let seed = cnbus::sys::monotonic_ns() ^ (u64::from(std::process::id()) << 32);
    let mut rng = Rng(seed | 1);
    let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut pids = live_pids();
    let start = Instant::now();
    let end = start + Duration::from_secs(cfg.seconds);
    let (mut tick, mut user_due, mut proc_due) = (0u64, 0u64, 0u64);
    eprintln!(
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
        if tick % TICKS_PER_SEC == 0 {
            pids = live_pids();
        }
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
            let group =
                FIRST_USER_GROUP + rng.below(u64::from(LAST_GROUP - FIRST_USER_GROUP + 1)) as u32;
            let d = user_datagram(&mut rng, &pids);
            send(d, Dest::Group(group));
        }
        for _ in 0..proc_now {
            let d = spoofed_event(&mut rng, &pids, cpus);
            send(d, Dest::Group(1));
        }
        let next = start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let total: u64 = sent.values().sum();
    eprintln!(
        "noise: sent {total} datagrams in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for (class, n) in &sent {
        eprintln!("  {class:<20} {n}");
    }
    for (what, n) in &errors {
        eprintln!("  send error: {what} x{n}");
    }
}
