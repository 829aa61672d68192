//! The agent's JSON lines as plain records, serialised with `serde_json`
//! (`cnbus_cli::json`): event lines, loss and resync lines, the counters line and the table
//! dump. The attribution fields are the library's own `Serialize` of `ProcessInfo`.

use cnbus::proc::ProcessInfo;
use cnbus_cli::clock::Rfc3339;
use cnbus_cli::json::Ordered;

/// The agent's own fields in an event line (`cnbus_cli::event::EventLine`, the schema it
/// shares with proctrace): the process's parent from the fork event or the table.
#[derive(serde::Serialize)]
pub struct AgentFields {
    pub ppid: Option<u32>,
}

/// A `/proc` resync.
#[derive(serde::Serialize)]
pub struct ResyncLine<'a> {
    pub ts: Rfc3339,
    pub event: &'static str,
    pub reason: &'a str,
    pub added: u64,
    pub removed: u64,
    pub live: usize,
}

/// The counters line.
#[derive(serde::Serialize)]
pub struct StatsLine<'a> {
    pub ts: Rfc3339,
    #[serde(rename = "final")]
    pub final_: bool,
    pub uptime_s: f64,
    pub events: Ordered<'a, &'static str, u64>,
    pub events_total: u64,
    pub events_per_s: f64,
    pub lost_events: u64,
    pub lost_exact: bool,
    pub lost_events_max: Option<u64>,
    pub kernel_drops: Option<u64>,
    pub spoofed: u64,
    pub decode_errors: u64,
    pub overruns: u64,
    pub unread: u64,
    pub lost_per_cpu: Ordered<'a, u32, u64>,
    pub live_processes: usize,
    pub table_capacity: usize,
    pub recent_exits: usize,
    pub resyncs: u64,
    pub resync_added: u64,
    pub resync_removed: u64,
    pub stale_replaced: u64,
    pub fork_known: u64,
    pub exit_unknown: u64,
    pub enrich_proc_reads: u64,
    pub enrich_evictions: u64,
    pub enrich_stale: u64,
    pub cpu_s: f64,
    pub rss_kb: u64,
    /// Lines of messages and counters that could not be written to stderr (it failed).
    pub stderr_lines_lost: u64,
    /// With `--nats` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsCounters>,
}

/// The NATS sink's counters (cnbus_nats::SinkStats), in the counters line.
#[derive(serde::Serialize)]
pub struct NatsCounters {
    pub published: u64,
    pub acknowledged: u64,
    pub resent: u64,
    pub spooled: u64,
    pub dropped: u64,
    /// Lines refused for good after an earlier publish went unacknowledged: they may be in
    /// the stream (not counted in `dropped`); kept in the dead-letter file.
    pub maybe_stored: u64,
    /// Of `dropped` and `maybe_stored`, lines refused for good and kept in the spool
    /// directory's dead-letter file.
    pub dead_lettered: u64,
    pub reconnects: u64,
    pub disconnects: u64,
    pub duplicates: u64,
    pub replayed: u64,
    pub in_flight: u64,
    pub queued: u64,
    pub spool_bytes: u64,
    pub spool_records: u64,
    /// Damaged spool tails cut off at start (a crash in the middle of a write), and their bytes.
    pub spool_torn_tails: u64,
    pub spool_torn_bytes: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The final line only: acknowledged over the sink's life, and left in the spool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsent: Option<u64>,
}

/// Lines the NATS sink dropped (its spool was full or failed).
#[derive(serde::Serialize)]
pub struct DroppedLine {
    pub ts: Rfc3339,
    pub event: &'static str,
    pub sink: &'static str,
    pub count: u64,
    pub dropped_total: u64,
}

/// One row of the table dump.
#[derive(serde::Serialize)]
pub struct DumpRow<'a> {
    pub pid: u32,
    pub ppid: u32,
    #[serde(flatten)]
    pub info: &'a ProcessInfo,
    pub start: Option<Rfc3339>,
    pub source: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnbus::proc::{EventBody, ExitStatus, ProcEvent, Task};
    use cnbus_cli::event::EventLine;

    #[test]
    fn event_lines_keep_their_field_order() {
        let mut info = ProcessInfo::unknown();
        info.cmdline = Some("a\"b\nc\u{7f}".into());
        let ev = ProcEvent {
            seq: 3,
            ack: 0,
            cpu: 1,
            timestamp_ns: 42,
            body: EventBody::Exit {
                process: Task { pid: 8, tgid: 7 },
                status: ExitStatus(0),
                exit_signal: -1,
                parent: Some(Task { pid: 1, tgid: 1 }),
            },
        };
        let mut line = EventLine::new(
            &ev,
            1_709_251_199_999_999_000,
            AgentFields { ppid: None },
            Some(&info),
        );
        line.data.duration(Some(1_002_117_000));
        let mut out = Vec::new();
        cnbus_cli::json::push_line(&mut out, &line).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("{\"ts\":\"2024-02-29T23:59:59.999999Z\",\"event\":\"exit\",\"pid\":7,\"tid\":8,\"thread\":true,\"cpu\":1,\"seq\":3,\"timestamp_ns\":42,\"ppid\":null,\"process_key\":null,"), "{s}");
        assert!(s.ends_with(",\"cmdline\":\"a\\\"b\\nc\u{7f}\",\"cmdline_source\":\"exited\",\"parent_pid\":1,\"parent_tid\":1,\"status\":0,\"exit_code\":0,\"signal\":null,\"core_dumped\":false,\"exit_signal\":-1,\"duration_ms\":1002.117}\n"), "{s}");
    }
}
