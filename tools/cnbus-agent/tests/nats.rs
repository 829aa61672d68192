//! `cnbus-agent --nats` against a real nats-server (each test starts its own on 127.0.0.1,
//! with a port the server picks and a temporary store, and kills it when done; the helper is
//! cnbus-nats's own tests/common).
//!
//! The agent sees every process of the machine (other tests fork too), so the tests compare
//! the agent's own local log (`--output`) with the stream: as multisets of lines, each msg id
//! stored once. The storm is the test's own short children; that they show in the log is
//! checked too.

#[path = "../../cnbus-nats/tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{read_stream, NatsServer, Stored, DEADLINE};

/// One storm at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_cnbus-agent");
const HOST: &str = "test-host.example";
const HOST_TOKEN: &str = "test-host_example";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent publishing to `url`, its spool and its log (`--output`) in `dir`, stderr piped.
fn agent_command(dir: &std::path::Path, url: &str) -> Command {
    let mut command = Command::new(BIN);
    // --duration: a safety net should the test die without stopping it.
    command
        .args(["--duration", "600", "--nats", url])
        .arg("--spool")
        .arg(dir.join("spool"))
        .arg("--output")
        .arg(dir.join("events.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A running agent; killed if the test fails before stopping it.
struct Agent {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Its stderr so far.
    said: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Agent {
    /// Starts the agent publishing to `url`, with a local log, a stats file and a spool in a
    /// temporary directory; returns once its first line (the start resync) is in the log.
    fn start(url: &str, extra: &[&str]) -> Agent {
        let mut a = Agent::spawn(url, extra);
        a.wait_started();
        a
    }

    /// Starts the agent as [`Agent::start`] does, without waiting for anything.
    fn spawn(url: &str, extra: &[&str]) -> Agent {
        Agent::spawn_in(tempfile::tempdir().unwrap(), url, extra)
    }

    /// As [`Agent::spawn`], in `dir` (a directory an earlier agent left: its spool and log).
    fn spawn_in(dir: tempfile::TempDir, url: &str, extra: &[&str]) -> Agent {
        let mut child = agent_command(dir.path(), url)
            .args(["--interval", "0.5", "--nats-hostname", HOST])
            .args(if extra.contains(&"--shutdown-deadline") {
                &[][..]
            } else {
                &["--shutdown-deadline", "120"][..]
            })
            .arg("--stats-file")
            .arg(dir.path().join("stats.json"))
            .args(extra)
            .spawn()
            .expect("spawn the agent");
        let err = child.stderr.take().unwrap();
        let said = Arc::new(Mutex::new(String::new()));
        let stderr = {
            let said = said.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let mut s = said.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
                said.lock().unwrap_or_else(|e| e.into_inner()).clone()
            })
        };
        Agent {
            child,
            stderr: Some(stderr),
            said,
            dir,
        }
    }

    /// Waits until its first line (the start resync) is in the log.
    fn wait_started(&mut self) {
        let start = Instant::now();
        while !self.log().contains("\"reason\":\"start\"") {
            if let Ok(Some(st)) = self.child.try_wait() {
                let err = self.stderr.take().unwrap().join().unwrap_or_default();
                panic!("the agent exited early ({st}): {err}");
            }
            assert!(start.elapsed() < DEADLINE, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it wrote to stderr so far.
    fn stderr_so_far(&self) -> String {
        self.said.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The latest counters of the stats file (`None` before the first).
    fn stats(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("stats.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Polls the stats file until `f` holds.
    fn wait_stats(&self, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
        let start = Instant::now();
        loop {
            if self.stats().is_some_and(|s| f(&s)) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}: {:?}",
                self.stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: sends a signal to our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then wait: the exit status, stderr, the final counters and the local log.
    fn stop(self) -> (ExitStatus, String, serde_json::Value, Vec<String>) {
        self.signal(libc::SIGTERM);
        self.finish()
    }

    /// Waits for the exit (at most [`DEADLINE`]): as [`Agent::stop`].
    fn finish(mut self) -> (ExitStatus, String, serde_json::Value, Vec<String>) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < DEADLINE, "the agent did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.take().unwrap().join().unwrap();
        let last = stderr
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no counters on stderr:\n{stderr}"));
        let fin: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(fin["final"], true, "{last}");
        let lines = self.log().lines().map(|l| format!("{l}\n")).collect();
        (status, stderr, fin, lines)
    }
}

/// Short children spawned by two threads until stopped, at least [`Storm::MIN`] each: their
/// pids. (On a busy host the condition a test waits for can hold before a storm thread ran
/// at all: a storm of no children then proved nothing, and `children_in_log` found none.)
struct Storm {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<u32>>>,
}

impl Storm {
    /// Children each thread spawns whatever the stop flag says.
    const MIN: usize = 100;

    fn start() -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut pids = Vec::new();
                    while pids.len() < Storm::MIN || !stop.load(Ordering::Relaxed) {
                        let mut c = Command::new("/bin/true")
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("spawn /bin/true");
                        pids.push(c.id());
                        let _ = c.wait();
                    }
                    pids
                })
            })
            .collect();
        Storm { stop, threads }
    }

    fn finish(mut self) -> HashSet<u32> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The storm's children that exited in the log (each must have its exit line).
fn children_in_log(lines: &[String], children: &HashSet<u32>) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("\"event\":\"exit\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["thread"] == false)
        .filter(|v| children.contains(&(v["pid"].as_u64().unwrap() as u32)))
        .count()
}

fn multiset<'a>(it: impl IntoIterator<Item = &'a [u8]>) -> HashMap<&'a [u8], u64> {
    let mut m = HashMap::new();
    for l in it {
        *m.entry(l).or_insert(0) += 1;
    }
    m
}

/// Checks the stream against the local log: each msg id once, each stored message one of the
/// log's lines (as a multiset: `stream ⊆ local`) on its subject; returns how many local lines
/// are not in the stream.
fn compare(stored: &[Stored], local: &[String]) -> u64 {
    let _ = common::by_id(stored); // panics on a msg id stored twice
    for s in stored {
        let v: serde_json::Value = serde_json::from_slice(&s.payload).unwrap_or_else(|e| {
            panic!("{e}: {:?}", String::from_utf8_lossy(&s.payload));
        });
        let event = v["event"].as_str().unwrap();
        assert_eq!(
            s.subject,
            format!("cnbus.events.{HOST_TOKEN}.{event}"),
            "{}",
            s.msg_id
        );
        let own = ["lost", "resync", "dropped"].contains(&event);
        assert_eq!(s.msg_id.contains(".agent."), own, "{}", s.msg_id);
    }
    let mut local_set = multiset(local.iter().map(|l| l.as_bytes()));
    for (line, n) in multiset(stored.iter().map(|s| &s.payload[..])) {
        let have = local_set.get_mut(line).unwrap_or_else(|| {
            panic!(
                "stored but not in the local log: {:?}",
                String::from_utf8_lossy(line)
            )
        });
        assert!(
            *have >= n,
            "stored {n} times, {have} in the log: {:?}",
            String::from_utf8_lossy(line)
        );
        *have -= n;
    }
    local_set.values().sum()
}

fn nats(fin: &serde_json::Value, key: &str) -> u64 {
    fin["nats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no nats.{key} in {fin}"))
}

/// The agent with --nats under a storm of its own children: afterwards the stream holds
/// exactly the lines of the local log, each once, unchanged, on its subject.
#[test]
fn every_line_of_the_local_log_is_in_the_stream_exactly_once() {
    let _serial = serial();
    let server = NatsServer::start(&[]);
    let agent = Agent::start(&server.url(), &[]);
    let storm = Storm::start();
    // Until the stats show a few hundred lines acknowledged (no timed assertion).
    agent.wait_stats("acknowledged lines", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 500
    });
    let children = storm.finish();
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        children_in_log(&local, &children) > 0,
        "none of the storm's {} children in the log",
        children.len()
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let missing = compare(&stored, &local);
    assert_eq!(missing, 0, "lines of the local log not in the stream");
    assert_eq!(stored.len(), local.len());
    assert_eq!(nats(&fin, "published"), local.len() as u64, "{fin}");
    assert_eq!(nats(&fin, "acknowledged"), local.len() as u64, "{fin}");
    assert_eq!(
        (nats(&fin, "dropped"), nats(&fin, "unsent")),
        (0, 0),
        "{fin}"
    );
    assert!(stderr.contains("NATS sink: sent"), "{stderr}");
}

/// The `count`s of the log's `dropped` lines, and the drops the final warning adds (made by
/// the sink's shutdown, after the last `dropped` line).
fn dropped_reported(local: &[String], stderr: &str) -> u64 {
    let in_lines: u64 = local
        .iter()
        .filter(|l| l.contains("\"event\":\"dropped\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["count"].as_u64().unwrap()
        })
        .sum();
    let after: u64 = stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("cnbus-agent: the NATS sink dropped ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    in_lines + after
}

/// kill -9 of the server in the middle of the storm, 4 s down, restarted on the same port
/// and store: every line of the local log is in the stream once, or counted as dropped, and
/// `local = in stream + dropped` exactly.
#[test]
fn a_server_killed_mid_storm_loses_nothing_silently() {
    let _serial = serial();
    let mut server = NatsServer::start(&[]);
    let agent = Agent::start(&server.url(), &[]);
    let storm = Storm::start();
    agent.wait_stats("lines acknowledged before the kill", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 200
    });
    server.kill();
    let before = agent.log().lines().count();
    // Down for several seconds, with the storm going on (and lines written meanwhile).
    std::thread::sleep(Duration::from_secs(4));
    agent.wait_stats("the sink to notice the outage", |s| {
        s["nats"]["connected"] == false
    });
    let during = agent.log().lines().count();
    assert!(during > before, "no lines during the outage");
    server.restart();
    agent.wait_stats("the reconnection", |s| {
        s["nats"]["connected"] == true && s["nats"]["reconnects"].as_u64().unwrap_or(0) >= 1
    });
    let children = storm.finish();
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        children_in_log(&local, &children) > 0,
        "none of {} children in the log: {fin}",
        children.len()
    );
    assert!(nats(&fin, "spooled") + nats(&fin, "resent") > 0, "{fin}");
    assert_eq!(nats(&fin, "unsent"), 0, "{fin}");
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let missing = compare(&stored, &local);
    let dropped = nats(&fin, "dropped");
    assert_eq!(missing, dropped, "local - in stream = dropped: {fin}");
    assert_eq!(local.len() as u64, stored.len() as u64 + dropped);
    assert_eq!(dropped_reported(&local, &stderr), dropped, "{stderr}");
    assert_eq!(nats(&fin, "published"), local.len() as u64, "{fin}");
}

/// A stream an operator made with `max_msg_size` 300: JetStream refuses the event lines
/// (longer) for good and takes the agent's own short lines. The refused lines hold nothing
/// up, are counted (`dropped` lines, `nats.dropped` = `nats.dead_lettered`), kept unchanged
/// in the spool directory's `dead-letter.jsonl`, and said on stderr at exit: local log =
/// in stream + dead-lettered, exactly.
#[test]
fn lines_the_stream_refuses_for_good_are_kept_counted_and_reported() {
    let _serial = serial();
    let server = NatsServer::start(&[]);
    server.create_stream_with("CNBUS_EVENTS", &["cnbus.events.>"], |c| {
        c.max_message_size = 300
    });
    let mut agent = Agent::start(&server.url(), &[]);
    let storm = Storm::start();
    agent.wait_stats("lines refused and kept", |s| {
        s["nats"]["dead_lettered"].as_u64().unwrap_or(0) >= 200
            && s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 1
    });
    let children = storm.finish();
    // The agent's directory outlives it (stop drops the agent's).
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap());
    let spool = dir.path().join("spool");
    let (status, stderr, fin, _) = agent.stop();
    let local: Vec<String> = std::fs::read_to_string(dir.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        children_in_log(&local, &children) > 0,
        "none of {} children in the log: {fin}",
        children.len()
    );
    let dropped = nats(&fin, "dropped");
    assert_eq!(nats(&fin, "dead_lettered"), dropped, "{fin}");
    assert_eq!(nats(&fin, "unsent"), 0, "{fin}");
    assert_eq!(dropped_reported(&local, &stderr), dropped, "{stderr}");
    assert!(stderr.contains("dead-letter.jsonl"), "{stderr}");
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    assert_eq!(compare(&stored, &local), dropped);
    // The dead-letter file holds exactly the local lines that are not in the stream.
    let kept: Vec<String> = common::dead_letters(&spool)
        .iter()
        .map(|v| {
            assert!(v["reason"].as_str().unwrap().contains("10054"), "{v}");
            v["line"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(kept.len() as u64, dropped);
    let mut all = multiset(stored.iter().map(|s| &s.payload[..]));
    for l in &kept {
        assert!(l.len() > 300, "{l}");
        *all.entry(l.as_bytes()).or_insert(0) += 1;
    }
    assert_eq!(all, multiset(local.iter().map(|l| l.as_bytes())));

    // The operator lifts the limit and requeues the dead letters: the next start stores
    // each of them once, with its msg id and subject, and the stream holds every local line
    // of both runs (the log is appended to) exactly once.
    server.update_stream(|c| c.max_message_size = -1);
    let requeue = Command::new(BIN)
        .arg("requeue-dead-letters")
        .arg("--spool")
        .arg(&spool)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&requeue.stdout);
    assert!(requeue.status.success(), "{requeue:?}");
    assert!(
        said.contains(&format!("requeued {dropped} dead letters"))
            && said.contains("kept 0 malformed"),
        "{said}"
    );
    assert!(!spool.join(cnbus_nats::DEAD_LETTER_FILE).exists());
    let agent = Agent::spawn_in(dir, &server.url(), &[]);
    agent.wait_stats("the requeued lines sent", |s| {
        s["nats"]["replayed"].as_u64() == Some(dropped)
            && s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= dropped
    });
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(
        (
            nats(&fin, "dropped"),
            nats(&fin, "dead_lettered"),
            nats(&fin, "unsent")
        ),
        (0, 0, 0),
        "{fin}"
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    assert_eq!(compare(&stored, &local), 0);
    for l in &kept {
        assert!(
            stored.iter().any(|s| s.payload == l.as_bytes()),
            "requeued line not stored: {l}"
        );
    }
}

/// `cnbus-agent requeue-dead-letters` without a server or the kernel: a summary line
/// (requeued N, kept M malformed, and why the first is), the malformed line kept aside;
/// refused, status 1 and the dead-letter file untouched, while the spool is in use (its
/// lock held, as by a running agent) or when the directory does not exist.
#[test]
fn requeue_dead_letters_says_what_it_did_and_refuses_a_spool_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join(cnbus_nats::DEAD_LETTER_FILE);
    let record =
        r#"{"msg_id":"b.1.2.3.exec","subject":"cnbus.events.h.exec","reason":"r","line":"{}\n"}"#;
    let text = format!("{record}\n{{\"msg_id\":\n");
    std::fs::write(&dead, &text).unwrap();
    let run = |spool: &std::path::Path| {
        Command::new(BIN)
            .arg("requeue-dead-letters")
            .arg("--spool")
            .arg(spool)
            .output()
            .unwrap()
    };
    let lock = std::fs::File::open(dir.path()).unwrap();
    lock.try_lock().unwrap();
    let out = run(dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), text);
    drop(lock);
    let out = run(&dir.path().join("missing"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = run(dir.path());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains("requeued 1 dead letters")
            && said.contains("kept 1 malformed")
            && said.contains("line 2: not JSON"),
        "{said}"
    );
    assert!(!dead.exists());
    assert_eq!(
        std::fs::read(dir.path().join(cnbus_nats::DEAD_LETTER_MALFORMED_FILE)).unwrap(),
        b"{\"msg_id\":\n"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".spool")));
}

/// A 16 KiB spool during a long outage: the sink drops lines, and the count is exact: the
/// `dropped` lines (and the final counters) say how many local lines are not in the stream.
#[test]
fn a_small_spool_during_a_long_outage_drops_an_exact_count() {
    let _serial = serial();
    let mut server = NatsServer::start(&[]);
    let agent = Agent::start(&server.url(), &["--spool-max", "16K"]);
    agent.wait_stats("the first counters", |s| s["nats"]["connected"] == true);
    server.kill();
    let storm = Storm::start();
    // Long enough for the 16 KiB spool (a few dozen lines) to overflow.
    agent.wait_stats("lines dropped", |s| {
        s["nats"]["dropped"].as_u64().unwrap_or(0) >= 100
    });
    std::thread::sleep(Duration::from_secs(2));
    let children = storm.finish();
    server.restart();
    agent.wait_stats("the reconnection", |s| s["nats"]["connected"] == true);
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        children_in_log(&local, &children) > 0,
        "none of {} children in the log: {fin}",
        children.len()
    );
    assert_eq!(nats(&fin, "unsent"), 0, "{fin}");
    let dropped = nats(&fin, "dropped");
    assert!(dropped >= 100, "{fin}");
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    let missing = compare(&stored, &local);
    assert_eq!(missing, dropped, "local - in stream = dropped: {fin}");
    assert_eq!(local.len() as u64, stored.len() as u64 + dropped);
    assert!(local.iter().any(|l| l.contains("\"event\":\"dropped\"")));
    assert_eq!(dropped_reported(&local, &stderr), dropped, "{stderr}");
}

/// Runs the agent expecting it to refuse to start: its exit status and stderr.
fn refused(url: &str, extra: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent_command(dir.path(), url)
        .args(extra)
        .spawn()
        .expect("spawn the agent");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the agent started although it should not have");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// A server down at start: the documented fallback (a warning, lines spooled, `connected`
/// false with the reason), then everything delivered once the server is up.
#[test]
fn an_unreachable_server_at_start_spools_warns_and_delivers_later() {
    let _serial = serial();
    let mut server = NatsServer::start(&[]);
    server.kill();
    let agent = Agent::start(&server.url(), &[]);
    for _ in 0..20 {
        let _ = Command::new("/bin/true").status();
    }
    agent.wait_stats("lines spooled while unreachable", |s| {
        s["nats"]["connected"] == false
            && s["nats"]["spooled"].as_u64().unwrap_or(0) >= 1
            && s["nats"]["last_error"].is_string()
    });
    server.restart();
    agent.wait_stats("the connection", |s| s["nats"]["connected"] == true);
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("is not reachable at start") && stderr.contains("spooled in"),
        "{stderr}"
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    assert_eq!(compare(&stored, &local), 0, "{fin}");
    assert_eq!(stored.len(), local.len());
    assert_eq!((nats(&fin, "dropped"), nats(&fin, "unsent")), (0, 0));
}

/// Credentials the server refuses are a clear error at start (exit status 1), and the
/// secret is never echoed; the right ones deliver.
#[test]
fn wrong_credentials_are_a_clear_error_and_exit_1() {
    let _serial = serial();
    let server = NatsServer::start(&["--user", "agent", "--pass", "right-pw"]);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong-s3cret\n").unwrap();
    let wrong = wrong.to_str().unwrap();
    let (status, stderr) = refused(
        &server.url(),
        &["--nats-user", "agent", "--nats-password-file", wrong],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(!stderr.contains("wrong-s3cret"), "{stderr}");
    // No password at all: said so before connecting.
    let (status, stderr) = refused(&server.url(), &["--nats-user", "agent"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--nats-password-file"), "{stderr}");
    // The right password, from a file: delivered.
    let right = dir.path().join("right");
    std::fs::write(&right, "right-pw\n").unwrap();
    let agent = Agent::start(
        &server.url(),
        &[
            "--nats-user",
            "agent",
            "--nats-password-file",
            right.to_str().unwrap(),
        ],
    );
    agent.wait_stats("a line acknowledged", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 1
    });
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("right-pw"), "{stderr}");
    assert_eq!(nats(&fin, "acknowledged"), local.len() as u64, "{fin}");
}

/// A stream CNBUS_EVENTS that exists with other subjects: exit status 1 and why.
#[test]
fn a_stream_with_other_subjects_is_a_clear_error_and_exit_1() {
    let _serial = serial();
    let server = NatsServer::start(&[]);
    server.create_stream("CNBUS_EVENTS", &["other.>"]);
    let (status, stderr) = refused(&server.url(), &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CNBUS_EVENTS") && stderr.contains("do not cover"),
        "{stderr}"
    );
}

/// A test certificate of the sink's tests (tools/cnbus-nats/tests/tls/README.md).
fn tls_file(name: &str) -> String {
    format!(
        "{}/../cnbus-nats/tests/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A server that verifies client certificates (mutual TLS): `--nats-tls-cert/--nats-tls-key`
/// with the right certificate deliver every line; without one, or with one the server does
/// not trust, the agent says so and exits 1.
#[test]
fn a_client_certificate_delivers_and_a_missing_or_untrusted_one_is_a_clear_error() {
    let _serial = serial();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            tls_file("server.pem"),
            tls_file("server.key"),
            tls_file("client-ca.pem"),
        ),
    )
    .unwrap();
    let server = NatsServer::start(&["-c", conf.to_str().unwrap()]);
    let ca = tls_file("ca.pem");
    let tls = ["--nats-tls-required", "--nats-tls-ca", &ca];
    let (status, stderr) = refused(&server.url(), &tls);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS with NATS server"), "{stderr}");
    let (stranger, stranger_key) = (tls_file("stranger.pem"), tls_file("stranger.key"));
    let mut args = tls.to_vec();
    args.extend([
        "--nats-tls-cert",
        &stranger,
        "--nats-tls-key",
        &stranger_key,
    ]);
    let (status, stderr) = refused(&server.url(), &args);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS with NATS server"), "{stderr}");
    let (cert, key) = (tls_file("client.pem"), tls_file("client.key"));
    let mut args = tls.to_vec();
    args.extend(["--nats-tls-cert", &cert, "--nats-tls-key", &key]);
    let agent = Agent::start(&server.url(), &args);
    let storm = Storm::start();
    agent.wait_stats("acknowledged lines", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 100
    });
    let children = storm.finish();
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        children_in_log(&local, &children) > 0,
        "none of {} children in the log: {fin}",
        children.len()
    );
    let read = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.into())
        .add_client_certificate(cert.into(), key.into());
    let stored = common::read_stream_with(read, &server.url(), "CNBUS_EVENTS");
    assert_eq!(compare(&stored, &local), 0, "{fin}");
    assert_eq!(stored.len(), local.len());
    assert_eq!(nats(&fin, "acknowledged"), local.len() as u64, "{fin}");
    assert_eq!((nats(&fin, "dropped"), nats(&fin, "unsent")), (0, 0));
}

/// A test NKey of the sink's tests (tools/cnbus-nats/tests/nkey/README.md).
fn nkey_file(name: &str) -> String {
    format!(
        "{}/../cnbus-nats/tests/nkey/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// An NKey user: `--nats-nkey-file` delivers every line once; a file that holds something
/// other than a seed (a damaged one) exits 1 at start, said so, its content never printed.
#[test]
fn an_nkey_file_delivers_and_a_file_that_is_not_a_seed_is_a_clear_error_and_exit_1() {
    let _serial = serial();
    let public = std::fs::read_to_string(nkey_file("user.pub")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            public.trim()
        ),
    )
    .unwrap();
    let server = NatsServer::start(&["-c", conf.to_str().unwrap()]);
    // No credentials.
    let (status, stderr) = refused(&server.url(), &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    // Shaped like a user seed (SU..., 58 base32 characters), its checksum wrong.
    let file = dir.path().join("damaged.nk");
    let not_a_seed = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBA";
    std::fs::write(&file, format!("{not_a_seed}\n")).unwrap();
    let (status, stderr) = refused(&server.url(), &["--nats-nkey-file", file.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NKey seed is not a valid seed"), "{stderr}");
    assert!(!stderr.contains(&not_a_seed[4..20]), "{stderr}");
    // The right seed.
    let seed_file = nkey_file("user.nk");
    let seed = std::fs::read_to_string(&seed_file)
        .unwrap()
        .trim()
        .to_owned();
    let agent = Agent::start(&server.url(), &["--nats-nkey-file", &seed_file]);
    for _ in 0..20 {
        let _ = Command::new("/bin/true").status();
    }
    agent.wait_stats("acknowledged lines", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 20
    });
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains(&seed[4..20]), "{stderr}");
    let stored = common::read_stream_with(
        async_nats::ConnectOptions::with_nkey(seed),
        &server.url(),
        "CNBUS_EVENTS",
    );
    assert_eq!(compare(&stored, &local), 0, "{fin}");
    assert_eq!(stored.len(), local.len());
    assert_eq!(nats(&fin, "acknowledged"), local.len() as u64, "{fin}");
    assert_eq!((nats(&fin, "dropped"), nats(&fin, "unsent")), (0, 0));
}

/// Regression: a second SIGINT/SIGTERM during the sink's shutdown was ignored, and the agent
/// waited its whole `--shutdown-deadline` for a server that does not answer. Now it stops
/// waiting at once, and what was not sent is counted (`unsent`, kept in the spool; local =
/// sent + unsent + dropped). The server is stopped (SIGSTOP): connected, never acknowledging.
#[test]
fn a_second_signal_ends_the_shutdown_wait_and_counts_what_was_not_sent() {
    let _serial = serial();
    let server = NatsServer::start(&[]);
    let agent = Agent::start(&server.url(), &["--shutdown-deadline", "3600"]);
    agent.wait_stats("a line acknowledged", |s| {
        s["nats"]["acknowledged"].as_u64().unwrap_or(0) >= 1
    });
    server.signal(libc::SIGSTOP);
    struct Resume<'a>(&'a NatsServer);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.signal(libc::SIGCONT);
        }
    }
    let _resume = Resume(&server);
    // Lines the server will not acknowledge: our own children's.
    for _ in 0..20 {
        let _ = Command::new("/bin/true").status();
    }
    agent.wait_stats("lines waiting for the stopped server", |s| {
        s["nats"]["published"].as_u64().unwrap_or(0)
            > s["nats"]["acknowledged"].as_u64().unwrap_or(0) + 20
    });
    agent.signal(libc::SIGTERM);
    let start = Instant::now();
    while !agent.stderr_so_far().contains("sending the last") {
        assert!(
            start.elapsed() < DEADLINE,
            "the agent did not begin its shutdown: {}",
            agent.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // An operator's second Ctrl-C: it must not wait the hour out (finish waits at most
    // DEADLINE, 120 s).
    agent.signal(libc::SIGINT);
    let (status, stderr, fin, local) = agent.finish();
    assert!(status.success(), "{status}: {stderr}");
    let unsent = nats(&fin, "unsent");
    assert!(unsent > 0, "{fin}");
    assert_eq!(nats(&fin, "published"), local.len() as u64, "{fin}");
    assert_eq!(
        nats(&fin, "sent") + unsent + nats(&fin, "dropped"),
        local.len() as u64,
        "local = sent + unsent + dropped: {fin}"
    );
    assert!(
        stderr.contains(&format!(
            "{unsent} lines not acknowledged by NATS before the second signal are kept in"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "NATS sink: sent {}, unsent {unsent}",
            nats(&fin, "sent")
        )),
        "{stderr}"
    );
}

/// Regression: processes that began and ended while the sink's start waited for the server
/// (up to its 5 s connect timeout: a server that accepts the connection and says nothing)
/// were in neither the log nor the stream: the agent subscribed to the proc connector only
/// after the sink's start. Now their lines are in the log, spooled, and delivered once the
/// server is there.
#[test]
fn processes_that_ran_while_the_sink_was_connecting_are_logged_and_delivered() {
    let _serial = serial();
    let mut server = NatsServer::start(&[]);
    server.kill();
    // On the server's port, a listener that accepts and never answers.
    let silent = std::net::TcpListener::bind(("127.0.0.1", server.port)).unwrap();
    silent.set_nonblocking(true).unwrap();
    let mut agent = Agent::spawn(&server.url(), &[]);
    let start = Instant::now();
    let held = loop {
        match silent.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < DEADLINE, "the agent never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    // The sink's start is waiting for the server: our children start and end now.
    let children: HashSet<u32> = (0..3)
        .map(|_| {
            let mut c = Command::new("/bin/true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        })
        .collect();
    assert!(
        !agent.log().contains("\"reason\":\"start\""),
        "the children were not made during the sink's start (the host is too slow?)"
    );
    agent.wait_started();
    drop(held);
    drop(silent);
    server.restart();
    agent.wait_stats("the connection", |s| s["nats"]["connected"] == true);
    let (status, stderr, fin, local) = agent.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("is not reachable at start"), "{stderr}");
    assert_eq!(
        children_in_log(&local, &children),
        children.len(),
        "the children that ran during the sink's start are not in the log"
    );
    let stored = read_stream(&server.url(), "CNBUS_EVENTS");
    assert_eq!(compare(&stored, &local), 0, "{fin}");
    assert_eq!(stored.len(), local.len());
    assert_eq!((nats(&fin, "dropped"), nats(&fin, "unsent")), (0, 0));
}

/// Regression: `requeue-dead-letters` renamed each spool segment into the spool as soon as
/// it was full, so a crash while it wrote (`kill -9` here, once a second segment is begun)
/// left the records of the first ones in the spool and in the dead-letter file: the next
/// start sent them, and the requeue run again queued them a second time (stored twice once
/// the stream's duplicate window had passed). Now the segments stay `.tmp` until every
/// record is written: a crash then leaves the spool as it was, and the run again requeues
/// each record once. (Failed before the fix: `seg-00000000000000000000.spool` in the spool
/// after the kill.)
#[test]
fn a_requeue_killed_while_it_writes_leaves_the_spool_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join(cnbus_nats::DEAD_LETTER_FILE);
    const N: usize = 12_000;
    let mut text = String::new();
    for i in 0..N {
        let record = serde_json::json!({
            "msg_id": format!("b.{i}.exec"),
            "subject": "cnbus.events.h.exec",
            "reason": "r",
            "line": format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(3000)),
        });
        text += &format!("{record}\n");
    }
    std::fs::write(&dead, &text).unwrap();
    let segment_files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        v.sort();
        v
    };
    let mut child = Command::new(BIN)
        .arg("requeue-dead-letters")
        .arg("--spool")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // A second segment begun: the first is whole.
    while segment_files().len() < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the requeue ended before it could be killed"
        );
        assert!(start.elapsed() < DEADLINE, "no second segment");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = segment_files();
    assert!(
        left.iter().all(|n| n.ends_with(".spool.tmp")),
        "a killed requeue left segments in the spool: {left:?}"
    );
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), text);
    let out = Command::new(BIN)
        .arg("requeue-dead-letters")
        .arg("--spool")
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains(&format!("requeued {N} dead letters")),
        "{said}"
    );
    let left = segment_files();
    assert!(
        !left.is_empty() && left.iter().all(|n| n.ends_with(".spool")),
        "{left:?}"
    );
    assert!(!dead.exists());
}
