//! The enricher against the real kernel: keys derived from fork events equal the keys
//! `/proc` gives, over thousands of this test's own children; keys stay unique when a pid
//! is reused; host processes have no container.
//!
//! Group 1 is host-wide and other tests fork constantly: every assertion is about this
//! test's own children (found by pid, with this process as the fork's parent). Every event
//! is fed to the enricher, in order, as a user would.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cnbus::proc::{
    Enricher, EventBody, EventSet, InfoSource, ProcEvent, ProcListener, ProcessInfo, ProcessKey,
    Received,
};
use common::kernel_socket;

fn open(test: &str, events: EventSet) -> Option<ProcListener> {
    kernel_socket(test)?;
    Some(
        ProcListener::builder()
            .events(events)
            .open()
            .unwrap_or_else(|e| panic!("{test}: open: {e}")),
    )
}

fn my_pid() -> u32 {
    std::process::id()
}

/// `fork()` a child that closes its copy of the write end `w` and blocks reading `r` until
/// every write end is closed, then `_exit(0)`s; `r == -1` exits at once. Raw system calls
/// only: the parent has threads.
fn fork_child((r, w): (i32, i32)) -> u32 {
    // SAFETY: the child runs only async-signal-safe system calls (read, _exit) on data
    // prepared before the fork, as required after fork in a threaded process.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        if r >= 0 {
            let mut b = [0u8; 1];
            // SAFETY: closes the child's copy of a descriptor; `b` is valid for one byte of
            // writes.
            unsafe {
                libc::close(w);
                libc::read(r, b.as_mut_ptr().cast(), 1)
            };
        }
        // SAFETY: _exit ends the child without running Rust or libc atexit code.
        unsafe { libc::_exit(0) };
    }
    pid as u32
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is valid for writes.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    assert_eq!(
        r,
        pid as i32,
        "waitpid: {}",
        std::io::Error::last_os_error()
    );
}

/// A pipe: (read end, write end).
fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is valid for two ints of writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn close(fd: i32) {
    // SAFETY: closes a descriptor this test opened and no longer uses.
    unsafe { libc::close(fd) };
}

/// What the enricher said about one of our children.
#[derive(Default)]
struct Seen {
    fork: Option<(ProcEvent, ProcessInfo)>,
    exit: Option<ProcessInfo>,
}

/// Feeds every queued event to the enricher; keeps what it said about `mine`.
fn drain(
    l: &mut ProcListener,
    e: &mut Enricher,
    mine: &HashSet<u32>,
    seen: &mut HashMap<u32, Vec<Seen>>,
    wait: Option<Duration>,
) -> u64 {
    let mut lost = 0;
    let mut first = true;
    loop {
        let r = if first {
            first = false;
            l.recv_timeout(wait).unwrap()
        } else {
            l.try_recv().unwrap()
        };
        match r {
            None => return lost,
            Some(Received::Lost(loss)) => {
                eprintln!("note: {loss:?}");
                lost += 1;
                e.note_loss();
            }
            Some(Received::Event(ev)) => {
                let info = e.enrich(&ev);
                match ev.body {
                    EventBody::Fork { parent, child }
                        if parent.tgid == my_pid() && mine.contains(&child.tgid) =>
                    {
                        let v = seen.entry(child.tgid).or_default();
                        v.push(Seen {
                            fork: Some((ev, info.unwrap())),
                            exit: None,
                        });
                    }
                    EventBody::Exit { process, .. }
                        if !process.is_thread() && mine.contains(&process.tgid) =>
                    {
                        // Only the first exit after our fork: once it exited, the pid may
                        // be reused by another test's process.
                        if let Some(s) = seen.get_mut(&process.tgid).and_then(|v| v.last_mut()) {
                            if s.exit.is_none() {
                                s.exit = info;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The start ticks the fork timestamp alone gives (no guard window, no `/proc`): to measure
/// how often the two kernel stamps fall in different ticks.
fn naive_ticks(ev: &ProcEvent) -> u64 {
    let off = cnbus::sys::boottime_ns().saturating_sub(cnbus::sys::monotonic_ns());
    let tick = 1_000_000_000 / cnbus::sys::clock_ticks_per_sec();
    (ev.timestamp_ns + off) / tick
}

#[test]
fn fork_derived_keys_equal_proc_keys_over_thousands_of_children() {
    // CNBUS_ENRICH_BATCHES raises the count for a longer measurement (docs/PROC.md).
    let batches: usize = std::env::var("CNBUS_ENRICH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    const PER_BATCH: usize = 250;
    let Some(mut l) = open("fork_keys", EventSet::FORK | EventSet::EXIT) else {
        return;
    };
    let mut e = Enricher::new();
    let mut reader = Enricher::new();
    let me = reader.proc_key(my_pid()).expect("own key");
    let tick = 1_000_000_000 / cnbus::sys::clock_ticks_per_sec();
    let (mut compared, mut naive_mismatch, mut max_residual) = (0usize, 0usize, 0u64);
    for _ in 0..batches {
        let (r, w) = pipe();
        let pids: Vec<u32> = (0..PER_BATCH).map(|_| fork_child((r, w))).collect();
        // Every child is alive (blocked on the pipe): /proc's key for each.
        let proc_keys: Vec<ProcessKey> = pids
            .iter()
            .map(|&p| reader.proc_key(p).expect("a blocked child is readable"))
            .collect();
        let mine: HashSet<u32> = pids.iter().copied().collect();
        let mut seen = HashMap::new();
        let mut lost = 0;
        while seen.len() < pids.len() {
            let before = seen.len();
            lost += drain(
                &mut l,
                &mut e,
                &mine,
                &mut seen,
                Some(Duration::from_secs(5)),
            );
            if seen.len() == before {
                break;
            }
        }
        close(w);
        close(r);
        for &p in &pids {
            reap(p);
        }
        let mut exits = 0;
        while exits < pids.len() {
            lost += drain(
                &mut l,
                &mut e,
                &mine,
                &mut seen,
                Some(Duration::from_secs(5)),
            );
            let now = seen.values().filter(|v| v[0].exit.is_some()).count();
            if now == exits {
                break;
            }
            exits = now;
        }
        if lost == 0 {
            assert_eq!(seen.len(), pids.len(), "a fork event of ours is missing");
        }
        for (&p, want) in pids.iter().zip(&proc_keys) {
            let Some(s) = seen.get(&p) else { continue };
            let (ev, info) = s[0].fork.as_ref().unwrap();
            let key = info.process_key.unwrap();
            assert_eq!(key, *want, "fork-derived key of {p} differs from /proc's");
            assert_eq!(info.parent_key, Some(me));
            assert_eq!(info.container_id, None, "a host process");
            assert_eq!(info.cmdline_source, InfoSource::Inherited);
            assert!(matches!(
                info.cgroup_source,
                InfoSource::Proc | InfoSource::Inherited
            ));
            if let Some(x) = &s[0].exit {
                assert_eq!(x.process_key, Some(key), "exit key of {p}");
                assert_eq!(x.container_id, None);
            } else if lost == 0 {
                panic!("exit of {p} not seen");
            }
            compared += 1;
            let naive = naive_ticks(ev);
            if naive != want.start_ticks {
                naive_mismatch += 1;
                let off = cnbus::sys::boottime_ns().saturating_sub(cnbus::sys::monotonic_ns());
                max_residual = max_residual.max((ev.timestamp_ns + off) % tick);
            }
        }
    }
    let st = e.stats();
    eprintln!(
        "compared {compared} keys; timestamp alone would differ for {naive_mismatch} \
         (largest distance past a tick boundary among them: {max_residual} ns); \
         start-time reads {}; stats {st:?}",
        st.start_time_reads
    );
    assert!(
        compared >= batches * PER_BATCH * 9 / 10,
        "compared only {compared}"
    );
}

#[test]
fn keys_stay_unique_when_a_pid_is_reused() {
    let Some(mut l) = open("pid_reuse", EventSet::FORK | EventSet::EXIT) else {
        return;
    };
    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let mut e = Enricher::new();
    let mut mine = HashSet::new();
    let mut seen: HashMap<u32, Vec<Seen>> = HashMap::new();
    let mut reused = None;
    // Pids are handed out cyclically: within pid_max forks one of ours comes back. Bounded
    // by count, not time.
    for i in 0..2 * pid_max {
        let p = fork_child((-1, -1));
        reap(p);
        if !mine.insert(p) && reused.is_none() {
            reused = Some((p, i));
        }
        drain(&mut l, &mut e, &mine, &mut seen, Some(Duration::ZERO));
        if let Some((_, at)) = reused {
            if i > at + 50 {
                break;
            }
        }
    }
    drain(
        &mut l,
        &mut e,
        &mine,
        &mut seen,
        Some(Duration::from_millis(500)),
    );
    let (pid, at) = reused.expect("no pid of ours was reused within 2 * pid_max forks");
    eprintln!("pid {pid} reused after {at} forks; {:?}", e.stats());
    let mut keys = HashSet::new();
    let mut reused_keys = 0;
    for (p, v) in &seen {
        for s in v {
            let Some((_, f)) = &s.fork else { continue };
            let k = f.process_key.unwrap();
            assert_eq!(k.pid, *p);
            assert!(keys.insert(k), "key {k} given to two processes");
            if let Some(x) = &s.exit {
                assert_eq!(x.process_key, Some(k), "fork and exit keys of {p}");
            }
        }
        if v.len() > 1 {
            reused_keys += v.len();
        }
    }
    assert!(
        seen.get(&pid).map_or(0, Vec::len) >= 2,
        "both forks of the reused pid {pid} were seen"
    );
    assert!(reused_keys >= 2);
}

#[test]
fn host_processes_have_no_container() {
    if kernel_socket("host_processes").is_none() {
        return;
    }
    let mut e = Enricher::new();
    for pid in [1, my_pid()] {
        let i = e.process(pid);
        assert!(i.process_key.is_some(), "pid {pid}");
        assert_eq!(i.container_id, None, "pid {pid}: {:?}", i.cgroup);
        assert_eq!(i.cgroup_source, InfoSource::Proc);
        // Some hosts protect pid 1's namespace links even from root (this one does).
        if i.pidns_source != InfoSource::Denied {
            assert_eq!(i.pidns_source, InfoSource::Proc);
            assert_eq!(i.ns_pid, Some(pid));
        }
    }
    let me = e.process(my_pid());
    assert_eq!(me.pidns_source, InfoSource::Proc);
    assert_eq!(me.ns_pid, Some(my_pid()));
    assert_eq!(me.cmdline_source, InfoSource::Proc);
    assert_eq!(me.process_key, e.proc_key(my_pid()));
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on a v2 host, `/sys/fs/cgroup/unified` on a
/// hybrid one), from `/proc/self/mounts`.
fn cgroup2_mount() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].to_string())
    })
}

/// Waits until our child `pid` is a zombie, without reaping it.
fn wait_zombie(pid: u32) {
    // SAFETY: `info` is valid for writes; WNOWAIT leaves the child waitable.
    let r = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
    };
    assert_eq!(r, 0, "waitid: {}", std::io::Error::last_os_error());
}

/// A zombie whose container cgroup was already removed (the runtime deletes the cgroup once
/// no live task is left in it): the kernel shows its cgroup v2 path with ` (deleted)`
/// appended. It is still the container's process. Before the fix the suffix made the last
/// component no container id: `container_id` was `null` for such exits read from `/proc`.
#[test]
fn a_zombie_in_a_removed_container_cgroup_keeps_its_container() {
    if kernel_socket("removed_cgroup").is_none() {
        return;
    }
    let Some(root) = cgroup2_mount() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no cgroup2 mount under CI"
        );
        eprintln!("removed_cgroup: SKIPPED, no cgroup2 mount");
        return;
    };
    // A 64-hex directory name of our own, like runc's default `cgroupsPath`.
    let id = format!(
        "{:032x}{:032x}",
        u128::from(my_pid()),
        u128::from(cnbus::sys::monotonic_ns())
    );
    let dir = std::path::Path::new(&root).join(&id);
    std::fs::create_dir(&dir).unwrap();
    let (r, w) = pipe();
    let child = fork_child((r, w));
    std::fs::write(dir.join("cgroup.procs"), child.to_string()).unwrap();
    let alive = Enricher::new().process(child);
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(child as i32, libc::SIGKILL) }, 0);
    wait_zombie(child);
    let removed = std::fs::remove_dir(&dir);
    let zombie = Enricher::new().process(child);
    reap(child);
    close(w);
    close(r);
    if removed.is_err() {
        let _ = std::fs::remove_dir(&dir);
    }
    removed.unwrap();
    assert_eq!(
        alive.container_id.as_deref(),
        Some(id.as_str()),
        "{alive:?}"
    );
    let cgroup = zombie.cgroup.as_deref().unwrap_or_default();
    assert!(cgroup.ends_with(" (deleted)"), "{zombie:?}");
    assert_eq!(zombie.cgroup_source, InfoSource::Proc);
    assert_eq!(
        zombie.container_id.as_deref(),
        Some(id.as_str()),
        "{zombie:?}"
    );
    assert_eq!(zombie.process_key, alive.process_key);
}

/// Feeds every queued event to `e`; returns the info of the first exec of `pid` (if any).
fn drain_execs(
    l: &mut ProcListener,
    e: &mut Enricher,
    pid: u32,
    wait: Duration,
) -> Option<ProcessInfo> {
    let mut first = true;
    let mut found = None;
    loop {
        let r = if first {
            first = false;
            l.recv_timeout(Some(wait)).unwrap()
        } else {
            l.try_recv().unwrap()
        };
        match r {
            None => return found,
            Some(Received::Lost(loss)) => {
                eprintln!("note: {loss:?}");
                e.note_loss();
            }
            Some(Received::Event(ev)) => {
                let info = e.enrich(&ev);
                if let EventBody::Exec { process } = ev.body {
                    if process.tgid == pid && found.is_none() {
                        found = info;
                    }
                }
            }
        }
    }
}

/// The next exec of `target` the listener brings, enriched, waiting up to 20 s.
fn next_exec(l: &mut ProcListener, e: &mut Enricher, target: u32) -> Option<ProcessInfo> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(i) = drain_execs(l, e, target, Duration::from_millis(100)) {
            return Some(i);
        }
    }
    None
}

/// A stream without forks and exits (`proctrace -e exec`, the kernel filtering): the cache
/// never hears that a process exited, so when its pid comes back the entry is another
/// process's. Before the fix the new process's exec got the old process's key (and parent
/// key and pid namespace): two processes with one key. An exec now checks the start time.
#[test]
fn an_exec_only_stream_gives_a_reused_pid_a_new_key() {
    let Some(mut l) = open("exec_only_reuse", EventSet::EXEC) else {
        return;
    };
    let mut e = Enricher::new();
    let mut old = std::process::Command::new("/bin/sleep")
        .arg("1000")
        .spawn()
        .expect("/bin/sleep");
    let target = old.id();
    let first = next_exec(&mut l, &mut e, target).expect("the exec of /bin/sleep was not seen");
    let old_key = first.process_key.expect("sleep is alive: its key is read");
    old.kill().unwrap();
    old.wait().unwrap();
    // Cycle the pids until one of our children gets `target` again; that one execs sleep.
    let reused = take_pid(target, "1000", || {
        drain_execs(&mut l, &mut e, target, Duration::ZERO);
    });
    if reused.is_none() {
        eprintln!("exec_only_reuse: SKIPPED, pid {target} did not come back to this test");
        return;
    }
    let new_key = e.proc_key(target);
    let second = next_exec(&mut l, &mut e, target);
    // SAFETY: signals our own child.
    unsafe { libc::kill(target as i32, libc::SIGKILL) };
    reap(target);
    let second = second.expect("the exec of the reused pid was not seen");
    eprintln!(
        "pid {target}: {old_key} then {:?}; {:?}",
        second.process_key,
        e.stats()
    );
    assert!(new_key.is_some());
    assert_ne!(second.process_key, Some(old_key), "two processes, one key");
    assert_eq!(second.process_key, new_key);
    assert_eq!(second.cmdline.as_deref(), Some("sleep 1000"));
    assert_eq!(second.parent_key, e.proc_key(my_pid()));
}

/// The second thread of `leader_exits_first`'s child: waits for EOF on the pipe, then ends
/// the process with status 3. Raw system calls only (it shares the exited leader's TLS).
extern "C" fn last_thread(fd: *mut libc::c_void) -> libc::c_int {
    let mut b = [0u8; 1];
    // SAFETY: `b` is valid for one byte of writes; exit_group ends the process.
    unsafe {
        libc::read(fd as usize as i32, b.as_mut_ptr().cast(), 1);
        libc::syscall(libc::SYS_exit_group, 3);
    }
    0
}

/// `fork()` a child whose leader starts a second thread (raw `clone`) and exits alone
/// (`SYS_exit`, as `pthread_exit` does); the thread ends the process when every write end
/// of `r`'s pipe is closed.
fn leader_exits_first((r, w): (i32, i32), stack: &mut [u8]) -> u32 {
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: the child runs only async-signal-safe system calls (close, clone, exit) on
    // data prepared before the fork; the thread gets its own stack, a copy of `stack`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::close(w);
            let flags = libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM;
            if libc::clone(
                last_thread,
                top as *mut libc::c_void,
                flags,
                r as usize as *mut libc::c_void,
            ) < 0
            {
                libc::_exit(9);
            }
            libc::syscall(libc::SYS_exit, 0);
        }
        unreachable!();
    }
    pid as u32
}

/// A leader that exits before its process's other thread (`pthread_exit` in `main`): the
/// kernel sends a process exit for the leader, and the last thread's exit (a thread's
/// event) ends the process with its status. By then `/proc/<pid>` is the zombie leader's,
/// without a command line. Before the fix the last exit, the one with the exit status,
/// was read from there: the comm instead of the command line (and on a cgroup v1 host the
/// root cgroup, so no container).
#[test]
fn threads_that_outlive_their_leader_keep_the_process_info() {
    let Some(mut l) = open("leader_exit", EventSet::FORK | EventSet::EXIT) else {
        return;
    };
    let mut e = Enricher::new();
    let (r, w) = pipe();
    let mut stack = vec![0u8; 256 << 10];
    let child = leader_exits_first((r, w), &mut stack);
    close(r);
    let (mut fork, mut leader_exit, mut last_exit) = (None, None, None);
    let mut w_open = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while last_exit.is_none() && std::time::Instant::now() < deadline {
        // The thread ends the process once the leader's exit has been enriched.
        if leader_exit.is_some() && w_open {
            close(w);
            w_open = false;
        }
        let Some(Received::Event(ev)) = l.recv_timeout(Some(Duration::from_millis(50))).unwrap()
        else {
            continue;
        };
        let info = e.enrich(&ev);
        match ev.body {
            EventBody::Fork { parent, child: c } if c.tgid == child && !c.is_thread() => {
                assert_eq!(parent.tgid, my_pid());
                fork = info;
            }
            EventBody::Exit {
                process, status, ..
            } if process.tgid == child => {
                if process.is_thread() {
                    assert_eq!(status.code(), Some(3));
                    last_exit = info;
                } else {
                    leader_exit = info;
                }
            }
            _ => {}
        }
    }
    if w_open {
        close(w);
    }
    let mut st = 0;
    // SAFETY: waits for our own child; `st` is valid for writes.
    unsafe { libc::waitpid(child as i32, &mut st, 0) };
    let fork = fork.expect("fork seen");
    let leader_exit = leader_exit.expect("leader exit seen");
    let last_exit = last_exit.expect("last thread's exit seen");
    assert_eq!(libc::WEXITSTATUS(st), 3);
    assert_eq!(leader_exit.process_key, fork.process_key);
    assert_eq!(last_exit.process_key, fork.process_key);
    assert_eq!(
        (last_exit.cmdline.as_deref(), last_exit.cmdline_source),
        (fork.cmdline.as_deref(), InfoSource::Inherited),
        "{last_exit:?}"
    );
    assert_eq!(last_exit.cgroup, fork.cgroup);
}

/// Cycles the pids with children that exit at once until one gets `target`; that one execs
/// `/bin/sleep <secs>` and is returned (`None` if the pid never came back to this test).
/// `every_512` runs every 512 children (to keep reading events meanwhile).
fn take_pid(target: u32, secs: &str, mut every_512: impl FnMut()) -> Option<u32> {
    let path = std::ffi::CString::new("/bin/sleep").unwrap();
    let args = [
        std::ffi::CString::new("sleep").unwrap(),
        std::ffi::CString::new(secs).unwrap(),
    ];
    let argv = [args[0].as_ptr(), args[1].as_ptr(), std::ptr::null()];
    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    for i in 0..4 * pid_max {
        // SAFETY: the child runs only async-signal-safe calls (getpid, execv, _exit) on
        // data prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: as above; `argv` is a NULL-terminated array of C strings.
            unsafe {
                if libc::getpid() as u32 == target {
                    libc::execv(path.as_ptr(), argv.as_ptr());
                }
                libc::_exit(0);
            }
        }
        if pid as u32 == target {
            return Some(target);
        }
        reap(pid as u32);
        if i % 512 == 0 {
            every_512();
        }
    }
    None
}

/// An enricher a whole pid cycle behind (a big receive buffer, a fork storm): when it gets
/// to a process's fork and exec, the process is gone and its pid belongs to another. What
/// `/proc/<pid>` says then is the other process's: before the fix the fork was given its
/// cgroup and pid namespace and the exec its command line, under the first process's key.
/// Now a late event's reads are checked against the process's start time (the event's
/// process started before the event; a fork's child no later than the event's tick).
#[test]
fn a_late_event_never_reads_the_next_holder_of_its_pid() {
    let Some(mut l) = open(
        "late_reads",
        EventSet::FORK | EventSet::EXEC | EventSet::EXIT,
    ) else {
        return;
    };
    let mut e = Enricher::new();
    let mut old = std::process::Command::new("/bin/sleep")
        .arg("1000")
        .spawn()
        .expect("/bin/sleep");
    let target = old.id();
    let old_key = e.proc_key(target).expect("sleep is alive");
    // Its fork and exec, kept for later.
    let mut kept = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(Received::Event(ev)) = l.recv_timeout(Some(Duration::from_millis(50))).unwrap()
        {
            let mine = ev.task().is_some_and(|t| t.tgid == target);
            let exec = matches!(ev.body, EventBody::Exec { .. });
            kept.push(ev);
            if mine && exec {
                break;
            }
        }
    }
    old.kill().unwrap();
    old.wait().unwrap();
    let Some(new) = take_pid(target, "999", || {}) else {
        eprintln!("late_reads: SKIPPED, pid {target} did not come back to this test");
        return;
    };
    let new_key = e.proc_key(new);
    // Now the enricher gets to the old events.
    let (mut fork, mut exec) = (None, None);
    for ev in &kept {
        let info = e.enrich(ev);
        match ev.body {
            EventBody::Fork { child, .. } if child.tgid == target => fork = info,
            EventBody::Exec { process } if process.tgid == target => exec = info,
            _ => {}
        }
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(new as i32, libc::SIGKILL) };
    reap(new);
    let fork = fork.expect("fork kept");
    let exec = exec.expect("exec kept");
    eprintln!("old {old_key}, new {new_key:?}\nfork {fork:?}\nexec {exec:?}");
    assert_ne!(new_key, Some(old_key));
    assert_eq!(fork.process_key, Some(old_key));
    assert_ne!(fork.cgroup_source, InfoSource::Proc, "{fork:?}");
    assert_ne!(fork.pidns_source, InfoSource::Proc, "{fork:?}");
    assert_eq!(exec.process_key, Some(old_key));
    assert_ne!(exec.cmdline.as_deref(), Some("sleep 999"));
    assert_eq!(exec.cmdline_source, InfoSource::Exited, "{exec:?}");
}

/// Mount points of the cgroup v1 hierarchies with `controller` among their options.
fn cgroup1_mount(controller: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| f[1].to_string())
    })
}

/// Creates `path` (relative, `/`-separated) under `root`, moves `pid` there; the
/// directories made, deepest first, for removal.
fn enter_cgroup(root: &str, path: &str, pid: u32) -> Vec<std::path::PathBuf> {
    let mut made = Vec::new();
    let mut dir = std::path::PathBuf::from(root);
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        dir.push(comp);
        std::fs::create_dir(&dir).unwrap();
        made.push(dir.clone());
    }
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    made.reverse();
    made
}

/// On a cgroup v1 (hybrid) host, deep paths in a few hierarchies make `/proc/<pid>/cgroup`
/// longer than the 8 KiB the enricher read: the v2 line, last, was cut and the prefix of
/// its path was reported as the process's cgroup (read from `/proc`), without its
/// container.
#[test]
fn a_long_proc_cgroup_file_is_read_whole() {
    if kernel_socket("long_cgroup").is_none() {
        return;
    }
    let v1: Vec<String> = ["pids", "cpu", "blkio"]
        .iter()
        .filter_map(|c| cgroup1_mount(c))
        .collect();
    let (Some(v2root), 3) = (cgroup2_mount(), v1.len()) else {
        eprintln!("long_cgroup: SKIPPED, not a hybrid host with pids, cpu and blkio on v1");
        return;
    };
    let tag = format!("cnbus-long-{}", my_pid());
    // 12 components of 250 bytes: 3000 bytes per line.
    let deep: String = (0..12)
        .map(|i| format!("/{tag}-{i}-{}", "x".repeat(230)))
        .collect();
    let id = format!(
        "{:032x}{:032x}",
        u128::from(my_pid()),
        u128::from(cnbus::sys::monotonic_ns())
    );
    let (r, w) = pipe();
    let child = fork_child((r, w));
    let mut made = Vec::new();
    for root in &v1 {
        made.extend(enter_cgroup(root, &deep, child));
    }
    let v2path = format!("{deep}/{id}");
    made.extend(enter_cgroup(&v2root, &v2path, child));
    let text = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
    let info = Enricher::new().process(child);
    close(w);
    close(r);
    reap(child);
    for d in &made {
        let _ = std::fs::remove_dir(d);
    }
    assert!(text.len() > 8192, "{}", text.len());
    assert_eq!(
        info.cgroup.as_deref(),
        Some(v2path.as_str()),
        "{:?}",
        info.cgroup.as_deref().map(str::len)
    );
    assert_eq!(info.container_id.as_deref(), Some(id.as_str()));
}

/// A fork storm (`stress-ng --fork 2`) read slowly through a small receive buffer, so that
/// exits are lost (most runs; how many is the host's doing) and their entries would stay:
/// the cache never holds more than its capacity, and what it dropped is counted.
#[test]
fn the_cache_stays_bounded_in_a_fork_storm_with_lost_exits() {
    let Some(_) = kernel_socket("storm_bound") else {
        return;
    };
    if std::process::Command::new("stress-ng")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "stress-ng is required under CI"
        );
        eprintln!("storm_bound: SKIPPED, no stress-ng");
        return;
    }
    let mut l = ProcListener::builder()
        .events(EventSet::FORK | EventSet::EXEC | EventSet::EXIT)
        .recv_buffer(64 << 10)
        .open()
        .unwrap();
    const CAPACITY: usize = 16;
    let mut e = Enricher::with_config(cnbus::proc::EnrichConfig {
        capacity: CAPACITY,
        read_at_fork: false,
        ..Default::default()
    });
    let mut storm = std::process::Command::new("stress-ng")
        .args(["--fork", "2", "--timeout", "2", "--quiet"])
        .spawn()
        .unwrap();
    let (mut max_cached, mut losses, mut events) = (0, 0, 0u64);
    let mut done_at: Option<std::time::Instant> = None;
    loop {
        if done_at.is_none() && storm.try_wait().unwrap().is_some() {
            done_at = Some(std::time::Instant::now());
        }
        let done = done_at.is_some();
        // Other tests' events may keep the queue busy after the storm: a bound.
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        match l.recv_timeout(Some(Duration::from_millis(20))).unwrap() {
            Some(Received::Event(ev)) => {
                events += 1;
                e.enrich(&ev);
                max_cached = max_cached.max(e.stats().cached);
            }
            Some(Received::Lost(_)) => {
                losses += 1;
                e.note_loss();
            }
            None if done => break,
            None => {}
        }
        // The storm's events are read slower than they come: some are lost.
        if !done && events % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let st = e.stats();
    eprintln!("{events} events, {losses} loss reports, most cached {max_cached}, {st:?}");
    assert!(events > 1000, "a storm: {events}");
    assert!(max_cached <= CAPACITY as u64, "{max_cached}");
}

/// What `thread_execs`' second thread runs: waits for EOF on the pipe, then execs
/// `/bin/sleep 1` (raw system calls only).
extern "C" fn exec_from_thread(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the ExecArgs the parent prepared before the fork, alive in
    // the child's copy of its memory; `b` is valid for one byte of writes.
    unsafe {
        let a = &*(arg as *const ExecArgs);
        let mut b = [0u8; 1];
        libc::read(a.fd, b.as_mut_ptr().cast(), 1);
        libc::execv(a.path, a.argv.as_ptr());
        libc::syscall(libc::SYS_exit_group, 9);
    }
    0
}

struct ExecArgs {
    fd: i32,
    path: *const libc::c_char,
    argv: [*const libc::c_char; 3],
}

/// A process whose second thread execs (Go's `syscall.Exec` runs on any thread): the
/// kernel ends the leader (an exit event for the process's pid), gives the thread the
/// leader's pid and start time, then sends the exec. The key stays the same through all of
/// it, and the exec reads the new image.
#[test]
fn an_exec_from_a_thread_keeps_the_key_and_reads_the_new_image() {
    let Some(mut l) = open(
        "thread_exec",
        EventSet::FORK | EventSet::EXEC | EventSet::EXIT,
    ) else {
        return;
    };
    let mut e = Enricher::new();
    let (r, w) = pipe();
    let path = std::ffi::CString::new("/bin/sleep").unwrap();
    let (a0, a1) = (
        std::ffi::CString::new("sleep").unwrap(),
        std::ffi::CString::new("1").unwrap(),
    );
    let args = ExecArgs {
        fd: r,
        path: path.as_ptr(),
        argv: [a0.as_ptr(), a1.as_ptr(), std::ptr::null()],
    };
    let mut stack = vec![0u8; 256 << 10];
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: the child runs only async-signal-safe system calls (close, clone, pause,
    // read, execv) on data prepared before the fork; the thread has its own stack.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: as above.
        unsafe {
            libc::close(w);
            let flags = libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM;
            let arg = &args as *const ExecArgs as *mut libc::c_void;
            if libc::clone(exec_from_thread, top as *mut libc::c_void, flags, arg) < 0 {
                libc::_exit(9);
            }
            loop {
                libc::pause();
            }
        }
    }
    let child = child as u32;
    close(r);
    let (mut fork, mut exec, mut exits) = (None, None, Vec::new());
    let mut w_open = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while exits.len() < 2 && std::time::Instant::now() < deadline {
        // The thread execs once the fork has been enriched.
        if fork.is_some() && w_open {
            close(w);
            w_open = false;
        }
        let Some(Received::Event(ev)) = l.recv_timeout(Some(Duration::from_millis(50))).unwrap()
        else {
            continue;
        };
        let info = e.enrich(&ev);
        match ev.body {
            EventBody::Fork { child: c, .. } if c.tgid == child && !c.is_thread() => fork = info,
            EventBody::Exec { process } if process.tgid == child => exec = info,
            EventBody::Exit { process, .. } if process.tgid == child && !process.is_thread() => {
                exits.push(info.unwrap())
            }
            _ => {}
        }
    }
    if w_open {
        close(w);
    }
    reap(child);
    let fork = fork.expect("fork seen");
    let exec = exec.expect("exec seen");
    assert_eq!(
        exits.len(),
        2,
        "the leader's end and the process's: {exits:?}"
    );
    assert_eq!(exec.process_key, fork.process_key);
    assert_eq!(
        (exec.cmdline.as_deref(), exec.cmdline_source),
        (Some("sleep 1"), InfoSource::Proc)
    );
    assert_eq!(exits[0].process_key, fork.process_key);
    assert_eq!(exits[0].cmdline, fork.cmdline);
    assert_eq!(exits[1].process_key, fork.process_key);
    assert_eq!(exits[1].cmdline.as_deref(), Some("sleep 1"));
}
