//! The on-disk spool: append-only segment files of length-prefixed, checksummed records.
//!
//! A segment file `seg-<20 digits>.spool` starts with the 12-byte header `CNBSPOOL` + u32 LE
//! version (1), then records: u32 LE payload length, u32 LE CRC-32 (IEEE) of the payload, the
//! payload (u8 flags, u16 LE msg-id length, msg id, u16 LE event length, event, then with flag
//! 2 a u16 LE subject length and the subject, then the line). Flag 1: published before without
//! an acknowledgement; flag 2: the record carries its own subject (a dead letter requeued by
//! [`requeue_dead_letters`](crate::requeue_dead_letters), sent to the subject it was refused
//! on). Segments are read oldest first; a segment file is deleted once every record read from
//! it was acknowledged (or rewritten into a newer segment at shutdown).
//!
//! A record that is short, longer than what is left of its file, or whose checksum does not
//! match ends its segment: it and every byte after it are counted (`torn_tails`, `torn_bytes`)
//! and cut off, never parsed.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::Item;

const MAGIC: &[u8; 8] = b"CNBSPOOL";
const VERSION: u32 = 1;
/// Bytes of the segment header.
pub(crate) const HEADER_LEN: u64 = 12;
/// Bytes of a record's length and checksum.
pub(crate) const RECORD_OVERHEAD: u64 = 8;
/// A payload length above this is damage, not data.
const MAX_PAYLOAD: u32 = 64 << 20;
/// The size at which a segment is closed and a new one started unless configured otherwise
/// ([`Config::spool_segment_bytes`](crate::Config::spool_segment_bytes)).
pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
/// Flag: published before without an acknowledgement.
const FLAG_SENT_BEFORE: u8 = 1;
/// Flag: the record carries its own subject.
const FLAG_SUBJECT: u8 = 2;
/// How long a spool directory's lock held by someone else is waited for before the spool
/// is refused as in use (see `Spool::open`).
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// What opening the spool found on disk.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Found {
    /// Whole records left by an earlier run.
    pub records: u64,
    /// Segments whose tail was damaged (torn write, crash) and cut off.
    pub torn_tails: u64,
    /// Bytes cut off.
    pub torn_bytes: u64,
}

struct Sealed {
    id: u64,
    bytes: u64,
    records: u64,
}

struct Active {
    id: u64,
    file: File,
    bytes: u64,
    records: u64,
}

struct Loaded {
    bytes: u64,
    outstanding: u64,
}

/// The spool of one sink. Not thread-safe by itself: the sink keeps it behind a mutex.
pub(crate) struct Spool {
    dir: PathBuf,
    cap: u64,
    segment_max: u64,
    sealed: VecDeque<Sealed>,
    active: Option<Active>,
    loaded: HashMap<u64, Loaded>,
    next_id: u64,
    /// Bytes of all segment files.
    bytes: u64,
    /// Records on disk that were not yet acknowledged.
    records: u64,
    /// Records on disk not yet handed out by [`Spool::take_segment`].
    pending: u64,
    /// Damage found while reading (at open and later).
    pub(crate) torn_tails: u64,
    pub(crate) torn_bytes: u64,
    /// Records written to (or found in) the spool that a later read could not give back (a
    /// segment damaged or removed while the spool was open): lost, to be counted as dropped.
    pub(crate) lost: u64,
    /// The directory, locked (flock) while the spool is open: one spool per directory,
    /// released when the spool is dropped or the process ends.
    _lock: File,
}

fn seg_name(id: u64) -> String {
    format!("seg-{id:020}.spool")
}

fn parse_seg_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".spool")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The encoded size of an item's payload (flags, fields, line).
fn payload_len(item: &Item) -> u64 {
    5 + item.msg_id.len() as u64
        + item.event.len() as u64
        + item.subject.as_ref().map_or(0, |s| 2 + s.len() as u64)
        + item.line.len() as u64
}

/// The encoded size of an item's record, overhead included.
pub(crate) fn record_len(item: &Item) -> u64 {
    RECORD_OVERHEAD + payload_len(item)
}

/// Whether `item` can be a spool record: its msg id, event and subject at most 65535 bytes
/// each, its payload at most 64 MiB.
pub(crate) fn check_fits(item: &Item) -> io::Result<()> {
    let long = |s: &str| s.len() > u16::MAX as usize;
    if long(&item.msg_id)
        || long(&item.event)
        || item.subject.as_deref().is_some_and(long)
        || payload_len(item) > MAX_PAYLOAD as u64
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "record too large for the spool (msg id, event or subject over 65535 bytes, or over 64 MiB)",
        ));
    }
    Ok(())
}

fn encode(item: &Item, out: &mut Vec<u8>) {
    let payload_len = payload_len(item) as usize;
    out.reserve(8 + payload_len);
    let start = out.len();
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let mut flags = 0;
    if item.sent_before {
        flags |= FLAG_SENT_BEFORE;
    }
    if item.subject.is_some() {
        flags |= FLAG_SUBJECT;
    }
    out.push(flags);
    out.extend_from_slice(&(item.msg_id.len() as u16).to_le_bytes());
    out.extend_from_slice(item.msg_id.as_bytes());
    out.extend_from_slice(&(item.event.len() as u16).to_le_bytes());
    out.extend_from_slice(item.event.as_bytes());
    if let Some(subject) = &item.subject {
        out.extend_from_slice(&(subject.len() as u16).to_le_bytes());
        out.extend_from_slice(subject.as_bytes());
    }
    out.extend_from_slice(&item.line);
    let crc = crc32(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode(payload: &[u8]) -> Option<Item> {
    let take_str = |rest: &[u8]| -> Option<(String, usize)> {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        Some((s.to_owned(), 2 + len))
    };
    let (&flags, payload) = payload.split_first()?;
    if flags & !(FLAG_SENT_BEFORE | FLAG_SUBJECT) != 0 {
        return None;
    }
    let (msg_id, mut used) = take_str(payload)?;
    let (event, n) = take_str(&payload[used..])?;
    used += n;
    let subject = if flags & FLAG_SUBJECT != 0 {
        let (subject, n) = take_str(&payload[used..])?;
        used += n;
        Some(subject)
    } else {
        None
    };
    let line = Bytes::copy_from_slice(&payload[used..]);
    Some(Item {
        event,
        msg_id,
        line,
        origin: None,
        sent_before: flags & FLAG_SENT_BEFORE != 0,
        subject,
    })
}

/// Parses a segment's bytes: the records up to the first damage, and where the damage starts
/// (`None`: no damage).
fn parse(data: &[u8]) -> (Vec<Item>, Option<usize>) {
    let mut items = Vec::new();
    if data.len() < HEADER_LEN as usize
        || &data[..8] != MAGIC
        || u32::from_le_bytes(data[8..12].try_into().unwrap_or([0; 4])) != VERSION
    {
        return (items, Some(0));
    }
    let mut at = HEADER_LEN as usize;
    while at < data.len() {
        let rest = &data[at..];
        if rest.len() < RECORD_OVERHEAD as usize {
            return (items, Some(at));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or([0xff; 4]));
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or([0; 4]));
        if len > MAX_PAYLOAD || rest.len() - 8 < len as usize {
            return (items, Some(at));
        }
        let payload = &rest[8..8 + len as usize];
        if crc32(payload) != crc {
            return (items, Some(at));
        }
        match decode(payload) {
            Some(item) => items.push(item),
            None => return (items, Some(at)),
        }
        at += 8 + len as usize;
    }
    (items, None)
}

fn ctx<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> crate::SinkError + 'a {
    move |source| crate::SinkError::Spool {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Locks the spool directory `dir` (which must exist) for this process: the lock is held while
/// the returned file is open. Two spools on one directory would read, cut and delete each
/// other's segments; the lock is the directory's own (flock on the directory), no file of its
/// own. Another holder (a running sink) is an error, "in use".
pub(crate) fn lock_dir(dir: &Path) -> Result<File, crate::SinkError> {
    let lock = File::open(dir).map_err(ctx("open spool directory", dir))?;
    // A lock held a moment after its owner let it go is waited for, up to LOCK_WAIT: a
    // process being spawned (by any thread of the owner's process) holds a copy of every
    // descriptor, this lock's too, until its `exec` closes them, so a spool closed and
    // opened again in one process could find its own lock still held (it failed so in
    // CI, beside tests starting servers). Another live sink holds it for longer.
    let waited = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(fs::TryLockError::WouldBlock) if waited.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ctx("lock spool directory", dir)(io::Error::other(
                    "in use by another process (another cnbus-agent?); each needs its own --spool",
                )))
            }
            // A file system without flock (some network or FUSE ones): the spool works,
            // only unguarded against a second process.
            Err(fs::TryLockError::Error(_)) => return Ok(lock),
        }
    }
}

/// The ids of the segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<u64>, crate::SinkError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(ctx("read spool directory", dir))? {
        let entry = entry.map_err(ctx("read spool directory", dir))?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_seg_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The id after the newest of `ids` (sorted), 0 for none; an error when the newest is the
/// last id there is (a file named so by hand: ids count up from 0).
fn next_segment_id(dir: &Path, ids: &[u64]) -> Result<u64, crate::SinkError> {
    match ids.last() {
        None => Ok(0),
        Some(id) => id.checked_add(1).ok_or_else(|| {
            ctx("name spool segment", dir)(io::Error::other(format!(
                "no spool segment id left after {}",
                seg_name(*id)
            )))
        }),
    }
}

/// The suffix of a segment being written by [`NewSegments`], not yet part of the spool.
const TMP_SUFFIX: &str = ".tmp";

/// New whole segments added after every segment of a spool directory, for records that come
/// from elsewhere (dead letters requeued): each segment is written as `seg-<id>.spool.tmp`
/// and synced as it fills ([`NewSegments::seal`] writes the last one); only
/// [`NewSegments::commit`] renames them all to their names, one after the other, so that a
/// crash while they are written (the long part) leaves none in the spool, and a crash at
/// any time leaves whole segments or none (never a torn one). For a directory locked
/// ([`lock_dir`]) with no [`Spool`] open on it. The caller makes the commit durable before
/// the renames with a marker file (the requeue: the dead-letter file renamed to
/// [`REQUEUING_FILE`]): while the marker exists, the `.tmp` segments belong in the spool and
/// [`finish_commit`] (at the next [`NewSegments::new`] or [`Spool::open`]) renames those a
/// crash left; without it, segments left `.tmp` are removed when the next one starts: their
/// records were not yet taken from where they came from.
///
/// [`REQUEUING_FILE`]: crate::dead_letter::REQUEUING_FILE
pub(crate) struct NewSegments {
    dir: PathBuf,
    segment_max: u64,
    next_id: u64,
    /// The segment being filled (header and records), written out when full or at
    /// [`NewSegments::seal`].
    buf: Vec<u8>,
    records: u64,
    /// Segments written (`.tmp` until [`NewSegments::commit`]).
    pub(crate) segments: u64,
    /// Their paths, `.tmp` and final, and whether renamed.
    written: Vec<(PathBuf, PathBuf, bool)>,
}

impl NewSegments {
    /// Starts after the newest segment of `dir`, first finishing a commit a crash
    /// interrupted ([`finish_commit`]), then removing `.tmp` segments left by a crash.
    pub(crate) fn new(dir: &Path, segment_max: u64) -> Result<NewSegments, crate::SinkError> {
        finish_commit(dir)?;
        for entry in fs::read_dir(dir).map_err(ctx("read spool directory", dir))? {
            let entry = entry.map_err(ctx("read spool directory", dir))?;
            let name = entry.file_name();
            let stale = name
                .to_str()
                .and_then(|n| n.strip_suffix(TMP_SUFFIX))
                .and_then(parse_seg_name)
                .is_some();
            if stale {
                let path = entry.path();
                fs::remove_file(&path).map_err(ctx("remove unfinished spool segment", &path))?;
            }
        }
        let next_id = next_segment_id(dir, &segment_ids(dir)?)?;
        Ok(NewSegments {
            dir: dir.to_owned(),
            segment_max,
            next_id,
            buf: Vec::new(),
            records: 0,
            segments: 0,
            written: Vec::new(),
        })
    }

    /// Adds `item` (its `origin` is not kept) to the segment being filled, writing that one
    /// out first when `item` would take it past the segment size. An item that is no
    /// record ([`check_fits`]) is an `InvalidInput` error, nothing added.
    pub(crate) fn push(&mut self, item: &Item) -> Result<(), crate::SinkError> {
        check_fits(item).map_err(ctx("add to spool", &self.dir))?;
        if self.records > 0 && self.buf.len() as u64 + record_len(item) > self.segment_max {
            self.write_out()?;
        }
        if self.buf.is_empty() {
            self.buf.extend_from_slice(MAGIC);
            self.buf.extend_from_slice(&VERSION.to_le_bytes());
        }
        encode(item, &mut self.buf);
        self.records += 1;
        Ok(())
    }

    /// Writes the segment being filled out: every record pushed is on disk, in `.tmp`
    /// segments, when this returns.
    pub(crate) fn seal(&mut self) -> Result<(), crate::SinkError> {
        if self.records > 0 {
            self.write_out()?;
        }
        Ok(())
    }

    /// Renames every segment written ([`NewSegments::seal`] first) into the spool, oldest
    /// first, then syncs the directory: every record pushed is in the spool, on disk, when
    /// this returns.
    pub(crate) fn commit(&mut self) -> Result<(), crate::SinkError> {
        for (tmp, path, renamed) in &mut self.written {
            fs::rename(&*tmp, &*path).map_err(ctx("rename spool segment", path))?;
            *renamed = true;
            crash_point("after a segment renamed", path)?;
        }
        sync_dir(&self.dir)
    }

    /// Takes every segment written back out (best effort, for a caller that failed and
    /// keeps the records where they came from): removed, the directory synced.
    pub(crate) fn abandon(&mut self) {
        for (tmp, path, renamed) in self.written.drain(..) {
            let _ = fs::remove_file(if renamed { path } else { tmp });
        }
        let _ = sync_dir(&self.dir);
        self.buf.clear();
        self.records = 0;
        self.segments = 0;
    }

    fn write_out(&mut self) -> Result<(), crate::SinkError> {
        let next = next_segment_id(&self.dir, &[self.next_id])?;
        let path = self.dir.join(seg_name(self.next_id));
        let mut tmp = path.clone().into_os_string();
        tmp.push(TMP_SUFFIX);
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(&self.buf)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(ctx("write spool segment", &tmp)(e));
        }
        self.written.push((tmp, path, false));
        self.next_id = next;
        self.segments += 1;
        self.buf.clear();
        self.records = 0;
        Ok(())
    }
}

/// Finishes the commit of [`NewSegments`] that a crash interrupted in spool directory `dir`
/// (locked): when the marker [`REQUEUING_FILE`] exists, every `.tmp` segment left is renamed
/// into the spool, oldest first, and the marker removed (the directory synced after each
/// step). Nothing to do without the marker. True when there was a commit to finish.
///
/// [`REQUEUING_FILE`]: crate::dead_letter::REQUEUING_FILE
pub(crate) fn finish_commit(dir: &Path) -> Result<bool, crate::SinkError> {
    let marker = dir.join(crate::dead_letter::REQUEUING_FILE);
    if !marker.exists() {
        return Ok(false);
    }
    let mut left = Vec::new();
    for entry in fs::read_dir(dir).map_err(ctx("read spool directory", dir))? {
        let entry = entry.map_err(ctx("read spool directory", dir))?;
        let name = entry.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(TMP_SUFFIX))
            .and_then(parse_seg_name)
        {
            left.push(id);
        }
    }
    left.sort_unstable();
    for id in left {
        let path = dir.join(seg_name(id));
        let mut tmp = path.clone().into_os_string();
        tmp.push(TMP_SUFFIX);
        fs::rename(&tmp, &path).map_err(ctx("rename spool segment", &path))?;
    }
    sync_dir(dir)?;
    fs::remove_file(&marker).map_err(ctx("remove the requeued dead-letter file", &marker))?;
    sync_dir(dir)?;
    Ok(true)
}

#[cfg(test)]
thread_local! {
    /// Fault injection for the tests: the [`crash_point`] at which a requeue on this thread
    /// stops as if its process had died there.
    pub(crate) static CRASH_AT: std::cell::Cell<Option<&'static str>> =
        const { std::cell::Cell::new(None) };
}

/// A point where a test may simulate a crash ([`CRASH_AT`] in the tests; never otherwise):
/// an error the caller returns at once, undoing nothing, as a process killed there would
/// leave things.
pub(crate) fn crash_point(point: &'static str, path: &Path) -> Result<(), crate::SinkError> {
    #[cfg(test)]
    if CRASH_AT.with(|c| c.get()) == Some(point) {
        return Err(ctx(point, path)(io::Error::other("simulated crash")));
    }
    let _ = (point, path);
    Ok(())
}

/// Syncs directory `dir` (its entries: files created, renamed or removed), so that what
/// was done in it is on disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), crate::SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx("sync spool directory", dir))
}

impl Spool {
    /// Opens (creating) the spool directory and checks every segment left there: damaged
    /// tails are counted and cut off, empty segments removed.
    pub(crate) fn open(
        dir: &Path,
        cap: u64,
        segment_max: u64,
    ) -> Result<(Spool, Found), crate::SinkError> {
        fs::create_dir_all(dir).map_err(ctx("create spool directory", dir))?;
        let lock = lock_dir(dir)?;
        // Records a requeue had committed to the spool when a crash stopped it.
        finish_commit(dir)?;
        let ids = segment_ids(dir)?;
        let mut spool = Spool {
            dir: dir.to_owned(),
            cap,
            segment_max,
            sealed: VecDeque::new(),
            active: None,
            loaded: HashMap::new(),
            next_id: next_segment_id(dir, &ids)?,
            bytes: 0,
            records: 0,
            pending: 0,
            torn_tails: 0,
            torn_bytes: 0,
            lost: 0,
            _lock: lock,
        };
        let mut found = Found::default();
        for id in ids {
            let path = dir.join(seg_name(id));
            let data = fs::read(&path).map_err(ctx("read spool segment", &path))?;
            let (items, damage) = parse(&data);
            let mut len = data.len() as u64;
            if let Some(at) = damage {
                found.torn_tails += 1;
                found.torn_bytes += len - at as u64;
                len = at as u64;
            }
            if items.is_empty() {
                fs::remove_file(&path).map_err(ctx("remove spool segment", &path))?;
                continue;
            }
            if damage.is_some() {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(ctx("open spool segment", &path))?;
                file.set_len(len)
                    .map_err(ctx("truncate spool segment", &path))?;
            }
            let records = items.len() as u64;
            found.records += records;
            spool.bytes += len;
            spool.records += records;
            spool.pending += records;
            spool.sealed.push_back(Sealed {
                id,
                bytes: len,
                records,
            });
        }
        spool.torn_tails = found.torn_tails;
        spool.torn_bytes = found.torn_bytes;
        Ok((spool, found))
    }

    /// Bytes of all segment files.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records on disk not yet acknowledged.
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    /// Records on disk not yet read back.
    pub(crate) fn pending(&self) -> u64 {
        self.pending
    }

    /// Appends one record. `Ok(false)`: it does not fit under the cap (unless `force`) and was
    /// not written. On a write error the segment is cut back to its last whole record.
    pub(crate) fn append(&mut self, item: &Item, force: bool) -> io::Result<bool> {
        check_fits(item)?;
        let len = record_len(item);
        let needs_header = self
            .active
            .as_ref()
            .is_none_or(|a| a.bytes + len > self.segment_max && a.records > 0);
        let total = len + if needs_header { HEADER_LEN } else { 0 };
        if !force && self.bytes + total > self.cap {
            return Ok(false);
        }
        if needs_header {
            let id = self.next_id;
            self.next_id = id
                .checked_add(1)
                .ok_or_else(|| io::Error::other("no spool segment id left"))?;
            self.seal_active();
            let path = self.dir.join(seg_name(id));
            let mut file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            let mut header = Vec::with_capacity(HEADER_LEN as usize);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&VERSION.to_le_bytes());
            if let Err(e) = file.write_all(&header) {
                drop(file);
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            self.bytes += HEADER_LEN;
            self.active = Some(Active {
                id,
                file,
                bytes: HEADER_LEN,
                records: 0,
            });
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active spool segment"));
        };
        let mut buf = Vec::new();
        encode(item, &mut buf);
        if let Err(e) = active.file.write_all(&buf) {
            // Cut the partial record off so that the segment stays whole.
            let _ = active.file.set_len(active.bytes);
            return Err(e);
        }
        active.bytes += len;
        active.records += 1;
        self.bytes += len;
        self.records += 1;
        self.pending += 1;
        Ok(true)
    }

    fn seal_active(&mut self) {
        if let Some(active) = self.active.take() {
            if active.records == 0 {
                let _ = fs::remove_file(self.dir.join(seg_name(active.id)));
                self.bytes -= active.bytes;
            } else {
                self.sealed.push_back(Sealed {
                    id: active.id,
                    bytes: active.bytes,
                    records: active.records,
                });
            }
        }
    }

    /// Reads the oldest segment back (sealing the one being written if it is the only one).
    /// Each item carries its segment in `origin`; [`Spool::release`] it once it is done.
    pub(crate) fn take_segment(&mut self) -> io::Result<Vec<Item>> {
        if self.sealed.is_empty() {
            self.seal_active();
        }
        let Some(seg) = self.sealed.pop_front() else {
            return Ok(Vec::new());
        };
        let path = self.dir.join(seg_name(seg.id));
        self.pending -= seg.records;
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) => {
                // Its records cannot be read: they are gone; count the segment as damaged.
                self.records -= seg.records;
                self.bytes -= seg.bytes;
                self.torn_tails += 1;
                self.torn_bytes += seg.bytes;
                self.lost += seg.records;
                return Err(e);
            }
        };
        let (mut items, damage) = parse(&data);
        if let Some(at) = damage {
            self.torn_tails += 1;
            self.torn_bytes += data.len() as u64 - at as u64;
        }
        let lost = seg.records.saturating_sub(items.len() as u64);
        self.records -= lost;
        self.lost += lost;
        if items.is_empty() {
            let _ = fs::remove_file(&path);
            self.bytes -= seg.bytes;
            return Ok(items);
        }
        for item in &mut items {
            item.origin = Some(seg.id);
        }
        self.loaded.insert(
            seg.id,
            Loaded {
                bytes: seg.bytes,
                outstanding: items.len() as u64,
            },
        );
        Ok(items)
    }

    /// One record read from segment `id` is done (acknowledged, dropped, or written again into
    /// a newer segment); the segment file goes when all of its records are.
    pub(crate) fn release(&mut self, id: u64) {
        let Some(seg) = self.loaded.get_mut(&id) else {
            return;
        };
        seg.outstanding -= 1;
        self.records -= 1;
        if seg.outstanding == 0 {
            let bytes = seg.bytes;
            self.loaded.remove(&id);
            let _ = fs::remove_file(self.dir.join(seg_name(id)));
            self.bytes -= bytes;
        }
    }

    /// Flushes the segment being written to stable storage.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        match &self.active {
            Some(active) => active.file.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u32) -> Item {
        Item {
            event: "fork".into(),
            msg_id: format!("id-{i}"),
            line: Bytes::from(format!("{{\"n\":{i}}}\n")),
            origin: None,
            sent_before: false,
            subject: None,
        }
    }

    #[test]
    fn oversized_fields_are_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let mut it = item(1);
        it.msg_id = "x".repeat(70_000);
        assert!(s.append(&it, true).is_err());
        assert_eq!((s.records(), s.bytes()), (0, 0));
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn roundtrip_cap_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, found) = Spool::open(dir.path(), 10_000, 300).unwrap();
        assert_eq!(found.records, 0);
        let mut n = 0;
        while s.append(&item(n), false).unwrap() {
            n += 1;
        }
        assert!(s.bytes() <= 10_000);
        assert_eq!(s.records(), n as u64);
        drop(s);
        // Tear the newest segment in the middle of its last record.
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let last = names.last().unwrap();
        let len = fs::metadata(last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(last)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut s, found) = Spool::open(dir.path(), 10_000, 300).unwrap();
        assert_eq!(found.records, n as u64 - 1);
        assert_eq!(found.torn_tails, 1);
        let mut got = Vec::new();
        loop {
            let items = s.take_segment().unwrap();
            if items.is_empty() {
                break;
            }
            for it in items {
                got.push(it.msg_id.clone());
                s.release(it.origin.unwrap());
            }
        }
        let want: Vec<_> = (0..n - 1).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, want);
        assert_eq!(s.records(), 0);
        assert_eq!(s.bytes(), 0);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn flipped_byte_is_damage_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        for i in 0..10 {
            assert!(s.append(&item(i), false).unwrap());
        }
        drop(s);
        let path = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut data = fs::read(&path).unwrap();
        let at = data.len() - 40;
        data[at] ^= 0x55;
        fs::write(&path, &data).unwrap();
        let (_, found) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert!(found.records < 10);
        assert_eq!(found.torn_tails, 1);
    }

    /// Regression: a segment file named with the last id there is (by hand: ids count up
    /// from 0) made the next id overflow, a panic in a debug build (in a release build it
    /// wrapped to 0, before every other segment). Now the spool refuses to open, and
    /// appending past the last id is an error. (Failed before the fix: "attempt to add
    /// with overflow".)
    #[test]
    fn the_last_segment_id_is_an_error_not_an_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let last = dir.path().join(seg_name(u64::MAX));
        fs::write(&last, b"").unwrap();
        let e = Spool::open(dir.path(), 1 << 20, 1 << 20)
            .err()
            .expect("opened")
            .to_string();
        assert!(e.contains("no spool segment id left"), "{e}");
        fs::remove_file(&last).unwrap();
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&VERSION.to_le_bytes());
        encode(&item(1), &mut data);
        fs::write(dir.path().join(seg_name(u64::MAX - 1)), &data).unwrap();
        let (mut spool, found) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(found.records, 1);
        let e = spool.append(&item(2), false).unwrap_err().to_string();
        assert!(e.contains("no spool segment id left"), "{e}");
    }
}
