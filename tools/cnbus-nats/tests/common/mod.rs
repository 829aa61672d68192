//! A nats-server of the test's own (127.0.0.1, a port the server picks, a temporary store),
//! killed when dropped, and a reader of the stream's messages.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Config as StreamConfig;
use bytes::Bytes;
use futures_util::StreamExt;

/// Generous: the host is busy.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
    js: bool,
}

impl NatsServer {
    /// Starts `nats-server -js` on 127.0.0.1 with a port it picks (`-p -1`, read back from its
    /// ports file). A missing nats-server fails the test.
    pub fn start(extra: &[&str]) -> NatsServer {
        NatsServer::start_with(extra, true)
    }

    /// As [`NatsServer::start`], with JetStream only if `js`.
    pub fn start_with(extra: &[&str], js: bool) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = NatsServer {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            js,
        };
        let child = server.spawn("-1");
        let pid = child.id();
        server.child = Some(child);
        let ports = server.dir.path().join(format!("nats-server_{pid}.ports"));
        let start = Instant::now();
        server.port = loop {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                if let Some(port) = parse_port(&text) {
                    break port;
                }
            }
            server.check_alive();
            assert!(
                start.elapsed() < DEADLINE,
                "nats-server wrote no ports file"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        server.wait_listening();
        server
    }

    fn spawn(&self, port: &str) -> Child {
        let store = self.store();
        let log = self.dir.path().join("server.log");
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", port]);
        if self.js {
            command.arg("-js").arg("-sd").arg(&store);
        }
        command
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .arg("-l")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (apt-get install nats-server; .ci/run does it)")
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn url(&self) -> String {
        local_url(self.port)
    }

    /// Creates the JetStream stream `name` with `subjects` on this server, as another user
    /// of the server would have (the bad-configuration cases).
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        self.create_stream_with(name, subjects, |_| {});
    }

    /// As [`NatsServer::create_stream`], with the limits `f` sets (an operator's stream:
    /// `max_message_size`, `max_messages`, `duplicate_window`, ...).
    pub fn create_stream_with(
        &self,
        name: &str,
        subjects: &[&str],
        f: impl FnOnce(&mut StreamConfig),
    ) {
        let mut config = StreamConfig {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        f(&mut config);
        runtime().block_on(async {
            let client = async_nats::connect(self.url()).await.unwrap();
            async_nats::jetstream::new(client)
                .create_stream(config)
                .await
                .unwrap();
        });
    }

    /// Changes the configuration of the stream `CNBUS_EVENTS` as an operator would.
    pub fn update_stream(&self, f: impl FnOnce(&mut StreamConfig)) {
        runtime().block_on(async {
            let client = async_nats::connect(self.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let mut config = js
                .get_stream("CNBUS_EVENTS")
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone();
            f(&mut config);
            js.update_stream(config).await.unwrap();
        });
    }

    fn check_alive(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                panic!("nats-server exited ({status}): {log}");
            }
        }
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            self.check_alive();
            assert!(
                start.elapsed() < DEADLINE,
                "nats-server does not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the server runs").id() as i32
    }

    /// Sends `signal` to the server (SIGSTOP: a server that stops reading and answering
    /// without closing its connections; SIGCONT resumes it).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the test's own child.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        loop {
            let child = self.spawn(&self.port.to_string());
            self.child = Some(child);
            // The port may still be held for a moment: retry while the server exits at once.
            std::thread::sleep(Duration::from_millis(200));
            if let Some(Ok(None)) = self.child.as_mut().map(|c| c.try_wait()) {
                break;
            }
            self.child = None;
            assert!(
                start.elapsed() < DEADLINE,
                "nats-server does not restart on {}",
                self.port
            );
        }
        self.wait_listening();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse_port(text: &str) -> Option<u16> {
    let at = text.find("127.0.0.1:")? + "127.0.0.1:".len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The URL of a server on 127.0.0.1 at `port`.
pub fn local_url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

/// A port nothing listens on (bound and released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
}

/// Every message of the stream, read with a JetStream pull consumer.
pub fn read_stream(url: &str, stream: &str) -> Vec<Stored> {
    read_stream_with(async_nats::ConnectOptions::new(), url, stream)
}

/// As [`read_stream`], connecting with `options` (credentials, TLS).
pub fn read_stream_with(
    options: async_nats::ConnectOptions,
    url: &str,
    stream: &str,
) -> Vec<Stored> {
    runtime().block_on(async {
        let client = options.connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(stream).await.unwrap();
        let total = stream.info().await.unwrap().state.messages;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while (out.len() as u64) < total {
            let message = tokio::time::timeout(DEADLINE, messages.next())
                .await
                .expect("stream read stalled")
                .unwrap()
                .unwrap();
            let msg_id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .expect("message without Nats-Msg-Id");
            out.push(Stored {
                subject: message.subject.to_string(),
                msg_id,
                payload: message.payload.clone(),
            });
        }
        out
    })
}

/// The stream's messages by msg id; panics on a msg id stored twice.
pub fn by_id(stored: &[Stored]) -> HashMap<String, Stored> {
    let mut map = HashMap::new();
    for s in stored {
        assert!(
            map.insert(s.msg_id.clone(), s.clone()).is_none(),
            "{} stored twice",
            s.msg_id
        );
    }
    map
}

pub fn line(i: usize) -> Bytes {
    Bytes::from(format!(
        "{{\"event\":\"fork\",\"seq\":{i},\"pad\":\"{}\"}}\n",
        "x".repeat(i % 50)
    ))
}

pub fn msg_id(i: usize) -> String {
    format!("host/{i}/fork")
}

/// Polls `f` until it is true (fails after [`DEADLINE`]).
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// For a sink started while its server was unreachable, with credentials the server refuses
/// once it is up: waits for the authorization error, checks that the `n` records published
/// stay spooled (nothing sent, nothing dropped, not connected), and returns the `Debug` text
/// of the counters and of the sink as they were before its shutdown (to look for secrets).
pub fn refused_after_an_unreachable_start(sink: cnbus_nats::NatsSink, n: u64) -> [String; 2] {
    wait_for("the authorization error", || {
        sink.stats()
            .last_error
            .is_some_and(|e| e.to_lowercase().contains("authorization"))
    });
    let stats = sink.stats();
    assert!(!stats.connected);
    assert_eq!((stats.acknowledged, stats.dropped), (0, 0));
    let texts = [format!("{stats:?}"), format!("{sink:?}")];
    let report = sink.shutdown(Duration::ZERO);
    assert_eq!((report.sent, report.unsent, report.dropped), (0, n, 0));
    texts
}

/// Starts a sink on `url` with host name `h` and spool `spool`, its other settings the
/// defaults.
pub fn start_sink(url: impl Into<String>, spool: &Path) -> cnbus_nats::NatsSink {
    cnbus_nats::NatsSink::start(cnbus_nats::Config::new(url, "h", spool)).expect("start")
}

/// The records of the dead-letter file in `spool`, in order (none without the file).
pub fn dead_letters(spool: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(spool.join(cnbus_nats::DEAD_LETTER_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Hands the records of `range` (`msg_id(i)`, `line(i)`, event `fork`) to the sink.
pub fn publish(sink: &cnbus_nats::NatsSink, range: std::ops::Range<usize>) {
    for i in range {
        sink.publish(cnbus_nats::Record {
            event: "fork",
            msg_id: msg_id(i),
            line: line(i),
        });
    }
}

/// A TCP proxy in front of a server (for a test to lose what the server says): what the
/// client sends goes through; what the server sends waits in the proxy while `hold` is on,
/// and goes on, in order, once it is off.
pub struct HoldingProxy {
    port: u16,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HoldingProxy {
    pub fn start(server_port: u16) -> HoldingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hold.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                forward(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    None,
                );
                forward(server, client, Some(h.clone()));
            }
        });
        HoldingProxy { port, hold }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Holds (true) or lets go (false) what the server sends.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    hold: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while hold
                .as_ref()
                .is_some_and(|h| h.load(std::sync::atomic::Ordering::SeqCst))
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
