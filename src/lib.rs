//! # cnbus: the Linux connector, in user space
//!
//! The kernel's *connector* multiplexes many small protocols over one netlink family
//! (`NETLINK_CONNECTOR`). Every message carries a callback id `{idx, val}`; receivers
//! register a callback per id, and by convention the multicast group of an id is its idx.
//! The best-known user is the proc connector (id `1.1`), which streams process events.
//!
//! cnbus is organised in layers, each a module:
//!
//! | module | what it holds |
//! |---|---|
//! | [`codec`] | the wire formats as plain data: no I/O, no `unsafe` |
//! | [`connector`] | the idx/val callback registry, the dispatcher thread, group subscriptions, sending, requests and loss accounting |
//! | [`sys`] | the connector socket and every system call; all of the crate's `unsafe` |
//! | [`error`] | the error enum callers match on |
//! | [`bus`] | CBUS: per-CPU batching queues and a flusher thread for hot-path senders |
//! | [`proc`] | the proc connector: typed process events, filtered listeners, loss accounting |
//!
//! ## Quick start: one message over the raw socket
//!
//! ```no_run
//! use bytes::{Bytes, BytesMut};
//! use cnbus::codec::{messages, CbId, CnMsg, DatagramBuilder, Message};
//! use cnbus::sys::{ConnectorSocket, Dest};
//!
//! # fn main() -> cnbus::Result<()> {
//! let rx = ConnectorSocket::open()?;
//! rx.join(20)?;
//! let tx = ConnectorSocket::open()?;
//! let mut dgram = DatagramBuilder::new(4096);
//! dgram.push(&CnMsg::new(CbId::new(20, 1), &b"hello"[..]))?;
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
pub mod error;
pub mod proc;
/// Under `cfg(cnbus_loom)` only the registry of [`connector`] is built, for its model checks.
#[cfg(cnbus_loom)]
#[path = "connector/registry.rs"]
pub mod registry;
pub mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;

mod sync;

pub use codec::{CbId, CnMsg};
pub use error::{DecodeError, DecodeErrorKind, Error, Op, Result};
