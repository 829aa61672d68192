//! Registering the connector socket with tokio's reactor (feature `tokio`).

use std::io;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::ConnectorSocket;

/// Registers `socket` with the current tokio runtime for read readiness (only: a netlink
/// sender's writability says nothing about a receiver's full queue, so sends that find one
/// retry after a pause instead).
/// Fails (instead of panicking, as tokio would) when called outside a runtime.
pub fn register(socket: Arc<ConnectorSocket>) -> io::Result<AsyncFd<Arc<ConnectorSocket>>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("not inside a tokio runtime"));
    }
    // SAFETY: the Arc keeps the ConnectorSocket, and so its descriptor, open for as long as
    // the AsyncFd holds it; ConnectorSocket::as_raw_fd always returns the one descriptor it
    // owns, and nothing closes it before the socket is dropped.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
