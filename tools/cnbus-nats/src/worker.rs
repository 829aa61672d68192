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

use crate::subject::{sanitize_token, subject_covers};
use crate::{Auth, Config, Item, Shared, SinkError, SUBJECT_PREFIX};

/// How often the loop looks at the connection and the spool when nothing else wakes it.
const TICK: Duration = Duration::from_millis(50);
/// Pause after a failed publish before the next one.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
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

/// Whether `payload` is a JetStream acknowledgement (`Some(duplicate)`) or not (an error).
/// The usual `{"stream":"NAME","seq":N}` is recognised without a full JSON parse; anything
/// else (a duplicate's `"duplicate": true`, an error) goes through [`PublishAck`]'s parser.
/// In the JSON text a `"` inside a string is escaped, so no key can be matched inside a value.
fn parse_ack(payload: &[u8]) -> Option<bool> {
    let has = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
    if payload.starts_with(br#"{"stream":""#)
        && payload.ends_with(b"}")
        && has(br#""seq":"#)
        && !has(br#""error""#)
        && !has(br#""duplicate""#)
    {
        return Some(false);
    }
    // A refusal carries `"stream"` and `"seq": 0` beside its `"error"` (nats-server 2.9), so
    // a parser that ignores unknown keys would take it for an acknowledgement.
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if value.get("error").is_some() {
        return None;
    }
    serde_json::from_value::<PublishAck>(value)
        .ok()
        .map(|ack| ack.duplicate)
}

/// Whether a refusal from JetStream will be the same at every attempt, so that sending the
/// record again would only hold up the ones behind it: the record is larger than the
/// stream's `max_msg_size` (error code 10054). Other refusals (a full stream, a stream being
/// recovered, limits an operator may lift) are retried.
fn refused_for_good(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("error")?.get("err_code")?.as_u64())
        == Some(async_nats::jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM.0)
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
    /// Published, waiting for the acknowledgement: key → (record, when sent).
    in_flight: HashMap<u64, (Item, Instant)>,
    next_key: u64,
    pause_until: Instant,
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
        let subject = match self.subjects.get(item.event.as_str()) {
            Some(subject) => subject.clone(),
            None => {
                let subject =
                    Subject::from(format!("{}{}", self.prefix, sanitize_token(&item.event)));
                self.subjects.insert(item.event.clone(), subject.clone());
                subject
            }
        };
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
                if item.sent_before {
                    self.shared.counters.resent.fetch_add(1, Ordering::Relaxed);
                }
                item.sent_before = true;
                self.in_flight.insert(key, (item, Instant::now()));
            }
            Err(e) => match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded
                | async_nats::client::PublishErrorKind::InvalidSubject => {
                    // Never sent, never sendable: dropped and counted.
                    self.drop_record(item, e.to_string());
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
        let Some((item, _)) = self.in_flight.remove(&key) else {
            return;
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            // Deleted, or not yet recovered: check (or create) it before sending again.
            self.stream_ok = false;
            self.not_acknowledged(item, "no stream for the subject".into());
            return;
        }
        match parse_ack(&message.payload) {
            Some(duplicate) => {
                let c = &self.shared.counters;
                c.acknowledged.fetch_add(1, Ordering::Relaxed);
                if duplicate {
                    c.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(id) = item.origin {
                    self.shared.spool.lock().release(id);
                }
            }
            None => {
                let text =
                    String::from_utf8_lossy(&message.payload[..message.payload.len().min(300)])
                        .into_owned();
                if refused_for_good(&message.payload) {
                    self.drop_record(item, format!("JetStream refuses it for good: {text}"));
                } else {
                    self.not_acknowledged(item, format!("JetStream refused the publish: {text}"));
                }
            }
        }
    }

    /// A record that can never be stored: dropped, counted, said why, released from the spool.
    fn drop_record(&mut self, item: Item, why: String) {
        self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
        self.shared
            .set_error(format!("record {} dropped: {why}", item.msg_id));
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
            .filter(|(_, (_, sent))| now.duration_since(*sent) >= timeout)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some((item, _)) = self.in_flight.remove(&key) {
                self.not_acknowledged(item, format!("no acknowledgement within {timeout:?}"));
            }
        }
    }

    fn not_acknowledged(&mut self, item: Item, why: String) {
        self.shared.set_error(format!(
            "publish not acknowledged, will be sent again: {why}"
        ));
        self.pause_until = Instant::now() + RETRY_PAUSE;
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
        let mut items: Vec<Item> = self.in_flight.drain().map(|(_, (item, _))| item).collect();
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
    use super::parse_ack;

    #[test]
    fn acknowledgements_are_read_like_the_json_parser_reads_them() {
        for (payload, want) in [
            (r#"{"stream":"CNBUS_EVENTS","seq":12}"#, Some(false)),
            // As nats-server 2.9 writes it.
            (
                r#"{"stream":"CNBUS_EVENTS","seq":12,"duplicate": true}"#,
                Some(true),
            ),
            (
                r#"{"stream":"CNBUS_EVENTS","seq":12,"duplicate":true}"#,
                Some(true),
            ),
            (
                r#"{"stream":"S","domain":"d","seq":1,"duplicate":false}"#,
                Some(false),
            ),
            (r#"{"stream":"a\"duplicate\":true","seq":3}"#, Some(false)),
            (r#"{"seq":4,"stream":"S"}"#, Some(false)),
            (
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                None,
            ),
            (
                r#"{"stream":"S","error":{"code":400,"description":"x"}}"#,
                None,
            ),
            // As nats-server 2.9 refuses a record over the stream's max_msg_size.
            (
                r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"},"stream":"CNBUS_EVENTS","seq":0}"#,
                None,
            ),
            ("", None),
            ("+OK", None),
        ] {
            assert_eq!(parse_ack(payload.as_bytes()), want, "{payload}");
        }
    }

    #[test]
    fn only_a_record_over_the_streams_size_limit_is_refused_for_good() {
        use super::refused_for_good;
        let over = r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#;
        assert!(refused_for_good(over.as_bytes()));
        for payload in [
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            r#"{"error":{"code":400,"err_code":"10054"}}"#,
            r#"{"stream":"S","seq":1}"#,
            r#"{"err_code":10054}"#,
            "",
            "{",
        ] {
            assert!(!refused_for_good(payload.as_bytes()), "{payload}");
        }
    }
}
