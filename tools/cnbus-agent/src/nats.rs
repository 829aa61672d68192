//! The NATS JetStream sink of the event log (`--nats`): every line the agent writes to its
//! log is also handed to a [`cnbus_nats::NatsSink`], unchanged, with a `Nats-Msg-Id` that is
//! unique per event and the same whenever the event is sent again.
//!
//! Message ids (docs/AGENT.md, "NATS JetStream sink"):
//! * a kernel event: `<boot id>.<cpu>.<seq>.<timestamp_ns>.<event>`: the kernel's per-CPU
//!   sequence number is global to the boot (not per socket), and the monotonic timestamp
//!   separates two events of one CPU should the 32-bit sequence wrap; so the same event
//!   seen by two agents of one host, or by a restarted agent, has the same id;
//! * the agent's own lines (`lost`, `resync`, `dropped`):
//!   `<boot id>.agent.<pid>.<start ns>.<n>.<event>`, `n` counting them in this run.
//!
//! Drops (the sink's spool is full) are never silent: the sink counts them, and the agent
//! writes (and ships) a `dropped` line with the increase of that counter, at most once a
//! second ([`Shipper::drops_due`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cnbus::proc::ProcEvent;
use cnbus_cli::warn;
use cnbus_nats::{
    AbortHandle, Accepted, Auth, Config, NatsSink, Record, ShutdownReport, SinkStats,
};

use crate::cli::NatsArgs;
use crate::records::NatsCounters;

/// `cnbus-agent requeue-dead-letters --spool DIR`: moves the dead letters of `spool` back
/// into it ([`cnbus_nats::requeue_dead_letters`]) and prints one line saying how many, and
/// how many lines were kept aside as malformed (and why the first one is). Status 1 on an
/// error (the directory missing or in use, a failed write).
pub fn requeue_dead_letters(spool: &Path) -> ExitCode {
    let done = match cnbus_nats::requeue_dead_letters(spool) {
        Ok(done) => done,
        Err(e) => {
            warn!("cnbus-agent: requeue-dead-letters: {e}");
            return ExitCode::from(1);
        }
    };
    let mut summary = format!(
        "cnbus-agent: requeued {} dead letters from {} into the spool {} (the next start sends them), kept {} malformed",
        done.requeued,
        spool.join(cnbus_nats::DEAD_LETTER_FILE).display(),
        spool.display(),
        done.malformed,
    );
    if let Some(first) = &done.first_malformed {
        summary += &format!(
            " in {} (first: {first})",
            spool.join(cnbus_nats::DEAD_LETTER_MALFORMED_FILE).display()
        );
    }
    summary.push('\n');
    let mut out = std::io::stdout().lock();
    match out.write_all(summary.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cnbus_cli::output::write_failed("cnbus-agent", "the summary to stdout", &e),
    }
}

/// How often the sink's drop counter is compared with what the `dropped` lines reported.
pub const DROP_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Lines held before they are handed to the sink in one go (see [`Shipper::flush`]).
const BATCH: usize = 512;

/// The sink and what the agent needs to name its records.
pub struct Shipper {
    sink: NatsSink,
    /// Lines not yet handed to the sink, one after the other.
    lines: BytesMut,
    /// Their event, msg id and length.
    pending: Vec<(&'static str, String, usize)>,
    /// The boot id, 32 hex digits.
    boot: String,
    /// This run: `<pid>.<start unix ns>`.
    run: String,
    /// The agent's own lines so far.
    own: u64,
    /// The sink's `dropped` counter as last reported in a `dropped` line.
    reported_dropped: u64,
    next_check: Instant,
    pub spool: PathBuf,
}

/// What a line is, for its message id and subject.
pub enum Ship<'a> {
    /// A kernel event's line.
    Event(&'a ProcEvent),
    /// One of the agent's own lines: `lost`, `resync`, `dropped`.
    Own(&'static str),
}

/// The first line of a secret file, without its line end.
fn read_secret(what: &str, path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(first.to_owned())
}

/// The host's name (`/proc/sys/kernel/hostname`).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The sink's configuration from the options; errors name the option (never a secret).
pub fn config(a: &NatsArgs, url: &str) -> Result<Config, String> {
    if url.trim().is_empty() {
        return Err("the server URL is empty (nats://HOST:PORT)".into());
    }
    // `nats://user:password@host`: async-nats would use it, and the URL is in every message
    // about the server (the journal, the counters' last_error). Not printed here either.
    if url.contains('@') {
        return Err(
            "the server URL carries credentials (USER:PASSWORD@ or TOKEN@), which \
                    would be shown in messages and in the counters: use --nats-user with \
                    --nats-password-file, or --nats-token-file"
                .into(),
        );
    }
    let mut c = Config::new(
        url,
        a.nats_hostname.clone().unwrap_or_else(hostname),
        &a.spool,
    );
    c.auth = if let Some(user) = &a.nats_user {
        let password = match &a.nats_password_file {
            Some(p) => read_secret("--nats-password-file", p)?,
            None => std::env::var("CNBUS_NATS_PASSWORD").map_err(|_| {
                "--nats-user needs --nats-password-file or CNBUS_NATS_PASSWORD".to_owned()
            })?,
        };
        Auth::UserPassword {
            user: user.clone(),
            password,
        }
    } else if let Some(p) = &a.nats_token_file {
        Auth::Token(read_secret("--nats-token-file", p)?)
    } else if let Some(p) = &a.nats_creds {
        Auth::CredsFile(p.clone())
    } else if let Some(p) = &a.nats_nkey_file {
        Auth::NKey(read_secret("--nats-nkey-file", p)?)
    } else if let Some(t) = std::env::var("CNBUS_NATS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        Auth::Token(t)
    } else {
        Auth::None
    };
    c.tls_required = a.nats_tls_required;
    c.tls_root_ca = a.nats_tls_ca.clone();
    c.tls_client_cert = a.nats_tls_cert.clone().zip(a.nats_tls_key.clone());
    c.stream = a.nats_stream.clone();
    c.window = a.nats_window;
    c.linger = Duration::from_millis(a.nats_linger);
    c.spool_max_bytes = a.spool_max;
    c.dead_letter_max_bytes = a.dead_letter_max;
    // At least four segments in the spool, so that a small cap still spools in steps.
    c.spool_segment_bytes = (a.spool_max / 4).clamp(4096, 4 << 20);
    Ok(c)
}

impl Shipper {
    /// Starts the sink. An unreachable server is not an error (the sink spools and keeps
    /// reconnecting: [`Shipper::unreachable`] says so); wrong credentials, TLS failures or a
    /// stream with other subjects are.
    pub fn start(a: &NatsArgs, url: &str, boot: u128) -> Result<Shipper, String> {
        let config = config(a, url)?;
        let spool = config.spool_dir.clone();
        let sink = NatsSink::start(config).map_err(|e| e.to_string())?;
        let start_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Shipper {
            sink,
            lines: BytesMut::with_capacity(BATCH * 512),
            pending: Vec::with_capacity(BATCH),
            boot: format!("{boot:032x}"),
            run: format!("{}.{start_ns}", std::process::id()),
            own: 0,
            reported_dropped: 0,
            next_check: Instant::now() + DROP_CHECK_EVERY,
            spool,
        })
    }

    /// Why the sink is not connected after its start, if it is not.
    pub fn unreachable(&self) -> Option<String> {
        let s = self.sink.stats();
        (!s.connected).then(|| s.last_error.unwrap_or_else(|| "not connected".into()))
    }

    /// Queues `line` (one log line, with its newline) for the sink: it is handed over by
    /// [`Shipper::flush`], which the agent calls whenever it has drained the socket (and
    /// which runs by itself every [`BATCH`] lines).
    pub fn ship(&mut self, line: &[u8], what: Ship<'_>) {
        if line.is_empty() {
            return;
        }
        let (event, msg_id) = match what {
            Ship::Event(ev) => {
                let event = ev.kind().name();
                let id = format!(
                    "{}.{}.{}.{}.{event}",
                    self.boot, ev.cpu, ev.seq, ev.timestamp_ns
                );
                (event, id)
            }
            Ship::Own(event) => {
                self.own += 1;
                let id = format!("{}.agent.{}.{}.{event}", self.boot, self.run, self.own);
                (event, id)
            }
        };
        self.lines.extend_from_slice(line);
        self.pending.push((event, msg_id, line.len()));
        if self.pending.len() >= BATCH {
            self.flush();
        }
    }

    /// Hands the queued lines to the sink, one after the other. In a burst, the sink's
    /// thread is woken once for many lines rather than once a line (a wake-up costs more
    /// than a publish), and the lines share one allocation.
    pub fn flush(&mut self) {
        let mut all = self.lines.split().freeze();
        for (event, msg_id, len) in self.pending.drain(..) {
            // A drop (Accepted::Dropped) is in the sink's counter: reported by drops_due.
            let _: Accepted = self.sink.publish(Record {
                event,
                msg_id,
                line: all.split_to(len),
            });
        }
    }

    /// The drops not yet reported in a `dropped` line: `(count, total)`, checked at most once
    /// every [`DROP_CHECK_EVERY`] unless `now` is `None` (a last check before the shutdown).
    pub fn drops_due(&mut self, now: Option<Instant>) -> Option<(u64, u64)> {
        if let Some(now) = now {
            if now < self.next_check {
                return None;
            }
            self.next_check = now + DROP_CHECK_EVERY;
        }
        self.flush();
        let total = self.sink.stats().dropped;
        let count = total
            .checked_sub(self.reported_dropped)
            .filter(|&n| n > 0)?;
        self.reported_dropped = total;
        Some((count, total))
    }

    /// The sink's counters now (after a flush, so that `published` counts every line
    /// written so far).
    pub fn stats(&mut self) -> SinkStats {
        self.flush();
        self.sink.stats()
    }

    /// Sends what it can within `deadline`; the rest stays in the spool. The report carries
    /// the final counters (`ShutdownReport::stats`).
    pub fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.flush();
        self.sink.shutdown(deadline)
    }

    /// A handle that cuts [`Shipper::shutdown`] short (a second SIGINT or SIGTERM).
    pub fn abort_handle(&self) -> AbortHandle {
        self.sink.abort_handle()
    }

    /// Lines handed over and not yet acknowledged nor dropped: in flight, queued, spooled
    /// (after a flush).
    pub fn left(&mut self) -> u64 {
        let s = self.stats();
        s.in_flight + s.queued + s.spool_records
    }

    /// Drops reported in `dropped` lines so far.
    pub fn reported_dropped(&self) -> u64 {
        self.reported_dropped
    }
}

/// The counters of the stats line.
pub fn counters(s: &SinkStats, report: Option<&ShutdownReport>) -> NatsCounters {
    NatsCounters {
        published: s.published,
        acknowledged: s.acknowledged,
        resent: s.resent,
        spooled: s.spooled,
        dropped: s.dropped,
        maybe_stored: s.maybe_stored,
        dead_lettered: s.dead_lettered,
        reconnects: s.reconnects,
        disconnects: s.disconnects,
        duplicates: s.duplicates,
        replayed: s.replayed,
        in_flight: s.in_flight,
        queued: s.queued,
        spool_bytes: s.spool_bytes,
        spool_records: s.spool_records,
        spool_torn_tails: s.spool_torn_tails,
        spool_torn_bytes: s.spool_torn_bytes,
        connected: s.connected,
        last_error: s.last_error.clone(),
        sent: report.map(|r| r.sent),
        unsent: report.map(|r| r.unsent),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    fn config_of(url: &str) -> Result<cnbus_nats::Config, String> {
        let cli = Cli::try_parse_from(["cnbus-agent", "--nats", url]).unwrap();
        super::config(&cli.args.nats, url)
    }

    #[test]
    fn a_url_with_credentials_or_an_empty_url_is_refused_without_printing_the_secret() {
        for url in [
            "nats://agent:s3cret@127.0.0.1:4222",
            "nats://s3cret@127.0.0.1:4222",
            "nats://127.0.0.1:4222,nats://agent:s3cret@127.0.0.2:4222",
        ] {
            let e = config_of(url).expect_err(url);
            assert!(e.contains("credentials") && !e.contains("s3cret"), "{e}");
        }
        for url in ["", "  "] {
            let e = config_of(url).expect_err(url);
            assert!(e.contains("empty"), "{e}");
        }
        let c = config_of("nats://127.0.0.1:4222").unwrap();
        assert_eq!(c.url, "nats://127.0.0.1:4222");
    }

    #[test]
    fn the_spool_and_dead_letter_caps_reach_the_sink() {
        let url = "nats://127.0.0.1:4222";
        let c = config_of(url).unwrap();
        assert_eq!(
            (c.spool_max_bytes, c.dead_letter_max_bytes),
            (256 << 20, 64 << 20)
        );
        let cli = Cli::try_parse_from([
            "cnbus-agent",
            "--nats",
            url,
            "--spool-max",
            "1M",
            "--dead-letter-max",
            "0",
        ])
        .unwrap();
        let c = super::config(&cli.args.nats, url).unwrap();
        assert_eq!((c.spool_max_bytes, c.dead_letter_max_bytes), (1 << 20, 0));
    }

    #[test]
    fn the_counters_line_says_how_much_of_the_spool_was_torn() {
        let stats = cnbus_nats::SinkStats {
            spool_torn_tails: 1,
            spool_torn_bytes: 77,
            ..Default::default()
        };
        let text = serde_json::to_string(&super::counters(&stats, None)).unwrap();
        assert!(
            text.contains(r#""spool_torn_tails":1,"spool_torn_bytes":77"#),
            "{text}"
        );
    }
}
