use cnbus::proc::{EnrichConfig, Enricher, EventSet, ProcListener, Received};
use std::time::{Duration, Instant};

#[test]
fn probe_storm() {
    let mut l = ProcListener::builder()
        .events(EventSet::ALL)
        .recv_buffer(64 << 10)
        .open()
        .unwrap();
    let mut e = Enricher::with_config(EnrichConfig {
        capacity: 512,
        read_at_fork: false,
        ..EnrichConfig::default()
    });
    let mut storm = std::process::Command::new("stress-ng")
        .args(["--fork", "2", "--timeout", "4", "--quiet"])
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut max_cached = 0;
    let mut losses = 0;
    while start.elapsed() < Duration::from_secs(6) {
        match l.recv_timeout(Some(Duration::from_millis(50))).unwrap() {
            Some(Received::Event(ev)) => {
                e.enrich(&ev);
                max_cached = max_cached.max(e.stats().cached);
            }
            Some(Received::Lost(_)) => {
                losses += 1;
                e.note_loss();
            }
            None => {}
        }
    }
    storm.wait().unwrap();
    eprintln!("max cached {max_cached} losses {losses} {:?}", e.stats());
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    eprintln!(
        "{}",
        status
            .lines()
            .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
