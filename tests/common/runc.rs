//! A real container runtime for tests: runc runs busybox containers with 64-hex ids, each
//! in its own temporary bundle and runc state directory, deleted (`runc delete -f`) on drop
//! even when the test fails. Also the check of what a tracer said about the container's
//! processes, shared by the library's, proctrace's and the agent's tests.
//!
//! Needs `runc` and a static `busybox` (Debian `runc`, `busybox-static`; `.ci/run` installs
//! them). Without them a test is skipped, except under CI (`CI` set), where that is a
//! failure.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cnbus::proc::{EventKind, InfoSource, ProcessInfo};

/// The start of the argument every program the tests start in a container carries, so
/// that the container's processes are told apart without the enricher's cgroup reading;
/// each scenario appends its container id (see [`Scenario::marker`]), so that another
/// test's container running at the same time is not taken for this one's.
pub const MARKER: &str = "cnbus-enrich-marker";

pub fn tool(name: &str, paths: &[&str]) -> Option<PathBuf> {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!p.is_empty()).then(|| PathBuf::from(p))
        })
}

/// runc and a static busybox, or skip (fail under CI).
pub fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let runc = tool("runc", &["/usr/sbin/runc", "/usr/bin/runc"]);
    let busybox = tool("busybox", &["/bin/busybox", "/usr/bin/busybox"]).filter(|b| is_static(b));
    match (runc, busybox) {
        (Some(r), Some(b)) => Some((r, b)),
        (r, b) => {
            let msg = format!("{test}: runc ({r:?}) and a static busybox ({b:?}) are needed");
            if std::env::var_os("CI").is_some() {
                panic!("{msg} under CI (.ci/run installs runc and busybox-static)");
            }
            eprintln!("{msg}: SKIPPED");
            None
        }
    }
}

/// True for a 64-bit ELF without a program interpreter (`PT_INTERP`): it runs in a rootfs
/// that has no libc.
pub fn is_static(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap()) as usize)
    };
    if b.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(size), Some(num)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..num).all(|i| {
        let o = phoff + i * size;
        b.get(o..o + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

pub fn random_id() -> String {
    let mut id = String::new();
    while id.len() < 64 {
        let u = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        id.extend(u.trim().chars().filter(|c| *c != '-'));
    }
    id.truncate(64);
    id
}

/// A runc container in its own bundle and state directory; deleted on drop.
pub struct Container {
    runc: PathBuf,
    /// The bundle directory.
    pub dir: PathBuf,
    /// The 64-hex container id.
    pub id: String,
}

impl Container {
    /// Builds the bundle (busybox as the rootfs's only program) with `args` as the init.
    pub fn bundle(runc: &Path, busybox: &Path, args: &[&str]) -> Container {
        Container::bundle_with_id(runc, busybox, args, random_id())
    }

    /// [`Container::bundle`] with the given id.
    pub fn bundle_with_id(runc: &Path, busybox: &Path, args: &[&str], id: String) -> Container {
        let dir = std::env::temp_dir().join(format!("cnbus-runc-{}", &id[..12]));
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "state"] {
            let p = if d == "state" {
                dir.join(d)
            } else {
                rootfs.join(d)
            };
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for app in ["sh", "sleep", "cat", "true"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(app)).unwrap();
        }
        let c = Container {
            runc: runc.to_path_buf(),
            dir,
            id,
        };
        let st = Command::new(&c.runc)
            .args(["spec", "--bundle"])
            .arg(&c.dir)
            .status()
            .unwrap();
        assert!(st.success(), "runc spec");
        let path = c.dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["process"]["terminal"] = false.into();
        cfg["process"]["args"] = args.iter().map(|a| a.to_string()).collect();
        cfg["root"]["readonly"] = false.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        c
    }

    pub fn runc(&self) -> Command {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root")
            .arg(self.dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Runs a runc subcommand to completion; its pid (the host process that ran it).
    pub fn run(&self, args: &[&str]) -> u32 {
        let mut child = self.runc().args(args).spawn().unwrap();
        let pid = child.id();
        let st = child.wait().unwrap();
        assert!(st.success(), "runc {args:?}: {st}");
        pid
    }

    /// The init's host pid (`runc state`).
    pub fn init_pid(&self) -> u32 {
        let out = self
            .runc()
            .stdout(Stdio::piped())
            .args(["state", &self.id])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["pid"].as_u64().expect("runc state pid") as u32
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.runc().args(["delete", "-f", &self.id]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One event as a tracer reported it: what the event says, and the enricher's fields.
#[derive(Debug, Clone)]
pub struct Rec {
    /// fork, exec or exit (others are ignored by [`check`]).
    pub kind: EventKind,
    /// The process (the child of a fork).
    pub pid: u32,
    /// A thread's event (a new thread, a thread's exit).
    pub thread: bool,
    /// A fork's parent process.
    pub parent: Option<u32>,
    /// What the tracer said about the process.
    pub info: ProcessInfo,
}

/// What [`run_scenario`] did: the container's id, its init's host pid, and the host
/// processes that ran `runc`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The 64-hex container id.
    pub id: String,
    /// The init's host pid.
    pub init: u32,
    /// Host pids of the `runc` commands the test ran.
    pub host_pids: Vec<u32>,
    /// The argument its programs carry: [`MARKER`], `-`, the container id.
    pub marker: String,
}

/// Runs a container whose init forks short pipelines in a loop, three `runc exec` programs
/// (short, long and detached, short) with children of their own, then kills it and waits
/// until the init is gone (its exit event is then queued). Every program in the container
/// carries [`MARKER`].
pub fn run_scenario(runc: &Path, busybox: &Path) -> Scenario {
    run_scenario_with_id(runc, busybox, random_id())
}

/// [`run_scenario`] with a container id chosen beforehand.
pub fn run_scenario_with_id(runc: &Path, busybox: &Path, id: String) -> Scenario {
    let init_script = "while true; do /bin/sleep 0.1 | /bin/cat; done";
    let marker = format!("{MARKER}-{id}");
    let c = Container::bundle_with_id(runc, busybox, &["/bin/sh", "-c", init_script, &marker], id);
    let mut host_pids = vec![c.run(&["run", "-d", "--bundle", c.dir.to_str().unwrap(), &c.id])];
    let init = c.init_pid();
    let short = "/bin/sleep 0.3 | /bin/cat; (/bin/true); /bin/true | /bin/cat";
    host_pids.push(c.run(&["exec", &c.id, "/bin/sh", "-c", short, &marker]));
    host_pids.push(c.run(&[
        "exec",
        "-d",
        &c.id,
        "/bin/sh",
        "-c",
        "/bin/sleep 2 | /bin/cat",
        &marker,
    ]));
    host_pids.push(c.run(&[
        "exec",
        &c.id,
        "/bin/sh",
        "-c",
        "(/bin/true) | /bin/cat",
        &marker,
    ]));
    std::thread::sleep(Duration::from_millis(300));
    host_pids.push(c.run(&["kill", &c.id, "KILL"]));
    assert!(super::wait_for(Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{init}")).exists()
            || std::fs::read_to_string(format!("/proc/{init}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }));
    let id = c.id.clone();
    drop(c);
    Scenario {
        id,
        init,
        host_pids,
        marker,
    }
}

/// The inode of this process's pid namespace (the host's).
pub fn host_pidns() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            l.to_str()?
                .split_once('[')?
                .1
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .unwrap()
}

/// One process's events, from its fork (or first exec) to its exit.
struct Proc {
    pid: u32,
    events: Vec<Rec>,
    /// The container's: a marked program, or forked by one.
    mine: bool,
    /// Forked by a container process.
    forked_inside: bool,
}

/// Checks what a tracer reported (every event it saw, in order, others' included) about
/// the scenario's container:
///
/// * which processes are the container's is decided without the tracer's cgroup reading:
///   the programs exec'd with [`MARKER`] (and the init), and everything they forked; a pid
///   can be reused during the test, so each process is one record from its fork (or first
///   exec) to its exit;
/// * every fork, exec and exit of those carries the container's id and a pid namespace
///   other than the host's, **except the fork of a `runc exec` program**: runc forks it on
///   the host (with `CLONE_PARENT`) and moves it into the container's cgroup and pid
///   namespace after the fork, so at its fork it may still be on the host;
/// * one process key per process across its fork, exec and exit;
/// * the init has `ns_pid` 1 read from `/proc`;
/// * the host's `runc` processes have no container id;
/// * command lines are honest, for every process seen (not only the container's): `null`
///   exactly when the source is `exited` or `denied`; an exec's never `inherited`; after an
///   exec, the process's later events say the command line that exec read (or none).
pub fn check(recs: &[Rec], sc: &Scenario) {
    let mut procs: Vec<Proc> = Vec::new();
    let mut current: HashMap<u32, usize> = HashMap::new();
    let new = |procs: &mut Vec<Proc>, pid| {
        procs.push(Proc {
            pid,
            events: Vec::new(),
            mine: false,
            forked_inside: false,
        });
        procs.len() - 1
    };
    for r in recs {
        let info = &r.info;
        assert_eq!(
            info.cmdline.is_none(),
            matches!(info.cmdline_source, InfoSource::Exited | InfoSource::Denied),
            "{r:?}"
        );
        if r.thread {
            continue;
        }
        match r.kind {
            EventKind::Fork => {
                let parent = r.parent.unwrap();
                let inside = current.get(&parent).is_some_and(|&i| procs[i].mine);
                let i = new(&mut procs, r.pid);
                procs[i].mine = inside;
                procs[i].forked_inside = inside;
                procs[i].events.push(r.clone());
                current.insert(r.pid, i);
            }
            EventKind::Exec => {
                assert_ne!(info.cmdline_source, InfoSource::Inherited, "exec: {r:?}");
                let i = match current.get(&r.pid) {
                    Some(&i) => i,
                    None => {
                        let i = new(&mut procs, r.pid);
                        current.insert(r.pid, i);
                        i
                    }
                };
                // The program runc started in the container (runc's own command line also
                // holds the marker, but starts with runc's path).
                let marked = info.cmdline_source == InfoSource::Proc
                    && info
                        .cmdline
                        .as_deref()
                        .is_some_and(|c| c.starts_with("/bin/sh ") && c.contains(&sc.marker));
                if marked || r.pid == sc.init {
                    procs[i].mine = true;
                }
                procs[i].events.push(r.clone());
            }
            EventKind::Exit => {
                let i = current
                    .remove(&r.pid)
                    .unwrap_or_else(|| new(&mut procs, r.pid));
                procs[i].events.push(r.clone());
            }
            _ => {}
        }
    }
    // After an exec, the command line is the one that exec read.
    for p in &procs {
        let mut after_exec: Option<&ProcessInfo> = None;
        for r in &p.events {
            if let Some(x) = after_exec {
                if r.kind == EventKind::Exit {
                    assert_eq!(r.info.cmdline, x.cmdline, "{} of {}: {r:?}", r.kind, p.pid);
                    assert_eq!(r.info.cmdline_source, x.cmdline_source, "{r:?}");
                }
            }
            if r.kind == EventKind::Exec {
                after_exec = Some(&r.info);
            }
        }
    }
    let mine: Vec<&Proc> = procs.iter().filter(|p| p.mine).collect();
    let host_ns = host_pidns();
    assert!(
        mine.iter().any(|p| p.pid == sc.init),
        "the init's exec was seen"
    );
    assert!(mine.len() >= 8, "container processes seen: {}", mine.len());
    let mut checked = HashMap::<EventKind, usize>::new();
    for proc in &mine {
        let p = proc.pid;
        for r in &proc.events {
            let info = &r.info;
            if r.kind == EventKind::Fork && !proc.forked_inside && p != sc.init {
                eprintln!(
                    "runc exec process {p} at its fork: container {:?}, cgroup {:?} ({})",
                    info.container_id.is_some(),
                    info.cgroup,
                    info.cgroup_source
                );
                continue;
            }
            assert_eq!(
                info.container_id.as_deref(),
                Some(sc.id.as_str()),
                "{} of container process {p}: {info:?}",
                r.kind
            );
            assert_ne!(info.pidns, Some(host_ns), "{} of {p}", r.kind);
            *checked.entry(r.kind).or_default() += 1;
        }
        let keys: HashSet<_> = proc.events.iter().map(|r| r.info.process_key).collect();
        assert_eq!(keys.len(), 1, "keys of {p}: {keys:?}");
        assert!(!keys.contains(&None), "keys of {p}: {keys:?}");
    }
    for k in [EventKind::Fork, EventKind::Exec, EventKind::Exit] {
        assert!(
            checked.get(&k).copied().unwrap_or(0) >= 2,
            "{k} events checked: {checked:?}"
        );
    }
    let init_proc = mine.iter().find(|p| p.pid == sc.init).unwrap();
    let i = &init_proc
        .events
        .iter()
        .find(|r| r.kind == EventKind::Exec)
        .unwrap()
        .info;
    assert_eq!(i.ns_pid, Some(1), "{i:?}");
    assert_eq!(i.pidns_source, InfoSource::Proc);
    assert!(i.pidns.is_some_and(|n| n != host_ns));
    let mut host_checked = 0;
    for proc in procs.iter().filter(|p| sc.host_pids.contains(&p.pid)) {
        for r in &proc.events {
            assert_eq!(
                r.info.container_id, None,
                "{} of runc process {}",
                r.kind, proc.pid
            );
            host_checked += 1;
        }
    }
    assert!(
        host_checked > 0,
        "no event of the host's runc processes seen"
    );
    eprintln!(
        "checked {checked:?} over {} container processes, {host_checked} host events",
        mine.len()
    );
}

/// A record from a JSON event line of proctrace or the agent: `event`, `pid`, `thread`
/// (the agent) or `tid != pid` (proctrace), `parent_pid` (proctrace) or `ppid` (the agent),
/// and the enricher's fields under their own names. `None` for other lines.
pub fn rec_from_json(v: &serde_json::Value) -> Option<Rec> {
    let kind = match v["event"].as_str()? {
        "fork" | "clone" => EventKind::Fork,
        "exec" => EventKind::Exec,
        "exit" => EventKind::Exit,
        _ => return None,
    };
    let pid = v["pid"].as_u64()? as u32;
    let thread = v["event"] == "clone"
        || v["thread"].as_bool().unwrap_or(false)
        || v["tid"].as_u64().is_some_and(|t| t != u64::from(pid));
    let parent = v["parent_pid"]
        .as_u64()
        .or_else(|| v["ppid"].as_u64())
        .map(|p| p as u32);
    let info: ProcessInfo = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("no enricher fields in {v}: {e}"));
    Some(Rec {
        kind,
        pid,
        thread,
        parent,
        info,
    })
}
