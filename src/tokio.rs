//! The async API on tokio (cargo feature `tokio`), gathered in one place.
//!
//! [`AsyncConnector`] (from [`connector`](crate::connector)) reads its socket through
//! [`tokio::io::unix::AsyncFd`]: no thread of its own, no thread per stream. It is a
//! [`futures_core::Stream`] of `Result<Incoming, Event>`: `Ok` for each message, `Err`
//! for each loss or fault the synchronous dispatcher would report as an
//! [`Event`](crate::connector::Event) (overrun, sequence gap, malformed message,
//! truncation). Events do not end the stream; a failing socket does, after one
//! [`Event::RecvFailed`](crate::connector::Event::RecvFailed). [`ProcStream`] (from
//! [`proc`](crate::proc)) gives typed process events the same way.
//!
//! ```no_run
//! # async fn demo() -> cnbus::Result<()> {
//! use futures_util::StreamExt;
//! use cnbus::connector::Connector;
//!
//! let mut conn = Connector::builder().build_async()?;
//! let _group = conn.subscribe(20)?;
//! while let Some(item) = conn.next().await {
//!     match item {
//!         Ok(m) => println!("[{}] [{}.{}] {} bytes", m.msg.id, m.msg.seq, m.msg.ack, m.msg.data.len()),
//!         Err(event) => eprintln!("{event}"),
//!     }
//! }
//! # Ok(()) }
//! ```

pub use crate::connector::AsyncConnector;
pub use crate::proc::ProcStream;
