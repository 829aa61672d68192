//! The enricher's rules on a fake `/proc` (a temporary directory laid out like it).

use std::path::PathBuf;

use super::*;
use crate::proc::event::{Comm, ExitStatus, Task};

const ID: &str = "24401a492a2b41ba4d959b037c9eacc1a86c80f39f2af0193746b9afb7debd29";
/// A container's pid namespace inode (any number other than the initial one).
const CONTAINER_NS: u64 = 4026532180;

struct FakeProc {
    root: PathBuf,
}

impl FakeProc {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "cnbus-enrich-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        FakeProc { root }
    }

    /// A process directory with stat, cmdline, comm, cgroup, status and ns/pid.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        pid: u32,
        ppid: u32,
        start: u64,
        cmdline: &[u8],
        cgroup: &str,
        ns: u64,
        nspid: u32,
    ) {
        let d = self.root.join(pid.to_string());
        std::fs::create_dir_all(d.join("ns")).unwrap();
        let stat = format!(
            "{pid} (odd) comm) S {ppid} 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 10 0\n"
        );
        std::fs::write(d.join("stat"), stat).unwrap();
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        std::fs::write(d.join("comm"), b"odd) comm\n").unwrap();
        std::fs::write(
            d.join("cgroup"),
            format!("9:name=systemd:{cgroup}\n0::{cgroup}\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("status"),
            format!("Name:\tx\nNSpid:\t{pid}\t{nspid}\n"),
        )
        .unwrap();
        let _ = std::fs::remove_file(d.join("ns/pid"));
        std::os::unix::fs::symlink(format!("pid:[{ns}]"), d.join("ns/pid")).unwrap();
    }

    fn remove(&self, pid: u32) {
        std::fs::remove_dir_all(self.root.join(pid.to_string())).unwrap();
    }

    fn set(&self, pid: u32, file: &str, content: &[u8]) {
        std::fs::write(self.root.join(pid.to_string()).join(file), content).unwrap();
    }

    fn enricher(&self, read_at_fork: bool) -> Enricher {
        let cfg = EnrichConfig {
            read_at_fork,
            ..EnrichConfig::default()
        };
        Enricher::with_root(cfg, self.root.to_str().unwrap())
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A time for events other than forks: after every fake process started (start ticks
/// below 10 000, 100 s).
const LATER: u64 = 100_000_000_000;

fn ev(timestamp_ns: u64, body: EventBody) -> ProcEvent {
    ProcEvent {
        seq: 0,
        ack: 0,
        cpu: 0,
        timestamp_ns,
        body,
    }
}

fn t(pid: u32) -> Task {
    Task { pid, tgid: pid }
}

fn fork(ts: u64, parent: u32, child: u32) -> ProcEvent {
    ev(
        ts,
        EventBody::Fork {
            parent: t(parent),
            child: t(child),
        },
    )
}

fn exec(pid: u32) -> ProcEvent {
    ev(LATER, EventBody::Exec { process: t(pid) })
}

fn exit(pid: u32) -> ProcEvent {
    ev(
        LATER,
        EventBody::Exit {
            process: t(pid),
            status: ExitStatus(0),
            exit_signal: 17,
            parent: None,
        },
    )
}

#[test]
fn exec_of_a_gone_process_never_reports_the_pre_exec_command_line() {
    let p = FakeProc::new("exec");
    p.add(100, 1, 500, b"bash\0-l\0", "/user.slice", PID_INIT_INO, 100);
    let mut e = p.enricher(true);
    // The child is already gone at its fork: what is known is inherited, and says so.
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    assert_eq!(f.cmdline.as_deref(), Some("bash -l"));
    assert_eq!(f.cmdline_source, InfoSource::Inherited);
    assert_eq!(f.cgroup.as_deref(), Some("/user.slice"));
    assert_eq!(f.cgroup_source, InfoSource::Inherited);
    assert_eq!(f.pidns, Some(PID_INIT_INO));
    assert_eq!(f.ns_pid, Some(101));
    assert_eq!(f.pidns_source, InfoSource::Inherited);
    assert_eq!(f.parent_key.unwrap().start_ticks, 500);
    assert_eq!(f.parent_key.unwrap().pid, 100);
    // Its exec: the command line from before the exec is not this image's.
    let x = e.enrich(&exec(101)).unwrap();
    assert_eq!(x.cmdline, None);
    assert_eq!(x.cmdline_source, InfoSource::Exited);
    assert_eq!(x.process_key, f.process_key);
    assert_eq!(x.cgroup_source, InfoSource::Inherited);
    // Its exit: the same key, then the entry is gone.
    let z = e.enrich(&exit(101)).unwrap();
    assert_eq!(z.process_key, f.process_key);
    assert_eq!(z.cmdline_source, InfoSource::Exited);
    assert_eq!(e.stats().cached, 1);
}

#[test]
fn exec_reads_the_new_command_line_and_cgroup() {
    let p = FakeProc::new("exec2");
    p.add(100, 1, 500, b"runc\0run\0", "/", PID_INIT_INO, 100);
    p.add(
        101,
        100,
        501,
        b"runc\0init\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        1,
    );
    let mut e = p.enricher(true);
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    // Read at fork: the child is in the container although its parent is not.
    assert_eq!(f.container_id.as_deref(), Some(ID));
    assert_eq!(f.cgroup_source, InfoSource::Proc);
    assert_eq!((f.pidns, f.ns_pid), (Some(CONTAINER_NS), Some(1)));
    assert_eq!(f.pidns_source, InfoSource::Proc);
    assert_eq!(f.cmdline.as_deref(), Some("runc run"));
    assert_eq!(f.cmdline_source, InfoSource::Inherited);
    p.set(101, "cmdline", b"/bin/sleep\x0030\x00");
    let x = e.enrich(&exec(101)).unwrap();
    assert_eq!(x.cmdline.as_deref(), Some("/bin/sleep 30"));
    assert_eq!(x.cmdline_source, InfoSource::Proc);
    assert_eq!(x.container_id.as_deref(), Some(ID));
    // A zombie has no command line left: its comm, said so.
    p.set(101, "cmdline", b"");
    let mut e2 = p.enricher(true);
    let z = e2.enrich(&exit(101)).unwrap();
    assert_eq!(z.cmdline.as_deref(), Some("odd) comm"));
    assert_eq!(z.cmdline_source, InfoSource::Comm);
    assert_eq!(z.process_key.unwrap().start_ticks, 501);
    assert_eq!(z.parent_key.unwrap().start_ticks, 500);
}

#[test]
fn without_reads_at_fork_the_child_inherits_until_its_exec() {
    let p = FakeProc::new("inherit");
    p.add(100, 1, 500, b"sh\0", "/user.slice", PID_INIT_INO, 100);
    p.add(101, 100, 501, b"sh\0", &format!("/{ID}"), CONTAINER_NS, 1);
    let mut e = p.enricher(false);
    let before = e.stats().proc_reads;
    e.enrich(&exec(100)).unwrap();
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    assert_eq!(f.cgroup_source, InfoSource::Inherited);
    assert_eq!(f.container_id, None);
    assert_eq!(f.pidns_source, InfoSource::Inherited);
    let x = e.enrich(&exec(101)).unwrap();
    assert_eq!(x.cgroup_source, InfoSource::Proc);
    assert_eq!(x.container_id.as_deref(), Some(ID));
    assert_eq!(
        (x.pidns, x.ns_pid, x.pidns_source),
        (Some(CONTAINER_NS), Some(1), InfoSource::Proc)
    );
    assert!(e.stats().proc_reads > before);
}

#[test]
fn thread_events_enrich_their_process_and_a_thread_exit_keeps_it() {
    let p = FakeProc::new("thread");
    p.add(100, 1, 500, b"srv\0", "/", PID_INIT_INO, 100);
    let mut e = p.enricher(true);
    let a = e.enrich(&exec(100)).unwrap();
    let th = Task {
        pid: 105,
        tgid: 100,
    };
    let b = e
        .enrich(&ev(
            LATER,
            EventBody::Fork {
                parent: t(100),
                child: th,
            },
        ))
        .unwrap();
    assert_eq!(a.process_key, b.process_key);
    let thread_exit = ev(
        LATER,
        EventBody::Exit {
            process: th,
            status: ExitStatus(0),
            exit_signal: -1,
            parent: None,
        },
    );
    e.enrich(&thread_exit).unwrap();
    assert_eq!(e.stats().cached, 1);
    e.enrich(&exit(100)).unwrap();
    assert_eq!(e.stats().cached, 0);
    assert!(e.enrich(&ev(0, EventBody::Ack { err: 0 })).is_none());
}

#[test]
fn comm_change_renames_a_comm_only_process() {
    let p = FakeProc::new("comm");
    p.add(2, 0, 1, b"", "/", PID_INIT_INO, 2);
    let mut e = p.enricher(true);
    let k = e.enrich(&exec(2)).unwrap();
    assert_eq!((k.cmdline_source, k.parent_key), (InfoSource::Comm, None));
    let c = e
        .enrich(&ev(
            LATER,
            EventBody::Comm {
                process: t(2),
                comm: Comm::new(b"renamed"),
            },
        ))
        .unwrap();
    assert_eq!(c.cmdline.as_deref(), Some("renamed"));
    assert_eq!(e.process(2).cmdline.as_deref(), Some("renamed"));
}

#[test]
fn pid_reuse_gives_new_keys_and_a_missed_exit_is_caught_after_a_loss() {
    let p = FakeProc::new("reuse");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    p.add(101, 100, 501, b"a\0", "/", PID_INIT_INO, 101);
    let mut e = p.enricher(true);
    // The stream carries forks (a thread's, here): cached entries are trusted.
    e.enrich(&ev(
        LATER,
        EventBody::Fork {
            parent: t(100),
            child: Task {
                pid: 105,
                tgid: 100,
            },
        },
    ));
    let a = e.enrich(&exec(101)).unwrap().process_key.unwrap();
    // Its exit is lost; pid 101 is reused by a process started later.
    p.remove(101);
    p.add(101, 100, 900, b"b\0", "/", PID_INIT_INO, 101);
    // Without a loss report the cache still believes the old process...
    assert_eq!(e.process(101).process_key, Some(a));
    // ...after one, the start time is checked and the entry replaced.
    e.note_loss();
    let b = e.enrich(&exec(101)).unwrap();
    assert_eq!(b.process_key.unwrap().start_ticks, 900);
    assert_eq!(b.cmdline.as_deref(), Some("b"));
    assert_eq!(e.stats().stale, 1);
    // A fork of a cached pid replaces the entry too (the old process must be gone).
    let f = e.enrich(&fork(19_005_000_000, 100, 101)).unwrap();
    assert_ne!(f.process_key, b.process_key);
    assert_eq!(e.stats().stale, 2);
}

#[test]
fn unreadable_or_garbage_proc_files_give_unknown_never_a_panic() {
    let p = FakeProc::new("garbage");
    p.add(100, 1, 500, b"\xff\xfe\0", "/", PID_INIT_INO, 100);
    p.set(100, "cgroup", b"\xff:\xff\n");
    p.set(100, "status", b"NSpid:\n");
    let mut e = p.enricher(true);
    let i = e.enrich(&exec(100)).unwrap();
    assert_eq!(i.cgroup, None);
    assert_eq!(i.cmdline.as_deref(), Some("\u{fffd}\u{fffd}"));
    p.set(100, "stat", b"100 (x");
    let mut e = p.enricher(true);
    assert_eq!(e.enrich(&exit(100)).unwrap(), ProcessInfo::unknown());
    assert_eq!(e.enrich(&exec(4_000_000)).unwrap(), ProcessInfo::unknown());
    assert_eq!(e.stats().gone, 2);
}

#[test]
fn capacity_bounds_the_cache() {
    let p = FakeProc::new("cap");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    let cfg = EnrichConfig {
        capacity: 8,
        ..EnrichConfig::default()
    };
    let mut e = Enricher::with_root(cfg, p.root.to_str().unwrap());
    for pid in 1000..1100 {
        e.enrich(&fork(7_005_000_000, 100, pid)).unwrap();
        assert!(e.stats().cached <= 8);
    }
    assert!(e.stats().evictions >= 90);
}

#[cfg(feature = "serde")]
#[test]
fn serialised_field_names() {
    let mut i = ProcessInfo::unknown();
    i.process_key = Some(ProcessKey {
        boot: 1,
        pid: 2,
        start_ticks: 3,
    });
    i.container_id = Some(ID.into());
    i.cmdline_source = InfoSource::Inherited;
    let j = serde_json::to_value(&i).unwrap();
    assert_eq!(j["process_key"], "00000000000000000000000000000001-2-3");
    assert_eq!(j["parent_key"], serde_json::Value::Null);
    assert_eq!(j["container_id"], ID);
    assert_eq!(j["cgroup"], serde_json::Value::Null);
    assert_eq!(j["ns_pid"], serde_json::Value::Null);
    assert_eq!(j["pidns"], serde_json::Value::Null);
    assert_eq!(j["cmdline"], serde_json::Value::Null);
    assert_eq!(j["cmdline_source"], "inherited");
    assert_eq!(j["cgroup_source"], "exited");
    assert_eq!(j["pidns_source"], "exited");
    let back: ProcessInfo = serde_json::from_value(j).unwrap();
    assert_eq!(back, i);
}

#[test]
fn a_child_read_before_its_cgroup_attach_gets_the_parents_cgroup() {
    let p = FakeProc::new("attach");
    p.add(100, 1, 500, b"sh\0", &format!("/{ID}"), CONTAINER_NS, 3);
    // The kernel has not run cgroup_post_fork() for the child yet: root cgroup.
    p.add(101, 100, 501, b"sh\0", "/", CONTAINER_NS, 4);
    let mut e = p.enricher(true);
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    assert_eq!(f.container_id.as_deref(), Some(ID));
    assert_eq!(f.cgroup_source, InfoSource::Inherited);
    assert_eq!(e.stats().unattached_cgroup_reads, 1);
    // A parent in the root cgroup: "/" is simply the answer.
    p.add(200, 1, 500, b"sh\0", "/", PID_INIT_INO, 200);
    p.add(201, 200, 501, b"sh\0", "/", PID_INIT_INO, 201);
    let f = e.enrich(&fork(7_005_000_000, 200, 201)).unwrap();
    assert_eq!(
        (f.cgroup.as_deref(), f.cgroup_source),
        (Some("/"), InfoSource::Proc)
    );
}

/// The agent's flake (one CI run in a few, more under load): `runc run -d` (100) had exited
/// before the enricher got to its exec, so its entry had no command line and was not known
/// as a spawner; the container's init (102, forked with `CLONE_PARENT`: the event names
/// runc as its parent) inherited runc's host cgroup and pid namespace although its own
/// `/proc` was readable (its command line was read from there).
#[test]
fn a_child_of_a_parent_whose_program_is_unknown_is_read_at_fork() {
    let p = FakeProc::new("unknown-parent");
    p.add(50, 1, 400, b"agent-test\0", "/", PID_INIT_INO, 50);
    p.add(
        102,
        50,
        502,
        b"/bin/sh\0-c\0loop\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        1,
    );
    let mut e = p.enricher(false);
    e.enrich(&exec(50)).unwrap();
    // runc run: forked by the test, gone before its exec is enriched.
    let f = e.enrich(&fork(7_005_000_000, 50, 100)).unwrap();
    assert_eq!(f.cmdline_source, InfoSource::Inherited);
    let x = e.enrich(&exec(100)).unwrap();
    assert_eq!(
        (x.cmdline.as_deref(), x.cmdline_source),
        (None, InfoSource::Exited)
    );
    // The init's fork names runc as its parent.
    let i = e.enrich(&fork(7_015_000_000, 100, 102)).unwrap();
    assert_eq!(i.container_id.as_deref(), Some(ID), "{i:?}");
    assert_eq!(i.cgroup_source, InfoSource::Proc);
    assert_eq!(
        (i.pidns, i.ns_pid, i.pidns_source),
        (Some(CONTAINER_NS), Some(1), InfoSource::Proc)
    );
    assert_eq!(i.cmdline.as_deref(), Some("/bin/sh -c loop"));
    assert_eq!(i.cmdline_source, InfoSource::Proc);
    // A known program that is not a spawner: its child still inherits, marked so.
    p.add(103, 50, 503, b"sh\0", &format!("/{ID}"), CONTAINER_NS, 2);
    let c = e.enrich(&fork(7_025_000_000, 50, 103)).unwrap();
    assert_eq!(
        (c.cgroup.as_deref(), c.cgroup_source, c.pidns_source),
        (Some("/"), InfoSource::Inherited, InfoSource::Inherited)
    );
}

/// A stream filtered to execs has no forks and no exits: without a loss the cache would
/// still believe an exited process holds its pid. Until a fork is seen, entries are checked.
#[test]
fn an_exec_checks_that_the_cached_entry_is_still_its_process() {
    let p = FakeProc::new("exec-reuse");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    p.add(101, 100, 501, b"a\0", "/", PID_INIT_INO, 101);
    let mut e = p.enricher(true);
    let a = e.enrich(&exec(101)).unwrap();
    // Its exit is not in the stream; pid 101 is reused by a process in a container.
    p.remove(101);
    p.add(101, 100, 900, b"b\0", &format!("/{ID}"), CONTAINER_NS, 7);
    let b = e.enrich(&exec(101)).unwrap();
    assert_ne!(b.process_key, a.process_key);
    assert_eq!(b.process_key.unwrap().start_ticks, 900);
    assert_eq!(b.cmdline.as_deref(), Some("b"));
    assert_eq!((b.pidns, b.ns_pid), (Some(CONTAINER_NS), Some(7)));
    assert_eq!(b.container_id.as_deref(), Some(ID));
    assert_eq!(e.stats().stale, 1);
    // The same process execs again: its key stays.
    let c = e.enrich(&exec(101)).unwrap();
    assert_eq!(c.process_key, b.process_key);
    assert_eq!(e.stats().stale, 1);
}

/// A key derived from a fork event can be a tick later than `/proc`'s start time (the
/// event is stamped after the start time; the window after a tick boundary only makes it
/// rare). That is the same process: a check of the entry (after a loss, at an exec) keeps
/// the key its fork gave rather than taking it for a reused pid and changing the key
/// between the process's events.
#[test]
fn a_fork_key_a_tick_late_is_not_a_reused_pid() {
    let p = FakeProc::new("late-key");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    let mut e = p.enricher(true);
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    let key = f.process_key.unwrap();
    p.add(
        101,
        100,
        key.start_ticks - 1,
        b"sh\0",
        "/",
        PID_INIT_INO,
        101,
    );
    e.note_loss();
    let x = e.enrich(&exec(101)).unwrap();
    assert_eq!(x.process_key, Some(key));
    let z = e.enrich(&exit(101)).unwrap();
    assert_eq!(z.process_key, Some(key));
    assert_eq!(e.stats().stale, 0);
}

/// `-e exec,nonzero-exit`: a process that exec'd and exited with status 0 left its entry;
/// its pid's next holder never execs and exits with status 1. Its exit must not be
/// reported as the first process's.
#[test]
fn a_stream_without_forks_checks_every_entry_at_use() {
    let p = FakeProc::new("no-forks");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    p.add(101, 100, 501, b"a\0", "/", PID_INIT_INO, 101);
    let mut e = p.enricher(false);
    let a = e.enrich(&exec(101)).unwrap();
    p.remove(101);
    p.add(101, 100, 900, b"sh\0", &format!("/{ID}"), CONTAINER_NS, 3);
    let z = e.enrich(&exit(101)).unwrap();
    assert_ne!(z.process_key, a.process_key);
    assert_eq!(z.process_key.unwrap().start_ticks, 900);
    assert_eq!(z.container_id.as_deref(), Some(ID));
    assert_eq!(z.cmdline.as_deref(), Some("sh"));
    // Other kinds too (a uid change), and the same process is not taken for another.
    p.add(102, 100, 600, b"b\0", "/", PID_INIT_INO, 102);
    let u = ev(
        LATER,
        EventBody::Uid {
            process: t(102),
            ruid: 0,
            euid: 1000,
        },
    );
    let b = e.enrich(&u).unwrap();
    assert_eq!(e.enrich(&u).unwrap().process_key, b.process_key);
    p.remove(102);
    p.add(102, 100, 950, b"c\0", "/", PID_INIT_INO, 102);
    assert_eq!(e.enrich(&u).unwrap().process_key.unwrap().start_ticks, 950);
    assert_eq!(e.stats().stale, 2);
}

/// A leader that calls `pthread_exit` before its other threads: its exit event is a
/// process's (pid = tgid), the last thread's exit ends the process. By then
/// `/proc/<tgid>` is the zombie leader's: no command line (only the comm), and on a
/// cgroup v1 host the root cgroup. The threads' events keep the process's info.
#[test]
fn threads_that_outlive_their_leader_keep_the_process_info() {
    let p = FakeProc::new("leader-exit");
    p.add(
        100,
        1,
        500,
        b"srv\0-x\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        1,
    );
    let mut e = p.enricher(true);
    let a = e.enrich(&exec(100)).unwrap();
    assert_eq!(a.container_id.as_deref(), Some(ID));
    // Its second thread.
    let thread_fork = ev(
        LATER,
        EventBody::Fork {
            parent: t(100),
            child: Task {
                pid: 105,
                tgid: 100,
            },
        },
    );
    assert_eq!(e.enrich(&thread_fork).unwrap(), a);
    let leader_exit = e.enrich(&exit(100)).unwrap();
    assert_eq!(leader_exit, a);
    // The zombie leader, as a v1-only host shows it.
    p.set(100, "cmdline", b"");
    p.set(100, "cgroup", b"9:name=systemd:/\n");
    let th = Task {
        pid: 105,
        tgid: 100,
    };
    let thread_exit = ev(
        LATER,
        EventBody::Exit {
            process: th,
            status: ExitStatus(3 << 8),
            exit_signal: -1,
            parent: None,
        },
    );
    let z = e.enrich(&thread_exit).unwrap();
    assert_eq!(z, a, "{z:?}");
    assert_eq!(e.stats().cached, 0);
    // A later process with the pid: a thread of it is not the old process's.
    p.remove(100);
    p.add(100, 1, 900, b"new\0", "/", PID_INIT_INO, 100);
    let n = e.enrich(&thread_exit).unwrap();
    assert_eq!(n.process_key.unwrap().start_ticks, 900);
    assert_eq!(n.cmdline.as_deref(), Some("new"));
    // Nor after a fork gave the pid to a new process.
    let mut e = p.enricher(true);
    p.add(200, 1, 500, b"old\0", "/", PID_INIT_INO, 200);
    e.enrich(&exec(200)).unwrap();
    e.enrich(&ev(
        LATER,
        EventBody::Fork {
            parent: t(200),
            child: Task {
                pid: 205,
                tgid: 200,
            },
        },
    ));
    e.enrich(&exit(200)).unwrap();
    let f = e.enrich(&fork(7_005_000_000, 100, 200)).unwrap();
    e.cache.remove(200); // evicted, say
    p.remove(200);
    let n = e.enrich(&thread_exit_of(200)).unwrap();
    assert_ne!(n.cmdline.as_deref(), Some("old"), "{f:?} {n:?}");
}

fn thread_exit_of(tgid: u32) -> ProcEvent {
    ev(
        LATER,
        EventBody::Exit {
            process: Task {
                pid: tgid + 5,
                tgid,
            },
            status: ExitStatus(0),
            exit_signal: -1,
            parent: None,
        },
    )
}

/// The start ticks `/proc` would show for a process started `ns` after boot in monotonic
/// time (the host may have been suspended: the offset between the clocks).
fn ticks_at(e: &Enricher, ns: u64) -> u64 {
    let offset = crate::sys::boottime_ns().saturating_sub(crate::sys::monotonic_ns());
    e.clock.ticks(ns + offset)
}

/// An enricher a whole pid cycle behind finds the event's process gone and its pid held by
/// a later process: nothing of that one is reported for the event's process. (Every fake
/// event is late: stamped seconds after boot, enriched hours later.)
#[test]
fn a_late_event_never_reads_the_next_holder_of_its_pid() {
    let p = FakeProc::new("late");
    let mut e = p.enricher(true);
    // Processes started at 1 s; the pid's next holders at 20 s, after every event below.
    let (early, later) = (ticks_at(&e, 1_000_000_000), ticks_at(&e, 20_000_000_000));
    p.add(100, 1, early, b"sh\0", "/", PID_INIT_INO, 100);
    p.add(101, 100, early, b"sh\0", "/", PID_INIT_INO, 101);
    let f = e.enrich(&fork(7_005_000_000, 100, 101)).unwrap();
    assert_eq!(f.cgroup_source, InfoSource::Proc);
    p.remove(101);
    p.add(
        101,
        1,
        later,
        b"other\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        1,
    );
    let x = e
        .enrich(&ev(7_500_000_000, EventBody::Exec { process: t(101) }))
        .unwrap();
    assert_eq!((x.cmdline, x.cmdline_source), (None, InfoSource::Exited));
    assert_eq!((x.cgroup.as_deref(), x.container_id), (Some("/"), None));
    assert_eq!(x.pidns, Some(PID_INIT_INO));
    assert_eq!(x.process_key, f.process_key);
    // An exit of a process not cached: read from /proc, found to be a later process.
    p.add(
        102,
        1,
        later,
        b"other\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        2,
    );
    let gone = e.stats().gone;
    let z = e
        .enrich(&ev(
            7_600_000_000,
            EventBody::Exit {
                process: t(102),
                status: ExitStatus(0),
                exit_signal: 17,
                parent: None,
            },
        ))
        .unwrap();
    assert_eq!(z, ProcessInfo::unknown());
    assert_eq!(e.stats().gone, gone + 1);
    // A fork whose child's pid already has a later holder: the parent's values, inherited.
    p.add(
        103,
        1,
        later,
        b"other\0",
        &format!("/{ID}"),
        CONTAINER_NS,
        3,
    );
    let g = e.enrich(&fork(7_705_000_000, 100, 103)).unwrap();
    assert_eq!(
        (
            g.cgroup.as_deref(),
            g.container_id.as_deref(),
            g.cgroup_source
        ),
        (Some("/"), None, InfoSource::Inherited)
    );
    assert_eq!(
        (g.pidns, g.pidns_source),
        (Some(PID_INIT_INO), InfoSource::Inherited)
    );
    assert_eq!(g.cmdline.as_deref(), Some("sh"));
    assert!(g.process_key.unwrap().start_ticks < later);
    // Not late (a process read outside `enrich`): /proc is the answer.
    assert_eq!(e.refresh(103).container_id.as_deref(), Some(ID));
}

/// `/proc/<pid>/cgroup` longer than the enricher read (8 KiB before): the v2 line, last,
/// was cut, and the prefix of its path was reported as the cgroup, read from `/proc`.
/// Deep paths in a dozen v1 hierarchies make such a file (each path up to 4 KiB).
#[test]
fn a_long_cgroup_file_is_read_whole_and_never_cut_mid_line() {
    let p = FakeProc::new("long-cgroup");
    p.add(100, 1, 500, b"sh\0", "/", PID_INIT_INO, 100);
    let deep = format!("/{}", "d".repeat(3000));
    let mut text = String::from("9:name=systemd:/\n");
    for (i, ctl) in ["pids", "memory", "cpu"].iter().enumerate() {
        text += &format!("{}:{ctl}:{deep}\n", i + 1);
    }
    let v2 = format!("{deep}/{ID}");
    text += &format!("0::{v2}\n");
    assert!(text.len() > 8192);
    p.set(100, "cgroup", text.as_bytes());
    let mut e = p.enricher(true);
    let i = e.enrich(&exec(100)).unwrap();
    assert_eq!(i.cgroup.as_deref(), Some(v2.as_str()));
    assert_eq!(i.container_id.as_deref(), Some(ID));
    // Beyond even the larger limit: the cut line is not used.
    let first_line = text.find('\n').unwrap() + 1;
    for k in 0..30 {
        text.insert_str(first_line, &format!("{}:name=x{k}:{deep}\n", 10 + k));
    }
    assert!(text.len() > 64 << 10);
    p.set(100, "cgroup", text.as_bytes());
    let i = e.refresh(100);
    assert_eq!(i.cgroup.as_deref(), Some("/"));
}

/// A process without a command line stands as its comm, the leader's. Its threads name
/// themselves (`prctl(PR_SET_NAME)`, a comm event for the thread): before, each such name
/// replaced the process's.
#[test]
fn a_threads_new_name_does_not_rename_its_process() {
    let p = FakeProc::new("thread-comm");
    p.add(300, 1, 500, b"", "/", PID_INIT_INO, 300);
    let mut e = p.enricher(true);
    let k = e.enrich(&exec(300)).unwrap();
    assert_eq!(
        (k.cmdline.as_deref(), k.cmdline_source),
        (Some("odd) comm"), InfoSource::Comm)
    );
    let rename = |pid, name: &[u8]| {
        ev(
            LATER,
            EventBody::Comm {
                process: Task { pid, tgid: 300 },
                comm: Comm::new(name),
            },
        )
    };
    let c = e.enrich(&rename(301, b"worker-1")).unwrap();
    assert_eq!(c.cmdline.as_deref(), Some("odd) comm"));
    assert_eq!(e.process(300).cmdline.as_deref(), Some("odd) comm"));
    let c = e.enrich(&rename(300, b"daemon")).unwrap();
    assert_eq!(c.cmdline.as_deref(), Some("daemon"));
    assert_eq!(e.process(300).cmdline.as_deref(), Some("daemon"));
}

/// The kernel shows an exiting task (a zombie, `PF_EXITING` in its flags) in the root of
/// every cgroup v1 hierarchy; only the v2 line keeps its cgroup. A process first read at
/// its exit on a host with no v2 line was reported in `/`, read from `/proc`: a container's
/// process as the host's. Its cgroup is now unknown, said so (`exited`).
#[test]
fn an_exiting_process_read_on_cgroup_v1_is_not_put_in_the_root() {
    let p = FakeProc::new("exiting-v1");
    p.add(100, 1, 500, b"", "/", PID_INIT_INO, 100);
    // A zombie (flags 0x40804c, as seen here) on a v1-only host: the root everywhere.
    let zombie = "100 (sh) Z 1 1 1 0 -1 4227148 100 0 0 0 1 2 0 0 20 0 1 0 500 0 0 0\n";
    p.set(100, "stat", zombie.as_bytes());
    p.set(100, "cgroup", b"9:name=systemd:/\n4:memory:/\n");
    let mut e = p.enricher(true);
    let z = e.enrich(&exit(100)).unwrap();
    assert_eq!(z.process_key.unwrap().start_ticks, 500);
    assert_eq!(
        (z.cgroup, z.container_id, z.cgroup_source),
        (None, None, InfoSource::Exited)
    );
    // With a v2 line, that line is the answer, the root included.
    p.set(
        100,
        "cgroup",
        format!("9:name=systemd:/\n0::/{ID}\n").as_bytes(),
    );
    let z = e.enrich(&exit(100)).unwrap();
    assert_eq!(z.container_id.as_deref(), Some(ID));
    p.set(100, "cgroup", b"9:name=systemd:/\n0::/\n");
    let z = e.enrich(&exit(100)).unwrap();
    assert_eq!(
        (z.cgroup.as_deref(), z.cgroup_source),
        (Some("/"), InfoSource::Proc)
    );
}
