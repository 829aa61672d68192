//! A NATS JetStream sink for cnbus event lines.
//!
//! [`NatsSink::start`] spawns one thread running a tokio runtime and an `async-nats` client;
//! [`NatsSink::publish`] is a plain synchronous call that hands a record (one JSON line, sent
//! unchanged) to that thread through a bounded queue, or to the disk spool when the queue is
//! full, and never drops a record without counting it. Each record is published to JetStream
//! with the header `Nats-Msg-Id` set to its message id and waits for the stream's
//! acknowledgement with at most [`Config::window`] publishes in flight; a publish that is not
//! acknowledged (timeout, disconnect) is re-sent with the same id, and the stream's duplicate
//! window makes it stored once. See README.md beside this crate for the guarantees.
//!
//! [`NatsSink::shutdown`] sends what is left for at most its deadline, then keeps every
//! record not acknowledged in the spool for the next start. An [`AbortHandle`]
//! ([`NatsSink::abort_handle`], cloneable, usable from any thread) cuts that wait short at
//! once, as if the deadline had passed: how `cnbus-agent` ends the shutdown on an operator's
//! second Ctrl-C. Nothing is dropped for it; what was not sent is counted as `unsent`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use cnbus_nats::{Config, NatsSink, Record};
//!
//! # fn main() -> Result<(), cnbus_nats::SinkError> {
//! let config = Config::new("nats://127.0.0.1:4222", "host1", "/var/lib/cnbus-agent/spool");
//! // Refused credentials or a stream with other subjects are errors here; an unreachable
//! // server is not (records are spooled until it is back).
//! let sink = NatsSink::start(config)?;
//! sink.publish(Record {
//!     event: "exec",
//!     msg_id: "host1-exec-42".into(),
//!     line: bytes::Bytes::from_static(b"{\"event\":\"exec\",\"pid\":42}\n"),
//! });
//! // Another thread (a signal waiter) can end the shutdown below early.
//! let abort = sink.abort_handle();
//! std::thread::spawn(move || {
//!     // ... on the second SIGINT:
//!     abort.abort();
//! });
//! let report = sink.shutdown(Duration::from_secs(5));
//! // Every record published is sent, kept in the spool (unsent), or dropped and counted.
//! println!("sent {}, unsent {}, dropped {}", report.sent, report.unsent, report.dropped);
//! # Ok(())
//! # }
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

mod dead_letter;
mod spool;
mod subject;
mod worker;

pub use dead_letter::{
    requeue_dead_letters, Requeued, DEAD_LETTER_FILE, DEAD_LETTER_MALFORMED_FILE,
};
pub use subject::{sanitize_token, subject_covers};

/// The stream the sink publishes to unless told otherwise.
pub const DEFAULT_STREAM: &str = "CNBUS_EVENTS";
/// The first two tokens of every subject; the stream must cover `cnbus.events.>`.
pub const SUBJECT_PREFIX: &str = "cnbus.events";
/// Most bytes of the subjects' host token (after [`sanitize_token`]); a host name is at most
/// 64 bytes on Linux, and a DNS name 253.
pub const MAX_HOST_TOKEN: usize = 255;
/// Most bytes of a subject the sink publishes to (`cnbus.events.`, a host token of at most
/// [`MAX_HOST_TOKEN`] bytes, `.`, an event token of up to 255 bytes). The subject and the
/// reply subject go on one protocol line, which the server caps (4096 bytes by default) by
/// closing the connection: a record with a longer subject (a very long event name, or a
/// requeued dead letter's subject) is refused for good (dead-lettered) instead of making
/// the sink disconnect at every publish of it, forever.
pub const MAX_SUBJECT: usize = SUBJECT_PREFIX.len() + 1 + MAX_HOST_TOKEN + 1 + 255;

/// How the sink authenticates to the server. Its `Debug` output hides the secrets.
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// `--user`/`--pass` authorization.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// Token authorization.
    Token(String),
    /// A `.creds` file (JWT + NKey seed), as written by `nsc`.
    CredsFile(PathBuf),
    /// An NKey seed (`SU...`).
    NKey(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<hidden>")
                .finish(),
            Auth::Token(_) => f.write_str("Token(<hidden>)"),
            Auth::CredsFile(path) => f.debug_tuple("CredsFile").field(path).finish(),
            Auth::NKey(_) => f.write_str("NKey(<hidden>)"),
        }
    }
}

/// Configuration of a [`NatsSink`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Server URL, `nats://HOST:PORT` (or `tls://HOST:PORT`).
    pub url: String,
    /// Credentials.
    pub auth: Auth,
    /// Refuse a connection without TLS.
    pub tls_required: bool,
    /// PEM file of root certificates to trust besides the system ones.
    pub tls_root_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// The host token of the subjects `cnbus.events.<hostname>.<event>` (sanitized; at most
    /// [`MAX_HOST_TOKEN`] bytes).
    pub hostname: String,
    /// Stream name, [`DEFAULT_STREAM`] by default.
    pub stream: String,
    /// The duplicate window of the stream when the sink creates it (`None`: the server's
    /// default, 2 minutes). A record re-sent later than this after its first publish may be
    /// stored twice; an existing stream keeps its own window.
    pub duplicate_window: Option<Duration>,
    /// Most publishes waiting for their acknowledgement at once.
    pub window: usize,
    /// Records the in-memory queue between [`NatsSink::publish`] and the sink's thread holds;
    /// past it records go to the spool.
    pub queue: usize,
    /// Spool directory (created if absent). Records left there by an earlier run are sent
    /// first.
    pub spool_dir: PathBuf,
    /// Most bytes of spool files; a record that does not fit is dropped and counted (the
    /// newest is dropped: see README.md).
    pub spool_max_bytes: u64,
    /// Size at which a spool segment file is closed and a new one started.
    pub spool_segment_bytes: u64,
    /// How long a publish waits for its acknowledgement before it is re-sent.
    pub ack_timeout: Duration,
    /// How long the first connection attempt at start may take.
    pub connect_timeout: Duration,
    /// How long the sink's thread lets acknowledgements (and new records) gather while
    /// publishes are in flight, before it handles them all in one wake-up: fewer wake-ups per
    /// record, at the cost of at most this much latency per round trip. Zero: woken by every
    /// packet from the server.
    pub linger: Duration,
    /// Most bytes of the dead-letter file ([`DEAD_LETTER_FILE`] in the spool directory), where
    /// records JetStream refuses for good are kept; past it they are only counted as dropped.
    pub dead_letter_max_bytes: u64,
}

impl Config {
    /// A configuration with defaults: no credentials, stream [`DEFAULT_STREAM`], window 256,
    /// queue 8192, spool 256 MiB in 4 MiB segments, acknowledgement timeout 5 s, connect
    /// timeout 5 s, linger 5 ms, dead-letter file 64 MiB.
    pub fn new(
        url: impl Into<String>,
        hostname: impl Into<String>,
        spool_dir: impl Into<PathBuf>,
    ) -> Config {
        Config {
            url: url.into(),
            auth: Auth::None,
            tls_required: false,
            tls_root_ca: None,
            tls_client_cert: None,
            hostname: hostname.into(),
            stream: DEFAULT_STREAM.to_owned(),
            duplicate_window: None,
            window: 256,
            queue: 8192,
            spool_dir: spool_dir.into(),
            spool_max_bytes: 256 << 20,
            spool_segment_bytes: spool::DEFAULT_SEGMENT_BYTES,
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            linger: Duration::from_millis(5),
            dead_letter_max_bytes: 64 << 20,
        }
    }
}

/// Why the sink could not start (or, for [`SinkError::Spool`], could not keep its spool).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A configuration value is unusable.
    #[error("invalid NATS sink configuration: {0}")]
    Config(String),
    /// The server refused the credentials: not an outage, so the sink does not start.
    #[error("NATS server {url} refused the credentials: {reason}")]
    Auth {
        /// The server URL.
        url: String,
        /// What the client reported.
        reason: String,
    },
    /// TLS could not be set up (certificate files, handshake, TLS required but not offered).
    #[error("TLS with NATS server {url} failed: {reason}")]
    Tls {
        /// The server URL.
        url: String,
        /// What the client reported.
        reason: String,
    },
    /// The stream exists, but its subjects do not cover `cnbus.events.>`.
    #[error("stream {stream} exists with subjects {subjects:?}, which do not cover {wanted}; change the stream's subjects or pick another stream name")]
    StreamSubjects {
        /// Stream name.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
        /// The subjects the sink publishes to.
        wanted: String,
    },
    /// JetStream refused to look up or create the stream (JetStream disabled, subjects claimed
    /// by another stream, ...).
    #[error("JetStream stream {stream}: {reason}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What the server or client reported.
        reason: String,
    },
    /// A spool file operation failed.
    #[error("spool: {op} {path}: {source}")]
    Spool {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The sink's thread or runtime could not be started.
    #[error("cannot start the NATS sink thread: {0}")]
    Thread(std::io::Error),
}

/// One event line to publish.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// The event type: the last subject token (sanitized: `.`, `*`, `>` and whitespace become
    /// `_`).
    pub event: &'a str,
    /// The `Nats-Msg-Id`: unique per event and the same when the event is sent again.
    pub msg_id: String,
    /// The line, sent unchanged as the message payload.
    pub line: Bytes,
}

/// Where [`NatsSink::publish`] put a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued in memory for the sink's thread.
    Queued,
    /// Written to the disk spool (queue full).
    Spooled,
    /// Dropped and counted: the queue and the spool were full (or the spool failed).
    Dropped,
}

/// The sink's counters. Records: `published + replayed = acknowledged + dropped +
/// maybe_stored + unsent`, where `unsent` is `spool_records` after [`NatsSink::shutdown`]
/// (while running it also includes the records queued or in flight).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Records handed to [`NatsSink::publish`].
    pub published: u64,
    /// Records found in the spool at start (sent first).
    pub replayed: u64,
    /// Records whose publish JetStream acknowledged (each record once).
    pub acknowledged: u64,
    /// Of those, acknowledgements flagged duplicate: the record was already in the stream.
    pub duplicates: u64,
    /// Publishes of records whose earlier publish was not acknowledged.
    pub resent: u64,
    /// Records written to the spool (queue full or server unreachable).
    pub spooled: u64,
    /// Records dropped (not in the stream, never sent again): spool full, spool write failed,
    /// or refused for good (over the server's `max_payload` or the stream's `max_msg_size`, a
    /// bad request: see [`SinkStats::dead_lettered`]).
    pub dropped: u64,
    /// Records refused for good after an earlier publish of theirs went unacknowledged, so
    /// that they may be in the stream after all (the acknowledgement was lost, and the
    /// stream was sealed since, or its size limit lowered past the duplicate window: a
    /// refusal comes before de-duplication): not sent again, kept in the dead-letter file,
    /// and neither counted as dropped nor as acknowledged, since the sink cannot tell.
    pub maybe_stored: u64,
    /// Of the records refused for good (`dropped` and `maybe_stored`), those kept in the
    /// dead-letter file ([`DEAD_LETTER_FILE`] in the spool directory) for an operator to
    /// re-publish.
    pub dead_lettered: u64,
    /// Connections after the first one.
    pub reconnects: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// Records published and not yet acknowledged now (waiting, or to be sent again).
    pub in_flight: u64,
    /// Records in the in-memory queue now.
    pub queued: u64,
    /// Bytes of spool files now.
    pub spool_bytes: u64,
    /// Records in the spool files not yet acknowledged.
    pub spool_records: u64,
    /// Spool segments found with a damaged (torn) tail, cut off.
    pub spool_torn_tails: u64,
    /// Bytes cut off those segments.
    pub spool_torn_bytes: u64,
    /// Connected to the server with the stream checked.
    pub connected: bool,
    /// The last error (connection, stream, spool), if any.
    pub last_error: Option<String>,
}

/// What [`NatsSink::shutdown`] could and could not send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Records acknowledged by JetStream over the sink's life.
    pub sent: u64,
    /// Records not acknowledged, kept in the spool for the next start.
    pub unsent: u64,
    /// Records dropped over the sink's life.
    pub dropped: u64,
    /// Every counter once the sink's thread has stopped: the final figures (nothing in
    /// flight or queued; `sent`, `unsent` and `dropped` above are taken from them).
    pub stats: SinkStats,
}

#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) event: String,
    pub(crate) msg_id: String,
    pub(crate) line: Bytes,
    /// The spool segment the item was read from.
    pub(crate) origin: Option<u64>,
    /// Published before without an acknowledgement.
    pub(crate) sent_before: bool,
    /// The subject to publish to, when not the sink's own `cnbus.events.<host>.<event>`: a
    /// dead letter requeued keeps the subject it was refused on.
    pub(crate) subject: Option<String>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) acknowledged: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) resent: AtomicU64,
    pub(crate) spooled: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) maybe_stored: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) connected: AtomicBool,
}

pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) spool: Mutex<spool::Spool>,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) deadline: Mutex<Option<Instant>>,
    pub(crate) wake: tokio::sync::Notify,
}

impl Shared {
    pub(crate) fn set_error(&self, error: String) {
        *self.last_error.lock() = Some(error);
    }

    /// Writes an item to the spool, or drops and counts it.
    pub(crate) fn spool_or_drop(&self, item: &Item, force: bool) -> Accepted {
        let result = self.spool.lock().append(item, force);
        match result {
            Ok(true) => {
                self.counters.spooled.fetch_add(1, Ordering::Relaxed);
                Accepted::Spooled
            }
            Ok(false) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Accepted::Dropped
            }
            Err(e) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.set_error(format!("spool write failed, record dropped: {e}"));
                Accepted::Dropped
            }
        }
    }
}

/// Cuts a [`NatsSink::shutdown`] short from another thread (an operator's second Ctrl-C):
/// from [`NatsSink::abort_handle`].
#[derive(Clone)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle").finish_non_exhaustive()
    }
}

impl AbortHandle {
    /// Stops the sending now, as if the shutdown deadline had passed: a shutdown in progress
    /// stops waiting for the server and writes every record not acknowledged to the spool
    /// (`unsent` in its report); before a shutdown, the sink stops sending and records
    /// published afterwards go to the spool (or are dropped and counted when it is full).
    pub fn abort(&self) {
        *self.shared.deadline.lock() = Some(Instant::now());
        self.shared.wake.notify_one();
    }
}

/// A running JetStream sink. Dropping it is [`NatsSink::shutdown`] with a zero deadline.
pub struct NatsSink {
    shared: Arc<Shared>,
    tx: Option<tokio::sync::mpsc::Sender<Item>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Checks at start what the client would report without saying which file or value is wrong:
/// an unreadable TLS file (async-nats gives only the I/O error) and an NKey seed that is not
/// one (async-nats reports "failed signing nonce", as if the server had refused it). The
/// seed is never part of the message.
fn check_credential_files(config: &Config) -> Result<(), SinkError> {
    let client = config.tls_client_cert.iter().flat_map(|(c, k)| [c, k]);
    for path in config.tls_root_ca.iter().chain(client) {
        if let Err(e) = std::fs::File::open(path) {
            return Err(SinkError::Tls {
                url: config.url.clone(),
                reason: format!("cannot read {}: {e}", path.display()),
            });
        }
    }
    if let Auth::NKey(seed) = &config.auth {
        if let Err(e) = nkeys::KeyPair::from_seed(seed) {
            return Err(SinkError::Config(format!(
                "the NKey seed is not a valid seed: {e}"
            )));
        }
    }
    Ok(())
}

impl NatsSink {
    /// Opens the spool (records left there are replayed first), connects and checks (or
    /// creates) the stream, then runs the sink on its own thread.
    ///
    /// Errors: wrong credentials ([`SinkError::Auth`]), TLS failures, a stream whose subjects
    /// do not cover `cnbus.events.>`, JetStream refusing the stream, an unusable spool. An
    /// unreachable server is not an error: the sink starts, spools and keeps reconnecting, and
    /// [`SinkStats::last_error`] says why it is not connected.
    pub fn start(config: Config) -> Result<NatsSink, SinkError> {
        if config.window == 0 || config.queue == 0 {
            return Err(SinkError::Config(
                "window and queue must be at least 1".into(),
            ));
        }
        if config.stream.is_empty()
            || config
                .stream
                .contains(['.', '*', '>', ' ', '\t', '\n', '\r', '/', '\\'])
        {
            return Err(SinkError::Config(format!(
                "invalid stream name {:?}",
                config.stream
            )));
        }
        // The subject `cnbus.events.<host>.<event>` and the reply subject go on one protocol
        // line, which the server caps (4096 bytes by default) by closing the connection: a
        // longer host token would make every publish fail, forever.
        if sanitize_token(&config.hostname).len() > MAX_HOST_TOKEN {
            return Err(SinkError::Config(format!(
                "the host name is {} bytes long; at most {MAX_HOST_TOKEN} fit in a subject",
                config.hostname.len()
            )));
        }
        if config.spool_segment_bytes < 4096 || config.spool_max_bytes < config.spool_segment_bytes
        {
            return Err(SinkError::Config(
                "spool segments must be at least 4096 bytes and the spool cap at least one segment"
                    .into(),
            ));
        }
        check_credential_files(&config)?;
        let (spool, found) = spool::Spool::open(
            &config.spool_dir,
            config.spool_max_bytes,
            config.spool_segment_bytes,
        )?;
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            spool: Mutex::new(spool),
            last_error: Mutex::new(None),
            deadline: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        });
        shared
            .counters
            .replayed
            .store(found.records, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(config.queue);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cnbus-nats".into())
            .spawn(move || worker::thread_main(config, worker_shared, rx, ready_tx))
            .map_err(SinkError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(NatsSink {
                shared,
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(SinkError::Thread(std::io::Error::other(
                    "the sink thread ended at start",
                )))
            }
        }
    }

    /// Hands a record to the sink. Never blocks on the network: when the in-memory queue is
    /// full the record is written to the spool; when the spool is full too it is dropped and
    /// counted ([`Accepted::Dropped`]).
    pub fn publish(&self, record: Record<'_>) -> Accepted {
        self.shared
            .counters
            .published
            .fetch_add(1, Ordering::Relaxed);
        let item = Item {
            event: record.event.to_owned(),
            msg_id: record.msg_id,
            line: record.line,
            origin: None,
            sent_before: false,
            subject: None,
        };
        let Some(tx) = &self.tx else {
            return self.shared.spool_or_drop(&item, false);
        };
        match tx.try_send(item) {
            Ok(()) => Accepted::Queued,
            Err(tokio::sync::mpsc::error::TrySendError::Full(item))
            | Err(tokio::sync::mpsc::error::TrySendError::Closed(item)) => {
                self.shared.spool_or_drop(&item, false)
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> SinkStats {
        let c = &self.shared.counters;
        let (spool_bytes, spool_records, spool_torn_tails, spool_torn_bytes) = {
            let s = self.shared.spool.lock();
            (s.bytes(), s.records(), s.torn_tails, s.torn_bytes)
        };
        SinkStats {
            published: c.published.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            acknowledged: c.acknowledged.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            spooled: c.spooled.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            maybe_stored: c.maybe_stored.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            reconnects: c.connects.load(Ordering::Relaxed).saturating_sub(1),
            disconnects: c.disconnects.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            queued: self
                .tx
                .as_ref()
                .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as u64),
            spool_bytes,
            spool_records,
            spool_torn_tails,
            spool_torn_bytes,
            connected: c.connected.load(Ordering::Relaxed),
            last_error: self.shared.last_error.lock().clone(),
        }
    }

    /// Sends what it can within `deadline`, then writes every record not acknowledged to the
    /// spool (for the next start) and stops the thread. [`AbortHandle::abort`] ends the wait
    /// early.
    pub fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.stop(deadline)
    }

    /// A handle that cuts the shutdown short ([`AbortHandle::abort`]).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    fn stop(&mut self, deadline: Duration) -> ShutdownReport {
        if let Some(thread) = self.thread.take() {
            {
                // Not later than an abort that came first.
                let until = Instant::now() + deadline;
                let mut d = self.shared.deadline.lock();
                *d = Some(d.map_or(until, |earlier| earlier.min(until)));
            }
            self.tx = None;
            self.shared.wake.notify_one();
            let _ = thread.join();
        }
        let stats = self.stats();
        ShutdownReport {
            sent: stats.acknowledged,
            unsent: stats.spool_records,
            dropped: stats.dropped,
            stats,
        }
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<NatsSink>();
        shared::<AbortHandle>();
    }

    #[test]
    fn debug_hides_secrets() {
        let auth = Auth::UserPassword {
            user: "agent".into(),
            password: "s3cret".into(),
        };
        let text = format!(
            "{auth:?} {:?} {:?}",
            Auth::Token("t0k".into()),
            Auth::NKey("SUabc".into())
        );
        assert!(text.contains("agent"));
        assert!(
            !text.contains("s3cret") && !text.contains("t0k") && !text.contains("SUabc"),
            "{text}"
        );
    }
}
