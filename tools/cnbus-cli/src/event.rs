//! The one JSON schema of a process event line, written by both `proctrace --json` and
//! `cnbus-agent` (docs/AGENT.md, "JSON event lines"): the same field names and types for
//! the same facts. [`EventLine::new`] takes every field from the kernel's event; each tool
//! adds its own fields (`X`: the agent's `ppid`, proctrace's `name` and `old_name`), the
//! event's `duration_ms` (from its own start times) and the enricher's attribution.
//! [`LostLine`] is the one `lost` line.

use cnbus::proc::{EventBody, Loss, ProcEvent, ProcessInfo};
use serde::Serialize;

use crate::clock::Rfc3339;
use crate::json::LostFields;

/// One process event as a JSON line: the common fields, then the tool's own (`X`, flattened;
/// `()` for none), the enricher's attribution (flattened; absent when `None`), then the
/// event's own fields.
#[derive(Debug, Clone, Serialize)]
pub struct EventLine<'a, X: Serialize> {
    /// Wall-clock time of the event (its kernel timestamp converted), RFC 3339 UTC, µs.
    pub ts: Rfc3339,
    /// The kernel's event type (`fork` for a new process and a new thread alike).
    pub event: &'static str,
    /// Process id (tgid) of the task the event is about (a fork's child); 0 for an ACK.
    pub pid: u32,
    /// Thread id of that task.
    pub tid: u32,
    /// The task is not its process's main thread (`tid != pid`).
    pub thread: bool,
    /// The CPU the kernel built the message on.
    pub cpu: u32,
    /// The kernel's per-CPU message sequence number (`cn_msg.seq`).
    pub seq: u32,
    /// The kernel's timestamp, `CLOCK_MONOTONIC` ns.
    pub timestamp_ns: u64,
    /// The tool's own fields.
    #[serde(flatten)]
    pub extra: X,
    /// The enricher's attribution of the process (the library's own `Serialize`).
    #[serde(flatten)]
    pub process: Option<&'a ProcessInfo>,
    /// The event's own fields.
    #[serde(flatten)]
    pub data: EventData,
}

/// The fields one kind of event carries; the others are left out. Within an event type the
/// set is fixed: a field that does not apply is `null`, never absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EventData {
    /// `fork`, `exit`, `coredump`: the real parent's pid and tid (`null` when the kernel
    /// sent none: an exit or core dump of a task whose parent is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_pid: Option<Option<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_tid: Option<Option<u32>>,
    /// ACK: 0 or an errno.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err: Option<u32>,
    /// `uid`: the new real and effective uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ruid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euid: Option<u32>,
    /// `gid`: the new real and effective gid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egid: Option<u32>,
    /// `sid`: the new session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
    /// `ptrace`: attach (true) or detach, and the tracer (`null` on detach).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracer_pid: Option<Option<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracer_tid: Option<Option<u32>>,
    /// `comm`: the new task name (invalid UTF-8 replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// `exit`: the raw wait status, its exit code or signal (`null` when not that kind of
    /// end), core dumped, the signal sent to the parent (-1 for a thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<Option<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<Option<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_dumped: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    /// `exit`: milliseconds since the process started (µs precision), `null` when the tool
    /// does not know its start or for a thread. Set by the tool ([`EventData::duration`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<Option<f64>>,
}

impl EventData {
    /// Every field the kernel's event carries (`duration_ms` is `null` on an exit until the
    /// tool sets it).
    pub fn of(body: &EventBody) -> EventData {
        let mut d = EventData::default();
        let parent = |d: &mut EventData, p: Option<cnbus::proc::Task>| {
            d.parent_pid = Some(p.map(|t| t.tgid));
            d.parent_tid = Some(p.map(|t| t.pid));
        };
        match *body {
            EventBody::Ack { err } => d.err = Some(err),
            EventBody::Fork { parent: p, .. } => parent(&mut d, Some(p)),
            EventBody::Exec { .. } => {}
            EventBody::Uid { ruid, euid, .. } => (d.ruid, d.euid) = (Some(ruid), Some(euid)),
            EventBody::Gid { rgid, egid, .. } => (d.rgid, d.egid) = (Some(rgid), Some(egid)),
            EventBody::Sid { process } => d.sid = Some(process.tgid),
            EventBody::Ptrace { tracer, .. } => {
                d.attach = Some(tracer.is_some());
                d.tracer_pid = Some(tracer.map(|t| t.tgid));
                d.tracer_tid = Some(tracer.map(|t| t.pid));
            }
            EventBody::Comm { comm, .. } => d.comm = Some(comm.to_string_lossy()),
            EventBody::Coredump { parent: p, .. } => parent(&mut d, p),
            EventBody::Exit {
                status,
                exit_signal,
                parent: p,
                ..
            } => {
                parent(&mut d, p);
                d.status = Some(status.raw());
                d.exit_code = Some(status.code());
                d.signal = Some(status.signal());
                d.core_dumped = Some(status.core_dumped());
                d.exit_signal = Some(exit_signal);
                d.duration_ms = Some(None);
            }
        }
        d
    }

    /// Sets an exit's `duration_ms` from nanoseconds (rounded to µs: all the clocks behind it
    /// can tell). Does nothing for other events.
    pub fn duration(&mut self, ns: Option<u64>) {
        if self.duration_ms.is_some() {
            self.duration_ms = Some(ns.map(|ns| crate::json::round(ns as f64 / 1e6, 3)));
        }
    }
}

impl<'a, X: Serialize> EventLine<'a, X> {
    /// The line of `ev` at wall-clock time `wall_ns` (Unix ns), with the tool's own fields
    /// and the enricher's attribution.
    pub fn new(
        ev: &ProcEvent,
        wall_ns: i128,
        extra: X,
        process: Option<&'a ProcessInfo>,
    ) -> EventLine<'a, X> {
        let task = ev.task().unwrap_or_default();
        EventLine {
            ts: Rfc3339(wall_ns),
            event: ev.kind().name(),
            pid: task.tgid,
            tid: task.pid,
            thread: task.is_thread(),
            cpu: ev.cpu,
            seq: ev.seq,
            timestamp_ns: ev.timestamp_ns,
            extra,
            process,
            data: EventData::of(&ev.body),
        }
    }
}

/// A `lost` line: `ts` (when the loss was noticed), then [`LostFields`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LostLine {
    pub ts: Rfc3339,
    #[serde(flatten)]
    pub lost: LostFields,
}

impl LostLine {
    /// The line of `loss`, noticed at `wall_ns` (Unix ns).
    pub fn new(loss: Loss, wall_ns: i128) -> LostLine {
        LostLine {
            ts: Rfc3339(wall_ns),
            lost: loss.into(),
        }
    }
}

/// The attribution fields (the enricher's `ProcessInfo`), in their order.
pub const ATTRIBUTION_FIELDS: [&str; 10] = [
    "process_key",
    "parent_key",
    "container_id",
    "cgroup",
    "cgroup_source",
    "ns_pid",
    "pidns",
    "pidns_source",
    "cmdline",
    "cmdline_source",
];

/// Checks a parsed line against the schema (what both tools' tests run every line they read
/// through): the common fields with their types, the attribution fields all or none
/// (`attributed`), exactly the fields of its event type, and no other field but the tool's
/// own (`own`). `lost` lines too. Returns what is wrong.
pub fn check_line(v: &serde_json::Value, attributed: bool, own: &[&str]) -> Result<(), String> {
    use serde_json::Value;
    let obj = v.as_object().ok_or("not an object")?;
    let ts = v["ts"].as_str().ok_or("no ts")?;
    if !(ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T') {
        return Err(format!("ts {ts:?} is not RFC 3339 UTC with microseconds"));
    }
    let event = v["event"].as_str().ok_or("no event")?;
    let uint = |k: &str| v[k].as_u64().is_some();
    let uint_or_null = |k: &str| v[k].is_null() || v[k].as_u64().is_some();
    let has_all = |keys: &[&str]| keys.iter().all(|k| obj.contains_key(*k));
    if event == "lost" {
        let want: &[&str] = match v["cause"].as_str() {
            Some("overrun") if v["count"].is_null() => &["ts", "event", "cause", "count"],
            Some("seq_gap") if uint("cpu") && uint("count") => {
                &["ts", "event", "cause", "cpu", "count"]
            }
            _ => return Err("lost line with a wrong cause, cpu or count".into()),
        };
        return match obj.len() == want.len() && has_all(want) {
            true => Ok(()),
            false => Err(format!("lost line's fields are not {want:?}")),
        };
    }
    for k in ["pid", "tid", "cpu", "seq", "timestamp_ns"] {
        if !uint(k) {
            return Err(format!("{k} is not an unsigned number"));
        }
    }
    if !v["thread"].is_boolean() {
        return Err("thread is not a boolean".into());
    }
    if v["thread"] != Value::Bool(v["pid"] != v["tid"]) {
        return Err("thread is not tid != pid".into());
    }
    let parent = &["parent_pid", "parent_tid"];
    let (fields, ok): (&[&str], bool) = match event {
        "fork" => (parent, uint("parent_pid") && uint("parent_tid")),
        "exec" => (&[], true),
        "exit" => (
            &[
                "parent_pid",
                "parent_tid",
                "status",
                "exit_code",
                "signal",
                "core_dumped",
                "exit_signal",
                "duration_ms",
            ],
            uint_or_null("parent_pid")
                && uint_or_null("parent_tid")
                && uint("status")
                && uint_or_null("exit_code")
                && uint_or_null("signal")
                && v["core_dumped"].is_boolean()
                && v["exit_signal"].is_i64()
                && (v["duration_ms"].is_null() || v["duration_ms"].is_f64() || uint("duration_ms")),
        ),
        "coredump" => (
            parent,
            uint_or_null("parent_pid") && uint_or_null("parent_tid"),
        ),
        "comm" => (&["comm"], v["comm"].is_string()),
        "uid" => (&["ruid", "euid"], uint("ruid") && uint("euid")),
        "gid" => (&["rgid", "egid"], uint("rgid") && uint("egid")),
        "sid" => (&["sid"], uint("sid")),
        "ptrace" => (
            &["attach", "tracer_pid", "tracer_tid"],
            v["attach"].is_boolean()
                && uint_or_null("tracer_pid")
                && uint_or_null("tracer_tid")
                && v["tracer_pid"].is_null() != (v["attach"] == true),
        ),
        "ack" => (&["err"], uint("err")),
        other => return Err(format!("unknown event {other:?}")),
    };
    if !has_all(fields) || !ok {
        return Err(format!(
            "{event} line without its fields {fields:?}, or of another type"
        ));
    }
    const COMMON: [&str; 8] = [
        "ts",
        "event",
        "pid",
        "tid",
        "thread",
        "cpu",
        "seq",
        "timestamp_ns",
    ];
    if attributed != has_all(&ATTRIBUTION_FIELDS) {
        return Err(format!("attribution fields expected: {attributed}"));
    }
    for k in obj.keys() {
        let k = k.as_str();
        let known = COMMON.contains(&k)
            || fields.contains(&k)
            || own.contains(&k)
            || (attributed && ATTRIBUTION_FIELDS.contains(&k));
        if !known {
            return Err(format!("{event} line with a field not in the schema: {k}"));
        }
    }
    Ok(())
}

/// The `--help` text of the event line schema, the same in both tools (a macro, so that
/// each tool's help can `concat!` it): indented two spaces, ends with a newline.
#[macro_export]
macro_rules! event_fields_help {
    () => {
        "  Process event lines (the same schema in proctrace --json and cnbus-agent's log):
  ts (RFC 3339 UTC, microseconds, from the kernel's timestamp), event (fork, exec, exit,
  uid, gid, sid, ptrace, comm, coredump; ack), pid, tid, thread (a non-main thread's
  event: a new thread is a fork with thread true), cpu and seq (the kernel's CPU and its
  per-CPU sequence number), timestamp_ns (the kernel's CLOCK_MONOTONIC); the tool's own
  fields (below); the enricher's attribution: process_key, parent_key, container_id,
  cgroup, cgroup_source, ns_pid, pidns, pidns_source, cmdline, cmdline_source (null when
  unknown; sources: proc, inherited, comm, exited, denied); then the event's own: fork:
  parent_pid parent_tid; exit: parent_pid parent_tid (null when the kernel sent none),
  status, exit_code and signal (null when not that kind of end), core_dumped, exit_signal,
  duration_ms (null when unknown, and for a thread); coredump: parent_pid parent_tid; comm:
  comm; uid: ruid euid; gid: rgid egid; sid: sid; ptrace: attach, tracer_pid tracer_tid
  (null on detach); ack: err.
  lost: ts (when the loss was noticed), cause (overrun with count null, or seq_gap with
  cpu and the exact count).
"
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnbus::proc::{ExitStatus, Task};

    fn line(r: &impl Serialize) -> String {
        let mut out = Vec::new();
        crate::json::push_line(&mut out, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn ev(body: EventBody) -> ProcEvent {
        ProcEvent {
            seq: 9,
            ack: 0,
            cpu: 1,
            timestamp_ns: 5_000,
            body,
        }
    }

    #[test]
    fn every_kind_has_its_fields_in_one_order() {
        let t = |tgid, pid| Task { pid, tgid };
        let cases = [
            (
                EventBody::Fork {
                    parent: t(1, 1),
                    child: t(7, 8),
                },
                r#""event":"fork","pid":7,"tid":8,"thread":true,"cpu":1,"seq":9,"timestamp_ns":5000,"parent_pid":1,"parent_tid":1}"#,
            ),
            (
                EventBody::Ptrace {
                    process: t(7, 7),
                    tracer: None,
                },
                r#""thread":false,"cpu":1,"seq":9,"timestamp_ns":5000,"attach":false,"tracer_pid":null,"tracer_tid":null}"#,
            ),
            (
                EventBody::Exit {
                    process: t(7, 7),
                    status: ExitStatus(0x300),
                    exit_signal: 17,
                    parent: None,
                },
                r#""parent_pid":null,"parent_tid":null,"status":768,"exit_code":3,"signal":null,"core_dumped":false,"exit_signal":17,"duration_ms":1.235}"#,
            ),
            (
                EventBody::Sid { process: t(7, 7) },
                r#""timestamp_ns":5000,"sid":7}"#,
            ),
        ];
        for (body, tail) in cases {
            let mut l = EventLine::new(&ev(body), 0, (), None);
            l.data.duration(Some(1_234_567));
            let s = line(&l);
            assert!(
                s.starts_with(r#"{"ts":"1970-01-01T00:00:00.000000Z","event":"#),
                "{s}"
            );
            assert!(s.ends_with(&format!("{tail}\n")), "{s}");
        }
    }

    #[test]
    fn lines_of_the_schema_pass_its_check_and_others_do_not() {
        let parse = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap();
        let t = |tgid, pid| Task { pid, tgid };
        for body in [
            EventBody::Fork {
                parent: t(1, 1),
                child: t(7, 8),
            },
            EventBody::Exit {
                process: t(7, 7),
                status: ExitStatus(9),
                exit_signal: 17,
                parent: None,
            },
            EventBody::Ptrace {
                process: t(7, 7),
                tracer: Some(t(3, 4)),
            },
            EventBody::Ack { err: 0 },
        ] {
            let l = line(&EventLine::new(&ev(body), 0, (), None));
            assert_eq!(check_line(&parse(&l), false, &[]), Ok(()), "{l}");
            assert!(check_line(&parse(&l), true, &[]).is_err(), "{l}");
        }
        let info = ProcessInfo::unknown();
        let l = line(&EventLine::new(
            &ev(EventBody::Exec { process: t(7, 7) }),
            0,
            (),
            Some(&info),
        ));
        assert_eq!(check_line(&parse(&l), true, &[]), Ok(()), "{l}");
        let lost = line(&LostLine::new(Loss::Overrun, 0));
        assert_eq!(check_line(&parse(&lost), false, &[]), Ok(()), "{lost}");
        // The two formats of before.
        for old in [
            r#"{"time":"2026-11-30T02:20:41.113262Z","timestamp_ns":1,"cpu":0,"seq":2,"event":"clone","pid":7,"tid":8,"parent_pid":1,"parent_tid":1,"name":null}"#,
            r#"{"ts":"2026-11-30T02:20:41.113262Z","event":"exit","pid":7,"tid":7,"thread":false,"ppid":1,"exit_code":0,"signal":null,"core_dumped":false,"duration_ms":2.117}"#,
            r#"{"time":"2026-11-30T02:20:41.113262Z","event":"lost","cause":"overrun","count":null}"#,
        ] {
            assert!(
                check_line(&parse(old), false, &["name", "ppid"]).is_err(),
                "{old}"
            );
        }
    }

    #[test]
    fn the_tools_fields_and_the_attribution_come_between() {
        #[derive(Serialize)]
        struct Mine {
            ppid: Option<u32>,
        }
        let mut info = ProcessInfo::unknown();
        info.cmdline = Some("sh".into());
        let l = EventLine::new(
            &ev(EventBody::Exec {
                process: Task { pid: 3, tgid: 3 },
            }),
            0,
            Mine { ppid: None },
            Some(&info),
        );
        let s = line(&l);
        assert!(
            s.contains(r#""timestamp_ns":5000,"ppid":null,"process_key":null,"#),
            "{s}"
        );
        // An exec has no fields of its own: the attribution ends the line.
        assert!(
            s.ends_with("\"cmdline\":\"sh\",\"cmdline_source\":\"exited\"}\n"),
            "{s}"
        );
        assert_eq!(
            line(&LostLine::new(Loss::Gap { cpu: 2, count: 5 }, 0)),
            "{\"ts\":\"1970-01-01T00:00:00.000000Z\",\"event\":\"lost\",\"cause\":\"seq_gap\",\"cpu\":2,\"count\":5}\n"
        );
    }
}
