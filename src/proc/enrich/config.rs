//! The enricher's settings ([`EnrichConfig`]) and the programs whose children are read at
//! fork ([`SPAWNERS`]).

#[cfg(doc)] // names in doc links
use super::{EnrichStats, Enricher, InfoSource};

/// Settings of an [`Enricher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichConfig {
    /// Most processes kept (default 65 536). Beyond it the least recently used half is
    /// dropped and counted in [`EnrichStats::evictions`]; a dropped process is read from
    /// `/proc` again at its next event.
    pub capacity: usize,
    /// Read the child's cgroup and pid namespace at fork (default `true`). A child is
    /// created in its parent's cgroup and in the pid namespace its parent made for its
    /// children, but the parent a fork event names is the *real* parent: a runtime that
    /// forks with `CLONE_PARENT` (runc does, for a container's init and every `runc exec`)
    /// or that moved itself into another cgroup or pid namespace just before makes the
    /// child differ from that parent. With `false` a fork costs no `/proc` read (unless the
    /// start time is uncertain, the parent is a spawner, or the parent's program is
    /// unknown) and the child's cgroup and namespace are the parent's, marked
    /// [`InfoSource::Inherited`], until its exec re-reads them.
    pub read_at_fork: bool,
    /// With `read_at_fork = false`: programs whose children are read at fork all the same
    /// (default [`SPAWNERS`]): container runtimes, which fork with `CLONE_PARENT` (so the
    /// parent a fork names did not make the child) and namespace tools, which enter or
    /// create a pid namespace before they fork. A program is matched by the base name of
    /// the first word of the parent's command line (or its comm): equal to an entry, or
    /// starting with an entry that ends in `-` or `:`. A parent whose program is unknown
    /// (not cached and gone, or its command line could not be read: `runc run -d` has
    /// often exited before a lagging reader enriches its exec) may be one of them, so its
    /// children are read too.
    pub spawners: Vec<String>,
    /// Longest command line kept, in bytes (default 4096). With 0 none is kept: the
    /// process's comm stands for it ([`InfoSource::Comm`]).
    pub max_cmdline: usize,
}

/// The default [`EnrichConfig::spawners`]: runc (also its `runc:[…]` stages), crun,
/// youki, runsc, conmon, containerd shims, nsenter, unshare.
pub const SPAWNERS: &[&str] = &[
    "runc",
    "runc:",
    "crun",
    "youki",
    "runsc",
    "conmon",
    "containerd-shim",
    "containerd-shim-",
    "nsenter",
    "unshare",
];

/// True when the command line `cmdline` is one of `spawners`' programs.
pub(super) fn is_spawner(spawners: &[String], cmdline: &str) -> bool {
    let first = cmdline.split(' ').next().unwrap_or(cmdline);
    let prog = first.rsplit('/').next().unwrap_or(first);
    let prog = prog
        .strip_prefix('[')
        .and_then(|p| p.strip_suffix(']'))
        .unwrap_or(prog);
    spawners.iter().any(|s| {
        prog == s || ((s.ends_with('-') || s.ends_with(':')) && prog.starts_with(s.as_str()))
    })
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            capacity: 65_536,
            read_at_fork: true,
            spawners: SPAWNERS.iter().map(|s| s.to_string()).collect(),
            max_cmdline: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawners_by_program_name() {
        let sp: Vec<String> = SPAWNERS.iter().map(|s| s.to_string()).collect();
        for c in [
            "runc --root /x run -d c1",
            "/usr/sbin/runc exec c1 sh",
            "runc:[1:CHILD]",
            "[runc:[2:INIT]]",
            "/usr/bin/containerd-shim-runc-v2 -namespace moby",
            "containerd-shim",
            "nsenter -t 1 -p sh",
            "/usr/bin/unshare --pid --fork sh",
            "crun run x",
        ] {
            assert!(is_spawner(&sp, c), "{c}");
        }
        for c in [
            "bash",
            "/usr/bin/runcible",
            "sh -c runc",
            "containerd",
            "unshared",
            "",
        ] {
            assert!(!is_spawner(&sp, c), "{c}");
        }
    }
}
