//! The summary printed on stderr at the end: events, losses (and whether the figure is
//! exact), and with `--stats` the enricher's counters, loss per CPU and counts per program.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use cnbus::proc::{EventKind, Filtering, LossStats};

use crate::tracer::{printable, Tracer, NO_NAME_ROW};

impl Tracer {
    /// The summary lines.
    pub fn summary(&self, stats: &LossStats, elapsed: Duration, filtering: Filtering) -> String {
        let mut s = String::new();
        // "exact" only when the figure is: the kernel's drop counter (every filter mode, the
        // end of the run included), or sequence gaps with no overflow.
        let n = stats.lost_at_least();
        let lost = match stats.lost_source() {
            cnbus::proc::LossSource::KernelCounter if filtering == Filtering::Kernel => {
                format!("{n} (exact, kernel drop counter)")
            }
            // Without a kernel filter the kernel's ACKs to anyone's LISTEN/IGNORE reach this
            // socket too, and one that met the full queue is in the figure.
            cnbus::proc::LossSource::KernelCounter => format!(
                "{n} (exact, kernel drop counter; proc-connector messages: events, and any ACKs to other listeners' requests dropped with them)"
            ),
            cnbus::proc::LossSource::SequenceNumbers => {
                format!("{n} (exact, from per-CPU sequence numbers)")
            }
            cnbus::proc::LossSource::NoOverrun => {
                format!("{n} (exact: no overflow reported; kernel filter, so no sequence check)")
            }
            cnbus::proc::LossSource::Bounded => format!(
                "between {n} and {} (not exact: user-space senders multicast on the proc group meanwhile, and the kernel's drop counter counts theirs too)",
                stats.lost_at_most().unwrap_or(n)
            ),
            cnbus::proc::LossSource::Unknown => format!(
                "at least {n} (not exact: {} receive-queue overflows and no kernel drop counter)",
                stats.overruns
            ),
        };
        let _ = writeln!(
            s,
            "proctrace: {} events in {:.1} s; lost: {lost}; overflows: {}; spoofed rejected: {}; decode errors: {}; filtering: {}",
            stats.events,
            elapsed.as_secs_f64(),
            stats.overruns,
            stats.spoofed,
            stats.decode_errors,
            match filtering {
                Filtering::None => "none (all events)",
                Filtering::Kernel => "kernel",
                Filtering::UserSpace => "user space",
            }
        );
        let lost_messages = cnbus_cli::output::stderr_lines_lost();
        if lost_messages > 0 {
            // Only when a write to stderr failed (a full disk, a reader gone): said here in
            // case stderr works again.
            let _ = writeln!(
                s,
                "proctrace: {lost_messages} lines of messages could not be written to stderr"
            );
        }
        if stats.unread > 0 {
            // Only when the output failed before the queue was drained (see main).
            let _ = writeln!(
                s,
                "proctrace: {} events received before the stop were not printed (the output failed first)",
                stats.unread
            );
        }
        if !self.stats {
            return s;
        }
        if let Some(e) = &self.enricher {
            let st = e.stats();
            let _ = writeln!(
                s,
                "enrichment: {} events, cache hits {}, misses {} (gone {}), /proc reads {} (failed {}), start-time reads {}, evictions {}, stale {}, cached {}",
                st.events, st.hits, st.misses, st.gone, st.proc_reads, st.proc_read_failures,
                st.start_time_reads, st.evictions, st.stale, st.cached
            );
        }
        if !stats.lost_per_cpu.is_empty() {
            let per: Vec<String> = stats
                .lost_per_cpu
                .iter()
                .map(|(c, n)| format!("cpu{c}={n}"))
                .collect();
            let _ = writeln!(s, "lost per CPU (sequence gaps): {}", per.join(" "));
        }
        let _ = writeln!(
            s,
            "loss sources: kernel drop counter {} ({}); per-CPU sequence gaps {}; dropped by proctrace {}",
            stats
                .kernel_drops
                .map_or("unavailable".to_string(), |n| n.to_string()),
            match (stats.foreign_unaccounted, stats.foreign_settled) {
                (Some(0), _) => "no user-space datagram among them".to_string(),
                (Some(u), true) => format!("{u} of them user-space datagrams on the proc group"),
                (Some(u), false) => format!("up to {u} of them user-space datagrams on the proc group"),
                (None, _) => "user-space datagrams among them not known".to_string(),
            },
            stats
                .seq_lost
                .map_or("not tracked (kernel filter)".to_string(), |n| n.to_string()),
            stats.dropped
        );
        let kinds = &EventKind::ALL[1..];
        let mut rows: Vec<(&Arc<str>, &[u64; 10])> = self.counts.iter().collect();
        rows.sort_by(|a, b| {
            b.1.iter()
                .sum::<u64>()
                .cmp(&a.1.iter().sum::<u64>())
                .then(a.0.cmp(b.0))
        });
        let _ = write!(s, "{:>8}", "total");
        for k in kinds {
            let _ = write!(s, " {:>8}", k.name());
        }
        let _ = writeln!(s, "  process");
        let row = |s: &mut String, name: &str, c: &[u64; 10]| {
            let _ = write!(s, "{:>8}", c.iter().sum::<u64>());
            for n in &c[1..] {
                let _ = write!(s, " {n:>8}");
            }
            let _ = writeln!(s, "  {name}");
        };
        for (name, c) in rows {
            let name = if name.is_empty() {
                NO_NAME_ROW.into()
            } else {
                printable(name)
            };
            row(&mut s, &name, c);
        }
        if self.other_counts.iter().any(|&n| n > 0) {
            row(
                &mut s,
                "(other processes: name table full)",
                &self.other_counts,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `--stats`' table printed program names as they came (the base name of a
    /// command line, a comm): a name with a newline or an escape sequence broke its row in
    /// two and wrote the escape to the terminal. Names are shown as in the event lines,
    /// control characters as `?`.
    #[test]
    fn the_table_shows_names_without_control_characters() {
        let mut t = crate::tracer::tests::tracer();
        t.stats = true;
        t.counts
            .insert("evil\n\u{1b}[31mX".into(), [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]);
        let s = t.summary(&LossStats::default(), Duration::ZERO, Filtering::None);
        assert!(!s.chars().any(|c| c.is_control() && c != '\n'), "{s:?}");
        let row = s.lines().find(|l| l.contains("evil")).unwrap();
        assert!(row.ends_with("  evil??[31mX"), "{s:?}");
    }

    /// Regression: the kernel's ACKs were counted under the empty program name, and so
    /// was every process whose program name is empty (an empty `argv[0]`, one ending in
    /// `/`, an empty comm): such a process's events were shown in the row
    /// "(kernel ack)". The ACKs now have a key no program name can be (it has a space, at
    /// which `program` cuts), and an empty name has a row of its own.
    #[test]
    fn a_process_without_a_program_name_is_not_a_kernel_ack() {
        let mut t = crate::tracer::tests::tracer();
        t.stats = true;
        t.count("", EventKind::Ack);
        for name in [" -x", "/usr/bin/", ""] {
            t.count(name, EventKind::Exit);
        }
        let s = t.summary(&LossStats::default(), Duration::ZERO, Filtering::None);
        let row = |label: &str| {
            let l = s.lines().find(|l| l.ends_with(&format!("  {label}")));
            l.unwrap_or_else(|| panic!("no row {label}: {s}"))
                .to_string()
        };
        assert!(row("(kernel ack)").trim_start().starts_with("1 "), "{s}");
        assert!(row("(no name)").trim_start().starts_with("3 "), "{s}");
    }
}
