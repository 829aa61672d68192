//! The `proctrace` binary end to end: JSON output with kernel-filtered events, a clean exit
//! with its summary on SIGTERM, and the error outside the initial pid namespace.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_proctrace");

fn kernel(test: &str) -> bool {
    common::kernel_socket(test).is_some()
}

/// Waits until process `pid` has a connector socket in group 1 (`/proc/net/netlink`: the
/// first socket of a process gets the pid as its port id), then a little longer for its
/// LISTEN, which follows the join immediately.
fn wait_subscribed(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let table = std::fs::read_to_string("/proc/net/netlink").unwrap_or_default();
        let joined = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == "11" && f[2] == pid.to_string() && f[3] == "00000001"
        });
        if joined {
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("proctrace {pid} did not join the proc connector's group");
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
    let tracer = Command::new(BIN)
        .args(["--json", "--events", "exec,nonzero-exit", "--duration", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscribed(tracer.id());
    let (ok_pid, _) = common::sh("exit 0");
    let (bad_pid, _) = common::sh("exit 3");
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
            l.starts_with("{\"time\":\"") && l.ends_with('}'),
            "not a JSON object: {l}"
        );
        assert!(
            l.contains("\"event\":\"exec\"") || l.contains("\"event\":\"exit\""),
            "event outside the filter: {l}"
        );
        assert!(!l.contains("\"exit_code\":0,"), "zero exit delivered: {l}");
    }
    let bad_exit = format!("\"event\":\"exit\",\"pid\":{bad_pid},");
    let line = lines
        .iter()
        .find(|l| l.contains(&bad_exit))
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
    let drain = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 2 && (f[1] == "exec" || f[1] == "exit") && f[2] == pid {
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
    assert!(err.contains("lost: 0 (exact"), "{err}");
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
