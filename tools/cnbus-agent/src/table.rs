//! The process table: live processes by process key (with a pid index), the recent exits,
//! the counters, and the `/proc` scan that fills the table at start and repairs it after a
//! loss.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use cnbus::proc::{EnrichConfig, Enricher, ProcessInfo, ProcessKey};
use cnbus_cli::clock::Clocks;
use cnbus_cli::procfs::read_stat;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Scan,
    Fork,
    Exec,
    Resync,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Scan => "scan",
            Source::Fork => "fork",
            Source::Exec => "exec",
            Source::Resync => "resync",
        }
    }
}

/// A live process: what the agent knows beyond the enricher's attribution.
#[derive(Clone)]
pub struct Entry {
    pub pid: u32,
    /// The parent at fork (or at the scan).
    pub ppid: u32,
    /// The enricher's attribution (its `process_key` is the table's key).
    pub info: ProcessInfo,
    /// Unix ns; `None` if `/proc` could not tell.
    pub start: Option<i128>,
    pub source: Source,
}

/// A process that left the table: by its exit event, or by a resync that found it gone
/// (then `exit_seen` is false until a late exit event fills it in).
pub struct Exited {
    pub key: ProcessKey,
    pub entry: Entry,
    pub exit_seen: bool,
}

/// The agent's own counters (the listener keeps the loss figures).
#[derive(Default)]
pub struct Counters {
    /// Indexed like `EventKind::ALL`.
    pub by_kind: [u64; 10],
    pub lost_reports: u64,
    pub resyncs: u64,
    pub resync_added: u64,
    pub resync_removed: u64,
    pub stale_replaced: u64,
    pub fork_known: u64,
    pub exit_unknown: u64,
}

/// The agent's state: the table, the enricher, the counters and the line being written.
pub struct Agent {
    /// The live table, keyed by process key (boot id + pid + start time: never reused).
    pub live: HashMap<ProcessKey, Entry>,
    /// The live process of each pid.
    pub by_pid: HashMap<u32, ProcessKey>,
    pub enricher: Enricher,
    pub exits: VecDeque<Exited>,
    pub exits_cap: usize,
    pub clocks: Clocks,
    pub n: Counters,
    /// A loss happened since the last resync.
    pub resync_pending: bool,
    pub last_resync: Option<Instant>,
    /// The listener's kernel drop count when last looked at ([`note_drops`](Self::note_drops)).
    pub drops_seen: u64,
    /// The line being formatted (with its newline; empty: nothing to write).
    pub line: Vec<u8>,
}

impl Agent {
    /// An empty table remembering up to `exits_cap` recent exits.
    pub fn new(exits_cap: usize) -> Self {
        Agent {
            live: HashMap::new(),
            by_pid: HashMap::new(),
            // A /proc read at fork only for children of container runtimes and namespace
            // tools (the others inherit, marked so, until their exec): see docs/PROC.md.
            enricher: Enricher::with_config(EnrichConfig {
                read_at_fork: false,
                ..EnrichConfig::default()
            }),
            exits: VecDeque::with_capacity(exits_cap.min(4096)),
            exits_cap,
            clocks: Clocks::new(),
            n: Counters::default(),
            resync_pending: false,
            drops_seen: 0,
            last_resync: None,
            line: Vec::with_capacity(512),
        }
    }

    pub fn remember_exit(&mut self, key: ProcessKey, entry: Entry, exit_seen: bool) {
        if self.exits_cap == 0 {
            return;
        }
        if self.exits.len() >= self.exits_cap {
            self.exits.pop_front();
        }
        self.exits.push_back(Exited {
            key,
            entry,
            exit_seen,
        });
    }

    /// Inserts `e` under `key`; an entry of another process on the same pid (its exit was
    /// lost and the pid reused) is removed and returned.
    pub fn insert(&mut self, key: ProcessKey, e: Entry) -> Option<Entry> {
        let older = match self.by_pid.insert(e.pid, key) {
            Some(k) if k != key => self.live.remove(&k),
            _ => None,
        };
        self.live.insert(key, e);
        older
    }

    pub fn remove(&mut self, key: ProcessKey) -> Option<Entry> {
        let e = self.live.remove(&key)?;
        if self.by_pid.get(&e.pid) == Some(&key) {
            self.by_pid.remove(&e.pid);
        }
        Some(e)
    }

    /// An entry for a process found in `/proc` (or `None` for zombies, exiting tasks and
    /// vanished pids). `fresh`: read everything again (a resync after a loss: an exec may
    /// have been missed), rather than trust the enricher's cache.
    pub fn entry_from_proc(&mut self, pid: u32, source: Source, fresh: bool) -> Option<Entry> {
        let st = read_stat(pid)?;
        if st.is_exiting() {
            return None;
        }
        let info = if fresh {
            self.enricher.refresh(pid)
        } else {
            self.enricher.process(pid)
        };
        // Gone meanwhile, or another process on the pid already.
        if info.process_key.map(|k| k.start_ticks) != Some(st.start_ticks) {
            return None;
        }
        Some(Entry {
            pid,
            ppid: st.ppid,
            info,
            start: Some(self.clocks.wall_of_ticks(st.start_ticks)),
            source,
        })
    }

    /// Scans `/proc` and reconciles the table with it. Returns `(added, removed)`.
    pub fn resync(&mut self, reason: &str) -> (u64, u64) {
        self.clocks.sync();
        let source = if reason == "start" {
            Source::Scan
        } else {
            Source::Resync
        };
        let mut seen: HashMap<ProcessKey, Entry> = HashMap::with_capacity(self.live.len() + 64);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for d in dir.flatten() {
                let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(e) = self.entry_from_proc(pid, source, source == Source::Resync) {
                    if let Some(k) = e.info.process_key {
                        seen.insert(k, e);
                    }
                }
            }
        }
        let (mut added, mut removed) = (0, 0);
        let gone: Vec<ProcessKey> = self
            .live
            .keys()
            .filter(|k| !seen.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(e) = self.remove(k) {
                self.remember_exit(k, e, false);
                removed += 1;
            }
        }
        for (k, s) in seen {
            match self.live.get_mut(&k) {
                // The same process: an exec may have been lost, so take /proc's view.
                Some(e) => e.info = s.info,
                None => {
                    // Its exit was already applied (it is still tearing down): do not revive.
                    let exited = self.exits.iter().any(|x| x.key == k && x.exit_seen);
                    if !exited {
                        if self.insert(k, s).is_some() {
                            removed += 1;
                        }
                        added += 1;
                    }
                }
            }
        }
        // After a storm the maps keep their peak capacity: give it back.
        if self.live.capacity() > 4 * self.live.len() + 1024 {
            self.live.shrink_to_fit();
            self.by_pid.shrink_to_fit();
        }
        if source == Source::Resync {
            self.n.resyncs += 1;
            self.n.resync_added += added;
            self.n.resync_removed += removed;
        }
        self.resync_pending = false;
        self.last_resync = Some(Instant::now());
        (added, removed)
    }

    /// Schedules a resync when the kernel dropped events for the listener's socket since the
    /// last look (`drops`: [`LossStats::kernel_drops`](cnbus::proc::LossStats::kernel_drops)).
    /// A loss report alone does not catch every drop: the kernel reports one overflow per
    /// congestion episode and then drops silently until the queue is read empty, and the
    /// gaps of those drops show only when later events of each CPU arrive, or never (the
    /// tail, at the stop). A fork dropped that way left its process out of the table.
    pub fn note_drops(&mut self, drops: Option<u64>) {
        if let Some(d) = drops {
            if d > self.drops_seen {
                self.drops_seen = d;
                self.resync_pending = true;
                self.enricher.note_loss();
            }
        }
    }
}
