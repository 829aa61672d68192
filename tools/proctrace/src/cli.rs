//! `proctrace`'s command line (clap): options, their checks, and the help text that
//! documents every option and output field.

use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use cnbus::proc::{EventSet, ProcessInfo};
use cnbus_cli::args::{parse_secs, parse_size};
use cnbus_cli::generate::Generate;

/// The long help's tail: output fields and exit status.
const AFTER_LONG_HELP: &str = concat!(
    "\
Output:
  Text: time (UTC, from the event's kernel timestamp), event, pid, info, duration (on exit,
  since the fork or exec seen, or the process start time), process (command line, or
  [comm] for kernel threads; <unknown> when the process was gone before /proc could be
  read). Once a process in a container was seen, a 'container' column (the first 12 hex
  digits of its id, '-' on the host) appears before the process, under a new header.

  --json: one object per line (docs/AGENT.md, \"JSON event lines\").
",
    cnbus_cli::event_fields_help!(),
    "  proctrace's own fields: name (as in the text output, null when unknown), and on comm
  old_name (the name before, null when unknown). Without enrichment (--enrich off) the
  attribution fields are absent. The filters apply to the process an event is about (a
  fork's child).

  On exit, a summary line on stderr: events, lost (and whether the figure is exact),
  overflows, spoofed datagrams rejected, decode errors, filtering; --stats adds tables.

Exit status:
  0 on --duration, SIGINT, SIGTERM, SIGHUP, when the reader of the output closes the pipe
  (proctrace | head), or when its terminal hangs up (SIGHUP, and writes to the terminal
  fail with EIO: the rest of the events and the summary go nowhere); 1 when the proc
  connector cannot be used or writing the events fails (a full disk), with a message, or
  when a filter is asked for where /proc is another pid namespace's, or
  when after the stop a write of the events or of the summary makes no progress for 2 s
  (a reader that stopped reading); 2 on a usage error.

Needs root (CAP_NET_ADMIN) on kernels before 6.6, and the initial network namespace.
See docs/PROC.md."
);

/// Trace process events from the Linux proc connector.
#[derive(Debug, Parser)]
#[command(
    name = "proctrace",
    version,
    after_help = "Output fields and exit status: see --help.",
    after_long_help = AFTER_LONG_HELP,
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub generate: Option<Generate>,
    #[command(flatten)]
    pub args: Args,
}

/// What to trace and how to show it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Event types to trace, comma-separated: fork, exec, exit, nonzero-exit (exits with a
    /// non-zero status), uid, gid, sid, ptrace, comm, coredump, all. Filtered in the kernel
    /// on Linux 6.6+, in user space before
    #[arg(short, long, value_name = "LIST", default_value = "all", value_parser = parse_events)]
    pub events: EventSet,
    /// One JSON object per line instead of text columns
    #[arg(short, long)]
    pub json: bool,
    /// Stop after SECS seconds (fractions allowed; 0 to 1e9)
    #[arg(short, long, value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    pub duration: Option<Duration>,
    /// At the end, also print loss per CPU and event counts per program (the one-line
    /// summary of events and losses always goes to stderr on exit)
    #[arg(short, long)]
    pub stats: bool,
    /// Socket receive buffer to ask for (bytes, or with a K, M or G suffix; 1 byte to 1G)
    #[arg(short, long, value_name = "BYTES", default_value = "16M", value_parser = parse_size,
          allow_negative_numbers = true)]
    pub buffer: usize,
    /// Process attribution (process key, container, cgroup, pid namespace, command line)
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Enrich::Full)]
    pub enrich: Enrich,
    /// Only processes in a container whose id starts with ID (1 to 64 hex digits)
    #[arg(long, value_name = "ID", value_parser = parse_container)]
    pub container: Option<String>,
    /// Only processes whose cgroup path starts with PATH (starts with '/')
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup_prefix)]
    pub cgroup: Option<String>,
    /// Only processes not in a container
    #[arg(long, conflicts_with_all = ["containers_only", "container"])]
    pub host_only: bool,
    /// Only processes in a container
    #[arg(long)]
    pub containers_only: bool,
    /// Run even outside the initial pid/user namespace (events then arrive only while
    /// another process listens, with host ids; where /proc is that namespace's, without
    /// names, attribution or filters)
    #[arg(long = "allow-foreign-namespace")]
    pub allow_foreign_ns: bool,
}

/// How much process attribution (`--enrich`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Enrich {
    /// A child's cgroup and pid namespace are read at fork when its parent is a container
    /// runtime or namespace tool, else its parent's (marked inherited) until its exec
    Full,
    /// Read at every fork (a /proc read per fork)
    Eager,
    /// Never read at fork
    Lazy,
    /// None of the attribution fields (the filters need them)
    Off,
}

impl Args {
    /// The process filter the options ask for.
    pub fn filter(&self) -> Filter {
        Filter {
            container: self.container.clone(),
            cgroup: self.cgroup.clone(),
            host_only: self.host_only,
            containers_only: self.containers_only,
        }
    }
}

impl Cli {
    /// Parses the command line; a usage error (or `--help`, `--version`) exits here, with
    /// clap's message and status 2 (0 for help and version, 1 when writing them fails).
    pub fn parse_checked() -> Cli {
        let cli: Cli = cnbus_cli::output::parse_args("proctrace");
        if let Err(msg) = cli.check() {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit();
        }
        cli
    }

    /// The checks clap's attributes cannot express.
    pub fn check(&self) -> Result<(), String> {
        let a = &self.args;
        if a.enrich == Enrich::Off && !a.filter().is_empty() {
            return Err("--container, --cgroup, --host-only and --containers-only need enrichment (not --enrich off)".into());
        }
        Ok(())
    }
}

fn parse_events(v: &str) -> Result<EventSet, String> {
    let set: EventSet = v.parse().map_err(|e| format!("{e}"))?;
    if set.is_empty() {
        return Err("no event type given".into());
    }
    Ok(set)
}

fn parse_container(v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{v:?} is not a container id or prefix (1 to 64 hex digits)"
        ));
    }
    Ok(v.to_ascii_lowercase())
}

fn parse_cgroup_prefix(v: &str) -> Result<String, String> {
    if !v.starts_with('/') || v.chars().any(char::is_control) {
        return Err(format!("{v:?} is not a cgroup path (it starts with '/')"));
    }
    Ok(v.to_string())
}

/// Which processes' events are shown (`--container`, `--cgroup`, `--host-only`,
/// `--containers-only`), decided on the enricher's attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub container: Option<String>,
    pub cgroup: Option<String>,
    pub host_only: bool,
    pub containers_only: bool,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// True when an event about a process with `info` is shown. Nothing known (`None`: an
    /// ACK) passes only an empty filter.
    pub fn matches(&self, info: Option<&ProcessInfo>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(info) = info else {
            return false;
        };
        let cid = info.container_id.as_deref();
        if self.host_only && cid.is_some() {
            return false;
        }
        if self.containers_only && cid.is_none() {
            return false;
        }
        if let Some(p) = &self.container {
            if !cid.is_some_and(|c| c.starts_with(p.as_str())) {
                return false;
            }
        }
        if let Some(p) = &self.cgroup {
            if !info
                .cgroup
                .as_deref()
                .is_some_and(|c| c.starts_with(p.as_str()))
            {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("proctrace").chain(args.iter().copied()))?;
        cli.check()
            .map_err(|m| Cli::command().error(clap::error::ErrorKind::ArgumentConflict, m))?;
        Ok(cli)
    }

    #[test]
    fn hostile_arguments_are_usage_errors() {
        for args in [
            &["--duration", "1e19"][..],
            &["--duration", "1e30"],
            &["--duration", "-1"],
            &["--duration", "NaN"],
            &["--duration", "inf"],
            &["--duration", ""],
            &["--duration"],
            &["-d", "1000000001"],
            &["--buffer", "0"],
            &["--buffer", "2G"],
            &["--buffer", "-5"],
            &["--buffer", "99999999999999999999"],
            &["--buffer", "18446744073709551615K"],
            &["--json=yes"],
            &["--stats=1"],
            &["--bogus"],
            &[""],
            &["-jx"],
            &["-e"],
            &["--events="],
            &["--events", "forks"],
            &["--container"],
            &["--container", ""],
            &["--container", "xyz"],
            &["--container", &"a".repeat(65)],
            &["--cgroup", "system.slice"],
            &["--cgroup="],
            &["--cgroup", "/a\nb"],
            &["--host-only=1"],
            &["--containers-only=yes"],
            &["--host-only", "--containers-only"],
            &["--host-only", "--container", "ab"],
            &["--enrich"],
            &["--enrich", "some"],
            &["--enrich", "off", "--containers-only"],
            &["--enrich=off", "--cgroup", "/"],
            &["completions"],
            &["completions", "tcsh"],
            &["-j", "man"],
        ] {
            let r = parse(args);
            assert!(r.is_err(), "{args:?} accepted");
            assert_eq!(r.err().map(|e| e.exit_code()), Some(2), "{args:?}");
        }
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff]);
        assert!(Cli::try_parse_from([OsString::from("proctrace"), bad.clone()]).is_err());
        assert!(Cli::try_parse_from(["proctrace".into(), OsString::from("-d"), bad]).is_err());
    }

    #[test]
    fn good_arguments_parse() {
        let a = parse(&["-j", "--duration=1e9", "-b", "1G", "-e", "exit"])
            .unwrap()
            .args;
        assert!(a.json);
        assert_eq!(a.duration, Some(Duration::from_secs(1_000_000_000)));
        assert_eq!(a.buffer, 1 << 30);
        assert_eq!(a.events, EventSet::EXIT);
        let d = parse(&[]).unwrap().args;
        assert_eq!(d.events, EventSet::ALL);
        assert_eq!(d.buffer, cnbus::proc::DEFAULT_RECV_BUFFER);
        assert!(!d.json && !d.stats && d.duration.is_none());
        let help = parse(&["--stats", "-h"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert_eq!(help.exit_code(), 0);
        let a = parse(&["--container=ABC0", "--cgroup", "/system.slice/"])
            .unwrap()
            .args;
        assert_eq!(a.enrich, Enrich::Full);
        assert_eq!(a.container.as_deref(), Some("abc0"));
        assert_eq!(a.cgroup.as_deref(), Some("/system.slice/"));
        let a = parse(&["--enrich", "lazy", "--host-only"]).unwrap().args;
        assert_eq!(a.enrich, Enrich::Lazy);
        assert!(a.host_only);
        assert_eq!(parse(&["--enrich=off"]).unwrap().args.enrich, Enrich::Off);
        assert!(matches!(
            parse(&["completions", "zsh"]).unwrap().generate,
            Some(Generate::Completions { .. })
        ));
        // Repeated options: the last one wins, as with the parser before clap.
        let a = parse(&[
            "-e", "fork", "-e", "exit", "-b", "1K", "-b", " 16M", "-j", "-j",
        ])
        .unwrap()
        .args;
        assert_eq!(a.events, EventSet::EXIT);
        assert_eq!(a.buffer, 16 << 20);
        assert!(a.json);
        let a = parse(&["--enrich=off", "--enrich", "lazy", "--host-only"])
            .unwrap()
            .args;
        assert_eq!(a.enrich, Enrich::Lazy);
        Cli::command().debug_assert();
    }

    #[test]
    fn filters_apply_to_the_enriched_process() {
        let mut host = ProcessInfo::unknown();
        host.cgroup = Some("/user.slice/session-1.scope".into());
        let mut ctr = host.clone();
        let id = "0123456789abcdef".repeat(4);
        ctr.cgroup = Some(format!("/system.slice/docker-{id}.scope").into());
        ctr.container_id = Some(id.as_str().into());
        let f = |filter: Filter, i: Option<&ProcessInfo>| filter.matches(i);
        assert!(f(Filter::default(), None));
        assert!(f(Filter::default(), Some(&host)));
        let host_only = Filter {
            host_only: true,
            ..Filter::default()
        };
        assert!(f(host_only.clone(), Some(&host)));
        assert!(!f(host_only.clone(), Some(&ctr)));
        assert!(!f(host_only, None));
        let containers = Filter {
            containers_only: true,
            ..Filter::default()
        };
        assert!(!f(containers.clone(), Some(&host)));
        assert!(f(containers, Some(&ctr)));
        let by_id = |p: &str| Filter {
            container: Some(p.into()),
            ..Filter::default()
        };
        assert!(f(by_id("0123"), Some(&ctr)));
        assert!(f(by_id(&id), Some(&ctr)));
        assert!(!f(by_id("1234"), Some(&ctr)));
        assert!(!f(by_id("0123"), Some(&host)));
        let by_cg = |p: &str| Filter {
            cgroup: Some(p.into()),
            ..Filter::default()
        };
        assert!(f(by_cg("/user.slice"), Some(&host)));
        assert!(!f(by_cg("/user.slice"), Some(&ctr)));
        assert!(f(by_cg("/"), Some(&ctr)));
        assert!(!f(by_cg("/"), Some(&ProcessInfo::unknown())));
    }
}
