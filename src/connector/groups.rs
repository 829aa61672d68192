//! Reference-counted multicast group membership.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::sys::ConnectorSocket;

/// Membership counts for groups 1..=32 of one socket.
///
/// The count and the socket's membership change together under one mutex, so a join racing
/// a leave of the same group can never leave the socket out of a group someone holds.
#[derive(Debug)]
pub(crate) struct Groups {
    socket: Arc<ConnectorSocket>,
    counts: Mutex<[u32; 33]>,
}

impl Groups {
    pub(crate) fn new(socket: Arc<ConnectorSocket>) -> Self {
        Self {
            socket,
            counts: Mutex::new([0; 33]),
        }
    }

    pub(crate) fn subscribe(self: &Arc<Self>, group: u32) -> Result<Subscription> {
        if !(1..=32).contains(&group) {
            return Err(Error::InvalidArgument("multicast group must be in 1..=32"));
        }
        let mut counts = self.counts.lock();
        let c = &mut counts[group as usize];
        if *c == 0 {
            self.socket.join(group)?;
        }
        *c += 1;
        Ok(Subscription {
            groups: Arc::downgrade(self),
            group,
        })
    }

    fn release(&self, group: u32) {
        let mut counts = self.counts.lock();
        let c = &mut counts[group as usize];
        *c -= 1;
        if *c == 0 {
            // Leaving can only fail for a bad group or descriptor, both ruled out here.
            let _ = self.socket.leave(group);
        }
    }

    pub(crate) fn count(&self, group: u32) -> u32 {
        self.counts.lock().get(group as usize).copied().unwrap_or(0)
    }
}

impl Drop for Groups {
    /// The connector is gone (its last handle): nobody reads the socket any more, so it
    /// leaves the groups it joined, even though a [`Subscription`] outlives it or the
    /// socket lives on elsewhere (shared with a bus, or a clone kept): else the socket
    /// stayed in them for good, no subscription left to end it.
    fn drop(&mut self) {
        for (group, n) in self.counts.get_mut().iter().enumerate().skip(1) {
            if *n > 0 {
                let _ = self.socket.leave(group as u32);
            }
        }
    }
}

/// Membership of one multicast group, shared by reference count: the socket joined the
/// group when the first subscription was made and leaves it when the last one drops, or
/// when the connector that made it goes (its last handle dropped), whichever comes first.
#[must_use = "dropping a Subscription leaves the group at once"]
#[derive(Debug)]
pub struct Subscription {
    groups: Weak<Groups>,
    group: u32,
}

impl Subscription {
    /// The group.
    pub fn group(&self) -> u32 {
        self.group
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(g) = self.groups.upgrade() {
            g.release(self.group);
        }
    }
}
