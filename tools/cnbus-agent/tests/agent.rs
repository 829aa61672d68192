//! `cnbus-agent` end to end, on the real kernel: under a fork storm it keeps an exact table
//! of live processes, stops cleanly on SIGINT with its final counters, and survives (and
//! reports) receive-queue overruns.
//!
//! The binary is the one cargo builds for this package's tests (`CARGO_BIN_EXE_cnbus-agent`),
//! so this works from a fresh clone and with any target dir.
//!
//! The storm is `stress-ng --fork 2`. Without stress-ng the test fails under CI (`CI` set)
//! and otherwise falls back to two shell loops spawning `/bin/true`.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cnbus::proc::{EventBody, EventSet, ProcListener, Received};

/// The tests that run a storm or an agent beside it: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cnbus-agent"))
}

/// Kills the processes it holds when dropped, so a failing assertion leaves nothing behind.
#[derive(Default)]
struct Reaper(Vec<Child>);

impl Reaper {
    fn add(&mut self, c: Child) -> u32 {
        let pid = c.id();
        self.0.push(c);
        pid
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `sleep 60` child: its pid and when it was spawned (wall-clock seconds before and after
/// the spawn, which a busy host can make long).
fn sleep60(reaper: &mut Reaper) -> (u32, (f64, f64)) {
    let before = now_s();
    let c = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    (reaper.add(c), (before, now_s()))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A fork storm of `secs` seconds, or `None` when stress-ng is missing outside CI (the caller
/// then runs shell loops).
fn storm(secs: u32) -> Child {
    let stress = Command::new("stress-ng")
        .args(["--fork", "2", "--timeout", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match stress {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("stress-ng is required under CI (apt-get install -y stress-ng): {e}")
        }
        Err(e) => {
            eprintln!("stress-ng not available ({e}): storming with shell loops of /bin/true");
            // Two loops, ended by `timeout`.
            Command::new("timeout")
                .args([
                    &secs.to_string(),
                    "/bin/sh",
                    "-c",
                    "while :; do /bin/true; done & while :; do /bin/true; done & wait",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the /bin/true storm")
        }
    }
}

/// A running agent; killed if the test fails before stopping it.
struct Running {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_agent(dir: &Path, extra: &[&str]) -> Running {
    let events = dir.join("events.jsonl");
    let mut child = Command::new(agent_bin())
        // --duration: a safety net should the test die without stopping it.
        .args(["--duration", "60", "--interval", "1", "--output"])
        .arg(&events)
        .arg("--dump-table")
        .arg(dir.join("table.jsonl"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut r = Running {
        child,
        stderr: Some(stderr),
    };
    // Ready once the initial /proc scan is in the log: its first line.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut head = [0u8; 512];
        let n = std::fs::File::open(&events)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        if String::from_utf8_lossy(&head[..n]).contains("\"reason\":\"start\"") {
            return r;
        }
        if let Ok(Some(st)) = r.child.try_wait() {
            let err = r.stderr.take().unwrap().join().unwrap_or_default();
            panic!("the agent exited early ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT, then wait (at most 10 s); the exit status and stderr.
fn interrupt(mut r: Running) -> (ExitStatus, String) {
    // SAFETY: sends SIGINT to our own child.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = r.child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = r.child.kill();
            panic!("the agent did not exit within 10 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, r.stderr.take().unwrap().join().unwrap())
}

fn final_stats(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no counters line on stderr:\n{stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v["final"], true,
        "the last line is not the final one: {line}"
    );
    v
}

fn read_table(dir: &Path) -> HashMap<u32, serde_json::Value> {
    std::fs::read_to_string(dir.join("table.jsonl"))
        .expect("the dumped table")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["pid"].as_u64().unwrap() as u32, v)
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` to Unix seconds.
fn parse_rfc3339(s: &str) -> f64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// What /proc says about a live (non-zombie) process: (ppid, start as Unix seconds, cmdline).
fn proc_info(pid: u32) -> Option<(u32, f64, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if f[0] == "Z" || f[0] == "X" {
        return None;
    }
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let start = now_s() - (uptime - f[19].parse::<f64>().ok()? / hz);
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd)
        .trim_end_matches('\0')
        .replace('\0', " ");
    Some((f[1].parse().ok()?, start, cmd))
}

/// Every live process descending from `root`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = HashMap::new();
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = d.file_name().to_string_lossy().parse::<u32>() {
            if let Some((ppid, _, _)) = proc_info(pid) {
                parent.insert(pid, ppid);
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..64 {
                match parent.get(&cur) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// A listener of the test's own, collecting process exits from now until `stop`: tells a pid
/// that exited after the agent stopped (a race of the check) from a stale table entry.
struct ExitWatch {
    stop: cnbus::proc::ShutdownHandle,
    seen: Arc<Mutex<HashSet<u32>>>,
    thread: std::thread::JoinHandle<()>,
}

impl ExitWatch {
    fn start() -> ExitWatch {
        let mut l = ProcListener::builder()
            .events(EventSet::EXIT)
            .open()
            .expect("the test's own exit listener");
        let stop = l.shutdown_handle();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let s = seen.clone();
        let thread = std::thread::spawn(move || {
            for r in l.iter() {
                if let Ok(Received::Event(ev)) = r {
                    if let EventBody::Exit { process, .. } = ev.body {
                        if !process.is_thread() {
                            s.lock().unwrap().insert(process.tgid);
                        }
                    }
                }
            }
        });
        ExitWatch { stop, seen, thread }
    }

    /// As [`finish`](Self::finish), once the watch has seen the exit of every process of
    /// `table` that is gone from /proc, or after 5 s. On a busy host the watch lags, and the
    /// kernel sends an exit event only after `exit_notify()`, when the parent's `wait` may
    /// already have returned: stopping at once would drop exits it is about to see.
    /// The table's stale entries (see [`stale_entries`]), judged while this watch still
    /// runs: an entry's process may exit at any moment, and only a watch that is still
    /// reading can see that exit. Retries for up to 5 s while some are stale (an exit event
    /// can trail the process's disappearance from /proc), then returns the last verdict.
    fn stale_in(self, table: &HashMap<u32, serde_json::Value>) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let stale = loop {
            let seen = self.seen.lock().unwrap().clone();
            let stale = stale_entries(table, &seen);
            if stale.is_empty() || Instant::now() >= deadline {
                break stale;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.finish();
        stale
    }

    fn finish(self) {
        self.stop.shutdown();
        self.thread.join().unwrap();
    }
}

/// Checks the dumped table against /proc. Returns the stale entries (pid gone, or reused by a
/// process with another start time, without the exit having been seen after the stop).
fn stale_entries(
    table: &HashMap<u32, serde_json::Value>,
    exited_after_stop: &HashSet<u32>,
) -> Vec<String> {
    let mut stale = Vec::new();
    for (pid, e) in table {
        let start = e["start"].as_str().map(parse_rfc3339);
        let ok = match proc_info(*pid) {
            Some((_, s, _)) => start.is_none_or(|t| (t - s).abs() < 0.5),
            None => false,
        };
        // /proc/<tid> exists for threads too (unlisted): an entry must be a process.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let tgid = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .map(str::trim);
        assert!(
            tgid.is_none() || tgid == Some(pid.to_string().as_str()),
            "table entry {pid} is a thread of {tgid:?}"
        );
        if !ok && !exited_after_stop.contains(pid) {
            stale.push(format!("{e} (/proc: {:?})", proc_info(*pid)));
        }
    }
    stale
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnbus-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_and_usage_errors() {
    let out = Command::new(agent_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--interval",
        "--stats-file",
        "--output",
        "--dump-table",
        "--duration",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
    let out = Command::new(agent_bin())
        .args(["--interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn duration_ends_it_with_counters_and_a_dump() {
    if common::kernel_socket("duration_ends_it_with_counters_and_a_dump").is_none() {
        return;
    }
    // Not beside a storm test: its stale-entry check would see this agent exit.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("agent-duration");
    let stats = dir.join("stats.json");
    let out = Command::new(agent_bin())
        .args(["--duration", "1", "--interval", "0.2", "--dump-table"])
        .arg(dir.join("table.jsonl"))
        .arg("--stats-file")
        .arg(&stats)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    final_stats(&err);
    // Only the final counters go to stderr with --stats-file; the file holds them too.
    assert_eq!(
        err.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{err}"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(file["final"], true);
    // The test process was there all along, found by the scan, with its parent.
    let me = std::process::id();
    let table = read_table(&dir);
    let e = table.get(&me).expect("the test process is in the table");
    assert_eq!(e["ppid"], proc_info(me).unwrap().0);
    assert_eq!(e["source"], "scan");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tracks_live_processes_under_a_fork_storm_and_stops_on_sigint() {
    if common::kernel_socket("tracks_live_processes_under_a_fork_storm").is_none() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let dir = temp_dir("agent-storm");
    let mut reaper = Reaper::default();
    // One child from before the agent: it can only know it from its /proc scan.
    let before = sleep60(&mut reaper);
    // The storm starts first, so that the agent's start-up scan races with forks and exits.
    let mut stress = storm(9);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let agent = start_agent(&dir, &[]);
    let mut during = Vec::new();
    std::thread::sleep(Duration::from_secs(1));
    during.push(sleep60(&mut reaper));
    // A thread of ours: it must not become a table entry.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Through a shell that execs: the table must follow the exec.
    let spawning = now_s();
    let sh = Command::new("/bin/sh")
        .args(["-c", "exec sleep 60"])
        .spawn()
        .unwrap();
    during.push((reaper.add(sh), (spawning, now_s())));
    std::thread::sleep(Duration::from_secs(2));
    during.push(sleep60(&mut reaper));
    let _ = stress.wait();
    eprintln!("storm over after {:.1} s", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(500));

    let watch = ExitWatch::start();
    let stop_time = now_s();
    let (status, stderr) = interrupt(agent);
    assert!(status.success(), "agent: {status}\n{stderr}");
    let stats = final_stats(&stderr);
    eprintln!("final counters: {stats}");
    let table = read_table(&dir);
    let stale = watch.stale_in(&table);

    // Every child of ours, with its parent, command line and start time.
    for &(pid, spawned) in std::iter::once(&before).chain(&during) {
        let e = table
            .get(&pid)
            .unwrap_or_else(|| panic!("sleep {pid} is not in the dumped table"));
        assert_eq!(e["ppid"], me, "{e}");
        assert_eq!(e["cmdline"], "sleep 60", "{e}");
        // Within the spawn, give or take 1 s (the start time's conversion to wall-clock
        // time), however long the spawn took.
        let start = parse_rfc3339(e["start"].as_str().expect("a start time"));
        assert!(
            spawned.0 - 1.0 < start && start < spawned.1 + 1.0,
            "{e}: spawned between {:.3} and {:.3}",
            spawned.0,
            spawned.1
        );
    }
    assert_eq!(table[&before.0]["source"], "scan");
    assert!(!table.contains_key(&tid), "thread {tid} has a table entry");
    drop(done_tx);
    thread.join().unwrap();

    // Nothing stale: every entry is a live process with that start time, unless it exited
    // after the agent stopped (seen by our own listener).
    let lost = stats["lost_events"].as_u64().unwrap_or(0);
    for s in &stale {
        eprintln!("stale entry: {s}");
    }
    assert!(
        stale.len() as u64 <= lost,
        "{} stale entries with {lost} events lost",
        stale.len()
    );

    // Every descendant that is still alive and was started before the stop is in the table.
    for pid in descendants(me) {
        let Some((_, start, cmd)) = proc_info(pid) else {
            continue;
        };
        if start < stop_time - 0.5 {
            assert!(
                table.contains_key(&pid),
                "descendant {pid} ({cmd}) is missing"
            );
        }
    }

    // The log: JSON lines with the documented fields, the storm in it, our children's forks
    // and the exec through the shell.
    let log = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let mut kinds: HashMap<String, u64> = HashMap::new();
    let mut forked = HashSet::new();
    let mut exec_sleep = false;
    let mut thread_fork = false;
    for l in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["ts"].is_string(), "{l}");
        let ev = v["event"].as_str().unwrap().to_string();
        // The one event schema (shared with proctrace --json) and the agent's own `ppid`.
        if ev != "resync" && ev != "dropped" {
            if let Err(e) = cnbus_cli::event::check_line(&v, true, &["ppid"]) {
                panic!("{e}: {l}");
            }
            assert!(
                ev == "lost" || v["ppid"].is_null() || v["ppid"].is_u64(),
                "{l}"
            );
        }
        if ev == "fork" && v["ppid"] == me && v["thread"] == false {
            forked.insert(v["pid"].as_u64().unwrap() as u32);
        }
        if ev == "fork" && v["tid"] == tid && v["pid"] == me && v["thread"] == true {
            thread_fork = true;
        }
        if ev == "exec" && v["pid"] == during[1].0 && v["cmdline"] == "sleep 60" {
            exec_sleep = true;
        }
        *kinds.entry(ev).or_default() += 1;
    }
    eprintln!("log lines by event: {kinds:?}");
    assert!(kinds.get("fork").copied().unwrap_or(0) > 1000, "{kinds:?}");
    assert!(kinds.get("exit").copied().unwrap_or(0) > 1000, "{kinds:?}");
    for (pid, _) in &during {
        assert!(
            forked.contains(pid) || lost > 0,
            "no fork line for child {pid}"
        );
    }
    assert!(exec_sleep || lost > 0, "no exec line for the shell's sleep");
    assert!(thread_fork || lost > 0, "no thread fork line for {tid}");
    assert_eq!(
        kinds.get("lost").copied().unwrap_or(0) > 0,
        lost > 0 || stats["overruns"].as_u64().unwrap_or(0) > 0,
        "lost lines and counters disagree"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overruns_are_reported_and_survived() {
    if common::kernel_socket("overruns_are_reported_and_survived").is_none() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let dir = temp_dir("agent-overrun");
    let mut reaper = Reaper::default();
    // A tiny receive queue: the storm must overflow it.
    let agent = start_agent(&dir, &["--buffer", "4K"]);
    let mut stress = storm(3);
    std::thread::sleep(Duration::from_secs(1));
    let (child, _) = sleep60(&mut reaper);
    let _ = stress.wait();
    std::thread::sleep(Duration::from_millis(300));
    let watch = ExitWatch::start();
    let (status, stderr) = interrupt(agent);
    assert!(status.success(), "agent: {status}\n{stderr}");
    let stats = final_stats(&stderr);
    eprintln!("final counters: {stats}");
    let table = read_table(&dir);
    let stale = watch.stale_in(&table);
    assert!(
        stats["overruns"].as_u64().unwrap() > 0,
        "no overrun with a 4 KiB queue: {stats}"
    );
    assert!(stats["lost_events"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["resyncs"].as_u64().unwrap() > 0, "{stats}");
    let log = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"lost\",\"cause\":\"overrun\""));
    assert!(log.contains("\"event\":\"lost\",\"cause\":\"seq_gap\""));
    // After the resyncs the table is right despite the losses.
    let e = table.get(&child).expect("the sleep is in the table");
    assert_eq!(e["ppid"], me);
    assert_eq!(e["cmdline"], "sleep 60");
    assert!(stale.is_empty(), "stale entries: {stale:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression: the agent dropped spoofed proc events (from user-space senders on group 1)
/// without counting them; its counters line now has `spoofed` (and `decode_errors`), and the
/// loss figures say whether they are exact.
#[test]
fn spoofed_events_are_counted_not_applied() {
    use cnbus::codec::{CbId, CnMsg, DatagramBuilder};
    use cnbus::sys::{ConnectorSocket, Dest};
    if common::kernel_socket("spoofed_events_are_counted_not_applied").is_none() {
        return;
    }
    // Not beside a storm test: its stale-entry check would see this agent exit.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("agent-spoofed");
    let agent = start_agent(&dir, &[]);
    // Fake FORKs whose child pid no process can have (above pid_max's limit of 2^22).
    let fake_pid: u32 = 0x7fff_0000 | (std::process::id() & 0xffff);
    let mut data = Vec::new();
    for w in [1u32, 0] {
        data.extend_from_slice(&w.to_ne_bytes());
    }
    data.extend_from_slice(&cnbus::sys::monotonic_ns().to_ne_bytes());
    for w in [1u32, 1, fake_pid, fake_pid, 0, 0] {
        data.extend_from_slice(&w.to_ne_bytes());
    }
    let spoofer = ConnectorSocket::open().unwrap();
    const SENT: u64 = 3;
    for seq in 0..SENT as u32 {
        let mut d = DatagramBuilder::new(256).with_pid(0);
        d.push(&CnMsg::new(CbId::PROC, data.clone()).with_seq(seq, 0))
            .unwrap();
        spoofer.send(d.as_bytes(), Dest::Group(1)).unwrap();
    }
    // A real event after them: once it is in the log, the spoofs were read too.
    let (sh, _) = common::sh("exit 0");
    let events = dir.join("events.jsonl");
    let exit = format!("\"event\":\"exit\",\"pid\":{sh},");
    assert!(
        common::wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&events).is_ok_and(|l| l.contains(&exit))
        }),
        "the agent logged the shell's exit"
    );
    let (status, stderr) = interrupt(agent);
    assert!(status.success(), "agent: {status}\n{stderr}");
    let stats = final_stats(&stderr);
    // Other processes may multicast on group 1 too: at least ours.
    assert!(
        stats["spoofed"].as_u64().expect("a spoofed counter") >= SENT,
        "{stats}"
    );
    assert_eq!(stats["decode_errors"], 0, "{stats}");
    assert!(stats["lost_exact"].is_boolean(), "{stats}");
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(
        !log.contains(&format!("\"pid\":{fake_pid},")),
        "a spoofed fork was applied"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent against a real runc container: its event lines carry the enricher's fields
/// (checked by `common::runc::check`: the container id on every fork/exec/exit of the
/// container's processes except a `runc exec` program's fork, the init with ns_pid 1 in its
/// own pid namespace, one key per process, the host's runc processes with container_id
/// null, honest command lines), and its dump has them too, keyed by process_key.
#[test]
fn container_processes_are_attributed() {
    let test = "agent_container_processes_are_attributed";
    let Some((runc, busybox)) = common::runc::tools(test) else {
        return;
    };
    if common::kernel_socket(test).is_none() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("agent-runc");
    let agent = start_agent(&dir, &[]);
    let sc = common::runc::run_scenario(&runc, &busybox);
    std::thread::sleep(Duration::from_millis(500));
    let (status, stderr) = interrupt(agent);
    assert!(status.success(), "{status:?}: {stderr}");
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let recs: Vec<common::runc::Rec> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| common::runc::rec_from_json(&v))
        .collect();
    common::runc::check(&recs, &sc);

    // The dump: one row per process key, with the enricher's fields; this test process is
    // there, on the host, with its own key.
    let me = std::process::id();
    let dump = std::fs::read_to_string(dir.join("table.jsonl")).unwrap();
    let mut keys = HashSet::new();
    let mut mine = None;
    for l in dump.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for f in cnbus_cli::event::ATTRIBUTION_FIELDS {
            assert!(v.get(f).is_some(), "{f} missing: {l}");
        }
        let k = v["process_key"].as_str().expect("a key").to_string();
        assert!(keys.insert(k), "duplicate key: {l}");
        if v["pid"] == me {
            mine = Some(v);
        }
    }
    let mine = mine.expect("this test process in the dump");
    let key: cnbus::proc::ProcessKey = mine["process_key"].as_str().unwrap().parse().unwrap();
    assert_eq!(key.pid, me);
    assert!(mine["container_id"].is_null(), "{mine}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same kernel event, seen by `proctrace --json` and by the agent side by side, is the
/// same line but for each tool's own fields (proctrace's `name`, `old_name`; the agent's
/// `ppid`) and the attribution read from `/proc` at slightly different moments: same
/// fields, same values (`duration_ms` from each tool's own start time: both numbers; `ts`
/// from each tool's own reading of the wall clock: within [`TS_APART`], the kernel's
/// `timestamp_ns` equal). The
/// events are the test's own children's (a fork, an exec, a comm change, an exit with 3),
/// matched by `(cpu, seq)`. proctrace is the binary cargo built beside the agent (a
/// workspace test run builds both); without it the test fails under CI and is skipped
/// elsewhere.
/// How far apart two tools' `ts` of one kernel event may be: each converts the kernel's
/// timestamp with its own reading of the clocks' offset (a slewing NTP moves it by at most
/// 0.5 ms per second between the two readings; a preempted reading is off by the pause).
const TS_APART: f64 = 0.05;

#[test]
fn proctrace_and_the_agent_write_the_same_line_for_the_same_event() {
    if common::kernel_socket("proctrace_and_the_agent_write_the_same_line").is_none() {
        return;
    }
    let proctrace = agent_bin().with_file_name("proctrace");
    if !proctrace.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} not built (cargo test --workspace builds it)",
            proctrace.display()
        );
        eprintln!("SKIPPED: {} not built", proctrace.display());
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("agent-vs-proctrace");
    let agent = start_agent(&dir, &[]);
    let out = std::fs::File::create(dir.join("proctrace.jsonl")).unwrap();
    let mut reaper = Reaper::default();
    let pt = reaper.add(
        Command::new(&proctrace)
            .args(["--json", "--duration", "60"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // proctrace has joined the proc connector's group once /proc/net/netlink says so.
    assert!(
        common::wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string("/proc/net/netlink")
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1] == "11" && f[2] == pt.to_string() && f[3] == "00000001"
                })
        }),
        "proctrace did not subscribe"
    );
    std::thread::sleep(Duration::from_millis(100));
    let children: HashSet<u64> = (0..3)
        .map(|_| u64::from(common::sh("printf cnbus-same > /proc/self/comm; exit 3").0))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: SIGINT to our own child.
    unsafe { libc::kill(pt as i32, libc::SIGINT) };
    let status = reaper.0[0].wait().unwrap();
    assert!(status.success(), "proctrace: {status}");
    let (status, _) = interrupt(agent);
    assert!(status.success(), "agent: {status}");

    type Key = (u64, u64);
    let read = |file: &str| -> (HashMap<Key, serde_json::Value>, bool) {
        let mut lines = HashMap::new();
        let mut lost = false;
        for l in std::fs::read_to_string(dir.join(file)).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            lost |= v["event"] == "lost";
            if v["pid"].as_u64().is_some_and(|p| children.contains(&p)) {
                let key = (v["cpu"].as_u64().unwrap(), v["seq"].as_u64().unwrap());
                lines.insert(key, v);
            }
        }
        (lines, lost)
    };
    let (pt_lines, pt_lost) = read("proctrace.jsonl");
    let (agent_lines, agent_lost) = read("events.jsonl");
    let own = |tool: &str, k: &str| match tool {
        "proctrace" => k == "name" || k == "old_name",
        _ => k == "ppid",
    };
    let mut kinds = HashSet::new();
    for (key, p) in &pt_lines {
        let Some(a) = agent_lines.get(key) else {
            assert!(agent_lost, "the agent has no line for {p}");
            continue;
        };
        let fields = |v: &serde_json::Value, tool: &str| -> HashSet<String> {
            v.as_object()
                .unwrap()
                .keys()
                .filter(|k| !own(tool, k))
                .cloned()
                .collect()
        };
        assert_eq!(fields(p, "proctrace"), fields(a, "agent"), "{p}\n{a}");
        for k in fields(p, "proctrace") {
            let from_proc = cnbus_cli::event::ATTRIBUTION_FIELDS.contains(&k.as_str())
                && k != "process_key"
                && k != "parent_key";
            match k.as_str() {
                _ if from_proc => {}
                "duration_ms" => assert!(p[&k].is_f64() == a[&k].is_f64(), "{p}\n{a}"),
                // Each tool turns the kernel's timestamp (equal, checked) into wall-clock
                // time with its own reading of CLOCK_REALTIME - CLOCK_MONOTONIC, taken at its
                // own moments (NTP slews it in between): a microsecond or a few apart.
                "ts" => {
                    let (tp, ta) = (p[&k].as_str().unwrap(), a[&k].as_str().unwrap());
                    let apart = (parse_rfc3339(tp) - parse_rfc3339(ta)).abs();
                    assert!(apart <= TS_APART, "ts {apart} s apart: {p}\n{a}");
                }
                _ => assert_eq!(p[&k], a[&k], "{k}: {p}\n{a}"),
            }
        }
        kinds.insert(p["event"].as_str().unwrap().to_owned());
    }
    eprintln!(
        "compared {} events of kinds {kinds:?} (lost: proctrace {pt_lost}, agent {agent_lost})",
        pt_lines.len()
    );
    if !pt_lost {
        for want in ["fork", "exec", "comm", "exit"] {
            assert!(kinds.contains(want), "no {want} compared: {kinds:?}");
        }
    }
}
