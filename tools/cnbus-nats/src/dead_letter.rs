//! The dead-letter file: records JetStream refuses for good (or the server's `max_payload`
//! makes unsendable), kept for an operator instead of being sent again forever.
//!
//! `<spool dir>/dead-letter.jsonl`, appended: one JSON object per record,
//! `{"msg_id":…,"subject":…,"reason":…,"line":…}`, `line` the record's line as a JSON string
//! (with its newline); a line that is not UTF-8 (never the agent's) is kept as `line_hex`
//! instead, its bytes in hex, unchanged.
//! A last line left unfinished (a crash in the middle of a write) is cut off when the file
//! is opened. Never read back by the sink: an operator re-publishes them once the cause is fixed (a
//! stream limit raised, say). Capped: past [`Config::dead_letter_max_bytes`] a refused record
//! is only counted as dropped.
//!
//! [`Config::dead_letter_max_bytes`]: crate::Config::dead_letter_max_bytes

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::Item;

/// The file's name in the spool directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

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
