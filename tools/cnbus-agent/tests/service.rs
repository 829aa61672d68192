//! The systemd unit (`tools/cnbus-agent/cnbus-agent.service`) and the operator's extras:
//!
//! * the unit restarts on failure, keeps the hardening the agent needs (never a private
//!   network, user or process namespace, which would hide the connector or the processes),
//!   and `systemd-analyze verify` accepts it where systemd-analyze exists;
//! * the agent runs as an unprivileged user with exactly the unit's capability set (on
//!   Linux 6.6+: CAP_SYS_PTRACE only) and attributes another user's process fully (its pid
//!   namespace is read, not `denied`), then stops cleanly on SIGTERM;
//! * shell completions and the man page are generated from clap.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::Running;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/cnbus-agent.service");
const BIN: &str = env!("CARGO_BIN_EXE_cnbus-agent");

fn unit() -> String {
    std::fs::read_to_string(UNIT).unwrap()
}

/// The values of `key=` lines in the unit.
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_unit_restarts_on_failure_and_keeps_what_the_agent_needs() {
    let u = unit();
    assert_eq!(values(&u, "Restart"), ["on-failure"]);
    assert_eq!(values(&u, "NoNewPrivileges"), ["yes"]);
    assert_eq!(values(&u, "ProtectSystem"), ["strict"]);
    assert_eq!(values(&u, "CapabilityBoundingSet"), ["CAP_SYS_PTRACE"]);
    assert_eq!(values(&u, "AmbientCapabilities"), ["CAP_SYS_PTRACE"]);
    let families = &values(&u, "RestrictAddressFamilies")[0];
    // Netlink for the connector, IP for the NATS sink.
    for f in ["AF_NETLINK", "AF_INET", "AF_INET6"] {
        assert!(families.split_whitespace().any(|x| x == f), "{families}");
    }
    // The NATS sink's spool: the default --spool is under the state directory.
    assert_eq!(values(&u, "StateDirectory"), ["cnbus-agent"]);
    assert_eq!(values(&u, "EnvironmentFile"), ["-/etc/default/cnbus-agent"]);
    // Each of these would hide the connector (initial network namespace only) or the
    // processes the agent is there to see.
    for key in [
        "PrivateNetwork",
        "PrivateUsers",
        "ProtectProc",
        "ProcSubset",
        "User",
    ] {
        assert!(values(&u, key).is_empty(), "{key}= in the unit");
    }
    let exec = &values(&u, "ExecStart")[0];
    assert!(exec.starts_with("/usr/local/bin/cnbus-agent "), "{exec}");
    // The options it passes exist (clap rejects anything else with status 2).
    // ($CNBUS_AGENT_OPTS, from the environment file, is empty unless an operator sets it.)
    let args: Vec<&str> = exec
        .split_whitespace()
        .skip(1)
        .filter(|a| !a.starts_with('$'))
        .collect();
    assert!(exec.ends_with(" $CNBUS_AGENT_OPTS"), "{exec}");
    let st = Command::new(BIN)
        .args(&args)
        .arg("--help")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{exec} --help: {st}");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: the unit's syntax is not verified");
        return;
    }
    // verify also wants ExecStart's binary to exist: point it at the one built here.
    let dir = temp_dir("unit");
    let path = dir.join("cnbus-agent.service");
    std::fs::write(&path, u.replace("/usr/local/bin/cnbus-agent", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn temp_dir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnbus-agent-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `(major, minor)` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = r.trim().split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A copy of the agent that user `nobody` can run (the build tree may not be reachable).
fn agent_for_nobody(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("cnbus-agent");
    // Copied by cp, not std::fs::copy: a write descriptor open in this process would be
    // inherited by a child another test forks meanwhile, and exec would then fail with
    // ETXTBSY.
    let st = Command::new("cp").arg(BIN).arg(&bin).status().unwrap();
    assert!(st.success(), "cp {BIN}: {st}");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn it_runs_unprivileged_with_only_the_units_capabilities() {
    let test = "it_runs_unprivileged_with_only_the_units_capabilities";
    if common::kernel_socket(test).is_none() {
        return;
    }
    if kernel_version() < (6, 6) {
        eprintln!("{test}: SKIPPED, before Linux 6.6 the proc connector needs CAP_NET_ADMIN");
        return;
    }
    let Ok(setpriv) = which("setpriv") else {
        assert!(std::env::var_os("CI").is_none(), "{test}: setpriv missing");
        eprintln!("{test}: SKIPPED, no setpriv");
        return;
    };
    let u = unit();
    let caps: Vec<String> = values(&u, "AmbientCapabilities")[0]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let caps = caps.join(",");
    let dir = temp_dir("nobody");
    let bin = agent_for_nobody(&dir);
    let (mut r, rx, err) = Running::piped(
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps=-all,{caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg(&bin)
            .args(["--interval", "60"]),
    );
    // Subscribed and scanned: its first line is the start resync.
    let Ok(first) = rx.recv_timeout(Duration::from_secs(60)) else {
        let st = r.wait("cnbus-agent as nobody", || {});
        panic!("no output: {st}: {}", err.join().unwrap());
    };
    assert!(
        first.contains("\"reason\":\"start\""),
        "first line: {first}"
    );
    // A process of root (this test's user): its exec must be fully attributed. (One exec:
    // the spawn's; it lives long enough for its command line to be read.)
    let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let end = Instant::now() + Duration::from_secs(60);
    let exec = loop {
        let left = end.saturating_duration_since(Instant::now());
        let Ok(l) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("no exec line of the child {pid}");
        };
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["event"] == "exec" && v["pid"] == pid {
            break v;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exec["cmdline"], "/bin/sleep 30", "{exec}");
    assert_eq!(exec["cmdline_source"], "proc", "{exec}");
    assert_eq!(exec["pidns_source"], "proc", "{exec}");
    assert!(exec["pidns"].is_u64(), "{exec}");
    r.signal(libc::SIGTERM);
    let st = r.wait("cnbus-agent as nobody", || {});
    let err = err.join().unwrap();
    assert!(st.success(), "{st}: {err}");
    assert!(err.contains("\"final\":true"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn completions_and_man_page_are_generated_from_clap() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        for opt in [
            "interval",
            "stats-file",
            "dump-table",
            "recent-exits",
            "buffer",
        ] {
            assert!(text.contains(opt), "{shell} completions lack {opt}");
        }
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH cnbus-agent"), "{man}");
    for text in ["interval", "process_key", "Exit status"] {
        assert!(man.contains(text), "the man page lacks {text}");
    }
    // Hidden from the help, which documents every option and output field.
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains("completions"), "{help}");
    for text in [
        "--interval",
        "--stats-file",
        "--output",
        "--dump-table",
        "--duration",
        "--recent-exits",
        "--buffer",
        "--version",
        "cmdline_source",
        "duration_ms",
        "timestamp_ns",
        "JSON event lines",
        "dead_lettered",
        "lost_per_cpu",
        "rss_kb",
        "source (scan, fork, exec, resync)",
        "Exit status",
    ] {
        assert!(help.contains(text), "--help lacks {text}");
    }
    let v = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("cnbus-agent "));
}
