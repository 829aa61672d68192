//! Kernel clocks to wall-clock time, and wall-clock time as text.
//!
//! Proc events carry `CLOCK_MONOTONIC` timestamps and `/proc/<pid>/stat` start times are
//! `CLOCK_BOOTTIME` clock ticks; [`Clocks`] turns both into Unix-epoch nanoseconds.
//! [`Rfc3339`] and [`TimeOfDay`] format them (UTC, microseconds) with the `time` crate
//! (once per second: the second's text is cached per thread, the microseconds appended).

use std::cell::Cell;
use std::fmt;
use std::thread::LocalKey;

use cnbus::sys::{boottime_ns, clock_ticks_per_sec, monotonic_ns, realtime_ns};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// Converts kernel clocks to Unix-epoch nanoseconds.
#[derive(Debug, Clone)]
pub struct Clocks {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`.
    mono: i128,
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME`.
    boot: i128,
    ticks: u64,
}

impl Default for Clocks {
    fn default() -> Self {
        Self::new()
    }
}

impl Clocks {
    /// Reads the clocks' offsets now.
    pub fn new() -> Self {
        let mut c = Clocks {
            mono: 0,
            boot: 0,
            ticks: clock_ticks_per_sec().max(1),
        };
        c.sync();
        c
    }

    /// Re-reads the offsets (NTP slews the real-time clock).
    pub fn sync(&mut self) {
        let real = i128::from(realtime_ns());
        self.mono = real - i128::from(monotonic_ns());
        self.boot = real - i128::from(boottime_ns());
    }

    /// Clock ticks per second (`/proc` times are in ticks).
    pub fn ticks_per_sec(&self) -> u64 {
        self.ticks
    }

    /// Wall-clock time of a proc event's timestamp (`CLOCK_MONOTONIC` ns).
    pub fn wall_of_event(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.mono
    }

    /// Wall-clock time of a `/proc/<pid>/stat` start time (clock ticks since boot).
    pub fn wall_of_ticks(&self, ticks: u64) -> i128 {
        i128::from(ticks) * 1_000_000_000 / i128::from(self.ticks) + self.boot
    }

    /// Nanoseconds since boot (`CLOCK_BOOTTIME`) of a tick count, as `/proc` gives it.
    pub fn boot_ns_of_ticks(&self, ticks: u64) -> u64 {
        ticks.saturating_mul(1_000_000_000) / self.ticks
    }

    /// The wall-clock time now.
    pub fn now(&self) -> i128 {
        i128::from(realtime_ns())
    }
}

/// The full formats, for the tests' comparison with [`format_cached`].
#[cfg(test)]
const RFC3339: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
#[cfg(test)]
const TIME_OF_DAY: &[BorrowedFormatItem<'static>] =
    format_description!("[hour]:[minute]:[second].[subsecond digits:6]");
/// The same up to the second (and the '.'), as the `time` crate formats it once a second.
const RFC3339_SECOND: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].");
const TIME_OF_DAY_SECOND: &[BorrowedFormatItem<'static>] =
    format_description!("[hour]:[minute]:[second].");

/// Earliest and latest times the `time` crate represents (years -9999 to 9999).
const MIN_NS: i128 = -377_705_116_800_000_000_000; // -9999-01-01T00:00:00Z
const MAX_NS: i128 = 253_402_300_799_999_999_999; // 9999-12-31T23:59:59.999999999Z

/// The UTC date and time of `unix_ns`, clamped to what the `time` crate represents (a
/// kernel clock cannot leave that range).
fn datetime(unix_ns: i128) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns.clamp(MIN_NS, MAX_NS))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// One second's text up to its '.', as the `time` crate formatted it.
#[derive(Clone, Copy)]
struct Second {
    /// Unix seconds (`i128::MIN`: none yet).
    sec: i128,
    len: u8,
    /// "-9999-12-31T23:59:59." is 21 bytes.
    text: [u8; 24],
}

const NO_SECOND: Second = Second {
    sec: i128::MIN,
    len: 0,
    text: [0; 24],
};

thread_local! {
    /// The last second formatted per format, per thread: in a burst thousands of lines
    /// share a second, and the `time` crate's formatter cost more per line (about 2 % of
    /// proctrace's CPU in a fork storm) than everything else in its time field.
    static RFC3339_LAST: Cell<Second> = const { Cell::new(NO_SECOND) };
    static TIME_OF_DAY_LAST: Cell<Second> = const { Cell::new(NO_SECOND) };
}

/// Formats `unix_ns` into `out`: its second with `prefix` (by the `time` crate, once per
/// second and thread, cached in `last`), six digits of microseconds, then `suffix`; returns
/// the length. Byte for byte what the full format description gives (tested).
fn format_cached(
    unix_ns: i128,
    prefix: &[BorrowedFormatItem<'_>],
    last: &'static LocalKey<Cell<Second>>,
    suffix: &[u8],
    out: &mut [u8; 40],
) -> usize {
    let ns = unix_ns.clamp(MIN_NS, MAX_NS);
    let sec = ns.div_euclid(1_000_000_000);
    let mut micros = (ns.rem_euclid(1_000_000_000) / 1000) as u32;
    let mut s = last.get();
    if s.sec != sec {
        let mut text = [0u8; 24];
        let mut rest = &mut text[..];
        let _ = datetime(sec * 1_000_000_000).format_into(&mut rest, prefix);
        let len = 24 - rest.len();
        s = Second {
            sec,
            len: len as u8,
            text,
        };
        last.set(s);
    }
    let n = usize::from(s.len);
    out[..n].copy_from_slice(&s.text[..n]);
    for d in out[n..n + 6].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out[n + 6..n + 6 + suffix.len()].copy_from_slice(suffix);
    n + 6 + suffix.len()
}

fn rfc3339(unix_ns: i128, out: &mut [u8; 40]) -> usize {
    format_cached(unix_ns, RFC3339_SECOND, &RFC3339_LAST, b"Z", out)
}

fn time_of_day(unix_ns: i128, out: &mut [u8; 40]) -> usize {
    format_cached(unix_ns, TIME_OF_DAY_SECOND, &TIME_OF_DAY_LAST, b"", out)
}

/// Appends `unix_ns` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC, microseconds).
pub fn push_rfc3339(out: &mut Vec<u8>, unix_ns: i128) {
    let mut buf = [0u8; 40];
    let n = rfc3339(unix_ns, &mut buf);
    out.extend_from_slice(&buf[..n]);
}

/// Appends the UTC time of day of `unix_ns` as `HH:MM:SS.ffffff`.
pub fn push_time_of_day(out: &mut Vec<u8>, unix_ns: i128) {
    let mut buf = [0u8; 40];
    let n = time_of_day(unix_ns, &mut buf);
    out.extend_from_slice(&buf[..n]);
}

/// A wall-clock time (Unix ns) that displays and serialises as RFC 3339 (UTC,
/// microseconds: `2026-11-26T12:00:00.123456Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub i128);

impl Rfc3339 {
    /// Calls `f` with the text, formatted into a stack buffer (no allocation: this runs
    /// for every event line).
    fn with<R>(self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; 40];
        let n = rfc3339(self.0, &mut buf);
        f(std::str::from_utf8(&buf[..n]).unwrap_or_default())
    }
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with(|s| f.write_str(s))
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with(|t| s.serialize_str(t))
    }
}

/// A wall-clock time (Unix ns) that displays as the UTC time of day, `HH:MM:SS.ffffff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay(pub i128);

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 40];
        let n = time_of_day(self.0, &mut buf);
        f.write_str(std::str::from_utf8(&buf[..n]).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times() {
        let t = |ns| Rfc3339(ns).to_string();
        assert_eq!(t(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(t(1_795_694_400_123_456_789), "2026-11-26T12:00:00.123456Z");
        assert_eq!(
            t(1_795_694_400_000_001_000 + 86_399_000_000_000),
            "2026-11-27T11:59:59.000001Z"
        );
        assert_eq!(t(1_709_251_199_999_999_000), "2024-02-29T23:59:59.999999Z");
        assert_eq!(t(-1_000), "1969-12-31T23:59:59.999999Z");
        assert_eq!(t(i128::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(t(i128::MIN), "-9999-01-01T00:00:00.000000Z");
        assert_eq!(
            TimeOfDay(1_795_694_400_123_456_789).to_string(),
            "12:00:00.123456"
        );
        assert_eq!(
            serde_json::to_string(&Rfc3339(0)).unwrap(),
            "\"1970-01-01T00:00:00.000000Z\""
        );
    }

    /// The cached formatting equals the `time` crate's full format descriptions, within a
    /// second, across seconds, days and years, before 1970, at the clamps, in any order.
    #[test]
    fn cached_seconds_format_as_the_time_crate_does() {
        let full = |ns: i128, fmt: &[BorrowedFormatItem<'_>]| {
            let mut v = Vec::new();
            datetime(ns).format_into(&mut v, fmt).unwrap();
            String::from_utf8(v).unwrap()
        };
        let mut values = vec![
            0,
            -1,
            -999,
            -1_000,
            -1_000_000_000,
            -1_000_000_001,
            999_999_999,
            1_000_000_000,
            1_795_694_400_123_456_789,
            1_795_694_400_999_999_999,
            1_795_694_401_000_000_000,
            1_709_251_199_999_999_000,
            MIN_NS,
            MIN_NS - 1,
            MAX_NS,
            MAX_NS + 1,
            i128::MIN,
            i128::MAX,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = i128::from(x % 4_000_000_000) * 1_000_000_000 - 62_000_000_000_000_000_000;
            values.push(base + i128::from(x % 1_000_000_000));
            // Lines of one second in a row (the cache's hits), then back in time.
            values.push(base + i128::from(x % 999_999_000) + 1);
            values.push(1_795_694_400_000_000_000 + i128::from(x % 3_000_000_000));
        }
        for ns in values {
            let clamped = ns.clamp(MIN_NS, MAX_NS);
            assert_eq!(Rfc3339(ns).to_string(), full(clamped, RFC3339), "{ns}");
            assert_eq!(
                TimeOfDay(ns).to_string(),
                full(clamped, TIME_OF_DAY),
                "{ns}"
            );
            let mut v = b"x".to_vec();
            push_rfc3339(&mut v, ns);
            push_time_of_day(&mut v, ns);
            let want = format!("x{}{}", full(clamped, RFC3339), full(clamped, TIME_OF_DAY));
            assert_eq!(String::from_utf8(v).unwrap(), want, "{ns}");
        }
    }
}
