//! Subscribes to a custom idx/val protocol and prints each message the way the kernel's
//! connector samples do: `[idx.val] [seq.ack]`.
//!
//! ```sh
//! cargo run --example cn_subscribe -- --group 14 --idx 0xe [--val 0x456] [--count N] [--seconds S]
//! ```
//!
//! The defaults, idx 14 (`CN_NETLINK_USERS + 3`) val 0x456 on group 14, are the ids of the
//! kernel's own connector sample module (`samples/connector/cn_test.c`), so this also hears
//! that module. Without `--val` every val of the idx is printed. Ends after `--count`
//! messages or `--seconds`, then prints the statistics, including lost messages. The
//! `Connector` counts malformed datagrams and overruns and keeps receiving; this example
//! reports each on stderr.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::connector::{Connector, Event, Match};
use cnbus::CbId;

/// Prints the messages of one connector idx (or idx.val) heard on a multicast group.
#[derive(Parser)]
#[command(name = "cn_subscribe")]
struct Args {
    /// Multicast group to join (1..=32).
    #[arg(long, default_value = "14", value_parser = cli::parse_group)]
    group: u32,
    /// Connector idx (decimal or 0x hex).
    #[arg(long, default_value = "14", value_parser = cli::parse_u32)]
    idx: u32,
    /// Only this val (decimal or 0x hex); default: every val of the idx.
    #[arg(long, value_parser = cli::parse_u32)]
    val: Option<u32>,
    /// Stop after this many messages (default: no limit).
    #[arg(long, value_parser = cli::parse_u64)]
    count: Option<u64>,
    /// Stop after this many seconds (fractions allowed; default: no limit).
    #[arg(long, value_parser = cli::parse_secs)]
    seconds: Option<Duration>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::finish("cn_subscribe", run(&args))
}

fn run(a: &Args) -> Result<(), cli::Stop> {
    let key = match a.val {
        Some(v) => Match::Id(CbId::new(a.idx, v)),
        None => Match::Idx(a.idx),
    };
    let conn = Connector::builder()
        .on_event(|e| match e {
            Event::Lost { port, id, count } => warn!(
                "lost {count} messages of [{:x}.{:x}] from port {port}",
                id.idx, id.val
            ),
            Event::Overrun => warn!("receive queue overflow (ENOBUFS)"),
            other => warn!("{other:?}"),
        })
        .spawn()?;
    let _sub = conn.subscribe(a.group)?;
    let (_reg, rx) = conn.channel(key, 4096);
    warn!(
        "listening on group {} for {key:?} (port {})",
        a.group,
        conn.port_id()
    );
    // MAX_SECS keeps this addition from overflowing.
    let end = a.seconds.map(|s| Instant::now() + s);
    let mut n = 0;
    while a.count.is_none_or(|c| n < c) {
        let left = end.map(|e| e.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            break;
        }
        let wait = left.map_or(Duration::from_millis(500), |l| {
            l.min(Duration::from_millis(500))
        });
        let m = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => break,
        };
        out!(
            "[{:x}.{:x}] [{:08}.{:08}] len {} from port {}",
            m.msg.id.idx,
            m.msg.id.val,
            m.msg.seq,
            m.msg.ack,
            m.msg.data.len(),
            m.source.port
        )?;
        n += 1;
    }
    warn!("{:#?}", conn.stats());
    Ok(())
}
