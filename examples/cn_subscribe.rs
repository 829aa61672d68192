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
//! messages or `--seconds`, then prints the statistics, including lost messages.

use std::time::{Duration, Instant};

#[path = "common/args.rs"]
mod args;

use cnbus::connector::{Connector, Event, Match};
use cnbus::CbId;

fn main() -> cnbus::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: cn_subscribe [--group G] [--idx I] [--val V] [--count N] [--seconds S]");
        return Ok(());
    }
    let group = args::int(&args, "--group").unwrap_or(14) as u32;
    let idx = args::int(&args, "--idx").unwrap_or(14) as u32;
    let key = match args::int(&args, "--val") {
        Some(v) => Match::Id(CbId::new(idx, v as u32)),
        None => Match::Idx(idx),
    };
    let count = args::int(&args, "--count").unwrap_or(u64::MAX);
    let seconds = args::int(&args, "--seconds").unwrap_or(u64::MAX / 4);

    let bus = Connector::builder()
        .on_event(|e| match e {
            Event::Lost { port, id, count } => eprintln!(
                "lost {count} messages of [{:x}.{:x}] from port {port}",
                id.idx, id.val
            ),
            Event::Overrun => eprintln!("receive queue overflow (ENOBUFS)"),
            other => eprintln!("{other:?}"),
        })
        .spawn()?;
    let _sub = bus.subscribe(group)?;
    let (_reg, rx) = bus.channel(key, 4096);
    eprintln!(
        "listening on group {group} for {key:?} (port {})",
        bus.port_id()
    );
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0;
    while n < count {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(m) = rx.recv_timeout(left.min(Duration::from_millis(500))) else {
            continue;
        };
        println!(
            "[{:x}.{:x}] [{:08}.{:08}] len {} from port {}",
            m.msg.id.idx,
            m.msg.id.val,
            m.msg.seq,
            m.msg.ack,
            m.msg.data.len(),
            m.source.port
        );
        n += 1;
    }
    eprintln!("{:#?}", bus.stats());
    Ok(())
}
