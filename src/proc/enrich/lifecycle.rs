//! How the [`Enricher`] keeps its cache: what a fork, an exec and an unknown process read
//! from `/proc`, what they inherit, and when a cached entry is checked again after a loss.

use std::sync::Arc;

use super::config::is_spawner;
use super::*;
use crate::proc::event::Task;

impl Enricher {
    pub(super) fn key(&self, pid: u32, start_ticks: u64) -> ProcessKey {
        ProcessKey {
            boot: self.boot,
            pid,
            start_ticks,
        }
    }

    /// The cached entry of `pid`, checked against `/proc` if events were lost since it was
    /// last known good, or if the stream has shown no fork yet.
    ///
    /// An entry can only be trusted while every new holder of its pid would be announced:
    /// a process gets its pid at a fork, whose event replaces the entry. A stream without
    /// forks (the kernel filtering, `proctrace -e exec`, `-e exec,nonzero-exit`) announces
    /// none, and exits may be missing from it too, so an exited process's entry would be
    /// taken for the process that has its pid now: another process's key, parent, pid
    /// namespace. Until a fork is seen every entry is checked at each use (one read of
    /// `stat`, what a loss costs once per entry).
    pub(super) fn cached(&mut self, pid: u32) -> Option<&mut Entry> {
        let epoch = self.epoch;
        let trusted = self.forks_seen;
        let stale = match self.cache.get_mut(pid) {
            None => return None,
            Some(e) if e.epoch == epoch && trusted => false,
            Some(e) => {
                let start = e.info.process_key.map(|k| k.start_ticks);
                self.pid_reused(pid, start)
            }
        };
        if stale {
            self.stats.stale += 1;
            self.cache.remove(pid);
            return None;
        }
        let e = self.cache.get_mut(pid)?;
        e.epoch = epoch;
        Some(e)
    }

    /// The event being enriched in clock ticks on `/proc`'s start-time clock (see
    /// `TickClock`); `None` outside `enrich`. The offset between the clocks is read now: it
    /// only grows (suspends), so this is never earlier than the event.
    fn event_ticks(&self) -> Option<u64> {
        let ts = self.event_ns?;
        let offset = crate::sys::boottime_ns().saturating_sub(crate::sys::monotonic_ns());
        Some(self.clock.ticks(ts.saturating_add(offset)))
    }

    /// True when the event being enriched is older than the least time in which its pid
    /// could have been freed and handed out again (`pid_max` forks): its process may be
    /// gone and `/proc/<pid>` another process's, so reads for it that succeeded are
    /// checked against the start time (one more read of `stat`, only for an enricher that
    /// far behind).
    fn late(&self) -> bool {
        self.event_ns
            .is_some_and(|ts| crate::sys::monotonic_ns().saturating_sub(ts) > self.pid_cycle_ns)
    }

    /// True when `/proc/<pid>/stat` shows a process started after the one whose start
    /// ticks the cache holds (`start`): the cached one is gone and its pid reused. A
    /// process gone now (its exit is the likely next event) is not. Neither is an earlier
    /// start: a key derived from a fork event can only be later than the kernel's start
    /// time (the event is stamped after it, see "Process keys" in `docs/PROC.md`), so
    /// that is the same process, whose key stays the one its fork gave.
    fn pid_reused(&mut self, pid: u32, start: Option<u64>) -> bool {
        match (self.fs.stat(pid), start) {
            (Some(st), Some(start)) => st.start_ticks > start,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// True when `/proc/<pid>/stat` shows the process whose start ticks are `start` (or
    /// one started earlier: a fork-derived key can be a tick late). Checked after reads
    /// for a late event: the process was there when it was checked, so it was there for
    /// the reads before; gone, or a later process, and the reads may have been another's.
    fn same_process(&mut self, pid: u32, start: Option<u64>) -> bool {
        matches!((self.fs.stat(pid), start), (Some(st), Some(s)) if st.start_ticks <= s)
    }

    pub(super) fn info(&mut self, pid: u32) -> ProcessInfo {
        self.task_info(Task { pid, tgid: pid })
    }

    /// The attributes of `task`'s process: from the cache (see `known`), else read from
    /// `/proc` and cached.
    pub(super) fn task_info(&mut self, task: Task) -> ProcessInfo {
        if let Some(info) = self.known(task) {
            return info;
        }
        let info = self.read_uncached(task.tgid);
        if info.process_key.is_some() {
            self.insert(task.tgid, info.clone());
        }
        info
    }

    /// What the cache knows of `task`'s process. For a thread of a process that is not
    /// cached, that can be a process whose leader already exited: a leader may end
    /// (`pthread_exit`) before the process's other threads, and the last of them ends
    /// the process with its exit status. `/proc/<tgid>` is then the zombie leader's,
    /// with no command line left (only the comm) and, on cgroup v1, the root cgroup, so
    /// the process's info from before the leader's exit is the answer, unless its pid
    /// now belongs to a later process. (Kept for processes seen creating a thread.)
    pub(super) fn known(&mut self, task: Task) -> Option<ProcessInfo> {
        let info = match self.cached(task.tgid) {
            Some(e) => e.info.clone(),
            None if task.is_thread() => {
                let start = self.exited.get_mut(task.tgid)?.process_key;
                if self.pid_reused(task.tgid, start.map(|k| k.start_ticks)) {
                    self.exited.remove(task.tgid);
                    return None;
                }
                self.exited.get_mut(task.tgid)?.clone()
            }
            None => return None,
        };
        self.stats.hits += 1;
        Some(info)
    }

    pub(super) fn read_uncached(&mut self, pid: u32) -> ProcessInfo {
        self.stats.misses += 1;
        self.read_process(pid).unwrap_or_else(|| {
            self.stats.gone += 1;
            ProcessInfo::unknown()
        })
    }

    pub(super) fn insert(&mut self, pid: u32, info: ProcessInfo) {
        let epoch = self.epoch;
        let entry = Entry {
            info,
            epoch,
            threaded: false,
        };
        if self.cache.insert(pid, entry).is_some() {
            self.stats.stale += 1;
        }
    }

    /// Everything about `pid` from `/proc`; `None` when its `stat` cannot be read.
    pub(super) fn read_process(&mut self, pid: u32) -> Option<ProcessInfo> {
        let st = self.fs.stat(pid)?;
        // The event's process started before the event: a later start is the next holder
        // of the pid, found by an enricher a pid cycle behind. (One tick of slack: the
        // clocks are read apart; a pid cannot go round within a tick.)
        if self
            .event_ticks()
            .is_some_and(|t| st.start_ticks > t.saturating_add(1))
        {
            return None;
        }
        let parent_key = match st.ppid {
            0 => None,
            ppid => match self.cached(ppid) {
                Some(e) => e.info.process_key,
                None => self.proc_key(ppid),
            },
        };
        let mut info = ProcessInfo {
            process_key: Some(self.key(pid, st.start_ticks)),
            parent_key,
            ..ProcessInfo::unknown()
        };
        self.read_cgroup(pid, st.exiting, &mut info);
        self.read_pidns(pid, &mut info);
        (info.cmdline, info.cmdline_source) = self.read_cmdline(pid);
        Some(info)
    }

    /// Reads the cgroup into `info`; false (and `info` unchanged) when the process is gone.
    /// An `exiting` task has only its cgroup v2 line to go by (see `ProcFs::cgroup`):
    /// without one, its cgroup is gone with it.
    pub(super) fn read_cgroup(&mut self, pid: u32, exiting: bool, info: &mut ProcessInfo) -> bool {
        let Some(path) = self.fs.cgroup(pid, exiting) else {
            if self.fs.denied && info.cgroup_source == InfoSource::Exited {
                info.cgroup_source = InfoSource::Denied;
            }
            return false;
        };
        info.container_id = container_id(&path).map(Arc::from);
        info.cgroup = Some(path.into());
        info.cgroup_source = InfoSource::Proc;
        true
    }

    /// Reads the pid namespace into `info`; false (and `info` unchanged) when the process is
    /// gone.
    pub(super) fn read_pidns(&mut self, pid: u32, info: &mut ProcessInfo) -> bool {
        let Some(ns) = self.fs.pidns(pid) else {
            if self.fs.denied && info.pidns_source == InfoSource::Exited {
                info.pidns_source = InfoSource::Denied;
            }
            return false;
        };
        info.pidns = Some(ns);
        // In the initial namespace the inner pid is the host pid: no need for `status`.
        info.ns_pid = if ns == PID_INIT_INO {
            Some(pid)
        } else {
            self.fs.ns_pid(pid)
        };
        info.pidns_source = InfoSource::Proc;
        true
    }

    pub(super) fn read_cmdline(&mut self, pid: u32) -> (Option<Arc<str>>, InfoSource) {
        match self.fs.cmdline(pid, self.cfg.max_cmdline) {
            Some(Some(c)) => (Some(c.into()), InfoSource::Proc),
            Some(None) => match self.fs.comm(pid) {
                Some(c) => (Some(c.into()), InfoSource::Comm),
                None => (None, self.failure()),
            },
            None => (None, self.failure()),
        }
    }

    /// The source of a value the last read could not give.
    pub(super) fn failure(&self) -> InfoSource {
        if self.fs.denied {
            InfoSource::Denied
        } else {
            InfoSource::Exited
        }
    }

    pub(super) fn fork(&mut self, timestamp_ns: u64, ppid: u32, pid: u32) -> ProcessInfo {
        // A new process has the pid: any earlier holder's info is over.
        self.exited.remove(pid);
        let parent = match self.cached(ppid) {
            Some(e) => Some(e.info.clone()),
            None => {
                let p = self.read_process(ppid);
                if let Some(p) = &p {
                    self.insert(ppid, p.clone());
                }
                p
            }
        };
        let offset = crate::sys::boottime_ns().saturating_sub(crate::sys::monotonic_ns());
        let derived = self.clock.ticks(timestamp_ns.saturating_add(offset));
        let start_ticks = match self.clock.fork_ticks(timestamp_ns, offset) {
            Some(t) => t,
            None => {
                self.stats.start_time_reads += 1;
                match self.fs.stat(pid) {
                    // The child started no later than its fork event: a later start is
                    // the pid's next holder (the child is gone).
                    Some(st) if st.start_ticks <= derived => st.start_ticks,
                    _ => derived,
                }
            }
        };
        let mut info = ProcessInfo {
            process_key: Some(self.key(pid, start_ticks)),
            parent_key: parent.as_ref().and_then(|p| p.process_key),
            ..ProcessInfo::unknown()
        };
        // Without reads at every fork the child is still read when its parent may have not
        // made it where the parent is: the parent is a spawner, or its program is unknown
        // (no entry, or a command line that could not be read), so that it cannot be ruled
        // out. The second case is common: `runc run -d` has often exited before a reader
        // that lags behind gets to its exec event, so its exec finds no command line, and
        // the container's init (forked with `CLONE_PARENT`, so the event names `runc run`
        // as its parent) would otherwise inherit runc's host cgroup and pid namespace.
        let read = self.cfg.read_at_fork
            || match parent.as_ref().map(|p| p.cmdline.as_deref()) {
                None | Some(None) => true,
                Some(Some(c)) => is_spawner(&self.cfg.spawners, c),
            };
        let inherit_cmdline = parent
            .as_ref()
            .is_some_and(|p| matches!(p.cmdline_source, InfoSource::Proc | InfoSource::Inherited));
        let (reads_before, failed_before) = (self.fs.reads, self.fs.failed);
        let mut have_cgroup = read && self.read_cgroup(pid, false, &mut info);
        // A child gone before its cgroup could be read is gone for its namespace too: one
        // failed read is enough (most children of a fork storm are gone by then).
        let gone = self.fs.failed > failed_before && !self.fs.denied;
        // The kernel sends the fork event before `cgroup_post_fork()` attaches the child to
        // its cgroups: until then the child is in the root cgroup of every hierarchy
        // (`init_css_set`), and a read in that window says "/". A child is created in the
        // cgroup of the task that forked it, so "/" under a parent elsewhere is that
        // window: the parent's cgroup is the better answer, marked inherited.
        if have_cgroup && info.cgroup.as_deref() == Some("/") {
            if let Some(p) = parent.as_ref() {
                if p.cgroup.as_deref().is_some_and(|c| c != "/") {
                    self.stats.unattached_cgroup_reads += 1;
                    have_cgroup = false;
                }
            }
        }
        let mut have_pidns = read && !gone && self.read_pidns(pid, &mut info);
        (info.cmdline, info.cmdline_source) = match parent.as_ref() {
            Some(p) if inherit_cmdline => (p.cmdline.clone(), InfoSource::Inherited),
            _ => self.read_cmdline(pid),
        };
        // Late, the child may be gone and its pid another process's: then nothing read
        // from `/proc/<pid>` is the child's.
        if self.fs.reads > reads_before && self.late() && !self.same_process(pid, Some(start_ticks))
        {
            let unknown = ProcessInfo::unknown();
            (info.cgroup, info.container_id, info.cgroup_source) =
                (unknown.cgroup, unknown.container_id, unknown.cgroup_source);
            (info.pidns, info.ns_pid, info.pidns_source) =
                (unknown.pidns, unknown.ns_pid, unknown.pidns_source);
            if !inherit_cmdline {
                (info.cmdline, info.cmdline_source) = (None, InfoSource::Exited);
            }
            (have_cgroup, have_pidns) = (false, false);
        }
        if !have_cgroup {
            if let Some(p) = parent.as_ref().filter(|p| p.cgroup.is_some()) {
                info.cgroup = p.cgroup.clone();
                info.container_id = p.container_id.clone();
                info.cgroup_source = InfoSource::Inherited;
            }
        }
        if !have_pidns {
            if let Some(p) = parent.as_ref().filter(|p| p.pidns.is_some()) {
                info.pidns = p.pidns;
                info.ns_pid = (p.pidns == Some(PID_INIT_INO)).then_some(pid);
                info.pidns_source = InfoSource::Inherited;
            }
        }
        self.insert(pid, info.clone());
        info
    }

    pub(super) fn exec(&mut self, pid: u32) -> ProcessInfo {
        let Some(start) = self
            .cached(pid)
            .map(|e| e.info.process_key.map(|k| k.start_ticks))
        else {
            // Not cached: everything is read now.
            return self.info(pid);
        };
        let reads_before = self.fs.reads;
        let (cmdline, source) = self.read_cmdline(pid);
        let mut info = match self.cache.get_mut(pid) {
            Some(e) => e.info.clone(),
            None => return self.info(pid),
        };
        self.stats.hits += 1;
        let cached = info.clone();
        info.cmdline = cmdline;
        info.cmdline_source = source;
        // The cgroup can change at any time (no event says so): refresh it, unless the
        // read says the root while the entry knew better (on a v1-only host an exiting
        // task reads as in the root). The pid namespace cannot change; read it only if it
        // was inherited.
        let before = (
            info.cgroup.clone(),
            info.container_id.clone(),
            info.cgroup_source,
        );
        if self.read_cgroup(pid, false, &mut info)
            && info.cgroup.as_deref() == Some("/")
            && before.0.as_deref().is_some_and(|c| c != "/")
        {
            (info.cgroup, info.container_id, info.cgroup_source) = before;
        }
        if info.pidns_source != InfoSource::Proc {
            self.read_pidns(pid, &mut info);
        }
        // Late, the process may be gone and its pid another's: then it is an exec of a
        // gone process, whose new command line nobody can read any more, and nothing read
        // is its.
        if self.fs.reads > reads_before && self.late() && !self.same_process(pid, start) {
            info = ProcessInfo {
                cmdline: None,
                cmdline_source: InfoSource::Exited,
                ..cached
            };
        }
        if let Some(e) = self.cache.get_mut(pid) {
            e.info = info.clone();
        }
        info
    }
}
