//! Process keys: boot id + pid + start time, the same whether derived from a fork event or
//! read from `/proc/<pid>/stat`.

use std::fmt;
use std::str::FromStr;

/// A process identity that survives pid reuse and reboots: the boot id
/// (`/proc/sys/kernel/random/boot_id`), the process id (tgid, in the initial pid namespace)
/// and the process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`,
/// the kernel's `start_boottime` divided by `1e9 / sysconf(_SC_CLK_TCK)`).
///
/// Printed (and serialised) as one string, `<boot id, 32 hex>-<pid>-<start ticks>`, e.g.
/// `3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654`; [`FromStr`] reads it back, and only
/// it: one key has one text (no `+`, leading zeros or upper-case hex).
///
/// Two processes never share a key: a pid is reused only after its process is gone, and a
/// process started within the same clock tick as an earlier holder of its pid would need
/// the whole pid space (`pid_max`) to wrap inside 10 ms. How a key is derived from a fork
/// event so that it equals the one `/proc` gives is in `docs/PROC.md` ("Process keys").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    /// The boot id as a 128-bit number (0 when `/proc` did not give one).
    pub boot: u128,
    /// Process id (tgid) in the initial pid namespace.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// The longest printed key: 32 hex digits, 2 dashes, a u32 and a u64 in decimal.
const KEY_LEN: usize = 32 + 1 + 10 + 1 + 20;

impl ProcessKey {
    /// Prints the key into `buf` (no allocation, no formatting machinery: keys are printed
    /// for every event a tracer writes); the text.
    fn encode<'b>(&self, buf: &'b mut [u8; KEY_LEN]) -> &'b str {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in buf[..32].iter_mut().enumerate() {
            *b = HEX[((self.boot >> (4 * (31 - i))) & 0xf) as usize];
        }
        let mut n = 32;
        for v in [u64::from(self.pid), self.start_ticks] {
            buf[n] = b'-';
            n += 1;
            let mut digits = [0u8; 20];
            let mut d = digits.len();
            let mut v = v;
            loop {
                d -= 1;
                digits[d] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            let len = digits.len() - d;
            buf[n..n + len].copy_from_slice(&digits[d..]);
            n += len;
        }
        // Only ASCII digits, letters and dashes were written.
        std::str::from_utf8(&buf[..n]).unwrap_or_default()
    }
}

impl fmt::Display for ProcessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode(&mut [0; KEY_LEN]))
    }
}

/// A string that is not a [`ProcessKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a process key (<32 hex>-<pid>-<start ticks>): {0:?}")]
pub struct BadProcessKey(pub String);

impl FromStr for ProcessKey {
    type Err = BadProcessKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadProcessKey(s.to_string());
        let mut it = s.split('-');
        let (Some(b), Some(p), Some(t), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        if b.len() != 32 || !b.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let key = ProcessKey {
            boot: u128::from_str_radix(b, 16).map_err(|_| bad())?,
            pid: p.parse().map_err(|_| bad())?,
            start_ticks: t.parse().map_err(|_| bad())?,
        };
        // One key, one text: no `+` signs, leading zeros or upper-case hex, which would
        // make two strings of one process (keys are compared and indexed as text).
        if key.encode(&mut [0; KEY_LEN]) != s {
            return Err(bad());
        }
        Ok(key)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ProcessKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.encode(&mut [0; KEY_LEN]))
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ProcessKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses the text of `/proc/sys/kernel/random/boot_id` (a UUID with dashes).
pub(crate) fn parse_boot_id(text: &str) -> Option<u128> {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// The boot id of the running kernel, `None` when `/proc` does not give it.
pub fn boot_id() -> Option<u128> {
    parse_boot_id(&std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?)
}

/// Converts the fork event's clock (`CLOCK_MONOTONIC` ns) to the start-time clock of
/// `/proc` (`CLOCK_BOOTTIME` clock ticks), and says when that conversion is certain.
///
/// The kernel stamps a new task's `start_boottime` in `copy_process()` (kernel/fork.c)
/// and the fork event's `timestamp_ns` (`ktime_get_ns()`) in `proc_fork_connector()`,
/// called at the end of the same `copy_process()`: the event is later by the time between,
/// microseconds. Both end in the same tick unless a tick boundary falls in between, so a
/// timestamp less than `guard_ns` after a boundary is *uncertain* and the start time must
/// come from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TickClock {
    /// Nanoseconds per clock tick (10 ms at `USER_HZ` 100).
    pub tick_ns: u64,
    /// Width of the uncertain window after each tick boundary.
    pub guard_ns: u64,
}

impl TickClock {
    /// Clock ticks of a `CLOCK_BOOTTIME` time in ns (what `/proc` prints: `nsec_to_clock_t`).
    pub fn ticks(&self, boot_ns: u64) -> u64 {
        boot_ns / self.tick_ns.max(1)
    }

    /// The start ticks of a process whose fork event says `mono_ns`, given the current
    /// `CLOCK_BOOTTIME - CLOCK_MONOTONIC` offset (time spent suspended); `None` when the
    /// event is within the guard window after a tick boundary.
    pub fn fork_ticks(&self, mono_ns: u64, boot_offset_ns: u64) -> Option<u64> {
        let t = mono_ns.saturating_add(boot_offset_ns);
        let tick = self.tick_ns.max(1);
        if t % tick < self.guard_ns {
            None
        } else {
            Some(t / tick)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prints_and_parses() {
        let k = ProcessKey {
            boot: 0x3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b,
            pid: 4242,
            start_ticks: 987654,
        };
        let s = k.to_string();
        assert_eq!(s, "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-987654");
        assert_eq!(s.parse::<ProcessKey>().unwrap(), k);
        let z = ProcessKey {
            boot: 0,
            pid: 1,
            start_ticks: 0,
        };
        assert_eq!(z.to_string().parse::<ProcessKey>().unwrap(), z);
        let max = ProcessKey {
            boot: u128::MAX,
            pid: u32::MAX,
            start_ticks: u64::MAX,
        };
        assert_eq!(
            max.to_string(),
            format!("{:032x}-{}-{}", u128::MAX, u32::MAX, u64::MAX)
        );
        assert_eq!(max.to_string().parse::<ProcessKey>().unwrap(), max);
        assert_eq!(z.to_string(), "00000000000000000000000000000000-1-0");
        for bad in [
            "",
            "1-2-3",
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-x-1",
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-1-2-3",
            // Other spellings of 3f1c…-4242-987654: accepted before.
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-+4242-987654",
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-04242-987654",
            "3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b-4242-+987654",
            "3F1C0B2E9A6D4B7F8E5A1C2D3E4F5A6B-4242-987654",
        ] {
            assert!(bad.parse::<ProcessKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn boot_id_text() {
        assert_eq!(
            parse_boot_id("3f1c0b2e-9a6d-4b7f-8e5a-1c2d3e4f5a6b\n"),
            Some(0x3f1c0b2e9a6d4b7f8e5a1c2d3e4f5a6b)
        );
        assert_eq!(parse_boot_id("nonsense"), None);
        assert_eq!(parse_boot_id(""), None);
        assert!(boot_id().is_some());
    }

    #[test]
    fn fork_ticks_refuses_the_window_after_a_boundary() {
        let c = TickClock {
            tick_ns: 10_000_000,
            guard_ns: 1_000_000,
        };
        assert_eq!(c.fork_ticks(25_000_000, 0), Some(2));
        assert_eq!(c.fork_ticks(20_999_999, 0), None);
        assert_eq!(c.fork_ticks(21_000_000, 0), Some(2));
        // The suspend offset moves the boundary.
        assert_eq!(c.fork_ticks(25_000_000, 5_500_000), None);
        assert_eq!(
            c.fork_ticks(u64::MAX, u64::MAX),
            Some(u64::MAX / 10_000_000)
        );
        assert_eq!(c.ticks(19_999_999), 1);
    }
}
