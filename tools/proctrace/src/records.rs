//! `--json` lines: plain records serialised with `serde_json` (`cnbus_cli::json`).

use cnbus::proc::{ProcessInfo, Task};
use cnbus_cli::clock::Rfc3339;
use cnbus_cli::json::LostFields;

/// The event-specific fields of a JSON line, in output order; absent ones are left out.
/// (`exit_code` and `signal` are present on exits, `null` when they do not apply.)
#[derive(serde::Serialize, Default)]
pub struct Detail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ruid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracer_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracer_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
}

impl Detail {
    pub fn parent(&mut self, t: Task) {
        (self.parent_pid, self.parent_tid) = (Some(t.tgid), Some(t.pid));
    }
}

/// One `--json` event line.
#[derive(serde::Serialize)]
pub struct JsonEvent<'a> {
    pub time: Rfc3339,
    pub timestamp_ns: u64,
    pub cpu: u32,
    pub seq: u32,
    pub event: &'a str,
    pub pid: u32,
    pub tid: u32,
    #[serde(flatten)]
    pub detail: Detail,
    pub name: Option<&'a str>,
    /// The enricher's fields (absent with `--enrich off`): the library's own serialisation.
    #[serde(flatten)]
    pub process: Option<&'a ProcessInfo>,
}

/// One `--json` loss line.
#[derive(serde::Serialize)]
pub struct JsonLost {
    pub time: Rfc3339,
    #[serde(flatten)]
    pub lost: LostFields,
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnbus::proc::InfoSource;

    fn line(r: &impl serde::Serialize) -> String {
        let mut out = Vec::new();
        cnbus_cli::json::push_line(&mut out, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_lines_escape_names_and_keep_field_order() {
        let detail = Detail {
            status: Some(0x300),
            exit_code: Some(Some(3)),
            signal: Some(None),
            ..Detail::default()
        };
        let record = JsonEvent {
            time: Rfc3339(0),
            timestamp_ns: 1,
            cpu: 0,
            seq: 2,
            event: "exit",
            pid: 7,
            tid: 7,
            detail,
            name: Some("a\"b\\c\nd\u{1}é"),
            process: None,
        };
        assert_eq!(
            line(&record),
            "{\"time\":\"1970-01-01T00:00:00.000000Z\",\"timestamp_ns\":1,\"cpu\":0,\"seq\":2,\"event\":\"exit\",\"pid\":7,\"tid\":7,\"status\":768,\"exit_code\":3,\"signal\":null,\"name\":\"a\\\"b\\\\c\\nd\\u0001é\"}\n"
        );
    }

    #[test]
    fn attribution_fields_follow_the_event_fields() {
        let mut info = ProcessInfo::unknown();
        info.process_key = Some(
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654"
                .parse()
                .unwrap(),
        );
        info.container_id = Some("0123".into());
        info.cmdline = Some("sh".into());
        info.cmdline_source = InfoSource::Comm;
        let record = JsonEvent {
            time: Rfc3339(0),
            timestamp_ns: u64::MAX,
            cpu: u32::MAX,
            seq: 0,
            event: "exec",
            pid: 1,
            tid: 2,
            detail: Detail::default(),
            name: None,
            process: Some(&info),
        };
        let l = line(&record);
        let keys: Vec<String> = serde_json::from_str::<serde_json::Value>(&l)
            .map(|v| v.as_object().unwrap().keys().cloned().collect())
            .unwrap();
        assert_eq!(keys.len(), 18, "{l}");
        assert!(l.contains(",\"name\":null,\"process_key\":\"3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654\",\"parent_key\":null,\"container_id\":\"0123\",\"cgroup\":null,\"cgroup_source\":"), "{l}");
        assert!(
            l.ends_with("\"cmdline\":\"sh\",\"cmdline_source\":\"comm\"}\n"),
            "{l}"
        );
    }
}
