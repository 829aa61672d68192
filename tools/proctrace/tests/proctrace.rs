//! The `proctrace` binary end to end: JSON output with kernel-filtered events, a clean exit
//! with its summary on SIGTERM, the error outside the initial pid namespace, and the exact
//! loss count of a tracer stopped during a burst (with and without a kernel filter).

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::wait_subscribed;

const BIN: &str = env!("CARGO_BIN_EXE_proctrace");

fn kernel(test: &str) -> bool {
    common::kernel_socket(test).is_some()
}

#[test]
fn help_and_usage_errors() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["--json", "--events", "--duration", "--stats"] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
    let out = Command::new(BIN)
        .args(["--events", "forks"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown event type"));
}

#[test]
fn json_lines_with_kernel_filtered_events() {
    if !kernel("json_lines_with_kernel_filtered_events") {
        return;
    }
    // Ended by SIGTERM once our children are gone, not by a --duration that a busy host
    // can use up before they even start (their events, queued by then, are printed).
    let tracer = Command::new(BIN)
        .args([
            "--json",
            "--events",
            "exec,nonzero-exit",
            "--duration",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscribed(tracer.id());
    let (ok_pid, _) = common::sh("exit 0");
    let (bad_pid, _) = common::sh("exit 3");
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let out = tracer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l.starts_with("{\"ts\":\"") && l.ends_with('}'),
            "not a JSON object: {l}"
        );
        assert!(
            l.contains("\"event\":\"exec\"") || l.contains("\"event\":\"exit\""),
            "event outside the filter: {l}"
        );
        assert!(!l.contains("\"exit_code\":0,"), "zero exit delivered: {l}");
    }
    // (Not the first exit line of that pid: a fork storm reuses pids within seconds.)
    let bad_exit = format!("\"event\":\"exit\",\"pid\":{bad_pid},");
    let line = lines
        .iter()
        .find(|l| l.contains(&bad_exit) && l.contains("\"exit_code\":3,"))
        .expect("the non-zero exit");
    assert!(line.contains("\"exit_code\":3,"), "{line}");
    assert!(line.contains("\"status\":768,"), "{line}");
    let exec = format!("\"event\":\"exec\",\"pid\":{ok_pid},");
    assert!(lines.iter().any(|l| l.contains(&exec)), "exec of {ok_pid}");
    let ok_exit = format!("\"event\":\"exit\",\"pid\":{ok_pid},");
    assert!(
        !lines.iter().any(|l| l.contains(&ok_exit)),
        "zero exit of {ok_pid}"
    );
}

#[test]
fn sigterm_ends_it_cleanly_with_the_summary() {
    if !kernel("sigterm_ends_it_cleanly_with_the_summary") {
        return;
    }
    let mut tracer = Command::new(BIN)
        .args(["--stats"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscribed(tracer.id());
    // A child with a name of its own, alive until the tracer has printed its exec (a busy
    // host's tracer lags, and a process gone before it reads /proc has no name to show);
    // SIGTERM only once the tracer has printed its exit. Its output is drained throughout
    // so that it never blocks on the pipe.
    let name = format!("cnbus-sigterm-{}", std::process::id());
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("/bin/sleep")
            .arg0(&name)
            .arg("60")
            .spawn()
            .unwrap()
    };
    let pid = child.id().to_string();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let stdout = tracer.stdout.take().unwrap();
    let child_name = name.clone();
    let drain = std::thread::spawn(move || {
        use std::io::BufRead;
        // Our child's exec names it; an exit of that pid before it is an earlier
        // process's (a fork storm reuses pids): not ours.
        let mut execd = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let f: Vec<&str> = line.split_whitespace().collect();
            let ours = if f.len() > 2 && f[1] == "exec" {
                line.contains(&child_name)
            } else {
                f.len() > 2 && f[1] == "exit" && execd
            };
            if ours && f[2] == pid {
                execd = true;
                let _ = seen_tx.send(f[1].to_string());
            }
        }
    });
    let next = || {
        seen.recv_timeout(Duration::from_secs(30))
            .expect("the tracer printed our child's events")
    };
    assert_eq!(next(), "exec");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(next(), "exit");
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    // Read stderr to its end before waiting: a busy host's table can outgrow a pipe.
    let mut err = String::new();
    tracer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = tracer.wait().unwrap();
    drain.join().unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains(" events in "), "{err}");
    // Exact, whatever it is: a busy host (a fork storm, spoofers on group 1) may overflow
    // even a 16 MiB queue while the tracer is starved.
    assert!(err.contains("lost: ") && err.contains("(exact"), "{err}");
    assert!(
        err.contains(&name),
        "per-process table lists our child {name}: {err}"
    );
    assert!(err.contains("stopped by signal 15"), "{err}");
}

#[test]
fn outside_the_initial_pid_namespace_it_says_why() {
    if !kernel("outside_the_initial_pid_namespace_it_says_why") {
        return;
    }
    let out = Command::new("unshare")
        .args(["--pid", "--fork", BIN, "--duration", "1"])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("unshare (util-linux) is needed for this test: {e}"),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("outside the initial pid namespace"), "{err}");
    assert!(err.contains("host pid"), "{err}");
}

/// Regression: run in another pid namespace with that namespace's `/proc`
/// (`--allow-foreign-namespace` under `unshare -pf --mount-proc`), proctrace read names and
/// attribution there by the events' pids, which are the initial namespace's: a host
/// process was shown as whichever process of the namespace had its number. Here a host
/// child of ours forks in a loop, and a process of the namespace is given the child's pid
/// (`ns_last_pid`, its number in the namespace): the child's forks came out named after it
/// (`"name": "sleep 1000.<pid>"`, its pid namespace, its start time in the keys). Now
/// proctrace says why and shows no names or attribution; the filters, which need them, are
/// refused (status 1). With the host's `/proc` (no `--mount-proc`), attribution stays.
#[test]
fn in_another_pid_namespaces_proc_it_reads_nothing_there() {
    let test = "in_another_pid_namespaces_proc_it_reads_nothing_there";
    if !kernel(test) {
        return;
    }
    // The kernel builds events only while a process of the initial namespaces listens.
    let _host = cnbus::proc::ProcListener::builder()
        .recv_buffer(64 << 10)
        .open()
        .unwrap();
    let mut forker = Command::new("sh")
        .args(["-c", "while :; do /bin/true; sleep 0.02; done"])
        .spawn()
        .unwrap();
    let host = forker.id();
    let marker = format!("sleep 1000.{}", std::process::id());
    let script = format!(
        "echo {} > /proc/sys/kernel/ns_last_pid; {marker} & echo \"ns pid $!\" >&2; \
         exec {BIN} --allow-foreign-namespace --json --duration 2 \"$@\"",
        host - 1
    );
    let run = |extra: &[&str]| {
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script, "sh"])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("unshare (util-linux) is needed for this test: {e}"))
    };
    let out = run(&[]);
    let refused = run(&["--host-only"]);
    let _ = forker.kill();
    let _ = forker.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{test}: {err}");
    assert!(
        err.contains(&format!("ns pid {host}\n")),
        "{test}: the namespace's process did not get pid {host}: {err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = text.lines().find(|l| l.contains(&marker)) {
        panic!("{test}: misattributed: {line}");
    }
    let mut about_host = 0;
    let mut comms = std::collections::HashSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Err(e) = cnbus_cli::event::check_line(&v, false, &["name", "old_name"]) {
            panic!("{test}: {e}: {line}");
        }
        // No name but those comm events carried (kept for the process and its children).
        if v["event"] == "comm" {
            comms.insert(v["comm"].to_string());
        }
        assert!(
            v["name"].is_null() || comms.contains(&v["name"].to_string()),
            "{test}: a name not from a comm event: {line}"
        );
        about_host += usize::from(v["pid"] == host || v["parent_pid"] == host);
    }
    assert!(about_host > 0, "{test}: no event of pid {host}: {err}");
    assert!(err.contains("belongs to another pid namespace"), "{err}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{test}: {err}");
    assert!(err.contains("cannot be applied"), "{test}: {err}");
}

/// Regression: a stdout made non-blocking by another process sharing it (`O_NONBLOCK`
/// belongs to the open pipe or terminal, and shells or runtimes such as node set it) failed
/// the first write that met a full pipe with `EAGAIN`: proctrace stopped at once, status 1,
/// "writing the events to stdout: Resource temporarily unavailable". Now it waits for the
/// reader, as with a blocking stdout. Our children's events fill the pipe (64 KiB) before
/// anything is read; then everything is read, and every line is whole JSON.
#[test]
fn a_non_blocking_stdout_is_waited_for() {
    let test = "a_non_blocking_stdout_is_waited_for";
    if !kernel(test) {
        return;
    }
    let args = ["--json", "--events", "exec,exit", "--duration", "4"];
    let (status, text, err) = common::cli::with_a_non_blocking_stdout(&BIN.into(), &args);
    assert_eq!(status.code(), Some(0), "{test}: {err}");
    assert!(text.len() > 64 << 10, "{test}: only {} bytes", text.len());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        check_json_fields(line, &v);
    }
}

/// `(Rmem, Drops)` of the connector socket whose port id is `port`, from
/// `/proc/net/netlink` (the kernel's own figures).
fn netlink_row(port: u32) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/netlink").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 8 && f[1] == "11" && f[2] == port.to_string())
            .then(|| Some((f[4].parse().ok()?, f[8].parse().ok()?)))
            .flatten()
    })
}

/// Waits until the tracer's queue is seen empty (it has read everything queued so far), for
/// at most 5 s: under a fork storm the queue may never be empty when looked at, and no
/// check depends on it (a tracer stopped by SIGTERM prints what is still queued, and the
/// loss windows below count what is left in the queue as printed, not as lost).
fn wait_drained(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while netlink_row(pid).is_some_and(|(rmem, _)| rmem > 0) {
        if std::time::Instant::now() >= deadline {
            eprintln!("proctrace {pid}: its queue was never seen empty (a busy host)");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The tail-loss scenario of issue 12: proctrace with a small queue is stopped (SIGSTOP)
/// during a burst of processes, resumed, and ended with SIGTERM. Its summary must give the
/// exact loss, from the kernel's drop counter, and that counter must equal the events (of
/// the traced kinds) a lossless reference listener saw in the same window and proctrace did
/// not print.
fn stopped_during_a_burst(
    test: &str,
    events: &str,
    set: cnbus::proc::EventSet,
    term_at_once: bool,
) {
    use cnbus::sys::monotonic_ns;
    use std::collections::BTreeSet;

    if !kernel(test) {
        return;
    }
    // One burst at a time: each would overflow the other's tracer outside its window.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let reference = common::Reference::start();
    let out_path = std::env::temp_dir().join(format!("cnbus-{test}-{}.jsonl", std::process::id()));
    let mut tracer = Command::new(BIN)
        .args(["--json", "--stats", "--events", events, "--buffer", "128K"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = tracer.id();
    wait_subscribed(pid);
    wait_drained(pid);
    let from = monotonic_ns();
    let (_, drops_before) = netlink_row(pid).unwrap();
    // SAFETY: stops and resumes our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    for _ in 0..400 {
        Command::new("/bin/true").status().unwrap();
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    // The window ends before the SIGTERM: proctrace sends IGNORE once it stops, and what
    // the kernel sends after that is not for it.
    let (to, drops) = if term_at_once {
        // Terminated with its queue still full: it must print what had reached it before
        // the stop (ProcListener::drain_queued), not drop it uncounted.
        // Its queue is still full, so the kernel keeps dropping: the counter is read
        // first, so that no drop it counts falls after the window's end.
        let (_, drops) = netlink_row(pid).unwrap();
        let to = monotonic_ns();
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        (to, drops)
    } else {
        wait_drained(pid);
        let to = monotonic_ns();
        let (_, drops) = netlink_row(pid).unwrap();
        // No process of ours after the burst; proctrace prints what it still had queued.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        (to, drops)
    };
    let status = tracer.wait().unwrap();
    let mut err = String::new();
    tracer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let (seen, rstats) = reference.finish();
    assert!(status.success(), "{status:?}: {err}");
    let text = std::fs::read_to_string(&out_path).unwrap();
    let _ = std::fs::remove_file(&out_path);
    assert!(
        drops > drops_before,
        "the burst overflowed the queue: {err}"
    );
    // The summary: the exact figure, from the kernel's count for the socket (less the
    // user-space multicasts on group 1 a witness socket knows were dropped with the
    // events); or, when some of those may still be in it, a range, not called exact.
    let lost_at = err.find("lost: ").expect("a loss figure") + "lost: ".len();
    let figure = &err[lost_at..];
    let num = |s: &str| -> u64 {
        s.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The kernel's counter at the end: at least what /proc/net/netlink said after the
    // window (more if the host overflowed the queue again before SIGTERM).
    let sources = "loss sources: kernel drop counter ";
    let at = err
        .find(sources)
        .unwrap_or_else(|| panic!("no {sources:?} in:\n{err}"));
    let final_drops = num(&err[at + sources.len()..]);
    assert!(final_drops >= drops, "{err}");
    let after = final_drops - drops;
    let (lo, hi, is_exact) = if figure.contains("(exact, kernel drop counter") {
        let n = num(figure);
        (n, n, true)
    } else {
        let range = figure
            .strip_prefix("between ")
            .unwrap_or_else(|| panic!("neither exact nor a range:\n{err}"));
        assert!(range.contains("(not exact: user-space senders"), "{err}");
        let hi = num(range.split(" and ").nth(1).unwrap());
        (num(range), hi, false)
    };
    assert!(hi <= final_drops, "{err}");
    // Against the reference, over the window in which proctrace could lose anything.
    let printed: BTreeSet<(u32, u32)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] != "lost")
        .map(|v| {
            (
                v["cpu"].as_u64().unwrap() as u32,
                v["seq"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    if rstats.lost() != Some(0) {
        eprintln!("{test}: the reference lost events too ({rstats:?}); cross-check skipped");
        return;
    }
    let window = seen
        .iter()
        .filter(|(k, e)| (from..to).contains(&e.timestamp_ns) && !printed.contains(*k));
    let (mut missed, mut acks) = (0u64, 0u64);
    for (_, e) in window {
        if e.is_ack() {
            // proctrace does not print ACKs: one it received looks missed here.
            acks += u64::from(set == cnbus::proc::EventSet::ALL);
        } else if set.matches(e) {
            missed += 1;
        }
    }
    let counted = drops - drops_before;
    eprintln!("{test}: kernel drops {counted}, missed events {missed}, unprinted ACKs {acks}");
    eprintln!(
        "{test}: reported {lo}..={hi} (exact: {is_exact}), before the window {drops_before}, \
         after it {after}"
    );
    // Loss before and after the window (normally none) is in the figures too.
    assert!(
        lo <= missed + acks + drops_before + after && missed <= hi,
        "reported {lo}..={hi} vs {missed} events (+ up to {acks} ACKs) the reference saw and proctrace did not print\n{err}"
    );
    // proctrace ends with ProcListener::finish (IGNORE, then the queue read empty), so the
    // user-space multicasts among the kernel's drops are settled and the figure is exact.
    assert!(is_exact, "{err}");
    if drops_before == 0 && after == 0 {
        assert!(
            (missed..=missed + acks).contains(&lo),
            "exact figure {lo} vs {missed} events (+ up to {acks} ACKs) missed\n{err}"
        );
    }
}

#[test]
fn stopped_during_a_burst_it_reports_the_exact_loss() {
    stopped_during_a_burst(
        "stopped_during_a_burst_it_reports_the_exact_loss",
        "all",
        cnbus::proc::EventSet::ALL,
        false,
    );
}

/// Regression: proctrace stopped on SIGTERM with events still queued discarded them, and
/// its summary said `lost: N (exact...)` with N below what it failed to print.
#[test]
fn terminated_with_a_full_queue_it_prints_what_reached_it_and_reports_the_exact_loss() {
    stopped_during_a_burst(
        "terminated_with_a_full_queue_it_prints_what_reached_it_and_reports_the_exact_loss",
        "all",
        cnbus::proc::EventSet::ALL,
        true,
    );
}

#[test]
fn stopped_during_a_burst_with_a_kernel_filter_it_reports_the_exact_loss() {
    stopped_during_a_burst(
        "stopped_during_a_burst_with_a_kernel_filter_it_reports_the_exact_loss",
        "exit",
        cnbus::proc::EventSet::EXIT,
        false,
    );
}

/// A proctrace writing to a file (a pipe could fill up while the test is busy elsewhere).
struct Traced {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Traced {
    fn start(args: &[&str], tag: &str) -> Traced {
        let out =
            std::env::temp_dir().join(format!("cnbus-proctrace-{}-{tag}.out", std::process::id()));
        let child = Command::new(BIN)
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_subscribed(child.id());
        Traced { child, out }
    }

    /// Lets it read what is queued, stops it; its output lines.
    fn finish(mut self) -> Vec<String> {
        wait_drained(self.child.id());
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(status.success(), "{status:?}: {err}");
        eprintln!("{err}");
        let text = std::fs::read_to_string(&self.out).unwrap();
        let _ = std::fs::remove_file(&self.out);
        text.lines().map(String::from).collect()
    }
}

/// proctrace against a real runc container: its JSON lines carry the enricher's fields
/// (checked by `common::runc::check`: container id on every fork/exec/exit of the
/// container's processes except a `runc exec` program's fork, init with ns_pid 1 in its
/// own pid namespace, one key per process, host processes with container_id null, honest
/// command lines), and the container filters and the text output's container column work.
#[test]
fn container_processes_are_attributed_and_filtered() {
    let test = "container_processes_are_attributed_and_filtered";
    let Some((runc, busybox)) = common::runc::tools(test) else {
        return;
    };
    if !kernel(test) {
        return;
    }
    let id = common::runc::random_id();
    let all = Traced::start(&["--json", "-e", "fork,exec,exit", "--stats"], "all");
    let by_id = Traced::start(&["--json", "--container", &id[..12]], "by-id");
    let host = Traced::start(&["--json", "--host-only", "-e", "exec"], "host");
    let text = Traced::start(&["--containers-only", "-e", "exec,exit"], "text");
    let sc = common::runc::run_scenario_with_id(&runc, &busybox, id.clone());

    let recs: Vec<common::runc::Rec> = all
        .finish()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| common::runc::rec_from_json(&v))
        .collect();
    common::runc::check(&recs, &sc);

    // --container PREFIX: only the container's processes, and all kinds of their events.
    let lines = by_id.finish();
    let mut kinds = std::collections::HashSet::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["event"] == "lost" {
            continue;
        }
        assert_eq!(v["container_id"], id.as_str(), "{l}");
        kinds.insert(v["event"].as_str().unwrap().to_string());
    }
    for k in ["fork", "exec", "exit"] {
        assert!(kinds.contains(k), "no {k} in --container output: {kinds:?}");
    }

    // --host-only: no container process; the host's runc processes are there.
    let lines = host.finish();
    let mut runc_seen = false;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["event"] == "lost" {
            continue;
        }
        assert!(v["container_id"].is_null(), "{l}");
        runc_seen |= v["pid"]
            .as_u64()
            .is_some_and(|p| sc.host_pids.contains(&(p as u32)));
    }
    assert!(runc_seen, "no exec of the host's runc commands");

    // Text with --containers-only: a header with the container column, then each line
    // with the short id.
    let lines = text.finish();
    assert!(lines[0].ends_with(" process") && !lines[0].contains("container"));
    assert!(lines.len() > 2, "{lines:?}");
    assert!(lines[1].contains(" container    process"), "{}", lines[1]);
    // Every line is some container's (another test's container may run meanwhile), and
    // ours are among them.
    let mut ours = 0;
    for l in &lines[2..] {
        if l.contains(" lost ") {
            continue;
        }
        let short = l
            .split_whitespace()
            .find(|w| w.len() == 12 && w.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(short.is_some(), "no container column: {l}");
        ours += usize::from(short == Some(&id[..12]));
    }
    assert!(ours > 0, "none of our container's lines: {lines:?}");
}

/// The `--json` fields: the one event schema both tools write (docs/AGENT.md, "JSON event
/// lines"; checked by `cnbus_cli::event::check_line`, which the agent's tests use too), with
/// the enricher's fields, and proctrace's own `name` (on every event line) and `old_name`
/// (comm lines only).
fn check_json_fields(line: &str, v: &serde_json::Value) {
    if let Err(e) = cnbus_cli::event::check_line(v, true, &["name", "old_name"]) {
        panic!("{e}: {line}");
    }
    if v["event"] == "lost" {
        return;
    }
    assert!(v["name"].is_null() || v["name"].is_string(), "{line}");
    assert_eq!(
        v.get("old_name").is_some(),
        v["event"] == "comm",
        "old_name on comm lines only: {line}"
    );
}

/// Every line of a `--json` run is valid JSON (parsed with serde_json, never skipped) with
/// the fields docs/PROC.md lists, for every kind of event this test can make: fork, clone,
/// exec, exit, comm, sid, coredump, uid, gid, ptrace (the last three when setpriv and
/// strace are installed); and a process name and command line full of bytes JSON must
/// escape (quotes, backslashes, control characters, invalid UTF-8) come out escaped and
/// decoded as the kernel had them (invalid UTF-8 as U+FFFD).
#[test]
fn json_lines_of_every_kind_are_valid_json_with_the_documented_fields() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    if !kernel("json_lines_of_every_kind_are_valid_json_with_the_documented_fields") {
        return;
    }
    let tag = format!("odd{}", std::process::id());
    let traced = Traced::start(&["--json"], "every-kind");
    // An exec with an odd argv[0] and argument; the shell then renames itself (comm) to
    // odd bytes and exits with 3.
    let argv0 = [b"x\"q\\\n\t\x01\x7f\xff", tag.as_bytes()].concat();
    // It waits on its stdin until proctrace has printed its exec (so that its command
    // line was read while it was alive).
    let mut odd = Command::new("/bin/sh");
    odd.arg0(std::ffi::OsStr::from_bytes(&argv0))
        .arg("-c")
        .arg("printf 'c\\001\"\\\\\\377' > /proc/self/comm; read x; exit 3")
        .arg(std::ffi::OsStr::from_bytes(b"arg\xe2\x82\"end"))
        .stdin(Stdio::piped());
    let odd_pid = {
        let mut c = odd.spawn().unwrap();
        let pid = c.id();
        let exec = format!("\"event\":\"exec\",\"pid\":{pid},");
        let printed = common::wait_for(Duration::from_secs(60), || {
            std::fs::read_to_string(&traced.out).is_ok_and(|t| t.contains(&exec))
        });
        assert!(printed, "proctrace printed no exec of {pid}");
        drop(c.stdin.take());
        assert_eq!(c.wait().unwrap().code(), Some(3));
        pid
    };
    // A thread of this process (clone), and its exit.
    std::thread::spawn(|| ()).join().unwrap();
    common::sh("setsid /bin/true");
    common::sh("ulimit -c 0; kill -SEGV $$");
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let (setpriv, strace) = (have("setpriv"), have("strace"));
    if setpriv {
        common::sh("setpriv --reuid=65534 --regid=65534 --clear-groups /bin/true");
    }
    if strace {
        common::sh("strace -o /dev/null /bin/true");
    }
    let lines = traced.finish();
    let mut kinds = std::collections::BTreeSet::new();
    let (mut odd_exec, mut odd_comm) = (false, false);
    let me = std::process::id();
    // The odd process's lines are those from our fork of it to its exit: a fork storm
    // reuses its pid within seconds, before and after.
    let mut odd_alive = false;
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        check_json_fields(l, &v);
        kinds.insert(v["event"].as_str().unwrap_or_default().to_string());
        if v["event"] == "fork" && v["thread"] == true {
            kinds.insert("thread fork".to_string());
        }
        if v["pid"] != odd_pid {
            continue;
        }
        if v["event"] == "fork" && v["parent_pid"] == me && v["thread"] == false {
            odd_alive = true;
        }
        if v["event"] == "exit" || !odd_alive {
            odd_alive = false;
            continue;
        }
        if v["event"] == "exec" {
            let cmdline = v["cmdline"]
                .as_str()
                .expect("the odd process's command line");
            assert_eq!(
                cmdline,
                format!(
                    "x\"q\\\n\t\u{1}\u{7f}\u{fffd}{tag} -c printf 'c\\001\"\\\\\\377' > /proc/self/comm; read x; exit 3 arg\u{fffd}\"end"
                ),
                "{l}"
            );
            assert_eq!(v["name"], v["cmdline"], "{l}");
            odd_exec = true;
        }
        if v["event"] == "comm" {
            assert_eq!(v["comm"], "c\u{1}\"\\\u{fffd}", "{l}");
            odd_comm = true;
        }
    }
    assert!(
        odd_exec && odd_comm,
        "the odd process's exec and comm lines"
    );
    // ("thread fork": a fork with thread true, the text output's `clone`.)
    let mut want = vec![
        "fork",
        "thread fork",
        "exec",
        "exit",
        "comm",
        "sid",
        "coredump",
    ];
    if setpriv {
        want.extend(["uid", "gid"]);
    }
    if strace {
        want.push("ptrace");
    }
    for k in want {
        assert!(kinds.contains(k), "no {k} line: {kinds:?}");
    }
}

/// The `lost` lines too are valid JSON with their documented fields: proctrace with a
/// tiny queue stopped during a burst.
#[test]
fn json_lost_lines_are_valid_json_with_the_documented_fields() {
    if !kernel("json_lost_lines_are_valid_json_with_the_documented_fields") {
        return;
    }
    let traced = Traced::start(&["--json", "--buffer", "4K"], "lost-lines");
    let pid = traced.child.id() as i32;
    // SAFETY: stops and resumes our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for _ in 0..300 {
        Command::new("/bin/true").status().unwrap();
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Events after the overflow reveal the gaps.
    for _ in 0..50 {
        Command::new("/bin/true").status().unwrap();
    }
    let lines = traced.finish();
    let mut lost = 0;
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        check_json_fields(l, &v);
        lost += usize::from(v["event"] == "lost");
    }
    assert!(lost > 0, "no lost line after an overflow of a 4K queue");
}
