//! Configuring and opening a [`ProcListener`]: filter mode, namespace policy, the
//! `LISTEN` handshake.

use super::*;

/// Where the listener's event set is applied.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FilterMode {
    /// In the kernel when it can (Linux 6.6+ `proc_input`, detected at run time), else in
    /// user space.
    #[default]
    Auto,
    /// In the kernel; opening fails on kernels without `proc_input`.
    Kernel,
    /// In user space: the kernel sends everything and the listener drops what was not asked
    /// for. Costs more CPU, but keeps exact gap accounting.
    UserSpace,
}

/// How the listener ended up filtering.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// Subscribed to every event: nothing to filter.
    None,
    /// The kernel filters; sequence-gap accounting is disabled.
    Kernel,
    /// The kernel sends everything and the listener filters.
    UserSpace,
}

/// Configures and opens a [`ProcListener`].
#[derive(Debug, Clone)]
pub struct ProcListenerBuilder {
    events: EventSet,
    recv_buffer: usize,
    mode: FilterMode,
    ack_timeout: Duration,
    acks: bool,
    allow_foreign_ns: bool,
}

impl Default for ProcListenerBuilder {
    fn default() -> Self {
        Self {
            events: EventSet::ALL,
            recv_buffer: DEFAULT_RECV_BUFFER,
            mode: FilterMode::Auto,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            acks: false,
            allow_foreign_ns: false,
        }
    }
}

impl ProcListenerBuilder {
    /// A builder for every event, a [`DEFAULT_RECV_BUFFER`] buffer and automatic filtering.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events to receive (default [`EventSet::ALL`]).
    pub fn events(mut self, events: EventSet) -> Self {
        self.events = events;
        self
    }

    /// The receive buffer to ask for, in bytes (default [`DEFAULT_RECV_BUFFER`]). Set with
    /// `SO_RCVBUFFORCE` when permitted (root), which ignores `net.core.rmem_max`; else with
    /// `SO_RCVBUF`, capped by it.
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.recv_buffer = bytes;
        self
    }

    /// Where to filter (default [`FilterMode::Auto`]).
    pub fn filter_mode(mut self, mode: FilterMode) -> Self {
        self.mode = mode;
        self
    }

    /// How long to wait for the kernel's ACK to `LISTEN` (default [`DEFAULT_ACK_TIMEOUT`]).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Also deliver the kernel's ACKs (to this and other sockets' requests) as events of kind
    /// [`Ack`](crate::proc::EventKind::Ack). The kernel sends ACKs only to sockets subscribed to
    /// every event, and the listener follows that rule in user space too. Default off.
    pub fn include_acks(mut self, on: bool) -> Self {
        self.acks = on;
        self
    }

    /// Outside the initial pid or user namespace the kernel ignores `LISTEN`, and opening
    /// fails with [`Error::ProcConnector`] saying so. With this on, the listener opens anyway
    /// (it then hears events only while another process listens, and they carry host ids)
    /// and [`ProcListener::namespace_warning`] says why.
    pub fn allow_foreign_namespace(mut self, on: bool) -> Self {
        self.allow_foreign_ns = on;
        self
    }

    /// Opens the socket, joins the proc group, and subscribes.
    ///
    /// Filtering is chosen at run time. For a strict subset of events with
    /// [`FilterMode::Auto`] or [`FilterMode::Kernel`] on a kernel whose release is 6.6 or
    /// later, the listener first sends the 8-byte `proc_input` `LISTEN` for *all* events: a
    /// kernel that understands `proc_input` acknowledges it (and an older one ignores it
    /// silently), so the ACK proves support. It then sends the real filter, without waiting:
    /// the kernel never sends an ACK to a filtered socket. Without that proof (an older
    /// kernel, or no ACK), `Auto` falls back to the classic 4-byte `LISTEN` and filters in
    /// user space with the kernel's own rules ([`EventSet::matches`]). The probe runs with a
    /// receive queue of at least 1 MiB, so that its ACK is not lost behind a fork storm's
    /// events in a small one; the socket gets [`recv_buffer`](Self::recv_buffer) once the
    /// probe is answered or given up.
    ///
    /// The listener's life starts before `open` returns, at its last join to group 1: it
    /// gets every event the kernel sends after that moment. Kernel-filtered, that is the
    /// join after the probe (the socket leaves group 1, is read empty and joins again, so
    /// that what the probe received or dropped, any kind of event, is neither delivered nor
    /// counted as lost); with every event or user-space filtering, the first join, and the
    /// events that came while the ACK was awaited are delivered.
    pub fn open(self) -> Result<ProcListener> {
        self.open_with(|_| {})
    }

    /// [`open`](Self::open), calling `probed` once the kernel acknowledged the probe for
    /// kernel-side filtering, before the filter is sent (tests overflow the socket there).
    pub(super) fn open_with(self, probed: impl FnOnce(&ConnectorSocket)) -> Result<ProcListener> {
        let events = EventSet::from_bits_truncate(self.events.bits());
        if events.is_empty() {
            return Err(Error::InvalidArgument("the event set is empty"));
        }
        let ns = namespace_report();
        if ns.initial_net == Some(false) {
            return Err(Error::NoKernelConnector { op: Op::Send });
        }
        let foreign = if ns.initial_pid == Some(false) {
            Some(REASON_PID_NS)
        } else if ns.initial_user == Some(false) {
            Some(REASON_USER_NS)
        } else {
            None
        };
        if let (Some(reason), false) = (foreign, self.allow_foreign_ns) {
            return Err(Error::ProcConnector { reason });
        }
        let sock = ConnectorSocket::open()?;
        // Only the kernel and group 1 may fill its queue: a stranger's unicasts would
        // otherwise count in its drop counter as lost events.
        sock.connect_kernel()?;
        let want_filter = !events.is_all();
        let try_kernel = want_filter
            && foreign.is_none()
            && match self.mode {
                FilterMode::UserSpace => false,
                FilterMode::Kernel => true,
                FilterMode::Auto => kernel_at_least(6, 6),
            };
        // The probe's queue from the first join: a small one may be congested (dropping
        // everything until read empty) before the probe is even sent.
        let probe_buffer = try_kernel && self.recv_buffer < PROBE_RECV_BUFFER;
        let first_buffer = if probe_buffer {
            PROBE_RECV_BUFFER
        } else {
            self.recv_buffer
        };
        sock.set_recv_buffer(first_buffer, true)?;
        let (witness, baseline) = if foreign.is_none() {
            join_counted(&sock)?
        } else {
            let baseline = DropCounter::baseline(&sock)?;
            sock.join(PROC_GROUP)?;
            (None, baseline)
        };
        let drops = Mutex::new(baseline);
        let mut l = ProcListener {
            sock,
            batch: RecvBatch::new(RECV_BATCH, RECV_CHUNK),
            small: None,
            core: Core {
                dec: ProcDecoder::new(events, true).with_acks(self.acks),
                pending: Pending::default(),
                awaiting_ack: None,
                ack_result: None,
            },
            filtering: if want_filter {
                Filtering::UserSpace
            } else {
                Filtering::None
            },
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                wake: EventFd::new()?,
            }),
            req_seq: 0,
            ignored: false,
            warning: foreign,
            drained: false,
            drops,
            witness,
            foreign: 0,
        };
        if foreign.is_some() {
            // The kernel drops the request; sending it costs nothing and keeps Drop simple.
            l.send_request(McastOp::Listen, None)?;
            return Ok(l);
        }
        if try_kernel {
            let acked = l.request_and_wait(Some(EventSet::ALL), self.ack_timeout);
            if probe_buffer {
                l.sock.set_recv_buffer(self.recv_buffer, true)?;
            }
            if acked? {
                probed(&l.sock);
                l.send_request(McastOp::Listen, Some(events))?;
                // Until now the socket got every event: what it queued or dropped (its
                // drop counter counts events outside `events` too) is the probe's, not the
                // subscription's. Out of the group and emptied, it starts anew, filtered
                // from its first datagram, with its baseline and witness taken then.
                l.sock.leave(PROC_GROUP)?;
                discard_queue(&l.sock)?;
                let (witness, baseline) = join_counted(&l.sock)?;
                l.witness = witness;
                *l.drops.lock() = baseline;
                l.core = Core {
                    dec: ProcDecoder::new(events, false).with_acks(self.acks),
                    pending: Pending::default(),
                    awaiting_ack: None,
                    ack_result: None,
                };
                l.foreign = 0;
                l.drained = false;
                l.filtering = Filtering::Kernel;
                return Ok(l);
            }
            if self.mode == FilterMode::Kernel {
                return Err(Error::ProcConnector {
                    reason: REASON_NO_PROC_INPUT,
                });
            }
        }
        if !l.request_and_wait(None, self.ack_timeout)? {
            let has_cn_proc = std::fs::read_to_string("/proc/net/connector")
                .map(|s| s.lines().any(|l| l.starts_with("cn_proc")))
                .unwrap_or(true);
            return Err(Error::ProcConnector {
                reason: if has_cn_proc {
                    REASON_NO_ACK
                } else {
                    REASON_NO_CN_PROC
                },
            });
        }
        Ok(l)
    }
}

/// Joins `sock` to group 1 with a witness of the user-space multicasts there (see
/// `join_witnessed`), and the socket's drop counter as it joined (taken again whenever the
/// join is repeated: out of the group and emptied, the socket is as new).
fn join_counted(sock: &ConnectorSocket) -> Result<(Option<Witness>, DropCounter)> {
    let mut baseline = DropCounter::baseline(sock)?;
    let (witness, ()) = join_witnessed(
        || sock.join(PROC_GROUP),
        |()| {
            sock.leave(PROC_GROUP)?;
            discard_queue(sock)?;
            baseline = DropCounter::baseline(sock)?;
            Ok(())
        },
    )?;
    Ok((witness, baseline))
}
