//! Namespace checks. The kernel connector exists only in the initial network namespace, and
//! proc events carry pids of the initial pid namespace.

use std::fs;

/// Inode number of the initial pid namespace (`PROC_PID_INIT_INO`, fixed since Linux 3.8).
pub(crate) const PID_INIT_INO: u64 = 0xEFFF_FFFC;
/// Inode number of the initial user namespace (`PROC_USER_INIT_INO`, fixed since Linux 3.8).
const USER_INIT_INO: u64 = 0xEFFF_FFFD;
/// Inode number of the initial network namespace (`PROC_NET_INIT_INO`, fixed since Linux
/// 6.18; older kernels number it dynamically, see [`namespace_report`]).
const NET_INIT_INO: u64 = 0xEFFF_FFF9;

/// Where this thread stands relative to the initial namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceReport {
    /// `Some(false)` when this thread is outside the initial network namespace (the kernel
    /// connector is then unreachable); `None` when it cannot be told.
    pub initial_net: Option<bool>,
    /// `Some(false)` when this process is outside the initial pid namespace (proc events
    /// then carry host pids that mean nothing here); `None` when it cannot be told.
    pub initial_pid: Option<bool>,
    /// `Some(false)` when this process is outside the initial user namespace (the proc
    /// connector then ignores its `LISTEN`); `None` when it cannot be told.
    pub initial_user: Option<bool>,
}

fn ns_inode(path: &str) -> Option<u64> {
    ns_inode_of(path).ok()
}

/// The inode number a namespace link (`/proc/<pid>/ns/<kind>`) names, from its text
/// `kind:[inode]`. The error is `read_link`'s (`ENOENT` when the task is gone, `EACCES`
/// when the ptrace access check refuses), or `InvalidData` for text of another shape.
pub(crate) fn ns_inode_of(path: &str) -> std::io::Result<u64> {
    // The link reads like "net:[4026531833]".
    let link = fs::read_link(path)?;
    link.to_str()
        .and_then(|s| s.split_once('[')?.1.strip_suffix(']')?.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a namespace link"))
}

/// Tells whether this thread is in the initial network and pid namespaces.
///
/// The initial pid namespace has a fixed inode number; so does the initial network
/// namespace on recent kernels. Where the network namespace's number differs, the answer
/// comes from comparing with pid 1's namespace when `/proc/1` is readable, and is `None`
/// otherwise (an older kernel in a restricted `/proc`).
pub fn namespace_report() -> NamespaceReport {
    let initial_pid = ns_inode("/proc/thread-self/ns/pid").map(|i| i == PID_INIT_INO);
    let initial_user = ns_inode("/proc/thread-self/ns/user").map(|i| i == USER_INIT_INO);
    let initial_net = match ns_inode("/proc/thread-self/ns/net") {
        None => None,
        Some(NET_INIT_INO) => Some(true),
        Some(mine) => match (fixed_net_inode(), ns_inode("/proc/1/ns/net")) {
            (true, _) => Some(false),
            (false, Some(init)) => Some(mine == init),
            (false, None) => None,
        },
    };
    NamespaceReport {
        initial_net,
        initial_pid,
        initial_user,
    }
}

/// Tells whether the `/proc` mounted here belongs to the initial pid namespace (its pid 1
/// is there). Proc events carry pids of the initial namespace: in another namespace's
/// `/proc` (`unshare -pf --mount-proc`, a container's) those pids name other processes, or
/// none, so nothing read there about an event's pid can be trusted. `None` when it cannot
/// be told (`/proc/1/ns/pid` unreadable).
pub fn proc_is_initial_pid_ns() -> Option<bool> {
    ns_inode("/proc/1/ns/pid").map(|i| i == PID_INIT_INO)
}

/// True when this kernel numbers the initial network namespace with its fixed inode
/// (Linux 6.18 and later; earlier kernels allocate it like any other namespace).
fn fixed_net_inode() -> bool {
    match ns_inode("/proc/1/ns/net") {
        Some(i) => i == NET_INIT_INO,
        None => kernel_at_least(6, 18),
    }
}

/// True when the running kernel's release (`/proc/sys/kernel/osrelease`) is at least
/// `major.minor`; false when it cannot be read.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(rel) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut it = rel.trim().split(|c: char| !c.is_ascii_digit());
    let ma: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}
