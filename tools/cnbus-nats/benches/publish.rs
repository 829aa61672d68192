//! CPU per record of the NATS sink, against a local nats-server.
//!
//! `cargo bench -p cnbus-nats --bench publish [-- RECORDS [RATE]]` (100000, 20000/s) starts its own `nats-server -js`
//! (127.0.0.1, a port it picks, a temporary store) unless `NATS_URL` names one, then measures
//! the process CPU time (user + system, all threads: getrusage) per record of
//! 1. building the records (a JSON line and a message id, as the agent does) without a sink,
//! 2. the same plus `NatsSink::publish` and waiting until JetStream acknowledged every record,
//!
//! and prints both, their difference (the sink's own cost per record) and the server's CPU per
//! record (from /proc/PID/stat, when the bench started the server).

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cnbus_nats::{Config, NatsSink, Record};

fn cpu_ns() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer it is given, which points to one.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(usage.ru_utime) + us(usage.ru_stime)) * 1000
}

fn server_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.path().join("store"))
        .arg("--ports_file_dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (apt-get install nats-server)");
    let ports = dir.path().join(format!("nats-server_{}.ports", child.id()));
    let start = Instant::now();
    let port = loop {
        if let Ok(text) = std::fs::read_to_string(&ports) {
            if let Some(at) = text.find("127.0.0.1:") {
                let digits: String = text[at + 10..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(port) = digits.parse::<u16>() {
                    break port;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        _dir: dir,
    }
}

fn record(i: u64) -> (String, Bytes) {
    let line = format!(
        "{{\"ts\":\"2026-11-30T04:00:00.{:06}Z\",\"event\":\"fork\",\"cpu\":{},\"seq\":{i},\"parent_pid\":{},\"child_pid\":{},\"comm\":\"stress-ng\"}}\n",
        i % 1_000_000,
        i % 2,
        1000 + i % 30000,
        2000 + i % 30000
    );
    (
        format!("bench-host/{}/fork/{i}/{}", 1000 + i % 30000, i % 2),
        Bytes::from(line),
    )
}

/// Publishes `records` records (ids from `first`) at `rate` per second (0: as fast as
/// possible), waits for every acknowledgement and prints the CPU per record.
fn run(url: &str, server: Option<&Server>, first: u64, records: u64, rate: u64, without: f64) {
    let spool = tempfile::tempdir().unwrap();
    let sink = NatsSink::start(Config::new(url, "bench-host", spool.path())).expect("start");
    let server_before = server.map(|s| server_cpu_ns(s.child.id()));
    let wall = Instant::now();
    let t1 = cpu_ns();
    for i in first..first + records {
        if rate > 0 && (i - first).is_multiple_of(100) {
            let due = Duration::from_secs_f64((i - first) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(wall.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (msg_id, line) = record(i);
        sink.publish(Record {
            event: "fork",
            msg_id,
            line,
        });
    }
    while sink.stats().acknowledged < records {
        std::thread::sleep(Duration::from_millis(1));
    }
    let with = (cpu_ns() - t1) as f64 / records as f64;
    let elapsed = wall.elapsed();
    let server_per = server
        .zip(server_before)
        .map(|(s, before)| (server_cpu_ns(s.child.id()) - before) as f64 / records as f64);
    let stats = sink.stats();
    let report = sink.shutdown(Duration::from_secs(60));
    let mode = if rate > 0 {
        format!("{rate} records/s")
    } else {
        "as fast as possible".into()
    };
    println!(
        "\n{records} records, {mode}: acknowledged {}, spooled {}, dropped {}, {:.0} records/s",
        report.sent,
        stats.spooled,
        report.dropped,
        records as f64 / elapsed.as_secs_f64()
    );
    println!("  with sink:   {with:.0} ns CPU/record (this process, all threads, publish to ack)");
    println!("  sink's own:  {:.0} ns CPU/record", with - without);
    if let Some(s) = server_per {
        println!("  nats-server: {s:.0} ns CPU/record");
    }
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let records = args.next().unwrap_or(100_000);
    let rate = args.next().unwrap_or(20_000);
    let server = match std::env::var("NATS_URL") {
        Ok(_) => None,
        Err(_) => Some(start_server()),
    };
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| server.as_ref().unwrap().url.clone());

    let t0 = cpu_ns();
    for i in 0..records {
        black_box(record(i));
    }
    let without = (cpu_ns() - t0) as f64 / records as f64;
    println!("without sink: {without:.0} ns CPU/record (building the line and msg id)");
    run(&url, server.as_ref(), 0, records, rate, without);
    run(&url, server.as_ref(), records, records, 0, without);
}
