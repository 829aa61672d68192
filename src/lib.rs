//! # cnbus: the Linux connector, in user space
//!
//! The kernel's *connector* multiplexes many small protocols over one netlink family
//! (`NETLINK_CONNECTOR`). Every message carries a callback id `{idx, val}`; receivers
//! register a callback per id, and by convention the multicast group of an id is its idx.
//! The best-known user is the proc connector (id `1.1`), which streams process events.
//!
//! cnbus is organised in layers, each a module, from the bottom up: a module uses only the
//! ones listed before it in this table (`bus` and `proc` do not use each other;
//! `tests/layers.rs` checks it):
//!
//! | module | what it holds |
//! |---|---|
//! | [`codec`] | the wire formats as plain data (the proc connector's in [`codec::proc`]): checked views, no I/O, no `unsafe`; its own errors ([`DecodeError`], [`codec::TooLarge`]) |
//! | [`error`] | the error enum callers match on (operation + errno kept) |
//! | [`sys`] | the connector socket and every system call; all of the crate's `unsafe` |
//! | [`connector`] | the idx/val callback registry, the dispatcher thread, group subscriptions, sending, requests and loss accounting |
//! | [`bus`] | CBUS: per-CPU batching queues and a flusher thread for hot-path senders |
//! | [`proc`] | the proc connector: typed process events, filtered listeners, loss accounting |
//! | `tokio` (feature `tokio`) | re-exports the async connector ([`connector`]) and proc event stream ([`proc`]), `futures` streams |
//!
//! With the `serde` feature, ids, messages, statistics and proc events are
//! `Serialize`/`Deserialize`. The repository's `docs/` explain the architecture, the
//! reliability guarantees and how to write a custom protocol.
//!
//! ## Quick start: process events
//!
//! ```no_run
//! use cnbus::proc::{EventBody, EventSet, ProcListener, Received};
//!
//! # fn main() -> cnbus::Result<()> {
//! // Filtered in the kernel on Linux 6.6+, in user space before; IGNORE is sent on drop.
//! let mut events = ProcListener::builder().events(EventSet::EXEC | EventSet::EXIT).open()?;
//! for r in events.iter().take(10) {
//!     match r? {
//!         Received::Event(ev) => println!("cpu {} {:?}", ev.cpu, ev.body),
//!         Received::Lost(loss) => eprintln!("lost: {loss:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## Quick start: a custom protocol between processes
//!
//! ```no_run
//! use std::time::Duration;
//! use cnbus::connector::Connector;
//! use cnbus::sys::Dest;
//! use cnbus::CbId;
//!
//! # fn main() -> cnbus::Result<()> {
//! let id = CbId::new(0x1000, 1); // idx above the kernel's 1..=10
//! let conn = Connector::builder().spawn()?;
//! let _member = conn.subscribe(20)?; // groups 12..=32 are for user space
//! let _reg = conn.register(id, |m| {
//!     println!("[{}] [{}.{}] {} bytes from port {}", m.id(), m.seq(), m.ack(), m.data().len(), m.source().port)
//! });
//! conn.send_numbered(id, &b"hello"[..], Dest::Group(20))?; // numbered: gaps are counted
//! std::thread::sleep(Duration::from_millis(50));
//! assert_eq!(conn.stats().lost, 0);
//! # Ok(()) }
//! ```
//!
//! ## Quick start: a hot-path sender
//!
//! ```no_run
//! use cnbus::bus::Bus;
//! use cnbus::sys::Dest;
//! use cnbus::CbId;
//!
//! # fn main() -> cnbus::Result<()> {
//! let bus = Bus::new(Dest::Group(20))?; // per-CPU shards, a flusher thread
//! for i in 0..1000u32 {
//!     // Usually no system call: a copy into this thread's shard under its short lock
//!     // (one compare-exchange). The insert that brings the shard to the watermark sends
//!     // the batch itself (`sendmmsg`), unless another thread is already sending it.
//!     bus.insert(CbId::new(0x1000, 2), &i.to_ne_bytes()).expect("queued");
//! }
//! bus.flush()?; // everything inserted so far is handed to the kernel
//! # Ok(()) }
//! ```
//!
//! ## The raw layers
//!
//! ```no_run
//! use bytes::BytesMut;
//! use cnbus::codec::{messages, CbId, CnMsg, DatagramBuilder, Message};
//! use cnbus::sys::{ConnectorSocket, Dest};
//!
//! # fn main() -> cnbus::Result<()> {
//! let rx = ConnectorSocket::open()?;
//! rx.join(20)?;
//! let tx = ConnectorSocket::open()?;
//! let mut dgram = DatagramBuilder::new(4096);
//! dgram.push(&CnMsg::new(CbId::new(0x1000, 1), &b"hello"[..]))?;
//! tx.send(dgram.as_bytes(), Dest::Group(20))?;
//!
//! let mut buf = BytesMut::with_capacity(65536);
//! let meta = rx.recv(&mut buf, false)?.expect("blocking recv returns a datagram");
//! for m in messages(buf.split().freeze()) {
//!     if let Message::Connector(c) = m? {
//!         println!("[{}] [{}.{}] from port {}", c.msg.id, c.msg.seq, c.msg.ack, meta.port);
//!     }
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod bus;
pub mod codec;
#[cfg(not(cnbus_loom))]
pub mod connector;
/// What the registry's callbacks get, beside it under `cfg(cnbus_loom)`.
#[cfg(cnbus_loom)]
#[path = "connector/delivery.rs"]
#[allow(dead_code)]
pub mod delivery;
pub mod error;
#[cfg(not(cnbus_loom))]
pub mod proc;
/// Under `cfg(cnbus_loom)` only the registry of [`connector`] is built, for its model checks.
#[cfg(cnbus_loom)]
#[path = "connector/registry.rs"]
pub mod registry;
#[cfg_attr(cnbus_loom, allow(dead_code))] // under loom only the bus uses it
mod seq;
pub mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;

mod sync;

/// The guide to writing a custom idx/val protocol (`docs/GUIDE.md`); its Rust examples are
/// compiled as doctests.
#[doc = include_str!("../docs/GUIDE.md")]
pub mod guide {}

pub use codec::{CbId, CnMsg};
pub use error::{DecodeError, DecodeErrorKind, Error, Op, Result};
