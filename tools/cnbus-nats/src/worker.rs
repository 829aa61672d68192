//! The sink's thread: connection, stream check, the publish window, the spool.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{
    ConnectErrorKind, ConnectOptions, Event, HeaderMap, StatusCode, Subject, Subscriber,
};
use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

use crate::dead_letter::{DeadLetter, MAYBE_STORED_NOTE};
use crate::subject::{sanitize_token, subject_covers};
use crate::{Auth, Config, Item, Shared, SinkError, MAX_SUBJECT, SUBJECT_PREFIX};

/// How often the loop looks at the connection and the spool when nothing else wakes it.
const TICK: Duration = Duration::from_millis(50);
/// Pause after a failed publish before the next one; it doubles with each failed round in a
/// row (a transient refusal, a timeout, a publish the client did not take) up to
/// [`MAX_RETRY_PAUSE`], and is back to this at the next acknowledgement.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between failed rounds.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(4);
/// Pause between stream checks after a failed one.
const STREAM_RECHECK: Duration = Duration::from_secs(2);
/// Bound of a JetStream API request (stream lookup, creation).
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the client to take a publish or a flush. Both wait for the network when
/// the connection's socket is full (a server that stopped reading without closing the
/// connection) or the connection is being re-established, and async-nats keeps such a flush
/// waiting until a reconnect succeeds: unbounded, the thread would stop looking at the queue,
/// the spool and the shutdown deadline for as long as the server does not answer.
const CLIENT_WAIT: Duration = Duration::from_millis(50);

pub(crate) fn thread_main(
    config: Config,
    shared: Arc<Shared>,
    rx: Receiver<Item>,
    ready: std::sync::mpsc::Sender<Result<(), SinkError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(SinkError::Thread(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let (client, stream_ok) = match connect(&config, &shared).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        // One subscription receives every PubAck: the reply subject of a publish is
        // `<inbox>.<key>`, which costs far less than one request (and one timer) per record.
        let inbox = client.new_inbox();
        let acks = match client.subscribe(format!("{inbox}.*")).await {
            Ok(acks) => acks,
            Err(e) => {
                let _ = ready.send(Err(SinkError::Thread(std::io::Error::other(format!(
                    "cannot subscribe to the acknowledgement inbox: {e}"
                )))));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut worker = Worker {
            prefix: format!("{SUBJECT_PREFIX}.{}.", sanitize_token(&config.hostname)),
            window: config.window,
            stream: config.stream.clone(),
            duplicate_window: config.duplicate_window,
            shared,
            rx,
            rx_open: true,
            client,
            inbox,
            acks,
            ack_timeout: config.ack_timeout,
            linger: config.linger,
            stream_ok,
            next_stream_check: Instant::now(),
            retry: VecDeque::new(),
            from_spool: VecDeque::new(),
            subjects: HashMap::new(),
            reply: String::new(),
            in_flight: HashMap::new(),
            next_key: 0,
            pause_until: Instant::now(),
            failures: 0,
            dead_letter: DeadLetter::new(&config.spool_dir, config.dead_letter_max_bytes),
        };
        worker.run().await;
    });
}

fn options(config: &Config, shared: &Arc<Shared>, creds: Option<ConnectOptions>) -> ConnectOptions {
    let mut o = match (&config.auth, creds) {
        (_, Some(o)) => o,
        (Auth::UserPassword { user, password }, None) => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        (Auth::Token(t), None) => ConnectOptions::with_token(t.clone()),
        (Auth::NKey(seed), None) => ConnectOptions::with_nkey(seed.clone()),
        (Auth::None | Auth::CredsFile(_), None) => ConnectOptions::new(),
    };
    if config.tls_required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &config.tls_root_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client_cert {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    let events = Arc::clone(shared);
    o.connection_timeout(config.connect_timeout)
        .max_reconnects(None)
        .name("cnbus-nats")
        // Subjects are built from sanitized tokens (no whitespace or control characters) and
        // the inbox: valid by construction, not checked again per publish.
        .skip_subject_validation(true)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50u64 << attempts.min(6)).min(2000))
        })
        .event_callback(move |event| {
            let shared = Arc::clone(&events);
            async move {
                match event {
                    Event::Connected => {
                        shared.counters.connects.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Disconnected => {
                        shared.counters.disconnects.fetch_add(1, Ordering::Relaxed);
                        shared.counters.connected.store(false, Ordering::Relaxed);
                        shared.set_error(
                            "disconnected from the NATS server; spooling and reconnecting".into(),
                        );
                    }
                    Event::ServerError(e) => shared.set_error(format!("NATS server error: {e}")),
                    Event::ClientError(e) => shared.set_error(format!("NATS client error: {e}")),
                    _ => {}
                }
            }
        })
}

/// Connects once; wrong credentials and TLS errors fail the start, an unreachable server
/// starts a client that keeps retrying in the background (the fallback).
async fn connect(
    config: &Config,
    shared: &Arc<Shared>,
) -> Result<(async_nats::Client, bool), SinkError> {
    let creds = match &config.auth {
        Auth::CredsFile(path) => Some(
            ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    SinkError::Config(format!("credentials file {}: {e}", path.display()))
                })?,
        ),
        _ => None,
    };
    let creds_again = match &config.auth {
        Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path).await.ok(),
        _ => None,
    };
    match options(config, shared, creds)
        .connect(config.url.as_str())
        .await
    {
        Ok(client) => {
            check_stream(&config.stream, config.duplicate_window, &client).await?;
            shared.counters.connected.store(true, Ordering::Relaxed);
            Ok((client, true))
        }
        Err(e) if e.kind() == ConnectErrorKind::Io && is_tls_failure(&e) => Err(SinkError::Tls {
            url: config.url.clone(),
            reason: e.to_string(),
        }),
        Err(e) => match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Err(SinkError::Auth {
                    url: config.url.clone(),
                    reason: e.to_string(),
                })
            }
            ConnectErrorKind::Tls => Err(SinkError::Tls {
                url: config.url.clone(),
                reason: format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ),
            }),
            ConnectErrorKind::ServerParse => Err(SinkError::Config(format!(
                "server URL {:?}: {e}",
                config.url
            ))),
            ConnectErrorKind::Io
            | ConnectErrorKind::TimedOut
            | ConnectErrorKind::Dns
            | ConnectErrorKind::MaxReconnects => {
                shared.set_error(format!(
                    "NATS server {} unreachable at start ({e}); spooling and reconnecting",
                    config.url
                ));
                let client = options(config, shared, creds_again)
                    .retry_on_initial_connect()
                    .connect(config.url.as_str())
                    .await
                    .map_err(|e| SinkError::Config(format!("server URL {:?}: {e}", config.url)))?;
                Ok((client, false))
            }
        },
    }
}

/// Whether an I/O error of a connection attempt is a failed TLS handshake (rustls reports
/// certificate and protocol errors as `InvalidData`), which is a configuration problem, not an
/// outage.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// What JetStream's reply to one publish means: the one place that reads a reply (its status
/// and payload) and decides what to do with the record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// Stored; `duplicate`: it was already in the stream (de-duplicated by its msg id).
    Stored { duplicate: bool },
    /// Not stored: what kind of refusal, and the server's words (for `last_error`).
    Refused { class: Refusal, reason: String },
}

/// The classes of JetStream refusals, by what sending the same record again would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No stream took the subject (no responders, stream not found): check the stream
    /// (creating it when it is gone; spooling everything while its subjects do not cover
    /// ours), then send again.
    NoStream,
    /// Will likely pass later (cluster or stream unavailable, leader election, insufficient
    /// resources, a full stream with the `new` discard policy, a timeout, a reply the sink
    /// cannot read): sent again after a bounded backoff.
    Transient,
    /// The same at every attempt (the record is over the stream's `max_msg_size`, a bad
    /// request, a sealed stream: every 400-class refusal): never sent again; kept in the
    /// dead-letter file, counted and reported, and the records behind it are not held up.
    Permanent,
}

/// Reads JetStream's reply to a publish. The usual `{"stream":"NAME","seq":N}` is recognised
/// without a JSON parse; anything else is parsed once: an `"error"` object is a refusal,
/// classified by [`refusal_class`] (a refusal also carries `"stream"` and `"seq": 0`,
/// nats-server 2.9, so it must never be taken for an acknowledgement), else a
/// [`PublishAck`]. In the JSON text a `"` inside a string is escaped, so no key can be
/// matched inside a value.
fn read_reply(status: Option<StatusCode>, payload: &[u8]) -> Reply {
    let refused = |class, reason: String| Reply::Refused { class, reason };
    if status == Some(StatusCode::NO_RESPONDERS) {
        return refused(
            Refusal::NoStream,
            "no stream for the subject (no responders)".into(),
        );
    }
    let has = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
    if payload.starts_with(br#"{"stream":""#)
        && payload.ends_with(b"}")
        && has(br#""seq":"#)
        && !has(br#""error""#)
        && !has(br#""duplicate""#)
    {
        return Reply::Stored { duplicate: false };
    }
    let text = || String::from_utf8_lossy(&payload[..payload.len().min(300)]).into_owned();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
        let status = status.map(|s| format!("status {s}: ")).unwrap_or_default();
        return refused(
            Refusal::Transient,
            format!("unreadable reply ({status}{:?})", text()),
        );
    };
    if let Some(error) = value.get("error") {
        return match serde_json::from_value::<async_nats::jetstream::Error>(error.clone()) {
            Ok(error) => refused(refusal_class(&error), error.to_string()),
            Err(_) => refused(Refusal::Transient, format!("unreadable refusal {}", text())),
        };
    }
    match serde_json::from_value::<PublishAck>(value) {
        Ok(ack) => Reply::Stored {
            duplicate: ack.duplicate,
        },
        Err(_) => refused(Refusal::Transient, format!("unreadable reply {}", text())),
    }
}

/// The class of a JetStream refusal: by its error code where the code says more than its
/// HTTP-like status, else by the status (400: the request itself is refused, so it will be
/// again; 404: no stream; anything else, 503 first: the server cannot take it now).
fn refusal_class(error: &async_nats::jetstream::Error) -> Refusal {
    use async_nats::jetstream::ErrorCode;
    match error.error_code() {
        ErrorCode::STREAM_NOT_FOUND => Refusal::NoStream,
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
        | ErrorCode::BAD_REQUEST
        | ErrorCode::INVALID_JSON
        | ErrorCode::STREAM_NOT_MATCH
        | ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID
        | ErrorCode::STREAM_WRONG_LAST_SEQUENCE
        | ErrorCode::STREAM_SEALED => Refusal::Permanent,
        ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NOT_LEADER
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::STREAM_STORE_FAILED
        | ErrorCode::JETSTREAM_NOT_ENABLED => Refusal::Transient,
        _ => match error.code() {
            400 | 413 => Refusal::Permanent,
            404 => Refusal::NoStream,
            _ => Refusal::Transient,
        },
    }
}

/// The pause before the next publish after `failures` failed rounds in a row: [`RETRY_PAUSE`]
/// doubling up to [`MAX_RETRY_PAUSE`].
fn backoff(failures: u32) -> Duration {
    RETRY_PAUSE
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_RETRY_PAUSE)
}

/// Checks that the stream exists with subjects covering `cnbus.events.>`, or creates it.
async fn check_stream(
    stream_name: &str,
    duplicate_window: Option<Duration>,
    client: &async_nats::Client,
) -> Result<(), SinkError> {
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .build(client.clone());
    let wanted = format!("{SUBJECT_PREFIX}.>");
    let stream_err = |reason: String| SinkError::Stream {
        stream: stream_name.to_owned(),
        reason,
    };
    match js.get_stream(stream_name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| stream_err(e.to_string()))?;
            let subjects = info.config.subjects.clone();
            if subjects.iter().any(|s| subject_covers(s, &wanted)) {
                Ok(())
            } else {
                Err(SinkError::StreamSubjects {
                    stream: stream_name.to_owned(),
                    subjects,
                    wanted,
                })
            }
        }
        Err(e) => {
            let not_found = matches!(e.kind(), async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref je)
                if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND);
            if !not_found {
                let hint = if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::Request
                ) {
                    " (is JetStream enabled on the server: nats-server -js?)"
                } else {
                    ""
                };
                return Err(stream_err(format!("{e}{hint}")));
            }
            let mut stream_config = async_nats::jetstream::stream::Config {
                name: stream_name.to_owned(),
                subjects: vec![wanted],
                ..Default::default()
            };
            if let Some(window) = duplicate_window {
                stream_config.duplicate_window = window;
            }
            js.create_stream(stream_config)
                .await
                .map(|_| ())
                .map_err(|e| stream_err(format!("cannot create it: {e}")))
        }
    }
}

struct Worker {
    prefix: String,
    window: usize,
    stream: String,
    duplicate_window: Option<Duration>,
    shared: Arc<Shared>,
    rx: Receiver<Item>,
    rx_open: bool,
    client: async_nats::Client,
    /// Reply subjects are `<inbox>.<key>`.
    inbox: String,
    acks: Subscriber,
    ack_timeout: Duration,
    linger: Duration,
    stream_ok: bool,
    next_stream_check: Instant,
    /// Published without an acknowledgement: sent again first.
    retry: VecDeque<Item>,
    /// Read from the spool, not yet published.
    from_spool: VecDeque<Item>,
    /// The subject of each event type seen, built once (a clone shares its bytes).
    subjects: HashMap<String, Subject>,
    /// Scratch for the reply subject.
    reply: String,
    /// Published, waiting for the acknowledgement: key → (record, when sent, whether an
    /// earlier publish of it went unacknowledged: it may be stored already).
    in_flight: HashMap<u64, (Item, Instant, bool)>,
    next_key: u64,
    pause_until: Instant,
    /// Failed rounds since the last acknowledgement (the backoff's exponent).
    failures: u32,
    /// Where records refused for good are kept.
    dead_letter: DeadLetter,
}

impl Worker {
    /// Connected, with the stream checked (checking it when it was not yet).
    async fn up(&mut self) -> bool {
        let connected = self.client.connection_state() == State::Connected;
        if connected && !self.stream_ok && Instant::now() >= self.next_stream_check {
            // At shutdown, no longer than the deadline leaves (each request may take
            // API_TIMEOUT when the server does not answer).
            let budget = match *self.shared.deadline.lock() {
                Some(deadline) => deadline.saturating_duration_since(std::time::Instant::now()),
                None => 2 * API_TIMEOUT,
            };
            let checked = tokio::time::timeout(
                budget,
                check_stream(&self.stream, self.duplicate_window, &self.client),
            )
            .await
            .unwrap_or_else(|_| {
                Err(SinkError::Stream {
                    stream: self.stream.clone(),
                    reason: "no answer before the shutdown deadline".into(),
                })
            });
            match checked {
                Ok(()) => self.stream_ok = true,
                Err(e) => {
                    self.shared
                        .set_error(format!("{e}; spooling until it is fixed"));
                    self.next_stream_check = Instant::now() + STREAM_RECHECK;
                }
            }
        }
        let up = connected && self.stream_ok;
        self.shared.counters.connected.store(up, Ordering::Relaxed);
        up
    }

    fn next_item(&mut self) -> Option<Item> {
        if let Some(item) = self.retry.pop_front() {
            return Some(item);
        }
        if let Some(item) = self.from_spool.pop_front() {
            return Some(item);
        }
        let (taken, lost) = {
            let mut spool = self.shared.spool.lock();
            let before = spool.lost;
            let taken = (spool.pending() > 0).then(|| spool.take_segment());
            (taken, spool.lost - before)
        };
        if lost > 0 {
            // Records the damaged segment could not give back: never to be sent, counted.
            self.shared
                .counters
                .dropped
                .fetch_add(lost, Ordering::Relaxed);
            self.shared.set_error(format!(
                "{lost} records lost from a damaged spool segment (counted as dropped)"
            ));
        }
        if let Some(taken) = taken {
            match taken {
                Ok(items) => self.from_spool.extend(items),
                Err(e) => self.shared.set_error(format!(
                    "spool segment unreadable, its records are lost: {e}"
                )),
            }
            if let Some(item) = self.from_spool.pop_front() {
                return Some(item);
            }
        }
        if self.rx_open {
            match self.rx.try_recv() {
                Ok(item) => return Some(item),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => self.rx_open = false,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
            }
        }
        None
    }

    async fn publish(&mut self, mut item: Item) {
        let key = self.next_key;
        self.next_key += 1;
        let subject = match (&item.subject, self.subjects.get(item.event.as_str())) {
            // A dead letter requeued: the subject it was refused on.
            (Some(own), _) => Subject::from(own.as_str()),
            (None, Some(subject)) => subject.clone(),
            (None, None) => {
                let subject =
                    Subject::from(format!("{}{}", self.prefix, sanitize_token(&item.event)));
                self.subjects.insert(item.event.clone(), subject.clone());
                subject
            }
        };
        if subject.len() > MAX_SUBJECT {
            let earlier = item.sent_before;
            let why = format!(
                "its subject is {} bytes long, over {MAX_SUBJECT}: the server would close the connection at each publish of it",
                subject.len()
            );
            self.refuse(item, why, earlier);
            return;
        }
        let reply = {
            use std::fmt::Write;
            self.reply.clear();
            let _ = write!(self.reply, "{}.{key}", self.inbox);
            Subject::from(self.reply.as_str())
        };
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, item.msg_id.as_str());
        let sent = tokio::time::timeout(
            CLIENT_WAIT,
            self.client
                .publish_with_reply_and_headers(subject, reply, headers, item.line.clone()),
        )
        .await;
        let Ok(sent) = sent else {
            // The client's command queue stayed full: not sent (a send that did not complete
            // is not queued), tried again after the pause.
            self.not_acknowledged(item, "the NATS client takes no more publishes".into());
            return;
        };
        match sent {
            Ok(()) => {
                let resent = item.sent_before;
                if resent {
                    self.shared.counters.resent.fetch_add(1, Ordering::Relaxed);
                }
                item.sent_before = true;
                self.in_flight.insert(key, (item, Instant::now(), resent));
            }
            Err(e) => match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded
                | async_nats::client::PublishErrorKind::InvalidSubject => {
                    // Not sent now, never sendable: kept aside, counted.
                    let earlier = item.sent_before;
                    self.refuse(item, format!("the NATS client refuses it: {e}"), earlier);
                }
                async_nats::client::PublishErrorKind::Send => {
                    self.not_acknowledged(item, format!("{e}"));
                }
            },
        }
    }

    /// A message on the acknowledgement inbox.
    fn on_ack(&mut self, message: async_nats::Message) {
        let Some(key) = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|k| k.parse::<u64>().ok())
        else {
            return;
        };
        // Unknown keys: acknowledgements arriving after their publish timed out (the record
        // was sent again under another key).
        let Some((item, _, resent)) = self.in_flight.remove(&key) else {
            return;
        };
        match read_reply(message.status, &message.payload) {
            Reply::Stored { duplicate } => {
                let c = &self.shared.counters;
                c.acknowledged.fetch_add(1, Ordering::Relaxed);
                if duplicate {
                    c.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(id) = item.origin {
                    self.shared.spool.lock().release(id);
                }
                self.failures = 0;
            }
            Reply::Refused {
                class: Refusal::NoStream,
                reason,
            } => {
                // Deleted, not yet recovered, or its subjects changed: check (or create) it
                // before sending again; while its subjects do not cover ours, `up` is false
                // and everything is spooled.
                self.stream_ok = false;
                self.not_acknowledged(item, reason);
            }
            Reply::Refused {
                class: Refusal::Transient,
                reason,
            } => self.not_acknowledged(item, format!("JetStream refused the publish: {reason}")),
            Reply::Refused {
                class: Refusal::Permanent,
                reason,
            } => self.refuse(
                item,
                format!("JetStream refuses it for good: {reason}"),
                resent,
            ),
        }
    }

    /// A record that can never be stored (refused for good): kept in the dead-letter file,
    /// counted and said why, released from the spool; the records behind it go on. Counted
    /// as dropped (not in the stream, never sent again), unless `earlier`: an earlier
    /// publish of it went unacknowledged, so it may be in the stream after all (its
    /// acknowledgement was lost; a stream sealed since, or a size limit lowered past the
    /// duplicate window, refuses the publish before de-duplication), counted as
    /// `maybe_stored` rather than claimed lost.
    fn refuse(&mut self, item: Item, why: String, earlier: bool) {
        let subject = match &item.subject {
            Some(own) => own.clone(),
            None => format!("{}{}", self.prefix, sanitize_token(&item.event)),
        };
        let c = &self.shared.counters;
        let why = if earlier {
            c.maybe_stored.fetch_add(1, Ordering::Relaxed);
            format!("{why} ({MAYBE_STORED_NOTE})")
        } else {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            why
        };
        let kept = match self.dead_letter.keep(&item, &subject, &why) {
            Ok(true) => {
                c.dead_lettered.fetch_add(1, Ordering::Relaxed);
                format!("kept in {}", self.dead_letter.path().display())
            }
            Ok(false) => "the dead-letter file is full, not kept".to_owned(),
            Err(e) => format!("not kept: dead-letter write failed: {e}"),
        };
        let fate = if earlier { "given up" } else { "dropped" };
        self.shared
            .set_error(format!("record {} {fate} ({kept}): {why}", item.msg_id));
        if let Some(id) = item.origin {
            self.shared.spool.lock().release(id);
        }
    }

    /// Records whose acknowledgement did not come within the timeout are sent again.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.ack_timeout;
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (_, sent, _))| now.duration_since(*sent) >= timeout)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some((item, _, _)) = self.in_flight.remove(&key) {
                self.not_acknowledged(item, format!("no acknowledgement within {timeout:?}"));
            }
        }
    }

    fn not_acknowledged(&mut self, item: Item, why: String) {
        self.shared.set_error(format!(
            "publish not acknowledged, will be sent again: {why}"
        ));
        // One failed round makes the pause longer, not every record of it (a disconnect fails
        // a whole window at once).
        let now = Instant::now();
        if now >= self.pause_until {
            self.pause_until = now + backoff(self.failures);
            self.failures = self.failures.saturating_add(1);
        }
        self.retry.push_back(item);
    }

    /// Moves everything waiting in the queue, and the records to send again, to the spool
    /// (during an outage, and at shutdown).
    fn drain_to_spool(&mut self) {
        while let Some(item) = self.retry.pop_front() {
            self.park(item);
        }
        while self.rx_open {
            match self.rx.try_recv() {
                Ok(item) => self.park(item),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => self.rx_open = false,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
            }
        }
    }

    /// Writes one record not acknowledged to the spool. A record read from the spool is written
    /// again whatever the cap (it was on disk already) and released from its old segment. A
    /// record published without acknowledgement is written whatever the cap too: it may be in
    /// the stream already, so dropping it would break `in stream + dropped = published` (at
    /// most [`Config::window`] records go over the cap so). Only a record never sent can be
    /// dropped.
    fn park(&mut self, item: Item) {
        match item.origin {
            Some(id) => {
                let written = self.shared.spool.lock().append(&item, true);
                if let Err(e) = written {
                    self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .set_error(format!("spool write failed, record dropped: {e}"));
                }
                self.shared.spool.lock().release(id);
            }
            None => {
                self.shared.spool_or_drop(&item, item.sent_before);
            }
        }
    }

    fn nothing_left(&self) -> bool {
        self.in_flight.is_empty()
            && self.retry.is_empty()
            && self.from_spool.is_empty()
            && !self.rx_open
            && self.shared.spool.lock().pending() == 0
    }

    async fn run(&mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let up = self.up().await;
            if up && Instant::now() >= self.pause_until {
                let mut published = false;
                // A publish the client did not take pauses the sending (RETRY_PAUSE), so that
                // the loop below comes back to the deadline and the queue.
                while self.in_flight.len() < self.window && Instant::now() >= self.pause_until {
                    let Some(item) = self.next_item() else { break };
                    self.publish(item).await;
                    published = true;
                }
                if published && !self.linger.is_zero() {
                    // On the wire before the thread lingers (a flush waits for the write, not
                    // for the server).
                    let _ = tokio::time::timeout(CLIENT_WAIT, self.client.flush()).await;
                }
            } else if !up {
                self.drain_to_spool();
            }
            let unacked = self.in_flight.len() + self.retry.len();
            self.shared
                .counters
                .in_flight
                .store(unacked as u64, Ordering::Relaxed);
            let deadline = *self.shared.deadline.lock();
            if let Some(deadline) = deadline {
                // Closed by shutdown: take what is still queued, then stop when all is sent.
                self.rx.close();
                if self.nothing_left() || std::time::Instant::now() >= deadline {
                    break;
                }
            }
            if !self.linger.is_zero()
                && !self.in_flight.is_empty()
                && self.in_flight.len() < self.window
            {
                // Acknowledgements due: let them (and new records) gather for a moment, so that
                // one wake-up handles many instead of one each. A blocking sleep on purpose: the
                // runtime is this thread's own, and a sleep inside it would wake at every
                // packet from the server. Not with a full window: then the sender waits for
                // acknowledgements anyway, and each wake-up finds many.
                let mut linger = self.linger;
                if let Some(deadline) = deadline {
                    linger =
                        linger.min(deadline.saturating_duration_since(std::time::Instant::now()));
                }
                std::thread::sleep(linger);
            }
            let room =
                up && self.in_flight.len() < self.window && Instant::now() >= self.pause_until;
            tokio::select! {
                Some(message) = self.acks.next() => {
                    self.on_ack(message);
                    // Every acknowledgement already received, in this wake-up.
                    while let Some(Some(message)) = self.acks.next().now_or_never() {
                        self.on_ack(message);
                    }
                }
                item = self.rx.recv(), if room && self.rx_open => match item {
                    Some(item) => self.publish(item).await,
                    None => self.rx_open = false,
                },
                _ = tick.tick() => self.expire(),
                _ = self.shared.wake.notified() => {}
            }
        }
        self.finish();
    }

    /// Writes every record not acknowledged to the spool: records read from the spool are
    /// written again (whatever the cap: they were on disk already) and their old segments
    /// removed, so that the spool holds exactly the records not acknowledged.
    fn finish(&mut self) {
        let mut items: Vec<Item> = self
            .in_flight
            .drain()
            .map(|(_, (item, _, _))| item)
            .collect();
        items.extend(self.retry.drain(..));
        items.extend(self.from_spool.drain(..));
        // Those read from the spool first, so that they keep their place.
        items.sort_by_key(|item| item.origin.is_none());
        for item in items {
            self.park(item);
        }
        self.rx_open = true;
        self.drain_to_spool();
        if let Err(e) = self.shared.spool.lock().sync() {
            self.shared.set_error(format!("spool sync failed: {e}"));
        }
        self.shared.counters.in_flight.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{backoff, read_reply, Refusal, Reply, MAX_RETRY_PAUSE, RETRY_PAUSE};
    use async_nats::StatusCode;

    fn class(status: Option<StatusCode>, payload: &str) -> Option<Refusal> {
        match read_reply(status, payload.as_bytes()) {
            Reply::Stored { .. } => None,
            Reply::Refused { class, .. } => Some(class),
        }
    }

    #[test]
    fn acknowledgements_are_read_like_the_json_parser_reads_them() {
        for (payload, want) in [
            (r#"{"stream":"CNBUS_EVENTS","seq":12}"#, false),
            // As nats-server 2.9 writes it.
            (
                r#"{"stream":"CNBUS_EVENTS","seq":12,"duplicate": true}"#,
                true,
            ),
            (
                r#"{"stream":"CNBUS_EVENTS","seq":12,"duplicate":true}"#,
                true,
            ),
            (
                r#"{"stream":"S","domain":"d","seq":1,"duplicate":false}"#,
                false,
            ),
            (r#"{"stream":"a\"duplicate\":true","seq":3}"#, false),
            (r#"{"seq":4,"stream":"S"}"#, false),
        ] {
            assert_eq!(
                read_reply(None, payload.as_bytes()),
                Reply::Stored { duplicate: want },
                "{payload}"
            );
        }
    }

    /// One reading of a reply decides what a refusal means: the table of JetStream's answers
    /// to a publish, by class.
    #[test]
    fn each_refusal_has_one_class() {
        use Refusal::*;
        for (status, payload, want) in [
            // No stream takes the subject (deleted, or its subjects changed).
            (Some(StatusCode::NO_RESPONDERS), "", NoStream),
            (
                None,
                r#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
                NoStream,
            ),
            // As nats-server 2.9 refuses a record over the stream's max_msg_size: with
            // "stream" and "seq":0, never an acknowledgement.
            (
                None,
                r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"},"stream":"CNBUS_EVENTS","seq":0}"#,
                Permanent,
            ),
            (
                None,
                r#"{"error":{"code":400,"err_code":10003,"description":"bad request"}}"#,
                Permanent,
            ),
            // A sealed stream: nothing is ever stored in it again.
            (
                None,
                r#"{"error":{"code":400,"err_code":10109,"description":"invalid operation on sealed stream"},"stream":"S","seq":0}"#,
                Permanent,
            ),
            (
                None,
                r#"{"stream":"S","error":{"code":400,"description":"x"}}"#,
                Permanent,
            ),
            // A full stream with the `new` discard policy: an operator may lift the limit,
            // and an age limit frees room.
            (
                None,
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                Transient,
            ),
            (
                None,
                r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
                Transient,
            ),
            (
                None,
                r#"{"error":{"code":500,"err_code":10009,"description":"JetStream cluster can not handle request"}}"#,
                Transient,
            ),
            (
                None,
                r#"{"error":{"code":503,"err_code":10023,"description":"insufficient resources"}}"#,
                Transient,
            ),
            // Unreadable: never an acknowledgement, never dropped for it.
            (
                None,
                r#"{"error":{"description":"no code"},"stream":"S","seq":0}"#,
                Transient,
            ),
            (None, r#"{"error":"text","stream":"S","seq":0}"#, Transient),
            (None, "", Transient),
            (None, "+OK", Transient),
            (Some(StatusCode::TIMEOUT), "", Transient),
        ] {
            assert_eq!(class(status, payload), Some(want), "{status:?} {payload}");
        }
    }

    #[test]
    fn the_retry_pause_doubles_up_to_its_bound() {
        assert_eq!(backoff(0), RETRY_PAUSE);
        assert_eq!(backoff(1), 2 * RETRY_PAUSE);
        assert_eq!(backoff(3), 8 * RETRY_PAUSE);
        assert_eq!(backoff(4), MAX_RETRY_PAUSE);
        assert_eq!(backoff(u32::MAX), MAX_RETRY_PAUSE);
    }
}
