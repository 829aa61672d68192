//! The enricher against a real container runtime: runc runs busybox containers with 64-hex
//! ids; a listener + enricher watches their processes. The container, the scenario and the
//! checks are in `tests/common/runc.rs` (shared with proctrace's and the agent's tests).
//!
//! Needs `runc` and a static `busybox` (Debian `runc`, `busybox-static`; `.ci/run` installs
//! them). Without them the test is skipped, except under CI (`CI` set), where that is a
//! failure.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnbus::proc::{Enricher, EventBody, EventSet, ProcListener, Received};
use common::kernel_socket;
use common::runc::{check, run_scenario, tools, Rec};

/// Every fork, exec and exit with what the enricher said, from a listener thread, until
/// stopped.
struct Recorder {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Rec>>,
}

impl Recorder {
    fn start(mut l: ProcListener) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut e = Enricher::new();
            let mut got = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match l.recv_timeout(Some(Duration::from_millis(50))).unwrap() {
                    Some(Received::Event(ev)) => {
                        let Some(info) = e.enrich(&ev) else {
                            continue;
                        };
                        let task = ev.task().unwrap();
                        let parent = match ev.body {
                            EventBody::Fork { parent, .. } => Some(parent.tgid),
                            _ => None,
                        };
                        got.push(Rec {
                            kind: ev.kind(),
                            pid: task.tgid,
                            thread: task.is_thread(),
                            parent,
                            info,
                        });
                    }
                    Some(Received::Lost(loss)) => {
                        eprintln!("note: {loss:?}");
                        e.note_loss();
                    }
                    None => {}
                }
            }
            eprintln!("enricher: {:?}", e.stats());
            got
        });
        Recorder { stop, thread }
    }

    fn finish(self) -> Vec<Rec> {
        // Let the last events arrive.
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn container_processes_carry_their_container_id() {
    let Some((runc, busybox)) = tools("runc_container") else {
        return;
    };
    if kernel_socket("runc_container").is_none() {
        return;
    }
    let l = ProcListener::builder()
        .events(EventSet::FORK | EventSet::EXEC | EventSet::EXIT)
        .open()
        .unwrap();
    let rec = Recorder::start(l);
    let sc = run_scenario(&runc, &busybox);
    check(&rec.finish(), &sc);
}
