//! Helpers shared by the integration tests: the root package's (`mod common;`) and the
//! tools' under `tools/*/tests/` (`#[path = "../../../tests/common/mod.rs"] mod common;`),
//! one copy for all.
#![allow(dead_code)]

pub mod cli;
pub mod examples;
pub mod runc;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::codec::{messages, ConnectorMessage, Message};
use cnbus::sys::{ConnectorSocket, RecvMeta};

/// The repository's root (the `cnbus` package's directory), from whichever workspace
/// package's tests this is compiled in.
pub fn repo_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("proto/fixtures").is_dir())
        .unwrap_or(here)
        .to_path_buf()
}

/// Opens a connector socket, or decides what to do when the kernel is not reachable:
/// under CI (`CI` set) that is a failure; on a developer's machine without root the test is
/// skipped with a message on stderr.
pub fn kernel_socket(test: &str) -> Option<ConnectorSocket> {
    match ConnectorSocket::open().and_then(|s| s.join(1).map(|()| s)) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: the kernel connector is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("{test}: SKIPPED, kernel connector not reachable: {e}");
            None
        }
    }
}

/// Receives connector messages from `sock` until `pred` returns true for one of them or
/// `timeout` passes. Returns every message seen, with the datagram's metadata.
pub fn recv_until(
    sock: &ConnectorSocket,
    timeout: Duration,
    mut pred: impl FnMut(&RecvMeta, &ConnectorMessage) -> bool,
) -> Vec<(RecvMeta, ConnectorMessage)> {
    let deadline = Instant::now() + timeout;
    let wake = cnbus::sys::EventFd::new().unwrap();
    let mut seen = Vec::new();
    let mut buf = BytesMut::with_capacity(1 << 16);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = cnbus::sys::poll_read(sock, &wake, Some(left)).unwrap();
        if !r.socket {
            continue;
        }
        buf.reserve(1 << 16);
        let meta = match sock.recv(&mut buf, true) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(cnbus::Error::Overrun { .. }) => continue,
            Err(e) => panic!("recv: {e}"),
        };
        for m in messages(buf.split().freeze()) {
            if let Ok(Message::Connector(c)) = m {
                let done = pred(&meta, &c);
                seen.push((meta, c));
                if done {
                    return seen;
                }
            }
        }
    }
    seen
}

/// A host-unique idx for tests of custom buses: above the kernel's 1..=10 and distinct per
/// test name and process, so parallel tests never hear each other's traffic.
pub fn test_idx(salt: u32) -> u32 {
    0x4000_0000 | ((std::process::id() & 0xffff) << 8) | (salt & 0xff)
}

/// A golden datagram from `proto/fixtures/`: its bytes and its `# expect:` keys.
pub struct Fixture {
    /// File name.
    pub name: String,
    /// The datagram.
    pub bytes: Vec<u8>,
    /// `key=value` pairs of the `# expect:` line, in order.
    pub expect: Vec<(String, String)>,
}

impl Fixture {
    /// Loads `proto/fixtures/<name>`.
    pub fn load(name: &str) -> Fixture {
        let path = format!("{}/proto/fixtures/{name}", repo_root().display());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut bytes = Vec::new();
        let mut expect = Vec::new();
        for line in text.lines() {
            let (code, comment) = line.split_once('#').unwrap_or((line, ""));
            if let Some(kv) = comment.trim_start().strip_prefix("expect:") {
                for pair in kv.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("key=value");
                    expect.push((k.to_string(), v.to_string()));
                }
            }
            for h in code.split_whitespace() {
                bytes.push(
                    u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{path}: bad hex {h}")),
                );
            }
        }
        Fixture {
            name: name.to_string(),
            bytes,
            expect,
        }
    }

    /// Every fixture file name.
    pub fn all() -> Vec<String> {
        let dir = repo_root().join("proto/fixtures");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".hex"))
            .collect();
        v.sort();
        v
    }

    /// The value of `key`, if the fixture states it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.expect
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs `/bin/sh -c script` to completion: the shell's pid (for matching its proc events)
/// and its exit status.
pub fn sh(script: &str) -> (u32, std::process::ExitStatus) {
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait().unwrap())
}

/// Parses an expected integer: decimal or `0x` hex.
pub fn parse_int(v: &str) -> u64 {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap_or_else(|_| panic!("not an integer: {v}")),
    }
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes; returns its last value.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Ends a numbered stream so that a loss at its tail shows as a gap: sends one more
/// message (`send` returns its seq) and waits up to `patience` for the receiver to have
/// delivered it (`last_seen`: the highest seq of the stream delivered so far), again with
/// the next one until one is. Once the receiver has delivered the last message sent, every
/// earlier one was delivered or counted in a gap, whatever a busy host dropped (a fixed
/// sleep before one final message assumed the receiver had drained by then, and lost that
/// message too when it had not). Returns how many were sent (at most 100, then panics).
pub fn close_stream(
    mut send: impl FnMut() -> u32,
    last_seen: impl Fn() -> u32,
    patience: Duration,
) -> u64 {
    for sent in 1..=100 {
        let seq = send();
        if wait_for(patience, || last_seen() == seq) {
            return sent;
        }
    }
    panic!("the receiver delivered none of 100 closing messages");
}

/// True when `port` is the port id of a netlink socket this test process holds: how a
/// receiver tells its own traffic from a foreign sender's on a busy host, where anyone may
/// send anything (even the very ids a test uses) to any group. Reads /proc/self/fd and
/// /proc/net/netlink; ports found are remembered (a port id is unique while its socket
/// lives, and this process's test sockets outlive the checks made on them).
///
/// A socket closed before its datagrams are checked is found only if some check (or
/// [`remember_own_sockets`]) ran while it was open.
pub fn own_port(port: u32) -> bool {
    if own_ports().contains(&port) {
        return true;
    }
    remember_own_sockets();
    own_ports().contains(&port)
}

fn own_ports() -> std::sync::MutexGuard<'static, std::collections::HashSet<u32>> {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static OWN: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    OWN.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Remembers the port ids of every connector socket this process holds now (for
/// [`own_port`]): call it before closing a sender whose datagrams are read afterwards.
pub fn remember_own_sockets() {
    use std::collections::HashSet;
    // This process's socket inodes...
    let inodes: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| {
                let link = std::fs::read_link(e.ok()?.path()).ok()?;
                let s = link.to_str()?;
                s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    // ...and the ports of the connector sockets with those inodes. Columns: sk Eth Pid
    // Groups Rmem Wmem Dump Locks Drops Inode.
    let table = std::fs::read_to_string("/proc/net/netlink").unwrap_or_default();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 10 && f[1] == "11" && f[9].parse().is_ok_and(|i| inodes.contains(&i)) {
            if let Ok(p) = f[2].parse::<u32>() {
                own_ports().insert(p);
            }
        }
    }
}

/// Counts what user-space processes multicast on group 1 (spoofed proc events) while it
/// runs: a raw socket with a large buffer, drained by its own thread. A listener opened
/// after [`ForeignOnGroup1::start`] and stopped before [`ForeignOnGroup1::check_spoofed`]
/// cannot have rejected more spoofed events than it counted: on a quiet host that is 0.
pub struct ForeignOnGroup1 {
    running: Option<Counting>,
}

/// Bytes [`ForeignOnGroup1`] reads of a datagram: what a listener reads whole (the largest
/// connector message, `CnMsg::MAX_ENCODED`), so that it counts the messages of every
/// datagram a listener counts message by message (at 64 KiB, a datagram of 65 537 to
/// 65 572 bytes was one cut datagram for it, its every message spoofed for a listener).
pub const FOREIGN_READ: usize = cnbus::CnMsg::MAX_ENCODED;

/// The counting socket's port and thread (which returns foreign datagrams, overruns).
type Counting = (u32, std::thread::JoinHandle<(u64, u64)>);

impl ForeignOnGroup1 {
    /// Starts counting (does nothing where the kernel connector is not reachable: the test
    /// skips or fails on its own).
    pub fn start() -> ForeignOnGroup1 {
        let Ok(sock) = ConnectorSocket::open().and_then(|s| s.join(1).map(|()| s)) else {
            return ForeignOnGroup1 { running: None };
        };
        sock.set_recv_buffer(32 << 20, true).unwrap();
        let port = sock.port_id();
        let thread = std::thread::spawn(move || {
            let (mut foreign, mut overruns) = (0u64, 0u64);
            let mut buf = BytesMut::with_capacity(FOREIGN_READ);
            loop {
                buf.clear();
                buf.reserve(FOREIGN_READ);
                match sock.recv_max(&mut buf, FOREIGN_READ, false) {
                    // The unicast end marker: everything queued before it has been read.
                    Ok(Some(meta)) if meta.group == 0 => return (foreign, overruns),
                    // Counted as a listener counts its spoofed messages: each message of the
                    // datagram (control messages and a malformed one included).
                    Ok(Some(meta)) if !meta.from_kernel() => {
                        foreign += cnbus::codec::messages_ref(&buf).count().max(1) as u64
                    }
                    Ok(_) => {}
                    Err(cnbus::Error::Overrun { .. }) => overruns += 1,
                    // Longer than any connector message: a user-space sender's (a
                    // listener counts it as one spoofed datagram too).
                    Err(cnbus::Error::Truncated { .. }) => foreign += 1,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        });
        ForeignOnGroup1 {
            running: Some((port, thread)),
        }
    }

    /// Stops counting and checks that a listener's `spoofed` count (read before this call)
    /// is no more than the messages user space sent on group 1 since `start`: a kernel
    /// event is never taken for a spoof. (When this counter's own queue overflowed, its
    /// count is only a lower bound and the check is reported, not made.)
    pub fn check_spoofed(self, test: &str, spoofed: u64) {
        let Some((port, thread)) = self.running else {
            return;
        };
        // A unicast to the counter ends it once it has read everything queued before.
        let marker = ConnectorSocket::open().unwrap();
        marker
            .send(&[0u8; 16], cnbus::sys::Dest::Port(port))
            .unwrap();
        let (foreign, overruns) = thread.join().unwrap();
        if overruns > 0 {
            eprintln!("{test}: the spoof counter overflowed; spoofed {spoofed} not checked");
            return;
        }
        assert!(
            spoofed <= foreign,
            "{test}: {spoofed} counted as spoofed, but user space sent only {foreign} messages on group 1"
        );
    }
}

/// Every proc-connector message the kernel sent, by `(cpu, seq)`, with the reference's
/// final counters: what a lossy listener is compared with.
pub type Seen = std::collections::BTreeMap<(u32, u32), cnbus::proc::ProcEvent>;

/// A lossless reference listener for loss tests: every event and ACK, a 16 MiB queue,
/// drained on its own thread from `start` until 300 ms after `finish` was called.
pub struct Reference {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Seen, cnbus::proc::LossStats)>,
}

impl Reference {
    /// Opens and starts draining the reference (panics if the kernel connector is
    /// unreachable: call it after the test's own `kernel_socket` check).
    pub fn start() -> Self {
        use cnbus::proc::{ProcListener, Received};
        use std::sync::atomic::Ordering;
        let reference = ProcListener::builder()
            .include_acks(true)
            .open()
            .unwrap()
            .into_channel(1 << 12)
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::new();
            let mut until = None;
            loop {
                if let Some(Received::Event(e)) =
                    reference.recv_timeout(Duration::from_millis(50)).unwrap()
                {
                    seen.insert((e.cpu, e.seq), e);
                }
                if flag.load(Ordering::SeqCst) {
                    let u =
                        *until.get_or_insert_with(|| Instant::now() + Duration::from_millis(300));
                    if Instant::now() >= u {
                        break;
                    }
                }
            }
            (seen, reference.close())
        });
        Self { stop, thread }
    }

    /// Stops the reference once what it had queued is read (300 ms from now) and returns
    /// what it saw and its counters (check `lost() == Some(0)` before comparing).
    pub fn finish(self) -> (Seen, cnbus::proc::LossStats) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}
