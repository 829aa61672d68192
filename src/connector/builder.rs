//! [`ConnectorBuilder`]: the settings of a [`Connector`] and how it starts (a dispatcher
//! thread, or the async connector).

use super::*;

/// Settings of a [`Connector`].
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) recv_buffer: usize,
    pub(super) max_datagram: usize,
    pub(super) track_seq: bool,
    pub(super) allow_kernel_ids: bool,
    pub(super) tracked_streams: usize,
    pub(super) numbered_ids: Option<usize>,
    pub(super) send_timeout: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            recv_buffer: 4 << 20,
            max_datagram: CnMsg::MAX_ENCODED,
            track_seq: true,
            allow_kernel_ids: false,
            tracked_streams: DEFAULT_TRACKED_STREAMS,
            numbered_ids: None,
            send_timeout: ConnectorBuilder::DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// Builds a [`Connector`].
pub struct ConnectorBuilder {
    config: Config,
    socket: Option<ConnectorSocket>,
    handed_in: bool,
    on_event: Option<Box<EventFn>>,
}

impl std::fmt::Debug for ConnectorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConnectorBuilder {
    /// The largest [`max_datagram`](Self::max_datagram) accepted: 64 MiB. (Larger would
    /// have the receive path allocate buffers of that size; a longer datagram is dropped and
    /// counted as truncated anyway.)
    pub const MAX_DATAGRAM: usize = 64 << 20;

    /// Default of [`send_timeout`](Self::send_timeout).
    pub const DEFAULT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

    /// The defaults ([`Connector::builder`]).
    pub(super) fn new() -> Self {
        Self {
            config: Config::default(),
            socket: None,
            handed_in: false,
            on_event: None,
        }
    }

    /// Receive buffer to ask for (default 4 MiB; `SO_RCVBUFFORCE` when permitted, so
    /// `net.core.rmem_max` does not cap it for root).
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.config.recv_buffer = bytes;
        self
    }

    /// Largest datagram received whole (default [`CnMsg::MAX_ENCODED`], 65 572 bytes: any
    /// one message, the largest a `send` or a bus sends alone; at least 64 bytes, at most
    /// [`MAX_DATAGRAM`](Self::MAX_DATAGRAM): more makes `spawn` and `build_async` fail with
    /// [`Error::InvalidArgument`]) and largest datagram
    /// [`send_batch`](ConnectorHandle::send_batch) packs. A longer datagram is dropped and
    /// counted as truncated.
    pub fn max_datagram(mut self, bytes: usize) -> Self {
        self.config.max_datagram = bytes.max(64);
        self
    }

    /// Whether to count sequence gaps per `(port, group, idx, val)` (group 0: unicast) of
    /// user-space senders as lost
    /// messages (default on). Turn it off when peers do not number their messages.
    pub fn track_seq_gaps(mut self, on: bool) -> Self {
        self.config.track_seq = on;
        self
    }

    /// How many `(port, group, idx, val)` streams the gap tracker remembers (default
    /// [`DEFAULT_TRACKED_STREAMS`], at least 1). Past it, the least recently seen streams
    /// are forgotten and counted in [`Stats::tracker_evictions`]; a forgotten stream's
    /// next message is a new baseline, so a loss just before it is not counted (see
    /// [`SeqTracker`]).
    pub fn tracked_streams(mut self, n: usize) -> Self {
        self.config.tracked_streams = n;
        self
    }

    /// How many `(destination, id)` sequences the socket's numbering remembers (default
    /// [`DEFAULT_NUMBERED_IDS`], at least 1). The numbering belongs to the socket and is
    /// shared by everything sending on it (a [`Bus`](crate::bus::Bus) given this
    /// connector's socket too), so this sets it for all of them. Past it, the least
    /// recently used sequences are forgotten and counted in
    /// [`Stats::numbering_evictions`]; a forgotten one starts again at 1, which receivers
    /// count as `reordered`, not as loss (see [`SeqSource`]).
    pub fn numbered_ids(mut self, n: usize) -> Self {
        self.config.numbered_ids = Some(n);
        self
    }

    /// Allows multicasting on ids the kernel owns (idx 1..=10) and on groups below 12.
    /// Such a multicast is also delivered to the kernel's handler for that idx, so this is
    /// off by default.
    pub fn allow_kernel_ids(mut self, on: bool) -> Self {
        self.config.allow_kernel_ids = on;
        self
    }

    /// How long a send waits for room at a unicast peer whose queue is full (default
    /// [`DEFAULT_SEND_TIMEOUT`](Self::DEFAULT_SEND_TIMEOUT), 1 s, as the bus's
    /// `send_timeout`), for the sends of the `AsyncConnector` (built with `build_async`,
    /// feature `tokio`; the wait never blocks the runtime) and for the [`Connector`]'s sends
    /// made on its dispatcher thread (from callbacks: a peer that never reads must not
    /// stall every delivery). Past it the send fails with [`Error::TimedOut`] (a batch
    /// returns what it sent) and counts a send error. The `Connector`'s sends from other
    /// threads wait as netlink does (blocking) and do not use it.
    pub fn send_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.config.send_timeout = timeout;
        self
    }

    /// Uses `socket` instead of opening one. Its sequence numbering comes with it (see
    /// [`numbered_ids`](Self::numbered_ids)).
    pub fn socket(mut self, socket: ConnectorSocket) -> Self {
        self.socket = Some(socket);
        self
    }

    /// Sets the function told about every [`Event`]. It runs on the dispatcher thread; a
    /// panic in it is caught and counted in [`Stats::callback_panics`].
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Box::new(f));
        self
    }

    /// Checks the settings, opens the socket unless one was given, and sizes its receive
    /// buffer.
    fn open_socket(&mut self) -> Result<Arc<ConnectorSocket>> {
        if self.config.max_datagram > Self::MAX_DATAGRAM {
            return Err(Error::InvalidArgument(
                "max_datagram must be at most ConnectorBuilder::MAX_DATAGRAM (64 MiB)",
            ));
        }
        self.handed_in = self.socket.is_some();
        let socket = match self.socket.take() {
            Some(s) => s,
            None => ConnectorSocket::open()?,
        };
        if self.config.recv_buffer > 0 {
            socket.set_recv_buffer(self.config.recv_buffer, true)?;
        }
        if let Some(n) = self.config.numbered_ids {
            socket.numbering().lock().set_capacity(n);
        }
        Ok(Arc::new(socket))
    }

    /// Builds an [`AsyncConnector`] with these settings
    /// instead of a thread: its messages and events are a `futures` `Stream`. Must be
    /// called inside a tokio runtime. `on_event` is not used: events come on the stream.
    #[cfg(feature = "tokio")]
    pub fn build_async(mut self) -> Result<AsyncConnector> {
        let socket = self.open_socket()?;
        let counters = Arc::new(Counters::default());
        counters.drops_baseline(&socket);
        let c = &self.config;
        AsyncConnector::new(
            Outbox::new(
                socket.clone(),
                counters.clone(),
                c.allow_kernel_ids,
                c.max_datagram,
            ),
            Arc::new(Groups::new(socket)),
            ingest::Ingest::new(c.track_seq, c.tracked_streams),
            c.max_datagram,
            c.send_timeout,
        )
    }

    /// Opens the socket (unless one was given), sizes its buffer and starts the
    /// dispatcher thread.
    pub fn spawn(mut self) -> Result<Connector> {
        let socket = self.open_socket()?;
        let counters = Arc::new(Counters::default());
        counters.drops_baseline(&socket);
        let registry = Registry::new();
        let on_event: Option<Arc<EventFn>> = self.on_event.map(Arc::from);
        let overrun_watchers = Registry::new();
        for r in [&registry, &overrun_watchers] {
            super::report_panics(r, &counters, &on_event);
        }
        let inner = Arc::new(Inner {
            outbox: Outbox::new(
                socket.clone(),
                counters.clone(),
                self.config.allow_kernel_ids,
                self.config.max_datagram,
            ),
            groups: Arc::new(Groups::new(socket.clone())),
            socket,
            registry,
            counters,
            wake: EventFd::new()?,
            shutdown: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            pending_count: AtomicUsize::new(0),
            late: Mutex::new(Default::default()),
            late_count: AtomicUsize::new(0),
            late_generation: AtomicU64::new(0),
            on_event,
            config: self.config,
            proc_listeners: Mutex::new(0),
            overrun_watchers,
            other_traffic: AtomicBool::new(self.handed_in),
            dispatcher: std::sync::OnceLock::new(),
            born: crate::sys::ForkStamp::now(),
        });
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("cnbus-dispatch".into())
                .spawn(move || dispatch::run(&inner))
                .map_err(|e| Error::from_io(Op::Spawn, e))?
        };
        Ok(Connector {
            handle: ConnectorHandle { inner },
            thread: Some(thread),
        })
    }
}
