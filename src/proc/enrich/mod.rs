//! Process attribution for proc events: a pid-reuse-safe [`ProcessKey`], the cgroup and
//! container, the pid namespace and the pid inside it, and the command line, each saying
//! where it came from ([`Source`]).
//!
//! The decoder ([`ProcEvent`]) stays pure; the [`Enricher`] is the part that reads `/proc`.
//! It keeps what it knows about each live process in a bounded cache fed by fork, exec and
//! exit events, so that most events cost no `/proc` read:
//!
//! * a **fork** derives the child's key from the event's timestamp (see "Process keys" in
//!   `docs/PROC.md`), inherits the parent's command line (the child runs the same image),
//!   and reads the child's cgroup and pid namespace (or inherits them, see
//!   [`EnrichConfig::read_at_fork`]);
//! * an **exec** re-reads the command line (the one from before the exec is never reported
//!   for the new image: if the process is already gone, the command line is `None` with
//!   [`Source::Exited`]) and the cgroup;
//! * an **exit** is enriched from the cache, then its entry is removed;
//! * any event of a process the cache does not know reads `/proc` once.
//!
//! ```no_run
//! use cnbus::proc::{Enricher, ProcListener, Received};
//!
//! let mut enricher = Enricher::new();
//! let mut listener = ProcListener::builder().open()?;
//! for r in listener.iter() {
//!     match r? {
//!         Received::Event(ev) => {
//!             if let Some(info) = enricher.enrich(&ev) {
//!                 println!(
//!                     "{} {} container={:?} cmdline={:?} ({})",
//!                     ev.kind(),
//!                     info.process_key.map(|k| k.to_string()).unwrap_or_default(),
//!                     info.container_id,
//!                     info.cmdline,
//!                     info.cmdline_source,
//!                 );
//!             }
//!         }
//!         // Events were lost: cached entries are re-checked against /proc before reuse.
//!         Received::Lost(_) => enricher.note_loss(),
//!     }
//! }
//! # Ok::<(), cnbus::Error>(())
//! ```

mod cache;
mod container;
mod key;
mod procfs;

use std::fmt;
use std::sync::Arc;

pub use container::{
    container_id, container_of, parse_cgroup, ContainerMatch, RuntimePattern, RUNTIME_PATTERNS,
};
pub use key::{boot_id, BadProcessKey, ProcessKey};

use self::cache::Cache;
use self::key::TickClock;
use self::procfs::ProcFs;
use super::event::{EventBody, ProcEvent};
use crate::sys::PID_INIT_INO;

/// Where an attribute of a [`ProcessInfo`] came from. Serialised in lower case.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Read from `/proc/<pid>/…` for this process (for the command line: for its current
    /// image, after the event's exec if any).
    Proc,
    /// Copied from the parent at fork, not read for this process.
    Inherited,
    /// Command line only: the command line was empty (a kernel thread, or a process whose
    /// memory was already released at exit); the value is the 16-byte task name.
    Comm,
    /// The process was gone before it could be read: the value is `None`.
    Exited,
    /// `/proc` refused the read (`EACCES`: `hidepid`, or the ptrace access check on a
    /// namespace link, which even root can fail for a protected process): the value is
    /// `None` although the process may be alive.
    Denied,
}

impl Source {
    /// `proc`, `inherited`, `comm`, `exited` or `denied`.
    pub const fn name(self) -> &'static str {
        match self {
            Source::Proc => "proc",
            Source::Inherited => "inherited",
            Source::Comm => "comm",
            Source::Exited => "exited",
            Source::Denied => "denied",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the [`Enricher`] knows about the process an event is about. Serialised with these
/// field names; `None` is `null`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The process's key; `None` only when its fork was not seen and it was gone before
    /// `/proc/<pid>/stat` could be read.
    pub process_key: Option<ProcessKey>,
    /// The key of the parent: the one named by the fork event when the fork was seen,
    /// else the current parent (`/proc/<pid>/stat` field 4); `None` for pid 1 and kernel
    /// threads' parent 0, or when it could not be read.
    pub parent_key: Option<ProcessKey>,
    /// The 64-hex container id when `cgroup` is a known container runtime's path
    /// ([`RUNTIME_PATTERNS`]); `None` on the host or when `cgroup` is `None`. Its source is
    /// `cgroup_source`.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub container_id: Option<Arc<str>>,
    /// The cgroup path: the `name=systemd` line of `/proc/<pid>/cgroup` on a cgroup v1 or
    /// hybrid host, else the v2 `0::` line.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub cgroup: Option<Arc<str>>,
    /// Where `cgroup` and `container_id` came from (`proc`, `inherited`, `exited` or
    /// `denied`).
    pub cgroup_source: Source,
    /// The pid in the process's own (innermost) pid namespace: the last field of `NSpid`
    /// in `/proc/<pid>/status` (equal to the host pid in the initial namespace).
    pub ns_pid: Option<u32>,
    /// The inode number of the process's pid namespace (`/proc/<pid>/ns/pid`).
    pub pidns: Option<u64>,
    /// Where `ns_pid` and `pidns` came from (`proc`, `inherited`, `exited` or `denied`).
    pub pidns_source: Source,
    /// The command line, arguments joined by spaces (capped at
    /// [`EnrichConfig::max_cmdline`] bytes), or the task name when `cmdline_source` is
    /// `comm`.
    #[cfg_attr(feature = "serde", serde(with = "opt_arc_str"))]
    pub cmdline: Option<Arc<str>>,
    /// Where `cmdline` came from: `proc`, `inherited`, `comm`, `exited` or `denied`.
    pub cmdline_source: Source,
}

impl ProcessInfo {
    /// Nothing known: every attribute `None` with [`Source::Exited`].
    pub fn unknown() -> Self {
        ProcessInfo {
            process_key: None,
            parent_key: None,
            container_id: None,
            cgroup: None,
            cgroup_source: Source::Exited,
            ns_pid: None,
            pidns: None,
            pidns_source: Source::Exited,
            cmdline: None,
            cmdline_source: Source::Exited,
        }
    }

    /// True when the process is in a container ([`container_id`](Self::container_id) is
    /// `Some`).
    pub fn in_container(&self) -> bool {
        self.container_id.is_some()
    }
}

#[cfg(feature = "serde")]
mod opt_arc_str {
    use std::sync::Arc;

    pub fn serialize<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&**v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<str>>, D::Error> {
        let v: Option<std::borrow::Cow<'de, str>> = serde::Deserialize::deserialize(d)?;
        Ok(v.map(|s| Arc::from(&*s)))
    }
}

/// Settings of an [`Enricher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichConfig {
    /// Most processes kept (default 65 536). Beyond it the least recently used half is
    /// dropped and counted in [`EnrichStats::evictions`]; a dropped process is read from
    /// `/proc` again at its next event.
    pub capacity: usize,
    /// Read the child's cgroup and pid namespace at fork (default `true`). A child is
    /// created in its parent's cgroup and in the pid namespace its parent made for its
    /// children, but the parent a fork event names is the *real* parent: a runtime that
    /// forks with `CLONE_PARENT` (runc does, for a container's init and every `runc exec`)
    /// or that moved itself into another cgroup or pid namespace just before makes the
    /// child differ from that parent. With `false` a fork costs no `/proc` read (unless the
    /// start time is uncertain or the parent is unknown) and the child's cgroup and
    /// namespace are the parent's, marked [`Source::Inherited`], until its exec re-reads
    /// them.
    pub read_at_fork: bool,
    /// With `read_at_fork = false`: programs whose children are read at fork all the same
    /// (default [`SPAWNERS`]): container runtimes, which fork with `CLONE_PARENT` (so the
    /// parent a fork names did not make the child) and namespace tools, which enter or
    /// create a pid namespace before they fork. A program is matched by the base name of
    /// the first word of the parent's command line (or its comm): equal to an entry, or
    /// starting with an entry that ends in `-` or `:`.
    pub spawners: Vec<String>,
    /// Longest command line kept, in bytes (default 4096).
    pub max_cmdline: usize,
}

/// The default [`EnrichConfig::spawners`]: runc (also its `runc:[…]` stages), crun,
/// youki, runsc, conmon, containerd shims, nsenter, unshare.
pub const SPAWNERS: &[&str] = &[
    "runc",
    "runc:",
    "crun",
    "youki",
    "runsc",
    "conmon",
    "containerd-shim",
    "containerd-shim-",
    "nsenter",
    "unshare",
];

/// True when the command line `cmdline` is one of `spawners`' programs.
fn is_spawner(spawners: &[String], cmdline: &str) -> bool {
    let first = cmdline.split(' ').next().unwrap_or(cmdline);
    let prog = first.rsplit('/').next().unwrap_or(first);
    let prog = prog
        .strip_prefix('[')
        .and_then(|p| p.strip_suffix(']'))
        .unwrap_or(prog);
    spawners.iter().any(|s| {
        prog == s || ((s.ends_with('-') || s.ends_with(':')) && prog.starts_with(s.as_str()))
    })
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            capacity: 65_536,
            read_at_fork: true,
            spawners: SPAWNERS.iter().map(|s| s.to_string()).collect(),
            max_cmdline: 4096,
        }
    }
}

/// Counters of an [`Enricher`].
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnrichStats {
    /// Events enriched.
    pub events: u64,
    /// Events whose process was in the cache.
    pub hits: u64,
    /// Events whose process was not in the cache and was read from `/proc`.
    pub misses: u64,
    /// Of those, processes already gone (the event's attributes are `None`).
    pub gone: u64,
    /// `/proc` files read.
    pub proc_reads: u64,
    /// `/proc` files that could not be read (the process was gone).
    pub proc_read_failures: u64,
    /// Forks whose timestamp fell in the uncertain window after a clock tick, so the start
    /// time was read from `/proc/<pid>/stat`.
    pub start_time_reads: u64,
    /// Forks whose child read as being in the root cgroup while its parent was not: read
    /// before the kernel attached the child to its cgroup; the parent's cgroup was used
    /// (marked inherited).
    pub unattached_cgroup_reads: u64,
    /// Cache entries dropped to stay within [`EnrichConfig::capacity`].
    pub evictions: u64,
    /// Cache entries found stale (their pid was reused: an exit was lost) and replaced.
    pub stale: u64,
    /// Processes in the cache now.
    pub cached: u64,
}

struct Entry {
    info: ProcessInfo,
    /// The loss epoch in which the entry was last known good.
    epoch: u64,
}

/// Enriches proc events with process attributes. See the [module documentation](self).
///
/// One enricher per event stream, fed every event in order (fork, exec and exit at least;
/// events of other kinds are enriched from the cache). Single-threaded: `&mut self`.
pub struct Enricher {
    boot: u128,
    clock: TickClock,
    fs: ProcFs,
    cache: Cache<Entry>,
    cfg: EnrichConfig,
    stats: EnrichStats,
    epoch: u64,
}

impl fmt::Debug for Enricher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enricher")
            .field("boot", &format_args!("{:032x}", self.boot))
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Enricher::new()
    }
}

/// How long after a clock-tick boundary a fork timestamp is treated as uncertain (see
/// `docs/PROC.md`, "Process keys"): far above the delay between the kernel's two stamps.
const START_GUARD_NS: u64 = 1_000_000;

impl Enricher {
    /// An enricher with the default [`EnrichConfig`].
    pub fn new() -> Self {
        Enricher::with_config(EnrichConfig::default())
    }

    /// An enricher with `cfg`. Reads the boot id (0 when `/proc` does not give it).
    pub fn with_config(cfg: EnrichConfig) -> Self {
        Enricher::with_root(cfg, "/proc")
    }

    fn with_root(cfg: EnrichConfig, root: &str) -> Self {
        let tick_ns = 1_000_000_000 / crate::sys::clock_ticks_per_sec().max(1);
        Enricher {
            boot: boot_id().unwrap_or(0),
            clock: TickClock {
                tick_ns,
                guard_ns: START_GUARD_NS.min(tick_ns / 2),
            },
            fs: ProcFs::new(root),
            cache: Cache::new(cfg.capacity.max(2)),
            cfg,
            stats: EnrichStats::default(),
            epoch: 0,
        }
    }

    /// The boot id in the keys.
    pub fn boot_id(&self) -> u128 {
        self.boot
    }

    /// The counters.
    pub fn stats(&self) -> EnrichStats {
        EnrichStats {
            proc_reads: self.fs.reads,
            proc_read_failures: self.fs.failed,
            evictions: self.cache.evictions,
            cached: self.cache.len() as u64,
            ..self.stats
        }
    }

    /// The key `/proc/<pid>/stat` gives for `pid` now; `None` when it is gone.
    pub fn proc_key(&mut self, pid: u32) -> Option<ProcessKey> {
        let st = self.fs.stat(pid)?;
        Some(self.key(pid, st.start_ticks))
    }

    /// Tells the enricher that events were lost (a [`Loss`](super::Loss) report): an exit
    /// may have been missed and its pid reused, so every cached process is checked against
    /// `/proc/<pid>/stat` at its next event and replaced if its start time differs.
    pub fn note_loss(&mut self) {
        self.epoch += 1;
    }

    /// The attributes of the process `ev` is about (the child of a fork, the process of
    /// every other event; for a thread's event, its process); `None` for an ACK. Updates
    /// the cache as described in the [module documentation](self); an exit's entry is
    /// removed after it is enriched.
    pub fn enrich(&mut self, ev: &ProcEvent) -> Option<ProcessInfo> {
        let task = ev.task()?;
        self.stats.events += 1;
        Some(match ev.body {
            EventBody::Fork { parent, child } if !child.is_thread() => {
                self.fork(ev.timestamp_ns, parent.tgid, child.tgid)
            }
            EventBody::Exec { process } => self.exec(process.tgid),
            EventBody::Exit { process, .. } => {
                // Never cached anew: no later exit would remove it (a process's threads
                // can exit after its leader, whose exit removes the entry).
                let info = match self.cached(process.tgid).map(|e| e.info.clone()) {
                    Some(info) => {
                        self.stats.hits += 1;
                        info
                    }
                    None => self.read_uncached(process.tgid),
                };
                if !process.is_thread() {
                    self.cache.remove(process.tgid);
                }
                info
            }
            EventBody::Comm { process, comm } => {
                let mut info = self.info(process.tgid);
                if info.cmdline_source == Source::Comm {
                    let name: Arc<str> = comm.to_string_lossy().into();
                    info.cmdline = Some(name.clone());
                    if let Some(e) = self.cache.get_mut(process.tgid) {
                        e.info.cmdline = Some(name);
                    }
                }
                info
            }
            _ => self.info(task.tgid),
        })
    }

    /// The attributes of `pid` from the cache, or read from `/proc` (and cached) when it is
    /// not there; [`ProcessInfo::unknown`] when it is gone.
    pub fn process(&mut self, pid: u32) -> ProcessInfo {
        self.info(pid)
    }

    /// Reads `pid` from `/proc` again, replacing what the cache had (for a resync after a
    /// loss: an exec may have been missed, and a cached command line would then be the
    /// old image's); [`ProcessInfo::unknown`] (and the entry removed) when it is gone.
    /// Everything is then [`Source::Proc`], and the parent key is the current parent's.
    pub fn refresh(&mut self, pid: u32) -> ProcessInfo {
        self.cache.remove(pid);
        self.info(pid)
    }

    fn key(&self, pid: u32, start_ticks: u64) -> ProcessKey {
        ProcessKey {
            boot: self.boot,
            pid,
            start_ticks,
        }
    }

    /// The cached entry of `pid`, checked against `/proc` if events were lost since it was
    /// last known good.
    fn cached(&mut self, pid: u32) -> Option<&mut Entry> {
        let epoch = self.epoch;
        let stale = match self.cache.get_mut(pid) {
            None => return None,
            Some(e) if e.epoch == epoch => false,
            Some(e) => {
                let start = e.info.process_key.map(|k| k.start_ticks);
                match self.fs.stat(pid) {
                    Some(st) if Some(st.start_ticks) != start => true,
                    // Same process, or gone (its exit is the likely event): keep it.
                    _ => false,
                }
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

    fn info(&mut self, pid: u32) -> ProcessInfo {
        if let Some(e) = self.cached(pid) {
            let info = e.info.clone();
            self.stats.hits += 1;
            return info;
        }
        let info = self.read_uncached(pid);
        if info.process_key.is_some() {
            self.insert(pid, info.clone());
        }
        info
    }

    fn read_uncached(&mut self, pid: u32) -> ProcessInfo {
        self.stats.misses += 1;
        self.read_process(pid).unwrap_or_else(|| {
            self.stats.gone += 1;
            ProcessInfo::unknown()
        })
    }

    fn insert(&mut self, pid: u32, info: ProcessInfo) {
        let epoch = self.epoch;
        if self.cache.insert(pid, Entry { info, epoch }).is_some() {
            self.stats.stale += 1;
        }
    }

    /// Everything about `pid` from `/proc`; `None` when its `stat` cannot be read.
    fn read_process(&mut self, pid: u32) -> Option<ProcessInfo> {
        let st = self.fs.stat(pid)?;
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
        self.read_cgroup(pid, &mut info);
        self.read_pidns(pid, &mut info);
        (info.cmdline, info.cmdline_source) = self.read_cmdline(pid);
        Some(info)
    }

    /// Reads the cgroup into `info`; false (and `info` unchanged) when the process is gone.
    fn read_cgroup(&mut self, pid: u32, info: &mut ProcessInfo) -> bool {
        let Some(path) = self.fs.cgroup(pid) else {
            if self.fs.denied && info.cgroup_source == Source::Exited {
                info.cgroup_source = Source::Denied;
            }
            return false;
        };
        info.container_id = container_id(&path).map(Arc::from);
        info.cgroup = Some(path.into());
        info.cgroup_source = Source::Proc;
        true
    }

    /// Reads the pid namespace into `info`; false (and `info` unchanged) when the process is
    /// gone.
    fn read_pidns(&mut self, pid: u32, info: &mut ProcessInfo) -> bool {
        let Some(ns) = self.fs.pidns(pid) else {
            if self.fs.denied && info.pidns_source == Source::Exited {
                info.pidns_source = Source::Denied;
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
        info.pidns_source = Source::Proc;
        true
    }

    fn read_cmdline(&mut self, pid: u32) -> (Option<Arc<str>>, Source) {
        match self.fs.cmdline(pid, self.cfg.max_cmdline) {
            Some(Some(c)) => (Some(c.into()), Source::Proc),
            Some(None) => match self.fs.comm(pid) {
                Some(c) => (Some(c.into()), Source::Comm),
                None => (None, self.failure()),
            },
            None => (None, self.failure()),
        }
    }

    /// The source of a value the last read could not give.
    fn failure(&self) -> Source {
        if self.fs.denied {
            Source::Denied
        } else {
            Source::Exited
        }
    }

    fn fork(&mut self, timestamp_ns: u64, ppid: u32, pid: u32) -> ProcessInfo {
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
        let start_ticks = match self.clock.fork_ticks(timestamp_ns, offset) {
            Some(t) => t,
            None => {
                self.stats.start_time_reads += 1;
                match self.fs.stat(pid) {
                    Some(st) => st.start_ticks,
                    None => self.clock.ticks(timestamp_ns.saturating_add(offset)),
                }
            }
        };
        let mut info = ProcessInfo {
            process_key: Some(self.key(pid, start_ticks)),
            parent_key: parent.as_ref().and_then(|p| p.process_key),
            ..ProcessInfo::unknown()
        };
        let read = self.cfg.read_at_fork
            || match parent.as_ref() {
                None => true,
                Some(p) => p
                    .cmdline
                    .as_deref()
                    .is_some_and(|c| is_spawner(&self.cfg.spawners, c)),
            };
        let failed_before = self.fs.failed;
        let mut have_cgroup = read && self.read_cgroup(pid, &mut info);
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
        if !have_cgroup {
            if let Some(p) = parent.as_ref().filter(|p| p.cgroup.is_some()) {
                info.cgroup = p.cgroup.clone();
                info.container_id = p.container_id.clone();
                info.cgroup_source = Source::Inherited;
            }
        }
        if !(read && !gone && self.read_pidns(pid, &mut info)) {
            if let Some(p) = parent.as_ref().filter(|p| p.pidns.is_some()) {
                info.pidns = p.pidns;
                info.ns_pid = (p.pidns == Some(PID_INIT_INO)).then_some(pid);
                info.pidns_source = Source::Inherited;
            }
        }
        (info.cmdline, info.cmdline_source) = match parent.as_ref() {
            Some(p) if matches!(p.cmdline_source, Source::Proc | Source::Inherited) => {
                (p.cmdline.clone(), Source::Inherited)
            }
            _ => self.read_cmdline(pid),
        };
        self.insert(pid, info.clone());
        info
    }

    fn exec(&mut self, pid: u32) -> ProcessInfo {
        if self.cached(pid).is_none() {
            // Not cached: everything is read now.
            return self.info(pid);
        }
        let (cmdline, source) = self.read_cmdline(pid);
        let mut info = match self.cache.get_mut(pid) {
            Some(e) => e.info.clone(),
            None => return self.info(pid),
        };
        self.stats.hits += 1;
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
        if self.read_cgroup(pid, &mut info)
            && info.cgroup.as_deref() == Some("/")
            && before.0.as_deref().is_some_and(|c| c != "/")
        {
            (info.cgroup, info.container_id, info.cgroup_source) = before;
        }
        if info.pidns_source != Source::Proc {
            self.read_pidns(pid, &mut info);
        }
        if let Some(e) = self.cache.get_mut(pid) {
            e.info = info.clone();
        }
        info
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod spawner_tests {
    use super::*;

    #[test]
    fn spawners_by_program_name() {
        let sp: Vec<String> = SPAWNERS.iter().map(|s| s.to_string()).collect();
        for c in [
            "runc --root /x run -d c1",
            "/usr/sbin/runc exec c1 sh",
            "runc:[1:CHILD]",
            "[runc:[2:INIT]]",
            "/usr/bin/containerd-shim-runc-v2 -namespace moby",
            "containerd-shim",
            "nsenter -t 1 -p sh",
            "/usr/bin/unshare --pid --fork sh",
            "crun run x",
        ] {
            assert!(is_spawner(&sp, c), "{c}");
        }
        for c in [
            "bash",
            "/usr/bin/runcible",
            "sh -c runc",
            "containerd",
            "unshared",
            "",
        ] {
            assert!(!is_spawner(&sp, c), "{c}");
        }
    }
}
