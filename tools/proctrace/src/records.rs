//! `--json` lines: the one event schema of `cnbus_cli::event` (shared with `cnbus-agent`,
//! docs/AGENT.md "JSON event lines") with proctrace's own fields, serialised with
//! `serde_json` (`cnbus_cli::json`).

/// proctrace's own fields in an event line: the name it shows for the process (`null` when
/// unknown), and on a `comm` event the name before it (`Some(None)`: `null`, unknown).
#[derive(serde::Serialize)]
pub struct ProctraceFields<'a> {
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name: Option<Option<String>>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cnbus::proc::{EventBody, ExitStatus, InfoSource, ProcEvent, ProcessInfo, Task};
    use cnbus_cli::event::EventLine;

    fn line(r: &impl serde::Serialize) -> String {
        let mut out = Vec::new();
        cnbus_cli::json::push_line(&mut out, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// An event of `body` (the other tests of the crate use it too).
    pub(crate) fn ev(body: EventBody) -> ProcEvent {
        ProcEvent {
            seq: 2,
            ack: 0,
            cpu: 0,
            timestamp_ns: 1,
            body,
        }
    }

    #[test]
    fn json_lines_escape_names_and_keep_field_order() {
        let exit = ev(EventBody::Exit {
            process: Task { pid: 7, tgid: 7 },
            status: ExitStatus(0x300),
            exit_signal: 17,
            parent: Some(Task { pid: 1, tgid: 1 }),
        });
        let extra = ProctraceFields {
            name: Some("a\"b\\c\nd\u{1}é"),
            old_name: None,
        };
        let record = EventLine::new(&exit, 0, extra, None);
        assert_eq!(
            line(&record),
            "{\"ts\":\"1970-01-01T00:00:00.000000Z\",\"event\":\"exit\",\"pid\":7,\"tid\":7,\"thread\":false,\"cpu\":0,\"seq\":2,\"timestamp_ns\":1,\"name\":\"a\\\"b\\\\c\\nd\\u0001é\",\"parent_pid\":1,\"parent_tid\":1,\"status\":768,\"exit_code\":3,\"signal\":null,\"core_dumped\":false,\"exit_signal\":17,\"duration_ms\":null}\n"
        );
    }

    #[test]
    fn attribution_fields_follow_proctraces_own() {
        let mut info = ProcessInfo::unknown();
        info.process_key = Some(
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654"
                .parse()
                .unwrap(),
        );
        info.container_id = Some("0123".into());
        info.cmdline = Some("sh".into());
        info.cmdline_source = InfoSource::Comm;
        let exec = ProcEvent {
            timestamp_ns: u64::MAX,
            cpu: u32::MAX,
            seq: 0,
            ..ev(EventBody::Exec {
                process: Task { pid: 2, tgid: 1 },
            })
        };
        let extra = ProctraceFields {
            name: None,
            old_name: None,
        };
        let l = line(&EventLine::new(&exec, 0, extra, Some(&info)));
        let keys: Vec<String> = serde_json::from_str::<serde_json::Value>(&l)
            .map(|v| v.as_object().unwrap().keys().cloned().collect())
            .unwrap();
        assert_eq!(keys.len(), 19, "{l}");
        assert!(l.contains(",\"name\":null,\"process_key\":\"3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654\",\"parent_key\":null,\"container_id\":\"0123\",\"cgroup\":null,\"cgroup_source\":"), "{l}");
        assert!(
            l.ends_with("\"cmdline\":\"sh\",\"cmdline_source\":\"comm\"}\n"),
            "{l}"
        );
    }
}
