//! Publishes numbered messages of a custom idx/val protocol to a multicast group.
//!
//! ```sh
//! cargo run --example cn_publish -- --group 14 --idx 0xe --val 0x456 --count 10 [--size 64] [--interval-ms 100] [--batch 32]
//! ```
//!
//! Run `cn_subscribe` with the same group and idx in another terminal: it prints each
//! message as `[idx.val] [seq.ack]` and counts any sequence gap as lost. With `--batch N`,
//! N messages share each datagram (cnbus receivers read them all). Needs root
//! (`CAP_NET_ADMIN`) to multicast. `--help` lists the options; a value out of range is a
//! usage error (exit status 2).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[path = "common/cli.rs"]
#[macro_use]
mod cli;

use cnbus::connector::Connector;
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};

/// Publishes numbered messages with one connector id to a multicast group.
#[derive(Parser)]
#[command(name = "cn_publish")]
struct Args {
    /// Multicast group (12..=32).
    #[arg(long, default_value = "14", value_parser = cli::parse_user_group)]
    group: u32,
    /// Connector idx (decimal or 0x hex; above 10: 1..=10 belong to the kernel).
    #[arg(long, default_value = "14", value_parser = cli::parse_user_idx)]
    idx: u32,
    /// Connector val (decimal or 0x hex).
    #[arg(long, default_value = "0x456", value_parser = cli::parse_u32)]
    val: u32,
    /// Messages to send.
    #[arg(long, default_value = "10", value_parser = cli::parse_u64)]
    count: u64,
    /// Payload bytes per message (at most 65535).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16))]
    size: u16,
    /// Pause after each datagram, in milliseconds (at most one day).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    interval_ms: u64,
    /// Messages per datagram (1..=1024).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::finish("cn_publish", run(&args))
}

fn run(a: &Args) -> Result<(), cli::Stop> {
    let id = CbId::new(a.idx, a.val);
    let interval = Duration::from_millis(a.interval_ms);
    let conn = Connector::builder().spawn()?;
    let mut sent = 0;
    while sent < a.count {
        let n = a.batch.min(a.count - sent);
        let msgs: Vec<CnMsg> = (0..n)
            .map(|_| CnMsg::new(id, vec![b'x'; usize::from(a.size)]).with_seq(conn.next_seq(id), 0))
            .collect();
        conn.send_batch(&msgs, Dest::Group(a.group))?;
        sent += n;
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    let s = conn.stats();
    warn!(
        "sent {} messages in {} datagrams from port {} to group {}",
        s.sent_messages,
        s.sent_datagrams,
        conn.port_id(),
        a.group
    );
    Ok(())
}
