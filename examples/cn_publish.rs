//! Publishes numbered messages of a custom idx/val protocol to a multicast group.
//!
//! ```sh
//! cargo run --example cn_publish -- --group 14 --idx 0xe --val 0x456 --count 10 [--size 64] [--interval-ms 100] [--batch 32]
//! ```
//!
//! Run `cn_subscribe` with the same group and idx in another terminal: it prints each
//! message as `[idx.val] [seq.ack]` and counts any sequence gap as lost. With `--batch N`,
//! N messages share each datagram (cnbus receivers read them all). Needs root
//! (`CAP_NET_ADMIN`) to multicast.

use std::time::Duration;

#[path = "common/args.rs"]
mod args;

use cnbus::connector::Connector;
use cnbus::sys::Dest;
use cnbus::{CbId, CnMsg};

fn main() -> cnbus::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: cn_publish [--group G] [--idx I] [--val V] [--count N] [--size B] [--interval-ms MS] [--batch N]");
        return Ok(());
    }
    let group = args::int(&args, "--group").unwrap_or(14) as u32;
    let id = CbId::new(
        args::int(&args, "--idx").unwrap_or(14) as u32,
        args::int(&args, "--val").unwrap_or(0x456) as u32,
    );
    let count = args::int(&args, "--count").unwrap_or(10);
    let size = args::int(&args, "--size").unwrap_or(64) as usize;
    let interval = Duration::from_millis(args::int(&args, "--interval-ms").unwrap_or(0));
    let batch = args::int(&args, "--batch").unwrap_or(1).max(1);

    let bus = Connector::builder().spawn()?;
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let msgs: Vec<CnMsg> = (0..n)
            .map(|_| CnMsg::new(id, vec![b'x'; size]).with_seq(bus.next_seq(id), 0))
            .collect();
        bus.send_batch(&msgs, Dest::Group(group))?;
        sent += n;
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    let s = bus.stats();
    eprintln!(
        "sent {} messages in {} datagrams from port {} to group {group}",
        s.sent_messages,
        s.sent_datagrams,
        bus.port_id()
    );
    Ok(())
}
