//! The enricher against a real container runtime: runc runs busybox containers with 64-hex
//! ids; a listener + enricher watches their processes. The container, the scenario and the
//! checks are in `tests/common/runc.rs` (shared with proctrace's and the agent's tests).
//!
//! Needs `runc` and a static `busybox` (Debian `runc`, `busybox-static`; `.ci/run` installs
//! them). Without them the test is skipped, except under CI (`CI` set), where that is a
//! failure.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnbus::proc::{Enricher, EventBody, EventSet, ProcListener, Received};
use common::kernel_socket;
use common::runc::{check, run_scenario, tools, Container, Rec};

/// Every fork, exec and exit with what the enricher said, from a listener thread, until
/// stopped.
struct Recorder {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Rec>>,
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
                        let Some(info) = e.enrich(&ev) else {
                            continue;
                        };
                        let task = ev.task().unwrap();
                        let parent = match ev.body {
                            EventBody::Fork { parent, .. } => Some(parent.tgid),
                            _ => None,
                        };
                        got.push(Rec {
                            kind: ev.kind(),
                            pid: task.tgid,
                            thread: task.is_thread(),
                            parent,
                            info,
                        });
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

    fn finish(self) -> Vec<Rec> {
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
    let sc = run_scenario(&runc, &busybox);
    check(&rec.finish(), &sc);
}

/// Every cgroup mount point (v1 hierarchies and v2).
fn cgroup_mounts() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| f[1].to_string())
        })
        .collect()
}

/// The cgroup shapes runtimes give their containers, made real by runc's cgroupfs driver
/// (which takes `cgroupsPath` as it is, as containerd does under a systemd kubelet when
/// `SystemdCgroup` is off): the enricher finds the container id in what `/proc` shows.
#[test]
fn runtime_cgroup_shapes_give_the_container_id() {
    let Some((runc, busybox)) = tools("runc_shapes") else {
        return;
    };
    let top = format!("/cnbus-shapes-{}", std::process::id());
    let uid = "2a9b7d4e_1c3f_4e5a_9b8c_7d6e5f4a3b2c";
    let mut seen = Vec::new();
    for (i, shape) in [
        // containerd without SystemdCgroup under a systemd kubelet (k3s).
        "kubepods-besteffort-pod{uid}.slice:cri-containerd:{id}",
        // nerdctl's and crun's systemd units, Docker in Docker.
        "system.slice/nerdctl-{id}.scope",
        "machine.slice/crun-{id}.scope",
        "docker/{outer}/docker/{id}",
        "kubepods/burstable/pod{uid}/crio-{id}",
    ]
    .iter()
    .enumerate()
    {
        let c = Container::bundle(&runc, &busybox, &["sleep", "100"]);
        let outer = "f".repeat(64);
        let rel = shape
            .replace("{uid}", uid)
            .replace("{id}", &c.id)
            .replace("{outer}", &outer);
        let path = format!("{top}/{i}/{rel}");
        let cfg_path = c.dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["linux"]["cgroupsPath"] = path.clone().into();
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        c.run(&["run", "-d", "--bundle", c.dir.to_str().unwrap(), &c.id]);
        let init = c.init_pid();
        let info = Enricher::new().process(init);
        let id = c.id.clone();
        drop(c);
        // runc removes the container's cgroup, not the parents it made.
        for root in cgroup_mounts() {
            let mut p = format!("{root}{path}");
            while p.len() > root.len() + top.len() {
                let _ = std::fs::remove_dir(&p);
                p.truncate(p.rfind('/').unwrap_or(0));
            }
        }
        seen.push((path, id, info));
    }
    for root in cgroup_mounts() {
        let _ = std::fs::remove_dir(format!("{root}{top}"));
    }
    for (path, id, info) in seen {
        assert_eq!(
            info.container_id.as_deref(),
            Some(id.as_str()),
            "{path}: {info:?}"
        );
        assert_eq!(info.cgroup.as_deref(), Some(path.as_str()));
    }
}
