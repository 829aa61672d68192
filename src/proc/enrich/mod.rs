//! Process attribution for proc events: a pid-reuse-safe [`ProcessKey`], the cgroup and
//! container, the pid namespace and the pid inside it, and the command line, each saying
//! where it came from ([`InfoSource`]).
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
//!   [`InfoSource::Exited`]) and the cgroup;
//! * an **exit** is enriched from the cache, then its entry is removed (a process whose
//!   leader exits first stays known to its remaining threads' events);
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
mod config;
mod container;
mod info;
mod key;
mod lifecycle;
mod procfs;

use std::fmt;
use std::sync::Arc;

pub use config::{EnrichConfig, SPAWNERS};
pub use container::{
    container_id, container_of, parse_cgroup, ContainerMatch, RuntimePattern, RUNTIME_PATTERNS,
};
pub use info::{EnrichStats, InfoSource, ProcessInfo};
pub use key::{boot_id, BadProcessKey, ProcessKey};

use self::cache::Cache;
use self::key::TickClock;
use self::procfs::ProcFs;
use super::event::{EventBody, ProcEvent, Task};
use crate::sys::PID_INIT_INO;

struct Entry {
    info: ProcessInfo,
    /// The loss epoch in which the entry was last known good.
    epoch: u64,
    /// A thread of the process was seen created: its threads may outlive its leader.
    threaded: bool,
}

/// Enriches proc events with process attributes. See the [module documentation](self).
///
/// One enricher per event stream, fed every event in order (fork, exec and exit at least;
/// events of other kinds are enriched from the cache). A stream filtered to fewer kinds
/// works too, at a cost: until it shows a fork, every cached process is checked against
/// `/proc/<pid>/stat` at each of its events, since its exit and its pid's next holder may
/// both be missing from the stream. Single-threaded: `&mut self`.
pub struct Enricher {
    boot: u128,
    clock: TickClock,
    fs: ProcFs,
    cache: Cache<Entry>,
    /// The last processes whose leader exited (see `known`): their other threads can
    /// outlive the leader.
    exited: Cache<ProcessInfo>,
    cfg: EnrichConfig,
    stats: EnrichStats,
    epoch: u64,
    /// A fork event was seen: the stream announces every new holder of a pid (see
    /// `cached`).
    forks_seen: bool,
    /// The timestamp of the event being enriched (`None` outside `enrich`): see `late`.
    event_ns: Option<u64>,
    /// The least time in which the pids can go round once (see `late`).
    pid_cycle_ns: u64,
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

/// How many processes are remembered after their leader's exit, for threads that outlive
/// it.
const EXITED_LEADERS: usize = 1024;

/// The least time in which a host hands out one pid: a million forks a second, far beyond
/// what hosts do (this 2-core one: about 7 000 a second under `stress-ng --fork 2`, and the
/// kernel's default `pid_max` grows with the CPUs). `pid_max` times this is the least time
/// in which a pid can be freed and handed out again (see `late`): 33 ms here.
const NS_PER_PID: u64 = 1000;

/// `/proc/sys/kernel/pid_max`; when unreadable, the least the kernel allows (301), which
/// makes every event count as late.
fn pid_max() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(301)
}

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
            exited: Cache::new(EXITED_LEADERS),
            cfg,
            stats: EnrichStats::default(),
            epoch: 0,
            forks_seen: false,
            event_ns: None,
            pid_cycle_ns: pid_max().saturating_mul(NS_PER_PID),
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
        self.event_ns = Some(ev.timestamp_ns);
        let info = self.enrich_task(ev, task);
        self.event_ns = None;
        Some(info)
    }

    fn enrich_task(&mut self, ev: &ProcEvent, task: Task) -> ProcessInfo {
        self.forks_seen |= matches!(ev.body, EventBody::Fork { .. });
        match ev.body {
            EventBody::Fork { parent, child } if !child.is_thread() => {
                self.fork(ev.timestamp_ns, parent.tgid, child.tgid)
            }
            EventBody::Exec { process } => self.exec(process.tgid),
            EventBody::Exit { process, .. } => {
                // Never cached anew: no later exit would remove it (a process's threads
                // can exit after its leader, whose exit removes the entry).
                let info = self
                    .known(process)
                    .unwrap_or_else(|| self.read_uncached(process.tgid));
                if !process.is_thread() {
                    // A process seen making threads is remembered for them; the others
                    // (most, and every child of a fork storm) cost nothing more.
                    let threaded = self.cache.remove(process.tgid).is_some_and(|e| e.threaded);
                    if threaded && info.process_key.is_some() {
                        self.exited.insert(process.tgid, info.clone());
                    }
                }
                info
            }
            EventBody::Fork { child, .. } => {
                let info = self.task_info(child);
                if let Some(e) = self.cache.get_mut(child.tgid) {
                    e.threaded = true;
                }
                info
            }
            EventBody::Comm { process, comm } => {
                let mut info = self.task_info(process);
                // The comm that stands for a command line is the leader's (what
                // `/proc/<tgid>/comm` shows): a thread naming itself does not rename it.
                if info.cmdline_source == InfoSource::Comm && !process.is_thread() {
                    let name: Arc<str> = comm.to_string_lossy().into();
                    info.cmdline = Some(name.clone());
                    if let Some(e) = self.cache.get_mut(process.tgid) {
                        e.info.cmdline = Some(name);
                    }
                }
                info
            }
            _ => self.task_info(task),
        }
    }

    /// The attributes of `pid` from the cache, or read from `/proc` (and cached) when it is
    /// not there; [`ProcessInfo::unknown`] when it is gone.
    pub fn process(&mut self, pid: u32) -> ProcessInfo {
        self.info(pid)
    }

    /// Reads `pid` from `/proc` again, replacing what the cache had (for a resync after a
    /// loss: an exec may have been missed, and a cached command line would then be the
    /// old image's); [`ProcessInfo::unknown`] (and the entry removed) when it is gone.
    /// Everything is then [`InfoSource::Proc`], and the parent key is the current parent's.
    pub fn refresh(&mut self, pid: u32) -> ProcessInfo {
        self.cache.remove(pid);
        self.info(pid)
    }
}

#[cfg(test)]
mod tests;
