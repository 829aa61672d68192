//! Applying what the listener delivers to the table, and the agent's lines: one per event
//! (the enricher's attribution and the event's fields), loss and resync lines, the counters
//! line and the table dump.

use std::time::Instant;

use cnbus::proc::{EventBody, EventKind, Loss, LossStats, ProcEvent};
use cnbus_cli::clock::Rfc3339;
use cnbus_cli::json::{self, Ordered};
use cnbus_cli::procfs::self_usage;
use cnbus_cli::warn;

use cnbus_cli::event::{EventLine, LostLine};

use crate::records::{AgentFields, DroppedLine, DumpRow, NatsCounters, ResyncLine, StatsLine};
use crate::table::{Agent, Entry, Source};

/// Appends `record`'s line to `out`. The agent's records (strings, numbers, options, maps
/// with string keys) always serialise; should one not, it is reported and left out.
fn push(out: &mut Vec<u8>, record: &impl serde::Serialize) {
    if let Err(e) = json::push_line(out, record) {
        warn!("cnbus-agent: a line could not be serialised: {e}");
    }
}

impl Agent {
    /// Formats a resync line into `self.line`.
    pub fn resync_line(&mut self, reason: &str, added: u64, removed: u64) {
        let line = ResyncLine {
            ts: Rfc3339(self.clocks.now()),
            event: "resync",
            reason,
            added,
            removed,
            live: self.live.len(),
        };
        self.line.clear();
        push(&mut self.line, &line);
    }

    /// Formats a `dropped` line into `self.line`: `count` lines the NATS sink dropped since
    /// the last one, `total` over its life.
    pub fn dropped_line(&mut self, count: u64, total: u64) {
        let line = DroppedLine {
            ts: Rfc3339(self.clocks.now()),
            event: "dropped",
            sink: "nats",
            count,
            dropped_total: total,
        };
        self.line.clear();
        push(&mut self.line, &line);
    }

    /// Applies one event to the table and formats its log line into `self.line` (left
    /// empty for an ACK).
    pub fn event(&mut self, ev: &ProcEvent) {
        let kind = ev.kind();
        if let Some(i) = EventKind::ALL.iter().position(|k| *k == kind) {
            self.n.by_kind[i] += 1;
        }
        let (Some(task), Some(info)) = (ev.task(), self.enricher.enrich(ev)) else {
            self.line.clear();
            return; // an ACK: the listener does not deliver them unless asked
        };
        let ts = self.clocks.wall_of_event(ev.timestamp_ns);
        let pid = task.tgid;
        let thread = task.is_thread();
        let key = info.process_key;
        let mut duration_ns: Option<u64> = None;
        let mut ppid: Option<u32> = None;
        match ev.body {
            EventBody::Fork { parent, child } if !child.is_thread() => {
                ppid = Some(parent.tgid);
                if let Some(k) = key {
                    if let Some(old) = self.live.get_mut(&k) {
                        // Seen by the scan as well (the same key): keep what the scan read
                        // (an exec may have followed), take the fork's exact start time.
                        old.start = Some(ts);
                        self.n.fork_known += 1;
                    } else {
                        let e = Entry {
                            pid,
                            ppid: parent.tgid,
                            info: info.clone(),
                            start: Some(ts),
                            source: Source::Fork,
                        };
                        if self.insert(k, e).is_some() {
                            // The old process's exit was lost and its pid reused.
                            self.n.stale_replaced += 1;
                        }
                    }
                }
            }
            EventBody::Exec { .. } => {
                match key.and_then(|k| self.live.get_mut(&k)) {
                    Some(e) => {
                        e.info = info.clone();
                        ppid = Some(e.ppid);
                    }
                    None => {
                        // Its fork was lost, or a non-main thread exec'd (the kernel then
                        // sends an exit for the old main thread first).
                        if let Some(e) = self.entry_from_proc(pid, Source::Exec, false) {
                            ppid = Some(e.ppid);
                            if let Some(k) = e.info.process_key {
                                if self.insert(k, e).is_some() {
                                    self.n.stale_replaced += 1;
                                }
                            }
                        }
                    }
                }
            }
            EventBody::Exit { process, .. } => {
                if !process.is_thread() {
                    let entry = match key.and_then(|k| self.remove(k)) {
                        Some(e) => {
                            if let Some(k) = key {
                                self.remember_exit(k, e.clone(), true);
                            }
                            Some(e)
                        }
                        // Removed by a resync before its exit event arrived?
                        None => self
                            .exits
                            .iter_mut()
                            .rev()
                            .find(|x| Some(x.key) == key && !x.exit_seen)
                            .map(|x| {
                                x.exit_seen = true;
                                x.entry.clone()
                            }),
                    };
                    match entry {
                        Some(e) => {
                            duration_ns = e.start.and_then(|s| u64::try_from(ts - s).ok());
                            ppid = Some(e.ppid);
                        }
                        None => self.n.exit_unknown += 1,
                    }
                } else if let Some(e) = key.and_then(|k| self.live.get(&k)) {
                    ppid = Some(e.ppid);
                }
            }
            _ => {
                // (Thread creation, comm, uid, gid, sid, ptrace, coredump: the event's own
                // fields are the shared schema's, `EventData::of`.)
                // The enricher's view is the current one (a comm change renames a
                // process that has no command line).
                if let Some(e) = key.and_then(|k| self.live.get_mut(&k)) {
                    ppid = Some(e.ppid);
                    if !thread {
                        e.info = info.clone();
                    }
                }
            }
        }
        // `ppid` and the attribution are the process's, for thread events too.
        let mut line = EventLine::new(ev, ts, AgentFields { ppid }, Some(&info));
        line.data.duration(duration_ns);
        self.line.clear();
        push(&mut self.line, &line);
    }

    /// Counts a loss report, schedules a resync and formats the `lost` line.
    pub fn lost(&mut self, loss: Loss) {
        self.n.lost_reports += 1;
        self.resync_pending = true;
        // An exit may be among the lost events and its pid reused: the enricher re-checks
        // its cached processes against /proc before trusting them again.
        self.enricher.note_loss();
        let line = LostLine::new(loss, self.clocks.now());
        self.line.clear();
        push(&mut self.line, &line);
    }

    /// The counters line (with its newline).
    pub fn stats_line(
        &self,
        st: &LossStats,
        started: Instant,
        rate: f64,
        final_: bool,
        nats: Option<NatsCounters>,
    ) -> Vec<u8> {
        let events: Vec<(&'static str, u64)> = EventKind::ALL
            .iter()
            .zip(self.n.by_kind)
            .filter(|(k, _)| **k != EventKind::Ack)
            .map(|(k, n)| (k.name(), n))
            .collect();
        let (cpu, rss) = self_usage(self.clocks.ticks_per_sec());
        let es = self.enricher.stats();
        let line = StatsLine {
            ts: Rfc3339(self.clocks.now()),
            final_,
            uptime_s: json::round(started.elapsed().as_secs_f64(), 3),
            events: Ordered(&events),
            events_total: self.n.by_kind.iter().sum(),
            events_per_s: json::round(rate, 1),
            // `lost_exact` is true only when the figure is exact (see LossStats::lost); else
            // `lost_events` is a lower bound and `lost_events_max` an upper one, if known.
            lost_events: st.lost_at_least(),
            lost_exact: st.lost().is_some(),
            lost_events_max: st.lost_at_most(),
            kernel_drops: st.kernel_drops,
            spoofed: st.spoofed,
            decode_errors: st.decode_errors,
            overruns: st.overruns,
            unread: st.unread,
            lost_per_cpu: Ordered(&st.lost_per_cpu),
            live_processes: self.live.len(),
            table_capacity: self.live.capacity(),
            recent_exits: self.exits.len(),
            resyncs: self.n.resyncs,
            resync_added: self.n.resync_added,
            resync_removed: self.n.resync_removed,
            stale_replaced: self.n.stale_replaced,
            fork_known: self.n.fork_known,
            exit_unknown: self.n.exit_unknown,
            enrich_proc_reads: es.proc_reads,
            enrich_evictions: es.evictions,
            enrich_stale: es.stale,
            cpu_s: json::round(cpu, 2),
            rss_kb: rss,
            stderr_lines_lost: cnbus_cli::output::stderr_lines_lost(),
            nats,
        };
        let mut out = Vec::with_capacity(1024);
        push(&mut out, &line);
        out
    }

    /// The live table, one JSON object per line, by pid.
    pub fn table_dump(&self) -> Vec<u8> {
        let mut rows: Vec<&Entry> = self.live.values().collect();
        rows.sort_unstable_by_key(|e| (e.pid, e.info.process_key));
        let mut out = Vec::with_capacity(rows.len() * 256);
        for e in rows {
            let row = DumpRow {
                pid: e.pid,
                ppid: e.ppid,
                info: &e.info,
                start: e.start.map(Rfc3339),
                source: e.source.name(),
            };
            push(&mut out, &row);
        }
        out
    }
}
