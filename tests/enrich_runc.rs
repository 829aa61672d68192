//! The enricher against a real container runtime: runc runs busybox containers with 64-hex
//! ids; a listener + enricher watches their processes.
//!
//! Needs `runc` and a static `busybox` (Debian `runc`, `busybox-static`; `.ci/run` installs
//! them). Without them the test is skipped, except under CI (`CI` set), where that is a
//! failure. Each container lives in its own temporary bundle and runc state directory and is
//! deleted (`runc delete -f`) even when the test fails.
//!
//! Which processes are the container's is decided without the enricher's cgroup reading:
//! the container's programs carry a marker argument (`cnbus-enrich-marker`), and every
//! process forked by one of them is the container's too.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnbus::proc::{
    Enricher, EventBody, EventKind, EventSet, ProcEvent, ProcListener, ProcessInfo, Received,
    Source,
};
use common::kernel_socket;

const MARKER: &str = "cnbus-enrich-marker";

fn tool(name: &str, paths: &[&str]) -> Option<PathBuf> {
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
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
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
fn is_static(path: &Path) -> bool {
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

fn random_id() -> String {
    let mut id = String::new();
    while id.len() < 64 {
        let u = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        id.extend(u.trim().chars().filter(|c| *c != '-'));
    }
    id.truncate(64);
    id
}

/// A runc container in its own bundle and state directory; deleted on drop.
struct Container {
    runc: PathBuf,
    dir: PathBuf,
    id: String,
}

impl Container {
    /// Builds the bundle (busybox as the rootfs's only program) with `args` as the init.
    fn bundle(runc: &Path, busybox: &Path, args: &[&str]) -> Container {
        let id = random_id();
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

    fn runc(&self) -> Command {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root")
            .arg(self.dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Runs a runc subcommand to completion; its pid (the host process that ran it).
    fn run(&self, args: &[&str]) -> u32 {
        let mut child = self.runc().args(args).spawn().unwrap();
        let pid = child.id();
        let st = child.wait().unwrap();
        assert!(st.success(), "runc {args:?}: {st}");
        pid
    }

    /// The init's host pid (`runc state`).
    fn init_pid(&self) -> u32 {
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

/// One process's events, from its fork (or first exec) to its exit.
struct Proc {
    pid: u32,
    events: Vec<(ProcEvent, ProcessInfo)>,
    /// The container's: a marked program, or forked by one.
    mine: bool,
    /// Forked by a container process.
    forked_inside: bool,
}

impl Proc {
    fn new(pid: u32) -> Proc {
        Proc {
            pid,
            events: Vec::new(),
            mine: false,
            forked_inside: false,
        }
    }
}

/// Every event with what the enricher said, from a listener thread, until stopped.
struct Recorder {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(ProcEvent, ProcessInfo)>>,
}

impl Recorder {
    fn start(mut l: ProcListener) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut e = Enricher::new();
            let mut got = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match l.recv_timeout(Some(Duration::from_millis(50))).unwrap() {
                    Some(Received::Event(ev)) => {
                        if let Some(info) = e.enrich(&ev) {
                            got.push((ev, info));
                        }
                    }
                    Some(Received::Lost(loss)) => {
                        eprintln!("note: {loss:?}");
                        e.note_loss();
                    }
                    None => {}
                }
            }
            eprintln!("enricher: {:?}", e.stats());
            got
        });
        Recorder { stop, thread }
    }

    fn finish(self) -> Vec<(ProcEvent, ProcessInfo)> {
        // Let the last events arrive.
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn container_processes_carry_their_container_id() {
    let Some((runc, busybox)) = tools("runc_container") else {
        return;
    };
    if kernel_socket("runc_container").is_none() {
        return;
    }
    let l = ProcListener::builder()
        .events(EventSet::FORK | EventSet::EXEC | EventSet::EXIT)
        .open()
        .unwrap();
    let rec = Recorder::start(l);
    // Init: a loop forking short pipelines inside the container.
    let init_script = "while true; do /bin/sleep 0.1 | /bin/cat; done";
    let c = Container::bundle(&runc, &busybox, &["/bin/sh", "-c", init_script, MARKER]);
    let mut host_pids = vec![c.run(&["run", "-d", "--bundle", c.dir.to_str().unwrap(), &c.id])];
    let init = c.init_pid();
    // A short process with short children, a long one (detached), another short one.
    let short = "/bin/sleep 0.3 | /bin/cat; (/bin/true); /bin/true | /bin/cat";
    host_pids.push(c.run(&["exec", &c.id, "/bin/sh", "-c", short, MARKER]));
    host_pids.push(c.run(&[
        "exec",
        "-d",
        &c.id,
        "/bin/sh",
        "-c",
        "/bin/sleep 2 | /bin/cat",
        MARKER,
    ]));
    host_pids.push(c.run(&[
        "exec",
        &c.id,
        "/bin/sh",
        "-c",
        "(/bin/true) | /bin/cat",
        MARKER,
    ]));
    std::thread::sleep(Duration::from_millis(300));
    host_pids.push(c.run(&["kill", &c.id, "KILL"]));
    // Wait for the init to be gone (its exit event is then queued).
    assert!(common::wait_for(Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{init}")).exists()
            || std::fs::read_to_string(format!("/proc/{init}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }));
    let id = c.id.clone();
    drop(c);
    let evs = rec.finish();

    // The container's processes: the marked programs and everything they forked. A pid can
    // be reused during the test (other tests fork constantly), so each process is one
    // record from its fork (or first exec) to its exit.
    let mut procs: Vec<Proc> = Vec::new();
    let mut current: HashMap<u32, usize> = HashMap::new();
    for (ev, info) in &evs {
        let item = (*ev, info.clone());
        match ev.body {
            EventBody::Fork { parent, child } if !child.is_thread() => {
                let inside = current.get(&parent.tgid).is_some_and(|&i| procs[i].mine);
                procs.push(Proc {
                    pid: child.tgid,
                    events: vec![item],
                    mine: inside,
                    forked_inside: inside,
                });
                current.insert(child.tgid, procs.len() - 1);
            }
            EventBody::Exec { process } => {
                let i = *current.entry(process.tgid).or_insert_with(|| {
                    procs.push(Proc::new(process.tgid));
                    procs.len() - 1
                });
                // The program runc started in the container (runc's own command line also
                // holds the marker, but starts with runc's path).
                let marked = info.cmdline_source == Source::Proc
                    && info
                        .cmdline
                        .as_deref()
                        .is_some_and(|c| c.starts_with("/bin/sh ") && c.contains(MARKER));
                if marked || process.tgid == init {
                    procs[i].mine = true;
                }
                procs[i].events.push(item);
            }
            EventBody::Exit { process, .. } if !process.is_thread() => {
                let i = current.remove(&process.tgid).unwrap_or_else(|| {
                    procs.push(Proc::new(process.tgid));
                    procs.len() - 1
                });
                procs[i].events.push(item);
            }
            _ => {}
        }
    }
    let mine: Vec<&Proc> = procs.iter().filter(|p| p.mine).collect();
    let host_ns: u64 = std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            l.to_str()?
                .split_once('[')?
                .1
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(
        mine.iter().any(|p| p.pid == init),
        "the init's exec was seen"
    );
    assert!(mine.len() >= 8, "container processes seen: {}", mine.len());

    let mut checked = HashMap::<EventKind, usize>::new();
    for proc in &mine {
        let p = proc.pid;
        for (ev, info) in &proc.events {
            // A `runc exec` process is forked by runc (CLONE_PARENT) on the host and moved
            // into the container's cgroup afterwards: its fork may say the host's cgroup.
            // Every other fork, exec and exit of the container's processes says the
            // container.
            if ev.kind() == EventKind::Fork && !proc.forked_inside && p != init {
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
                Some(id.as_str()),
                "{} of container process {p}: {info:?}",
                ev.kind()
            );
            assert_ne!(info.pidns, Some(host_ns), "{} of {p}", ev.kind());
            *checked.entry(ev.kind()).or_default() += 1;
        }
        // One key per process across its fork, exec and exit.
        let keys: HashSet<_> = proc.events.iter().map(|(_, i)| i.process_key).collect();
        assert_eq!(keys.len(), 1, "keys of {p}: {keys:?}");
    }
    for k in [EventKind::Fork, EventKind::Exec, EventKind::Exit] {
        assert!(
            checked.get(&k).copied().unwrap_or(0) >= 2,
            "{k} events checked: {checked:?}"
        );
    }
    // The init: pid 1 in its own pid namespace.
    let init_proc = mine.iter().find(|p| p.pid == init).unwrap();
    let (_, i) = init_proc
        .events
        .iter()
        .find(|(ev, _)| ev.kind() == EventKind::Exec)
        .unwrap();
    assert_eq!(i.ns_pid, Some(1), "{i:?}");
    assert_eq!(i.pidns_source, Source::Proc);
    assert!(i.pidns.is_some_and(|n| n != host_ns));
    // The host processes that ran runc are not in the container.
    for proc in procs.iter().filter(|p| host_pids.contains(&p.pid)) {
        for (ev, info) in &proc.events {
            assert_eq!(
                info.container_id,
                None,
                "{} of runc process {}",
                ev.kind(),
                proc.pid
            );
        }
    }
    eprintln!(
        "checked {checked:?} over {} container processes",
        mine.len()
    );
}
