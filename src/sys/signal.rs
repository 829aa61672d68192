//! Waiting for `SIGINT` / `SIGTERM` synchronously, so a tool can shut down cleanly.

use std::io;
use std::mem;

use crate::error::{Error, Op, Result};

/// `SIGINT`, `SIGTERM` and `SIGHUP`, blocked so they can be waited for with
/// [`TermSignals::wait`] instead of killing the process.
///
/// Create it in `main` **before spawning any thread**: threads inherit the signal mask, and a
/// thread that does not block the signals would receive them with their default action
/// (termination). Then call [`wait`](Self::wait) from one thread.
#[derive(Debug)]
pub struct TermSignals {
    set: libc::sigset_t,
}

// SAFETY: sigset_t is plain data; TermSignals never mutates it after construction.
unsafe impl Send for TermSignals {}
// SAFETY: as above; `wait` only reads it.
unsafe impl Sync for TermSignals {}

impl TermSignals {
    /// Blocks `SIGINT`, `SIGTERM` and `SIGHUP` in the calling thread (and so in every thread
    /// it spawns afterwards).
    pub fn block() -> Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
        }
        // SAFETY: `set` is initialised; the old mask is not wanted (null is allowed).
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(Error::from_io(
                Op::SetOption("pthread_sigmask"),
                io::Error::from_raw_os_error(r),
            ));
        }
        Ok(Self { set })
    }

    /// Blocks until one of the signals arrives; returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `self.set` is an initialised sigset_t and `sig` is valid for writes.
            let r = unsafe { libc::sigwait(&self.set, &mut sig) };
            if r == 0 {
                return sig;
            }
        }
    }
}
