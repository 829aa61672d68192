//! The dead-letter file: records JetStream refuses for good (or the server's `max_payload`
//! makes unsendable), kept for an operator instead of being sent again forever.
//!
//! `<spool dir>/dead-letter.jsonl`, appended: one JSON object per record,
//! `{"msg_id":…,"subject":…,"reason":…,"line":…}`, `line` the record's line as a JSON string
//! (with its newline); a line that is not UTF-8 (never the agent's) is kept as `line_hex`
//! instead, its bytes in hex, unchanged.
//! A last line left unfinished (a crash in the middle of a write) is cut off when the file
//! is opened. Never read back by the sink while it runs: once the cause is fixed (a stream
//! limit raised, say), an operator moves the records back into the spool with
//! [`requeue_dead_letters`] (`cnbus-agent requeue-dead-letters`), and the next start sends
//! them with their own msg ids and subjects. Capped: past
//! [`Config::dead_letter_max_bytes`] a refused record is only counted as dropped.
//!
//! [`Config::dead_letter_max_bytes`]: crate::Config::dead_letter_max_bytes

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::spool::{self, NewSegments};
use crate::{sanitize_token, Item, SinkError, MAX_HOST_TOKEN, MAX_SUBJECT, SUBJECT_PREFIX};

/// The file's name in the spool directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// What the `reason` of a record refused after an unacknowledged publish of it says (it may
/// be in the stream: counted as `maybe_stored`); a requeue keeps that for the next refusal.
pub(crate) const MAYBE_STORED_NOTE: &str =
    "an earlier publish of it was not acknowledged: it may be in the stream";

pub(crate) struct DeadLetter {
    path: PathBuf,
    file: Option<File>,
    /// The file's size (what an earlier run left counts against the cap).
    bytes: u64,
    cap: u64,
}

impl DeadLetter {
    pub(crate) fn new(dir: &Path, cap: u64) -> DeadLetter {
        let path = dir.join(DEAD_LETTER_FILE);
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        DeadLetter {
            path,
            file: None,
            bytes,
            cap,
        }
    }

    /// Appends `item` with the subject it was sent to and why it was refused, in one
    /// `write(2)`. `Ok(false)`: the file is at its cap, nothing written.
    pub(crate) fn keep(&mut self, item: &Item, subject: &str, reason: &str) -> io::Result<bool> {
        let mut record = serde_json::json!({
            "msg_id": item.msg_id,
            "subject": subject,
            "reason": reason,
        });
        // The record's bytes unchanged: as text when they are UTF-8, else in hex (a lossy
        // conversion would keep something else than what was refused).
        match std::str::from_utf8(&item.line) {
            Ok(text) => record["line"] = text.into(),
            Err(_) => record["line_hex"] = hex(&item.line).into(),
        }
        let mut record = serde_json::to_vec(&record).map_err(io::Error::other)?;
        record.push(b'\n');
        self.follow_path();
        if self.file.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&self.path)?;
            self.bytes = cut_partial_line(&mut file)?;
            self.file = Some(file);
        }
        if self.bytes + record.len() as u64 > self.cap {
            return Ok(false);
        }
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(&record) {
            Ok(()) => {
                self.bytes += record.len() as u64;
                Ok(true)
            }
            Err(e) => {
                // A partial record (disk full) is cut off, so that the file stays one record
                // per line.
                if let Ok(len) = file.metadata().map(|m| m.len()) {
                    if len > self.bytes {
                        let _ = file.set_len(self.bytes);
                    }
                }
                // Opened again for the next record, which cuts off what is left of this one
                // if the cut above failed.
                self.file = None;
                Err(e)
            }
        }
    }

    /// Keeps the open file only while the path still names it, and counts its size as it is
    /// now: an operator who took the records may have moved the file away, removed it or
    /// emptied it. (Appending to a removed file would lose every record written after,
    /// reported as kept; a file emptied would stay "full" for the cap.)
    fn follow_path(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(file) = &self.file else { return };
        match (std::fs::metadata(&self.path), file.metadata()) {
            (Ok(named), Ok(open)) if (named.dev(), named.ino()) == (open.dev(), open.ino()) => {
                self.bytes = open.len();
            }
            _ => self.file = None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// `bytes` in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The bytes of `hex` (an even number of hex digits, either case); `None` if it is not that.
fn unhex(hex: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| (b as char).to_digit(16);
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| Some((digit(pair[0])? << 4 | digit(pair[1])?) as u8))
        .collect()
}

/// The dead-letter file's name while [`requeue_dead_letters`] moves its records into the
/// spool: renamed so once every record is on disk in new (`.tmp`) segments, removed once
/// they are all renamed into the spool. Found at a start (the next requeue, a sink's), it
/// means that a crash interrupted that step, which is then finished
/// (`spool::finish_commit`).
pub(crate) const REQUEUING_FILE: &str = "dead-letter.jsonl.requeuing";

/// Where [`requeue_dead_letters`] keeps the lines of the dead-letter file that are no
/// record (in the spool directory, appended, each line unchanged and ended by a newline).
pub const DEAD_LETTER_MALFORMED_FILE: &str = "dead-letter.malformed";

/// What [`requeue_dead_letters`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Records moved into the spool, each with its msg id, subject and line unchanged.
    pub requeued: u64,
    /// Lines that are no record (a torn last line, not JSON, a field missing or unusable),
    /// appended unchanged to [`DEAD_LETTER_MALFORMED_FILE`].
    pub malformed: u64,
    /// Why the first of those is no record, with its line number.
    pub first_malformed: Option<String>,
    /// Spool segments written.
    pub segments: u64,
}

/// Moves every record of the dead-letter file of spool directory `spool_dir`
/// ([`DEAD_LETTER_FILE`]) back into the spool, for the next [`NatsSink::start`] on that
/// directory to send (after what the spool already holds, before new records). Each record
/// keeps its msg id (the `Nats-Msg-Id`: de-duplicated by the stream as the first time), its
/// subject (whatever host name the next start has) and its line byte for byte (`line_hex`
/// too). For an operator who fixed why they were refused (raised the stream's
/// `max_msg_size` or the server's `max_payload`, say): a record refused again goes back to
/// the dead-letter file.
///
/// Lines that are no record (a torn last line left by a crash, anything that is not one JSON
/// object with a string `msg_id`, a `cnbus.events.<host>.<event>` `subject` and exactly one
/// of `line` or `line_hex`) are never dropped: counted ([`Requeued::malformed`]) and
/// appended, unchanged, to [`DEAD_LETTER_MALFORMED_FILE`]. The dead-letter file is removed
/// at the end. A missing dead-letter file requeues nothing.
///
/// Crash-safe and idempotent: the records go into new spool segments, each written aside
/// (`.tmp`) and synced as it fills; only once every record is written is the dead-letter
/// file renamed (the commit, synced) to a name of its own (`dead-letter.jsonl.requeuing`),
/// then the segments renamed into the spool, then that file removed. A crash before the
/// commit (nearly all the time a requeue takes) leaves the spool as it was (the `.tmp`
/// segments are removed by the next requeue); a crash after it is finished by the next
/// requeue or the next sink start on the directory, which renames the `.tmp` segments left
/// into the spool and removes the renamed file. Either way each record is queued exactly
/// once: none is lost, none queued twice (before, a crash between the first rename and the
/// removal left the records both in the spool and in the dead-letter file, and a second
/// requeue queued them again).
///
/// Errors ([`SinkError::Spool`]): the directory is missing or in use (locked by a running
/// sink, an agent), or a file operation failed (disk full, say); the dead-letter file is
/// then left as it was, and what this requeue had done is undone: its segments removed,
/// the lines it appended to [`DEAD_LETTER_MALFORMED_FILE`] cut off, the file removed if it
/// made it (a sink started next, or a second requeue, would otherwise send those records a
/// second time). The exception: an error after the commit (renaming a segment, removing
/// the renamed file, syncing the directory) leaves the requeue decided, finished as after
/// a crash by the next requeue or sink start.
///
/// [`NatsSink::start`]: crate::NatsSink::start
pub fn requeue_dead_letters(spool_dir: &Path) -> Result<Requeued, SinkError> {
    requeue(spool_dir, MAX_LINE)
}

/// The longest line of the dead-letter file that can be a record: a line of the largest
/// spool payload (64 MiB) with every byte escaped as `\u00XX`, and room for the rest.
/// A longer line is kept aside without ever being whole in memory.
const MAX_LINE: usize = 6 * (64 << 20) + (1 << 20);

/// [`requeue_dead_letters`], lines over `max_line` bytes kept aside as they are read.
fn requeue(spool_dir: &Path, max_line: usize) -> Result<Requeued, SinkError> {
    let ctx = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SinkError::Spool { op, path, source }
    };
    // No sink on the directory meanwhile: it would append to the file being emptied.
    let _lock = spool::lock_dir(spool_dir)?;
    // A requeue a crash interrupted after its commit is finished first.
    spool::finish_commit(spool_dir)?;
    let path = spool_dir.join(DEAD_LETTER_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Requeued::default()),
        Err(e) => return Err(ctx("open dead-letter file", &path)(e)),
    };
    let mut reader = io::BufReader::new(file);
    let mut segments = NewSegments::new(spool_dir, spool::DEFAULT_SEGMENT_BYTES)?;
    let mut aside = Aside {
        path: spool_dir.join(DEAD_LETTER_MALFORMED_FILE),
        file: None,
    };
    let mut done = Requeued::default();
    let requeuing = spool_dir.join(REQUEUING_FILE);
    let written = move_records(
        &mut reader,
        &path,
        max_line,
        &mut segments,
        &mut aside,
        &mut done,
    )
    .and_then(|()| aside.sync())
    // Every record on disk in `.tmp` segments (and every other line kept aside) before
    // the commit.
    .and_then(|()| segments.seal())
    // The commit: the dead-letter file renamed (on disk) to the marker that the `.tmp`
    // segments belong in the spool. A crash from here on is finished by the next requeue
    // or sink start (`spool::finish_commit`); none finds the records a second time.
    .and_then(|()| {
        std::fs::rename(&path, &requeuing).map_err(ctx("rename dead-letter file", &path))
    })
    .and_then(|()| {
        spool::crash_point(UNDO_FAILS, spool_dir)
            .and_then(|()| spool::sync_dir(spool_dir))
            .or_else(|e| {
                // Undone (the file back under its name, the segments removed below), or,
                // if that fails, the commit stands: the renamed file says that the `.tmp`
                // segments belong in the spool, so they must stay (removed, the next start
                // would take the renamed file for a finished requeue and remove it, every
                // record with it).
                match spool::crash_point(UNDO_FAILS, &requeuing)
                    .and_then(|()| std::fs::rename(&requeuing, &path).map_err(ctx("rename", &path)))
                {
                    Ok(()) => Err(e),
                    Err(_) => Ok(()),
                }
            })
    });
    if let Err(e) = written {
        // Nothing done: the dead-letter file is still there, so the records put in
        // segments so far and the lines kept aside so far come out again.
        segments.abandon();
        aside.abandon();
        return Err(e);
    }
    spool::crash_point("after the commit", &requeuing)?;
    segments.commit()?;
    spool::crash_point("after the segments renamed", &requeuing)?;
    std::fs::remove_file(&requeuing).map_err(ctx("remove dead-letter file", &requeuing))?;
    done.segments = segments.segments;
    spool::sync_dir(spool_dir)?;
    Ok(done)
}

/// The test point ([`spool::crash_point`]) where the sync of the commit fails and so does
/// its undoing.
const UNDO_FAILS: &str = "the commit's sync and its undoing fail";

/// [`DEAD_LETTER_MALFORMED_FILE`] while a requeue appends to it: opened at the first line
/// kept aside, with its length then (`None`: made by this requeue), to cut back to (or to
/// remove) if the requeue fails.
struct Aside {
    path: PathBuf,
    file: Option<(File, Option<u64>)>,
}

impl Aside {
    fn keep(&mut self, line: &[u8]) -> Result<(), SinkError> {
        let ctx = |op| {
            let path = self.path.clone();
            move |source| SinkError::Spool { op, path, source }
        };
        if self.file.is_none() {
            let made = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&self.path);
            self.file = Some(match made {
                Ok(file) => (file, None),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let file = OpenOptions::new()
                        .append(true)
                        .open(&self.path)
                        .map_err(ctx("open"))?;
                    let len = file.metadata().map_err(ctx("open"))?.len();
                    (file, Some(len))
                }
                Err(e) => return Err(ctx("open")(e)),
            });
        }
        let (out, _) = self.file.as_mut().expect("opened above");
        out.write_all(line).map_err(ctx("write"))
    }

    fn sync(&self) -> Result<(), SinkError> {
        match &self.file {
            Some((file, _)) => file.sync_all().map_err(|source| SinkError::Spool {
                op: "sync",
                path: self.path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Cuts the file back to what it held before, or removes it if this requeue made it
    /// (best effort: the requeue fails anyway).
    fn abandon(&mut self) {
        match self.file.take() {
            Some((file, Some(len))) => {
                let _ = file.set_len(len).and_then(|()| file.sync_all());
            }
            Some((_, None)) => {
                let _ = std::fs::remove_file(&self.path);
            }
            None => {}
        }
    }
}

/// Reads the dead-letter file at `path` through `reader` to its end: records into
/// `segments`, other lines into `aside`, counted in `done`. A line over `max_line` bytes
/// (no record) goes aside piece by piece, never whole in memory.
fn move_records(
    reader: &mut impl BufRead,
    path: &Path,
    max_line: usize,
    segments: &mut NewSegments,
    aside: &mut Aside,
    done: &mut Requeued,
) -> Result<(), SinkError> {
    let read_error = |source| SinkError::Spool {
        op: "read dead-letter file",
        path: path.to_owned(),
        source,
    };
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        (&mut *reader)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        if line.is_empty() {
            break;
        }
        let record = match line.strip_suffix(b"\n") {
            _ if line.len() > max_line => Err(format!("longer than {max_line} bytes")),
            Some(text) => parse_record(text),
            // Even one that parses: the write was cut short, and the record is still in
            // the spool (released only once its line is written).
            None => Err("torn: no newline at its end (a write cut short)".to_owned()),
        };
        match record {
            Ok(item) => {
                segments.push(&item)?;
                done.requeued += 1;
            }
            Err(why) => {
                done.malformed += 1;
                done.first_malformed
                    .get_or_insert_with(|| format!("line {number}: {why}"));
                if line.len() > max_line && !line.ends_with(b"\n") {
                    // The rest of that line, up to its newline (or the end of the file).
                    aside.keep(&line)?;
                    loop {
                        let buf = reader.fill_buf().map_err(read_error)?;
                        if buf.is_empty() {
                            aside.keep(b"\n")?;
                            break;
                        }
                        match buf.iter().position(|&b| b == b'\n') {
                            Some(i) => {
                                aside.keep(&buf[..=i])?;
                                reader.consume(i + 1);
                                break;
                            }
                            None => {
                                let n = buf.len();
                                aside.keep(buf)?;
                                reader.consume(n);
                            }
                        }
                    }
                    continue;
                }
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                aside.keep(&line)?;
            }
        }
    }
    Ok(())
}

/// One line of the dead-letter file (without its newline) as the spool record it was, or
/// why it is none.
fn parse_record(text: &[u8]) -> Result<Item, String> {
    let value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let record = value.as_object().ok_or("not a JSON object")?;
    let field = |name: &'static str| record.get(name).map(|v| v.as_str().ok_or(name));
    let msg_id = match field("msg_id") {
        Some(Ok(id)) if !id.is_empty() && !id.chars().any(char::is_control) => id,
        _ => return Err("no msg_id (a non-empty string without control characters)".into()),
    };
    let Some(Ok(subject)) = field("subject") else {
        return Err("no subject string".into());
    };
    let event = subject_event(subject).ok_or_else(|| {
        format!("subject {subject:?} is not one the sink publishes to ({SUBJECT_PREFIX}.<host>.<event>)")
    })?;
    let line = match (field("line"), field("line_hex")) {
        (Some(Ok(text)), None) => Bytes::copy_from_slice(text.as_bytes()),
        (None, Some(Ok(hex))) => Bytes::from(unhex(hex).ok_or("line_hex is not hex")?),
        _ => return Err("not exactly one of line and line_hex (a string)".into()),
    };
    // A record that may be in the stream is counted so again if it is refused again.
    let sent_before = matches!(field("reason"), Some(Ok(r)) if r.contains(MAYBE_STORED_NOTE));
    let item = Item {
        event,
        msg_id: msg_id.to_owned(),
        line,
        origin: None,
        sent_before,
        subject: Some(subject.to_owned()),
    };
    spool::check_fits(&item).map_err(|e| e.to_string())?;
    Ok(item)
}

/// The event token of `subject` if it is one the sink publishes to,
/// `cnbus.events.<host>.<event>` with both tokens as [`sanitize_token`] leaves them, at most
/// [`MAX_SUBJECT`] bytes (the sink refuses a longer one for good when it publishes).
fn subject_event(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(SUBJECT_PREFIX)?.strip_prefix('.')?;
    let (host, event) = rest.split_once('.')?;
    let token = |t: &str| !t.is_empty() && sanitize_token(t) == t;
    (token(host) && token(event) && host.len() <= MAX_HOST_TOKEN && subject.len() <= MAX_SUBJECT)
        .then(|| event.to_owned())
}

/// Cuts off an unfinished last line (a run that crashed, or lost power, in the middle of a
/// write), so that the next record starts a line of its own instead of being glued to the
/// fragment (one line that parses as no record). The fragment is no record: the sink
/// releases a record from the spool only after its line is written, so that record is sent
/// again, refused again, and written whole. Returns the file's length.
fn cut_partial_line(file: &mut File) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_lines_and_the_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let item = |line: &'static str| Item {
            event: "fork".into(),
            msg_id: "m\"1".into(),
            line: bytes::Bytes::from_static(line.as_bytes()),
            origin: None,
            sent_before: false,
            subject: None,
        };
        let mut dl = DeadLetter::new(dir.path(), 200);
        assert!(dl
            .keep(&item("{\"a\":1}\n"), "cnbus.events.h.fork", "too big")
            .unwrap());
        let text = std::fs::read_to_string(dl.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["msg_id"], "m\"1");
        assert_eq!(v["line"], "{\"a\":1}\n");
        assert_eq!(v["reason"], "too big");
        // Over the cap: refused, the file unchanged.
        let long: &'static str = Box::leak("x".repeat(300).into_boxed_str());
        assert!(!dl.keep(&item(long), "s", "r").unwrap());
        assert_eq!(std::fs::read_to_string(dl.path()).unwrap(), text);
        // A new run counts what is there against the cap.
        let again = DeadLetter::new(dir.path(), 200);
        assert_eq!(again.bytes, text.len() as u64);
    }

    /// Regression: a line that is not UTF-8 was kept with its bad bytes replaced (U+FFFD),
    /// so the dead-letter file held something else than what was refused, and the record
    /// was gone from the spool. Now such a line is kept in hex, byte for byte; a UTF-8 line
    /// (newlines, quotes, control characters) as text, unchanged.
    #[test]
    fn every_line_is_kept_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        let lines: [&'static [u8]; 3] = [b"a\xff\xfe\x00b\n", "é\"\\\n\x01x\n".as_bytes(), b""];
        for line in lines {
            let item = Item {
                event: "exec".into(),
                msg_id: "m".into(),
                line: bytes::Bytes::from_static(line),
                origin: None,
                sent_before: false,
                subject: None,
            };
            assert!(dl.keep(&item, "s", "r").unwrap());
        }
        let text = std::fs::read_to_string(dl.path()).unwrap();
        let back: Vec<Vec<u8>> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                match (v["line"].as_str(), v["line_hex"].as_str()) {
                    (Some(t), None) => t.as_bytes().to_vec(),
                    (None, Some(h)) => (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                        .collect(),
                    _ => panic!("{l}"),
                }
            })
            .collect();
        assert_eq!(back, lines.map(<[u8]>::to_vec));
    }

    /// Regression: the file was opened once and written through that handle for good, so
    /// after an operator took the records away (moved or removed the file) every later
    /// record went into a file no one can open again, counted and reported as kept; and a
    /// file emptied stayed at its cap. Now the path is followed: a new file is made, and the
    /// cap counts what is there.
    #[test]
    fn a_file_moved_away_removed_or_emptied_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let item = |id: &str| Item {
            event: "exec".into(),
            msg_id: id.into(),
            line: bytes::Bytes::from_static(b"{\"event\":\"exec\"}\n"),
            origin: None,
            sent_before: false,
            subject: None,
        };
        let ids = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["msg_id"].to_string()
                })
                .collect()
        };
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        assert!(dl.keep(&item("a"), "s", "r").unwrap());
        // Room for two records, not three.
        let one = std::fs::metadata(dl.path()).unwrap().len();
        dl.cap = 2 * one + one / 2;
        let taken = dir.path().join("taken.jsonl");
        std::fs::rename(dl.path(), &taken).unwrap();
        assert!(dl.keep(&item("b"), "s", "r").unwrap());
        assert_eq!(ids(&taken), ["\"a\""]);
        assert_eq!(ids(dl.path()), ["\"b\""]);
        std::fs::remove_file(dl.path()).unwrap();
        assert!(dl.keep(&item("c"), "s", "r").unwrap());
        assert_eq!(ids(dl.path()), ["\"c\""]);
        // At the cap, then emptied by an operator.
        assert!(dl.keep(&item("d"), "s", "r").unwrap());
        assert!(!dl.keep(&item("e"), "s", "r").unwrap());
        std::fs::File::create(dl.path()).unwrap();
        assert!(dl.keep(&item("f"), "s", "r").unwrap());
        assert_eq!(ids(dl.path()), ["\"f\""]);
    }

    /// Regression: a run that crashed in the middle of writing a record left a partial last
    /// line, and the next run appended its first record to it: one line that parses as
    /// nothing, the record in it lost to any reader of the file. Now the fragment is cut off
    /// when the file is opened (the record it was is still in the spool, and is written
    /// again whole when refused again), and every line is one record.
    #[test]
    fn a_partial_line_left_by_a_crash_is_cut_off_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let item = Item {
            event: "exec".into(),
            msg_id: "h-1-2".into(),
            line: bytes::Bytes::from_static(b"{\"event\":\"exec\"}\n"),
            origin: None,
            sent_before: false,
            subject: None,
        };
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        assert!(dl.keep(&item, "s", "r").unwrap());
        let whole = std::fs::read(dl.path()).unwrap();
        drop(dl);
        // The crash: the start of a second record, long enough to span read chunks.
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"msg_id\":\"h-1-3\",\"subject\":\"");
        torn.extend(std::iter::repeat_n(b'x', 10_000));
        std::fs::write(dir.path().join(DEAD_LETTER_FILE), &torn).unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        assert!(dl.keep(&item, "s", "r").unwrap());
        let text = std::fs::read_to_string(dl.path()).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one record: {e}: {line:.200}"));
            assert_eq!(v["msg_id"], "h-1-2");
        }
        assert_eq!(text.lines().count(), 2);
        assert_eq!(dl.bytes, text.len() as u64);
        // A file that is nothing but a fragment is emptied.
        std::fs::write(dl.path(), b"{\"msg_id\"").unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        assert!(dl.keep(&item, "s", "r").unwrap());
        assert_eq!(std::fs::read(dl.path()).unwrap(), whole);
    }
}

#[cfg(test)]
mod requeue_tests {
    use super::*;
    use crate::spool::Spool;

    fn item(id: &str, event: &str, line: &'static [u8]) -> Item {
        Item {
            event: event.into(),
            msg_id: id.into(),
            line: Bytes::from_static(line),
            origin: None,
            sent_before: false,
            subject: None,
        }
    }

    /// What the spool in `dir` holds, oldest first: (msg id, subject, line, sent before).
    fn spooled(dir: &Path) -> Vec<(String, Option<String>, Vec<u8>, bool)> {
        let (mut spool, found) = Spool::open(dir, 1 << 30, 1 << 20).unwrap();
        assert_eq!(found.torn_tails, 0);
        let mut out = Vec::new();
        loop {
            let items = spool.take_segment().unwrap();
            if items.is_empty() {
                break;
            }
            for it in items {
                out.push((it.msg_id, it.subject, it.line.to_vec(), it.sent_before));
            }
        }
        out
    }

    fn dead_letter_path(dir: &Path) -> PathBuf {
        dir.join(DEAD_LETTER_FILE)
    }

    /// Records kept by the sink's own writer come back into the spool with their msg id,
    /// subject and bytes (a non-UTF-8 line through `line_hex`), in order, after what the
    /// spool held; the dead-letter file is gone, nothing is malformed.
    #[test]
    fn records_go_back_into_the_spool_with_their_ids_subjects_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // A record the spool held already: the requeued ones come after it.
        {
            let (mut spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            assert!(spool
                .append(&item("old", "fork", b"{\"old\":1}\n"), false)
                .unwrap());
        }
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        let lines: [&'static [u8]; 3] = [b"{\"a\":1}\n", b"a\xff\xfe\x00b\n", b""];
        for (i, line) in lines.iter().enumerate() {
            let it = item(&format!("h-{i}"), "exec", line);
            assert!(dl
                .keep(&it, &format!("cnbus.events.host{i}.exec"), "too big")
                .unwrap());
        }
        // Refused after an unacknowledged publish: still "may be stored" once requeued.
        let maybe = format!("sealed ({MAYBE_STORED_NOTE})");
        assert!(dl
            .keep(&item("h-3", "exit", b"{}\n"), "cnbus.events.h.exit", &maybe)
            .unwrap());
        drop(dl);
        let text = std::fs::read_to_string(dead_letter_path(dir.path())).unwrap();
        assert!(text.contains("line_hex"), "{text}");
        let done = requeue_dead_letters(dir.path()).unwrap();
        assert_eq!((done.requeued, done.malformed, done.segments), (4, 0, 1));
        assert_eq!(done.first_malformed, None);
        assert!(!dead_letter_path(dir.path()).exists());
        assert!(!dir.path().join(DEAD_LETTER_MALFORMED_FILE).exists());
        let mut want = vec![("old".to_owned(), None, b"{\"old\":1}\n".to_vec(), false)];
        for (i, line) in lines.iter().enumerate() {
            let subject = format!("cnbus.events.host{i}.exec");
            want.push((format!("h-{i}"), Some(subject), line.to_vec(), false));
        }
        want.push((
            "h-3".into(),
            Some("cnbus.events.h.exit".into()),
            b"{}\n".to_vec(),
            true,
        ));
        assert_eq!(spooled(dir.path()), want);
    }

    /// A torn last line and lines that are no record are counted and kept aside byte for
    /// byte, never dropped; the records around them are requeued.
    #[test]
    fn malformed_and_torn_lines_are_counted_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let good = |id: &str| {
            format!(
                "{{\"msg_id\":\"{id}\",\"subject\":\"cnbus.events.h.fork\",\"reason\":\"r\",\"line\":\"x\\n\"}}\n"
            )
            .into_bytes()
        };
        let bad: [&[u8]; 12] = [
            b"not json\n",
            b"[1,2]\n",
            b"\n",
            b"{\"subject\":\"cnbus.events.h.fork\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"\",\"subject\":\"cnbus.events.h.fork\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"a\\r\\nX: y\",\"subject\":\"cnbus.events.h.fork\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"other.h.fork\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"cnbus.events.h h.fork\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"cnbus.events.h.>\",\"line\":\"x\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"cnbus.events.h.fork\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"cnbus.events.h.fork\",\"line\":\"x\",\"line_hex\":\"78\"}\n",
            b"{\"msg_id\":\"m\",\"subject\":\"cnbus.events.h.fork\",\"line_hex\":\"7g\"}\n",
        ];
        let mut file = good("g-0");
        for b in bad {
            file.extend_from_slice(b);
        }
        file.extend(good("g-1"));
        // Not UTF-8 at all.
        file.extend_from_slice(b"\xff\xfe\n");
        // The crash: a last line cut short, even one that parses.
        let torn = &good("g-2")[..];
        file.extend_from_slice(&torn[..torn.len() - 1]);
        std::fs::write(dead_letter_path(dir.path()), &file).unwrap();
        let done = requeue_dead_letters(dir.path()).unwrap();
        assert_eq!((done.requeued, done.malformed), (2, bad.len() as u64 + 2));
        let first = done.first_malformed.unwrap();
        assert!(first.starts_with("line 2: not JSON"), "{first}");
        let ids: Vec<_> = spooled(dir.path()).into_iter().map(|s| s.0).collect();
        assert_eq!(ids, ["g-0", "g-1"]);
        let mut kept = Vec::new();
        for b in bad {
            kept.extend_from_slice(b);
        }
        kept.extend_from_slice(b"\xff\xfe\n");
        kept.extend_from_slice(torn);
        let aside = dir.path().join(DEAD_LETTER_MALFORMED_FILE);
        assert_eq!(std::fs::read(&aside).unwrap(), kept);
        assert!(!dead_letter_path(dir.path()).exists());
        // Appended: a second run keeps what the first kept aside.
        std::fs::write(dead_letter_path(dir.path()), b"junk\n").unwrap();
        let done = requeue_dead_letters(dir.path()).unwrap();
        assert_eq!((done.requeued, done.malformed), (0, 1));
        kept.extend_from_slice(b"junk\n");
        assert_eq!(std::fs::read(&aside).unwrap(), kept);
    }

    /// No dead-letter file, or an empty one: nothing requeued, no spool file made; a spool
    /// directory that does not exist is an error (a mistyped --spool), not "nothing".
    #[test]
    fn a_missing_or_empty_file_requeues_nothing_and_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            requeue_dead_letters(dir.path()).unwrap(),
            Requeued::default()
        );
        std::fs::write(dead_letter_path(dir.path()), b"").unwrap();
        assert_eq!(
            requeue_dead_letters(dir.path()).unwrap(),
            Requeued::default()
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("nope");
        let e = requeue_dead_letters(&missing).unwrap_err().to_string();
        assert!(
            e.contains("open spool directory") && e.contains("nope"),
            "{e}"
        );
        assert!(!missing.exists());
    }

    /// A running sink holds the spool's lock: the requeue refuses, as a second sink would,
    /// and leaves the dead-letter file as it was.
    #[test]
    fn a_spool_in_use_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        assert!(dl
            .keep(&item("m", "fork", b"x\n"), "cnbus.events.h.fork", "r")
            .unwrap());
        let before = std::fs::read(dl.path()).unwrap();
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let e = requeue_dead_letters(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        assert_eq!(std::fs::read(dl.path()).unwrap(), before);
        drop(spool);
        assert_eq!(requeue_dead_letters(dir.path()).unwrap().requeued, 1);
    }

    /// Regression: a crash in the last step of a requeue, after the first segment was
    /// renamed into the spool and before the dead-letter file was removed, left the records
    /// both in the spool and in the dead-letter file; the next requeue queued them a second
    /// time (the same msg ids: only the stream's duplicate window, 2 min, hid it). Now the
    /// dead-letter file is renamed aside first (the commit), and the next requeue or sink
    /// start finishes the step: at every crash point, each record is queued exactly once,
    /// in order, after what the spool held, and no dead-letter file is left. (Failed
    /// before the fix: `a b c a b c`.) A segment left half-written (`.tmp`) by a crash
    /// before the commit is removed, never read as part of the spool.
    #[test]
    fn a_requeue_crashed_in_its_last_step_queues_each_record_once() {
        use crate::spool::CRASH_AT;
        let s = "cnbus.events.h.fork".to_owned();
        for (point, then_requeue) in [
            ("after the commit", true),
            ("after the commit", false),
            ("after a segment renamed", true),
            ("after a segment renamed", false),
            ("after the segments renamed", true),
            ("after the segments renamed", false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut dl = DeadLetter::new(dir.path(), 1 << 30);
            // One record a segment (4 MiB), so that a crash falls between renames.
            let big: &'static [u8] = Box::leak(vec![b'x'; 3 << 20].into_boxed_slice());
            for id in ["a", "b", "c"] {
                assert!(dl.keep(&item(id, "fork", big), &s, "r").unwrap());
            }
            drop(dl);
            let stale = dir.path().join("seg-00000000000000000007.spool.tmp");
            std::fs::write(&stale, b"CNBSPOOL half").unwrap();
            CRASH_AT.with(|c| c.set(Some(point)));
            let crashed = requeue_dead_letters(dir.path());
            CRASH_AT.with(|c| c.set(None));
            assert!(crashed.is_err(), "{point}: no crash");
            assert!(!stale.exists());
            // The next requeue finds nothing left to queue; or a sink starts at once.
            if then_requeue {
                let again = requeue_dead_letters(dir.path()).unwrap();
                assert_eq!(again.requeued, 0, "{point}: queued again");
            }
            let got: Vec<_> = spooled(dir.path())
                .into_iter()
                .map(|s| (s.0, s.1.unwrap(), s.2.len()))
                .collect();
            let want = ["a", "b", "c"].map(|a| (a.to_owned(), s.clone(), big.len()));
            assert_eq!(got, want, "{point}, then a requeue: {then_requeue}");
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with("dead-letter") || n.ends_with(".tmp"))
                .collect();
            assert!(left.is_empty(), "{point}: {left:?} left");
        }
    }

    /// Regression: when the sync that makes the commit durable failed and renaming the
    /// dead-letter file back failed too, the `.tmp` segments were removed while the file
    /// stayed renamed (the commit marker): the next requeue or sink start took it for a
    /// finished requeue and removed it, every record with it. Now the commit stands and
    /// the segments stay: each record queued once. (Failed before: nothing in the spool.)
    #[test]
    fn a_commit_that_cannot_be_undone_stands() {
        use crate::spool::CRASH_AT;
        let dir = tempfile::tempdir().unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 20);
        let s = "cnbus.events.h.fork".to_owned();
        for id in ["a", "b", "c"] {
            assert!(dl.keep(&item(id, "fork", b"x\n"), &s, "r").unwrap());
        }
        drop(dl);
        CRASH_AT.with(|c| c.set(Some(UNDO_FAILS)));
        let _ = requeue_dead_letters(dir.path());
        CRASH_AT.with(|c| c.set(None));
        let _ = requeue_dead_letters(dir.path()).unwrap();
        let got: Vec<_> = spooled(dir.path()).into_iter().map(|s| s.0).collect();
        assert_eq!(got, ["a", "b", "c"]);
        assert!(!dir.path().join(REQUEUING_FILE).exists());
    }

    /// Regression: a subject of any length up to 65535 bytes was requeued; the sink sent it,
    /// the server closed the connection at each publish of it (its protocol line is capped
    /// at 4096 bytes), and the record was sent again and again, forever, the sink
    /// disconnecting each time. Now a subject over `MAX_SUBJECT` is no record: kept aside.
    /// (Failed before the fix: both lines requeued.)
    #[test]
    fn a_subject_too_long_for_the_server_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let subject = |len: usize| {
            let head = "cnbus.events.h.";
            format!("{head}{}", "e".repeat(len - head.len()))
        };
        let mut text = String::new();
        for (id, len) in [
            ("fits", MAX_SUBJECT),
            ("long", MAX_SUBJECT + 1),
            ("huge", 60000),
        ] {
            let record = serde_json::json!({
                "msg_id": id, "subject": subject(len), "reason": "r", "line": "x\n",
            });
            text += &format!("{record}\n");
        }
        std::fs::write(dead_letter_path(dir.path()), &text).unwrap();
        let done = requeue_dead_letters(dir.path()).unwrap();
        assert_eq!((done.requeued, done.malformed), (1, 2));
        let first = done.first_malformed.unwrap();
        assert!(first.starts_with("line 2: subject"), "{first}");
        let got = spooled(dir.path());
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.as_str(), got[0].1.as_deref()),
            ("fits", Some(subject(MAX_SUBJECT).as_str()))
        );
        let aside = std::fs::read_to_string(dir.path().join(DEAD_LETTER_MALFORMED_FILE)).unwrap();
        assert_eq!(aside.lines().count(), 2);
    }

    /// Regression: a requeue that failed part way (here: the file for malformed lines cannot
    /// be opened, after a first segment of records went into the spool) returned an error
    /// with the dead-letter file as it was, yet left that segment in the spool: the next
    /// start sent those records, and the requeue run again once the error was fixed queued
    /// them a second time, stored twice once the stream's duplicate window had passed. Now
    /// an error undoes what the requeue did: no segment of it left, the malformed lines it
    /// kept aside cut off. (Failed before the fix: one segment left in the spool.)
    #[test]
    fn a_requeue_that_fails_part_way_leaves_the_spool_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 30);
        let big: &'static [u8] = Box::leak(vec![b'y'; 3 << 20].into_boxed_slice());
        for i in 0..2 {
            let it = item(&format!("m{i}"), "fork", big);
            assert!(dl.keep(&it, "cnbus.events.h.fork", "r").unwrap());
        }
        drop(dl);
        let mut file = std::fs::read(dead_letter_path(dir.path())).unwrap();
        file.extend_from_slice(b"junk\n");
        std::fs::write(dead_letter_path(dir.path()), &file).unwrap();
        // Where the junk line would go: a directory, which cannot be opened for writing.
        let aside = dir.path().join(DEAD_LETTER_MALFORMED_FILE);
        std::fs::create_dir(&aside).unwrap();
        let e = requeue_dead_letters(dir.path()).unwrap_err().to_string();
        assert!(e.contains(DEAD_LETTER_MALFORMED_FILE), "{e}");
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(dir.path()),
            [DEAD_LETTER_FILE, DEAD_LETTER_MALFORMED_FILE]
        );
        assert_eq!(std::fs::read(dead_letter_path(dir.path())).unwrap(), file);
        // Malformed lines kept aside before the error are cut off too: a junk line first,
        // then a failure at the second segment (no segment id left after the first: the
        // newest segment in the directory is the one before the last id).
        std::fs::remove_dir(&aside).unwrap();
        std::fs::write(&aside, b"kept before\n").unwrap();
        let mut file2 = b"junk first\n".to_vec();
        file2.extend_from_slice(&file[..file.len() - b"junk\n".len()]);
        std::fs::write(dead_letter_path(dir.path()), &file2).unwrap();
        let newest = format!("seg-{:020}.spool", u64::MAX - 2);
        std::fs::write(dir.path().join(&newest), b"").unwrap();
        let e = requeue_dead_letters(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no spool segment id left"), "{e}");
        assert_eq!(std::fs::read(&aside).unwrap(), b"kept before\n");
        assert_eq!(std::fs::read(dead_letter_path(dir.path())).unwrap(), file2);
        assert_eq!(
            names(dir.path()),
            [
                DEAD_LETTER_FILE,
                DEAD_LETTER_MALFORMED_FILE,
                newest.as_str()
            ]
        );
        // A malformed file this requeue made is removed, not left empty.
        std::fs::remove_file(&aside).unwrap();
        assert!(requeue_dead_letters(dir.path()).is_err());
        assert_eq!(names(dir.path()), [DEAD_LETTER_FILE, newest.as_str()]);
    }

    /// Regression: a line was read whole whatever its length, so a dead-letter file of one
    /// endless line (not the sink's: it caps its lines) took all memory, an abort. Now a
    /// line over the longest a record can be is kept aside piece by piece, never whole in
    /// memory (here with a 200-byte bound), byte for byte, and the records around it are
    /// requeued. (Failed before the fix: the reason was "not JSON", the line read whole.)
    #[test]
    fn a_line_longer_than_any_record_is_kept_aside_piece_by_piece() {
        let dir = tempfile::tempdir().unwrap();
        let good = |id: &str| {
            format!(
                "{{\"msg_id\":\"{id}\",\"subject\":\"cnbus.events.h.fork\",\"reason\":\"r\",\"line\":\"x\\n\"}}\n"
            )
            .into_bytes()
        };
        let long = [b'z'; 100_000];
        let mut file = good("a");
        file.extend_from_slice(&long);
        file.push(b'\n');
        file.extend(good("b"));
        // A torn endless last line.
        file.extend_from_slice(&long);
        std::fs::write(dead_letter_path(dir.path()), &file).unwrap();
        let done = requeue(dir.path(), 200).unwrap();
        assert_eq!((done.requeued, done.malformed), (2, 2));
        let first = done.first_malformed.unwrap();
        assert_eq!(first, "line 2: longer than 200 bytes");
        let ids: Vec<_> = spooled(dir.path()).into_iter().map(|s| s.0).collect();
        assert_eq!(ids, ["a", "b"]);
        let mut kept = long.to_vec();
        kept.push(b'\n');
        kept.extend_from_slice(&long);
        kept.push(b'\n');
        let aside = std::fs::read(dir.path().join(DEAD_LETTER_MALFORMED_FILE)).unwrap();
        assert!(aside == kept, "kept aside: {} bytes", aside.len());
    }

    /// Many records fill several segments (each at most the segment size, unless one
    /// record is larger), all read back in order.
    #[test]
    fn many_records_fill_several_segments_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut dl = DeadLetter::new(dir.path(), 1 << 30);
        let big: &'static [u8] = Box::leak(vec![b'y'; 3 << 20].into_boxed_slice());
        let n = 6;
        for i in 0..n {
            let it = item(&format!("m{i}"), "fork", big);
            assert!(dl.keep(&it, "cnbus.events.h.fork", "r").unwrap());
        }
        drop(dl);
        let done = requeue_dead_letters(dir.path()).unwrap();
        assert_eq!((done.requeued, done.segments), (n, n));
        let got = spooled(dir.path());
        assert_eq!(got.len() as u64, n);
        for (i, s) in got.iter().enumerate() {
            assert_eq!(
                (s.0.as_str(), s.2.as_slice()),
                (format!("m{i}").as_str(), big)
            );
        }
    }
}
