//! Running the tools and examples as a user would, for the command-line tests (the root
//! package's `tests/cli.rs` and the tools' `tests/cli.rs`): a child with a hang guard that is
//! killed when dropped, its output line by line, and the checks every program must pass
//! (usage errors, `> /dev/full`, `| head`).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest any program here may take to do what the test waits for. Only a guard against
/// a hang (the old behaviour of several cases was to run on with defaults): never reached
/// by a passing test.
pub const HANG: Duration = Duration::from_secs(60);

/// Kills the child when dropped, so that a failing test leaves nothing running.
pub struct Running(pub Child);

impl Running {
    /// Starts `cmd` with no stdin and piped outputs: the child, its stdout lines as they
    /// come, and its whole stderr once it has exited.
    pub fn piped(
        cmd: &mut Command,
    ) -> (
        Self,
        mpsc::Receiver<String>,
        std::thread::JoinHandle<String>,
    ) {
        let mut r = Running(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let err = stderr_of(&mut r.0);
        let rx = lines(&mut r.0);
        (r, rx, err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sends a signal to our own child, which we have not reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the exit, at most `HANG`; `poke` runs between checks (to make events).
    pub fn wait(&mut self, what: &str, mut poke: impl FnMut()) -> ExitStatus {
        let end = Instant::now() + HANG;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "{what}: still running after {HANG:?}");
            poke();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the kernel shows the child stopped (after SIGSTOP).
    pub fn wait_stopped(&self) {
        let path = format!("/proc/{}/stat", self.pid());
        let end = Instant::now() + HANG;
        loop {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            match state {
                Some("T") => return,
                Some("Z") | None => panic!("the child exited instead of stopping: {stat}"),
                _ => {}
            }
            assert!(Instant::now() < end, "child did not stop: {stat}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `program args` to completion (with the hang guard), stdin empty, outputs captured.
pub fn run(program: &PathBuf, args: &[&OsStr]) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = Running(child);
    let (mut so, mut se) = (r.0.stdout.take().unwrap(), r.0.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let what = format!("{} {args:?}", program.display());
    let status = r.wait(&what, || {});
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn os(args: &[&str]) -> Vec<&'static OsStr> {
    args.iter()
        .map(|a| OsStr::new(Box::leak(a.to_string().into_boxed_str())))
        .collect()
}

/// `program args` must be a usage error: status 2, a message naming `expect`, no panic.
pub fn usage_error(program: &PathBuf, args: &[&OsStr], expect: &str) {
    let out = run(program, args);
    let err = String::from_utf8_lossy(&out.stderr);
    let name = program.file_name().unwrap().to_string_lossy();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name} {args:?} is not a usage error ({}): {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{name} {args:?} panicked: {err}");
    assert!(
        err.contains(expect),
        "{name} {args:?}: the message does not name {expect:?}: {err}"
    );
}

/// Reads a child's stdout line by line on a thread.
pub fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Every line still to come from a child that has exited: up to the end of its output
/// (the reader thread may lag behind the exit), at most `HANG` away.
pub fn rest(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let end = Instant::now() + HANG;
    let mut out = Vec::new();
    while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        out.push(l);
    }
    out
}

/// Collects a child's stderr on a thread (so that it never blocks writing it).
pub fn stderr_of(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut e = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        s
    })
}

/// Reads a child's stderr line by line on a thread.
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line that contains `what`, at most `HANG` away.
pub fn line_with(rx: &mpsc::Receiver<String>, what: &str) -> String {
    let end = Instant::now() + HANG;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(what) => return l,
            Ok(_) => {}
            Err(e) => panic!("no line with {what:?}: {e}"),
        }
    }
}

/// The number after `key` in `line` (`"overruns: 3;"` → 3).
pub fn count(line: &str, key: &str) -> u64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line}"))
}

pub fn true_pid() -> u32 {
    let mut c = Command::new("/bin/true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// The values no numeric option accepts: empty, negative, not a number, infinite, huge.
pub const BAD_NUMBERS: &[&str] = &[
    "",
    "-1",
    "-0.5",
    "NaN",
    "inf",
    "-inf",
    "1e30",
    "18446744073709551616",
    "99999999999999999999999999",
    "0x10000000000000000",
    "12abc",
];

/// `option value` (as `--option=value`, so that a leading `-` is a value), and `option`
/// with its value missing, are usage errors naming the option.
pub fn rejects_bad_numbers(bin: &PathBuf, options: &[&str]) {
    for opt in options {
        for v in BAD_NUMBERS {
            usage_error(bin, &os(&[&format!("{opt}={v}")]), opt);
        }
        usage_error(bin, &os(&[opt]), opt);
    }
}

pub fn dev_full() -> Stdio {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap()
        .into()
}

/// `bin args > /dev/full` must end with status 1 and say that writing failed.
pub fn fails_on_a_full_disk(bin: &PathBuf, args: &[&str], expect: &str) {
    let mut r = Running(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(dev_full())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = stderr_of(&mut r.0);
    let st = r.wait(&format!("{} > /dev/full", bin.display()), || {
        true_pid();
    });
    let err = err.join().unwrap();
    assert_eq!(
        st.code(),
        Some(1),
        "{} > /dev/full: {st}: {err}",
        bin.display()
    );
    assert!(err.contains(expect), "{}: {err}", bin.display());
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `bin args | head -1`: once the reader is gone the program must end quietly with 0.
pub fn quiet_on_a_closed_pipe(bin: &PathBuf, args: &[&str]) {
    let mut r = Running(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = stderr_of(&mut r.0);
    let mut out = BufReader::new(r.0.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "{}: no output", bin.display());
    drop(out);
    // Every process started makes events to write, and the write fails with EPIPE.
    let st = r.wait(&format!("{} | head -1", bin.display()), || {
        true_pid();
    });
    let err = err.join().unwrap();
    assert!(st.success(), "{} | head -1: {st}: {err}", bin.display());
    assert!(!err.contains("writing"), "{}: {err}", bin.display());
    assert!(!err.contains("panicked"), "{}: {err}", bin.display());
}

/// `bin --help` succeeds with clap's usage text; `--bogus`, a non-UTF-8 flag and each of
/// `cases` (arguments, what the message must name) are usage errors.
pub fn help_and_usage_errors(bin: &PathBuf, cases: &[(Vec<&str>, &str)]) {
    let name = bin.display();
    let help = run(bin, &os(&["--help"]));
    assert!(help.status.success(), "{name} --help: {}", help.status);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage:"), "{name} --help: {text}");
    usage_error(bin, &os(&["--bogus"]), "--bogus");
    usage_error(bin, &[OsStr::from_bytes(b"--\xff")], "");
    for (args, expect) in cases {
        usage_error(bin, &os(args), expect);
    }
}

/// `bin --bogus 2> /dev/full`: still a usage error (status 2), no panic.
pub fn usage_error_with_a_full_stderr(bin: &PathBuf) {
    let st = Command::new(bin)
        .arg("--bogus")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(dev_full())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "{}: {st}", bin.display());
}

/// `bin args 2> /dev/full` runs to its end and succeeds.
pub fn runs_with_a_full_stderr(bin: &PathBuf, args: &[&str]) {
    let mut r = Running(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(dev_full())
            .spawn()
            .unwrap(),
    );
    let st = r.wait(&format!("{} 2> /dev/full", bin.display()), || {});
    assert!(
        st.success(),
        "{} {args:?} 2> /dev/full: {st}",
        bin.display()
    );
}

/// `bin args > /dev/full`: status 1, the message `program: writing {what} to stdout: No
/// space left...`, no panic (help, version, completions and man pages included: clap alone
/// would exit 0 having written nothing, or panic in clap_complete).
pub fn full_stdout(bin: &PathBuf, program: &str, args: &[&str], what: &str) {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} > /dev/full: {err}");
    assert!(!err.contains("panicked"), "{args:?} > /dev/full: {err}");
    assert!(
        err.contains(&format!(
            "{program}: writing {what} to stdout: No space left"
        )),
        "{args:?} > /dev/full: {err}"
    );
}

/// Whether the main thread of `pid` sleeps in a `write(2)` (`/proc/PID/syscall` starts
/// with the number of the call it is blocked in).
pub fn blocked_in_write(pid: i32) -> bool {
    blocked_in(pid, &[libc::SYS_write])
}

/// Whether the main thread of `pid` sleeps in one of the system calls `calls`.
pub fn blocked_in(pid: i32, calls: &[libc::c_long]) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let sleeping = state
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        == Some("S");
    let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let first = call.split_whitespace().next().unwrap_or_default();
    sleeping && calls.iter().any(|c| first == c.to_string())
}

/// Makes events (our own short children) until `pid` is blocked writing them.
pub fn until_blocked_in_write(pid: i32) {
    for _ in 0..20_000 {
        if blocked_in_write(pid) {
            return;
        }
        true_pid();
    }
    panic!("the output of {pid} never blocked");
}

/// The master side of a pseudo-terminal that a child runs on ([`on_a_terminal`]). Dropping
/// it hangs the terminal up (a closed terminal window, a dropped ssh session): the kernel
/// makes every operation on the child's side fail with EIO and sends SIGHUP to the child,
/// the terminal's session leader.
pub struct Terminal(std::fs::File);

impl Terminal {
    /// Reads what the child wrote until a whole line has come (and whatever came with it).
    pub fn read_line(&mut self) -> String {
        let mut seen = Vec::new();
        while !seen.contains(&b'\n') {
            let mut buf = [0u8; 4096];
            let n = self.0.read(&mut buf).unwrap();
            assert!(n > 0, "no line on the terminal");
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
}

/// Starts `cmd` (stdin empty) as the session leader of a new pseudo-terminal, its stdout and
/// stderr on it and it its controlling terminal, as a tool run in the foreground of a
/// terminal window or an ssh session. Both ends are close-on-exec (`openpty`'s are not): no
/// other child of the test process holds the terminal open, so dropping the [`Terminal`]
/// hangs it up.
pub fn on_a_terminal(cmd: &mut Command) -> (Running, Terminal) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")
        .unwrap();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; `master` is an open pseudo-terminal master.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) };
    assert_eq!(r, 0, "unlock: {}", std::io::Error::last_os_error());
    // SAFETY: TIOCGPTPEER opens the slave side and returns a new descriptor (or -1).
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    assert!(slave >= 0, "slave: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    cmd.stdin(Stdio::null())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: only async-signal-safe calls between fork and exec: a new session, with the
    // pseudo-terminal (its stdout by then) as the controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(1, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = Running(cmd.spawn().unwrap());
    drop(slave);
    (r, Terminal(master))
}

/// Waits until the process `pid` has joined the proc connector's group (its connector
/// socket's port is its pid: its first netlink socket), then a moment more for the
/// subscription to take effect.
pub fn wait_subscribed(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let table = std::fs::read_to_string("/proc/net/netlink").unwrap_or_default();
        let joined = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == "11" && f[2] == pid.to_string() && f[3] == "00000001"
        });
        if joined {
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} did not join the proc connector's group");
}

/// Runs `bin args` (a process-event tool that ends by itself) with its stdout the write
/// end of a pipe opened again with `O_NONBLOCK`: a description of its own, as a shell or
/// node sharing the pipe would set it. Once it has subscribed, 300 `/bin/true` children
/// give it some 200 KiB of lines, more than the pipe holds. Returns its exit status, its
/// stdout and its stderr.
pub fn with_a_non_blocking_stdout(bin: &PathBuf, args: &[&str]) -> (ExitStatus, String, String) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let (mut reader, writer) = std::io::pipe().unwrap();
    let stdout = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
        .unwrap();
    drop(writer);
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscribed(child.id());
    for _ in 0..300 {
        Command::new("/bin/true").status().unwrap();
    }
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    let done = child.wait_with_output().unwrap();
    (
        done.status,
        String::from_utf8(out).unwrap(),
        String::from_utf8_lossy(&done.stderr).into_owned(),
    )
}

/// Runs `cmd` (stdin empty, stdout discarded) with its stderr the write end of a pipe
/// opened again with `O_NONBLOCK` (a description of its own, as a shell or node sharing the
/// pipe would set it) and already full: whatever the program writes to stderr meets
/// `EAGAIN` at first. Nothing is read until the program has exited or waits for its stderr
/// (sleeps in `poll`); then everything is. Returns its exit status and what it wrote to
/// stderr (after the filling).
pub fn with_a_full_non_blocking_stderr(cmd: &mut Command) -> (ExitStatus, String) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let (mut reader, writer) = std::io::pipe().unwrap();
    let mut stderr = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", writer.as_raw_fd()))
        .unwrap();
    drop(writer);
    let mut filled = 0usize;
    for chunk in [4096usize, 1] {
        loop {
            match stderr.write(&vec![b'.'; chunk]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    let mut r = Running(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    // The command keeps its stderr (our write end) until told otherwise.
    cmd.stderr(Stdio::null());
    let end = Instant::now() + HANG;
    while r.0.try_wait().unwrap().is_none()
        && !blocked_in(r.pid(), &[libc::SYS_poll, libc::SYS_ppoll])
    {
        assert!(
            Instant::now() < end,
            "{cmd:?}: still running after {HANG:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The child holds the only write end left: the read ends when it exits.
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    let status = r.wait(&format!("{cmd:?}"), || {});
    assert!(all.len() >= filled && all[..filled].iter().all(|&b| b == b'.'));
    (status, String::from_utf8_lossy(&all[filled..]).into_owned())
}
