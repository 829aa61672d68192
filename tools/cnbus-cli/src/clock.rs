//! Kernel clocks to wall-clock time, and wall-clock time as text.
//!
//! Proc events carry `CLOCK_MONOTONIC` timestamps and `/proc/<pid>/stat` start times are
//! `CLOCK_BOOTTIME` clock ticks; [`Clocks`] turns both into Unix-epoch nanoseconds.
//! [`Rfc3339`] and [`TimeOfDay`] format them (UTC, microseconds) with the `time` crate.

use std::fmt;

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

const RFC3339: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
const TIME_OF_DAY: &[BorrowedFormatItem<'static>] =
    format_description!("[hour]:[minute]:[second].[subsecond digits:6]");

/// The UTC date and time of `unix_ns`, clamped to what the `time` crate represents (years
/// -9999 to 9999; a kernel clock cannot leave that range).
fn datetime(unix_ns: i128) -> OffsetDateTime {
    const LIMIT: i128 = 253_402_300_799_999_999_999; // 9999-12-31T23:59:59.999999999Z
    let ns = unix_ns.clamp(-377_705_116_800_000_000_000, LIMIT);
    OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Formats `fmt` for `unix_ns` into `out`. Formatting a valid date into a `Vec` cannot fail.
fn push(out: &mut Vec<u8>, unix_ns: i128, fmt: &[BorrowedFormatItem<'_>]) {
    let _ = datetime(unix_ns).format_into(out, fmt);
}

/// Appends `unix_ns` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC, microseconds).
pub fn push_rfc3339(out: &mut Vec<u8>, unix_ns: i128) {
    push(out, unix_ns, RFC3339);
}

/// Appends the UTC time of day of `unix_ns` as `HH:MM:SS.ffffff`.
pub fn push_time_of_day(out: &mut Vec<u8>, unix_ns: i128) {
    push(out, unix_ns, TIME_OF_DAY);
}

/// A wall-clock time (Unix ns) that displays and serialises as RFC 3339 (UTC,
/// microseconds: `2026-11-26T12:00:00.123456Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub i128);

impl Rfc3339 {
    /// Calls `f` with the text, formatted into a stack buffer (no allocation: this runs
    /// for every event line).
    fn with<R>(self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; 40]; // "-9999-12-31T23:59:59.999999Z" is 28 bytes
        let mut rest = &mut buf[..];
        let _ = datetime(self.0).format_into(&mut rest, RFC3339);
        let len = 40 - rest.len();
        f(std::str::from_utf8(&buf[..len]).unwrap_or_default())
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
        let mut buf = Vec::with_capacity(16);
        push_time_of_day(&mut buf, self.0);
        f.write_str(std::str::from_utf8(&buf).unwrap_or_default())
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
}
