//! Which cgroup a process is in, and which container that cgroup belongs to: one table of
//! container runtimes' cgroup path shapes.

/// How one runtime names a container's cgroup: a path component that is `prefix`, the
/// 64-hex container id, then `suffix`. Components are tried from the innermost outwards,
/// so a container nested in another container (Docker in Docker) gives the inner one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimePattern {
    /// The runtime, for humans and tests.
    pub runtime: &'static str,
    /// What precedes the id in the component.
    pub prefix: &'static str,
    /// What follows it (`.scope` for systemd-managed cgroups, or nothing).
    pub suffix: &'static str,
}

const fn pat(runtime: &'static str, prefix: &'static str, suffix: &'static str) -> RuntimePattern {
    RuntimePattern {
        runtime,
        prefix,
        suffix,
    }
}

/// Every container cgroup shape cnbus recognises. The monitors (`crio-conmon-<id>.scope`,
/// `libpod-conmon-<id>.scope`) are not containers and match nothing: after the prefix the
/// component does not continue with 64 hex digits.
///
/// | runtime | cgroupfs driver | systemd driver |
/// |---|---|---|
/// | Docker | `/docker/<id>` | `/system.slice/docker-<id>.scope` |
/// | containerd (CRI) | `/kubepods/burstable/pod<uid>/<id>` | `/kubepods.slice/…/cri-containerd-<id>.scope` |
/// | CRI-O | `/kubepods/…/pod<uid>/crio-<id>` | `/kubepods.slice/…/crio-<id>.scope` |
/// | Podman (libpod) | `/libpod_parent/libpod-<id>` | `/machine.slice/libpod-<id>.scope` (and `…/container` below it) |
/// | runc | `/<id>` (its default `cgroupsPath`) | `/system.slice/runc-<id>.scope` |
/// | Kubernetes with Docker | `/kubepods/…/pod<uid>/<id>` | `/kubepods.slice/…/docker-<id>.scope` |
/// | nerdctl | `/<namespace>/<id>` | `/system.slice/nerdctl-<id>.scope` |
/// | crun, gVisor (`runsc`), youki | `/<id>` | `/system.slice/{crun,runsc,youki}-<id>.scope` |
/// | any runtime given a systemd `cgroupsPath` without a prefix | | `/…/<id>.scope` |
///
/// One more shape is recognised without a row of its own: a systemd `cgroupsPath`
/// (`<slice>:<prefix>:<id>`) that a cgroupfs driver took literally as a directory name,
/// as containerd does under a systemd kubelet when `SystemdCgroup` is off (k3s):
/// `/kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`. It is the container whose
/// systemd unit would be `<prefix>-<id>.scope`, and matches when that unit does.
pub const RUNTIME_PATTERNS: &[RuntimePattern] = &[
    pat("docker", "docker-", ".scope"),
    pat("containerd", "cri-containerd-", ".scope"),
    pat("cri-o", "crio-", ".scope"),
    pat("cri-o", "crio-", ""),
    pat("podman", "libpod-", ".scope"),
    pat("podman", "libpod-", ""),
    pat("runc", "runc-", ".scope"),
    pat("nerdctl", "nerdctl-", ".scope"),
    pat("crun", "crun-", ".scope"),
    pat("gvisor", "runsc-", ".scope"),
    pat("youki", "youki-", ".scope"),
    // A unit named after the id alone (a systemd `cgroupsPath` with an empty prefix).
    pat("systemd", "", ".scope"),
    // A bare id: Docker and Kubernetes cgroupfs paths, plain runc, containerd (`ctr`).
    pat("cgroupfs", "", ""),
];

/// What the kernel appends to a cgroup v2 path whose cgroup was removed while a task (a
/// zombie: a live task keeps its cgroup populated) was still in it.
const DELETED: &str = " (deleted)";

/// A container found in a cgroup path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerMatch<'a> {
    /// The runtime whose pattern matched ([`RuntimePattern::runtime`]).
    pub runtime: &'static str,
    /// The 64-hex container id (lower case as the path has it).
    pub id: &'a str,
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container a cgroup path belongs to, by [`RUNTIME_PATTERNS`]; `None` on the host. A
/// path ending in ` (deleted)` (a zombie whose container's cgroup was already removed, as
/// `/proc/<pid>/cgroup` shows it) is still that container's.
pub fn container_of(cgroup: &str) -> Option<ContainerMatch<'_>> {
    let path = cgroup.strip_suffix(DELETED).unwrap_or(cgroup);
    path.rsplit('/').find_map(component_container)
}

/// The container one path component names, by [`RUNTIME_PATTERNS`], or in the
/// `<slice>:<prefix>:<id>` form (see there).
fn component_container(comp: &str) -> Option<ContainerMatch<'_>> {
    let found = |runtime, id| Some(ContainerMatch { runtime, id });
    for p in RUNTIME_PATTERNS {
        let id = comp
            .strip_prefix(p.prefix)
            .and_then(|rest| rest.strip_suffix(p.suffix));
        if let Some(id) = id.filter(|id| is_id(id)) {
            return found(p.runtime, id);
        }
    }
    let mut f = comp.rsplitn(3, ':');
    let (Some(id), Some(prefix), Some(_slice)) = (f.next(), f.next(), f.next()) else {
        return None;
    };
    if !is_id(id) || prefix.is_empty() {
        return None;
    }
    RUNTIME_PATTERNS
        .iter()
        .find(|p| p.suffix == ".scope" && p.prefix.strip_suffix('-') == Some(prefix))
        .and_then(|p| found(p.runtime, id))
}

/// The paths of the `name=systemd` line and of the cgroup v2 line (`0::`) of the text of
/// `/proc/<pid>/cgroup`.
pub(super) fn cgroup_lines(text: &str) -> (Option<&str>, Option<&str>) {
    let (mut systemd, mut unified) = (None, None);
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_id), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if ctl == "name=systemd" && systemd.is_none() {
            systemd = Some(path);
        } else if ctl.is_empty() && unified.is_none() {
            unified = Some(path);
        }
    }
    (systemd, unified)
}

/// The 64-hex container id of a cgroup path (see [`container_of`]).
pub fn container_id(cgroup: &str) -> Option<&str> {
    container_of(cgroup).map(|m| m.id)
}

/// The cgroup path in the text of `/proc/<pid>/cgroup`: the `name=systemd` line when there
/// is one (cgroup v1 or a hybrid host, where that hierarchy tracks services and
/// containers), else the cgroup v2 line `0::<path>`. One exception: the kernel shows every
/// *exiting* task in the root (`/`) of the v1 hierarchies while the v2 line keeps its
/// cgroup (`proc_cgroup_show()` in kernel/cgroup/cgroup.c), so a `name=systemd` root with a
/// deeper v2 path gives the v2 path. `None` when neither line is present. A path whose
/// cgroup was removed ends in ` (deleted)`, kept as the kernel says it.
pub fn parse_cgroup(text: &str) -> Option<&str> {
    match cgroup_lines(text) {
        (Some("/"), Some(u)) if u != "/" => Some(u),
        (Some(s), _) => Some(s),
        (None, u) => u,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn rt(path: &str) -> Option<(&'static str, String)> {
        container_of(path).map(|m| (m.runtime, m.id.to_string()))
    }

    #[test]
    fn docker() {
        assert_eq!(rt(&format!("/docker/{ID}")), Some(("cgroupfs", ID.into())));
        assert_eq!(
            rt(&format!("/system.slice/docker-{ID}.scope")),
            Some(("docker", ID.into()))
        );
        // Docker in Docker: the innermost container.
        assert_eq!(
            rt(&format!("/docker/{ID2}/docker/{ID}")),
            Some(("cgroupfs", ID.into()))
        );
    }

    #[test]
    fn containerd_cri() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2a9b7d4e_1c3f_4e5a_9b8c_7d6e5f4a3b2c.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(rt(&p), Some(("containerd", ID.into())));
        let p = format!("/kubepods/burstable/pod2a9b7d4e-1c3f-4e5a-9b8c-7d6e5f4a3b2c/{ID}");
        assert_eq!(rt(&p), Some(("cgroupfs", ID.into())));
        // containerd without CRI (`ctr run`): /<namespace>/<id>.
        assert_eq!(rt(&format!("/default/{ID}")), Some(("cgroupfs", ID.into())));
    }

    #[test]
    fn cri_o() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0c9a3f1e_2b4d_4c6e_8f0a_1b2c3d4e5f60.slice/crio-{ID}.scope"
        );
        assert_eq!(rt(&p), Some(("cri-o", ID.into())));
        let p = format!("/kubepods/besteffort/pod0c9a3f1e-2b4d-4c6e-8f0a-1b2c3d4e5f60/crio-{ID}");
        assert_eq!(rt(&p), Some(("cri-o", ID.into())));
        // conmon, the monitor, is not the container.
        let p = format!("/kubepods.slice/kubepods-besteffort.slice/crio-conmon-{ID}.scope");
        assert_eq!(rt(&p), None);
    }

    #[test]
    fn podman() {
        assert_eq!(
            rt(&format!("/machine.slice/libpod-{ID}.scope")),
            Some(("podman", ID.into()))
        );
        assert_eq!(
            rt(&format!("/machine.slice/libpod-{ID}.scope/container")),
            Some(("podman", ID.into()))
        );
        assert_eq!(
            rt(&format!("/libpod_parent/libpod-{ID}")),
            Some(("podman", ID.into()))
        );
        let rootless =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        assert_eq!(rt(&rootless), Some(("podman", ID.into())));
        assert_eq!(
            rt(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
    }

    #[test]
    fn runc() {
        // Plain `runc run` with the default cgroupsPath, as seen on this host's v1 and v2
        // hierarchies.
        assert_eq!(rt(&format!("/{ID}")), Some(("cgroupfs", ID.into())));
        assert_eq!(
            rt(&format!("/system.slice/runc-{ID}.scope")),
            Some(("runc", ID.into()))
        );
    }

    #[test]
    fn kubepods_with_docker() {
        let p = format!(
            "/kubepods.slice/kubepods-pod2a9b7d4e_1c3f_4e5a_9b8c_7d6e5f4a3b2c.slice/docker-{ID}.scope"
        );
        assert_eq!(rt(&p), Some(("docker", ID.into())));
        let p = format!("/kubepods/pod2a9b7d4e-1c3f-4e5a-9b8c-7d6e5f4a3b2c/{ID}");
        assert_eq!(rt(&p), Some(("cgroupfs", ID.into())));
    }

    #[test]
    fn other_runtimes_systemd_scopes() {
        // nerdctl's systemd `cgroupsPath` is `system.slice:nerdctl:<id>` (user.slice when
        // rootless); crun's default unit is `crun-<id>.scope`, runsc's `:runsc:<id>`,
        // youki's `youki-<id>.scope`; an empty prefix makes the unit `<id>.scope`.
        for (p, runtime) in [
            (format!("/system.slice/nerdctl-{ID}.scope"), "nerdctl"),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/nerdctl-{ID}.scope"
                ),
                "nerdctl",
            ),
            (format!("/machine.slice/crun-{ID}.scope"), "crun"),
            (format!("/system.slice/runsc-{ID}.scope"), "gvisor"),
            (format!("/system.slice/youki-{ID}.scope"), "youki"),
            (format!("/system.slice/{ID}.scope"), "systemd"),
        ] {
            assert_eq!(rt(&p), Some((runtime, ID.into())), "{p}");
        }
    }

    #[test]
    fn systemd_cgroups_path_taken_literally_by_cgroupfs() {
        // containerd without `SystemdCgroup = true` under a systemd kubelet (k3s): runc's
        // cgroupfs driver makes the `slice:prefix:name` a directory name.
        let p = format!(
            "/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:{ID}"
        );
        assert_eq!(rt(&p), Some(("containerd", ID.into())));
        let p = format!(
            "/system.slice/containerd.service/kubepods-burstable-pod2c4b2241_5c01_11e9_8e4e_42010a800002.slice:cri-containerd:{ID}"
        );
        assert_eq!(rt(&p), Some(("containerd", ID.into())));
        assert_eq!(
            rt(&format!("/system.slice:docker:{ID}")),
            Some(("docker", ID.into()))
        );
        assert_eq!(
            rt(&format!("/user.slice:nerdctl:{ID}")),
            Some(("nerdctl", ID.into()))
        );
        // Not ids, unknown prefixes, the monitor: nothing.
        for p in [
            format!("/a.slice:cri-containerd:{}", &ID[1..]),
            format!("/a.slice:cri-containerd:{ID}:x"),
            format!("/a.slice:unknown:{ID}"),
            format!("/a.slice::{ID}"),
            format!("/a.slice:crio-conmon:{ID}"),
            format!("/a.slice:cri-containerd{ID}"),
        ] {
            assert_eq!(rt(&p), None, "{p}");
        }
    }

    #[test]
    fn a_removed_cgroup_is_still_the_containers() {
        // `/proc/<pid>/cgroup` of a zombie whose cgroup v2 was removed (seen on this host:
        // a killed, unreaped child of a removed cgroup).
        let zombie = format!("9:name=systemd:/\n8:pids:/\n0::/{ID} (deleted)\n");
        let path = parse_cgroup(&zombie).unwrap();
        assert_eq!(path, format!("/{ID} (deleted)"));
        assert_eq!(container_id(path), Some(ID));
        assert_eq!(
            rt(&format!("/system.slice/docker-{ID}.scope (deleted)")),
            Some(("docker", ID.into()))
        );
        assert_eq!(rt("/user.slice (deleted)"), None);
        // Only as the kernel writes it: at the end, once.
        assert_eq!(rt(&format!("/{ID} (deleted) (deleted)")), None);
        assert_eq!(rt(&format!("/{ID}(deleted)")), None);
    }

    #[test]
    fn host_paths_are_not_containers() {
        for p in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/pod2a9b7d4e-1c3f-4e5a-9b8c-7d6e5f4a3b2c",
            // 63 and 65 hex digits, and a non-hex letter.
            &format!("/docker/{}", &ID[1..]),
            &format!("/docker/{ID}0"),
            &format!("/docker/{}g", &ID[1..]),
            "",
        ] {
            assert_eq!(rt(p), None, "{p}");
        }
    }

    #[test]
    fn cgroup_line_choice() {
        // This host: hybrid, name=systemd and 0:: both present.
        let hybrid = format!(
            "9:name=systemd:/{ID}\n8:pids:/{ID}\n4:memory:/process_api/669b/{ID}\n1:cpu:/\n0::/x\n"
        );
        assert_eq!(parse_cgroup(&hybrid), Some(format!("/{ID}").as_str()));
        assert_eq!(parse_cgroup("0::/user.slice\n"), Some("/user.slice"));
        // A path may hold ':'.
        assert_eq!(parse_cgroup("0::/a:b\n"), Some("/a:b"));
        assert_eq!(parse_cgroup("3:cpu:/\n"), None);
        assert_eq!(parse_cgroup(""), None);
        assert_eq!(parse_cgroup("garbage\n\n::\n"), Some(""));
        assert_eq!(container_id(parse_cgroup(&hybrid).unwrap()), Some(ID));
        // An exiting task on a hybrid host: v1 says root, v2 keeps the cgroup.
        let zombie = format!("9:name=systemd:/\n8:pids:/\n0::/{ID}\n");
        assert_eq!(parse_cgroup(&zombie), Some(format!("/{ID}").as_str()));
        assert_eq!(parse_cgroup("9:name=systemd:/\n0::/\n"), Some("/"));
        assert_eq!(parse_cgroup("0::/a\n9:name=systemd:/b\n"), Some("/b"));
    }
}
