//! Value parsers for `clap`, each range-checked, so that an out-of-range value is a usage
//! error (exit status 2) rather than a silently wrapped number or a panic. Uses only `std`:
//! the root package's examples include this file too (`examples/common/cli.rs`).

use std::time::Duration;

/// Longest duration accepted, in seconds (about 31 years): far beyond any real run, and
/// small enough that adding it to `Instant::now()` cannot overflow.
pub const MAX_SECS: f64 = 1e9;

/// Largest socket receive buffer accepted (the kernel caps a buffer near 2 GiB).
pub const MAX_BUFFER: usize = 1 << 30;

/// An unsigned integer in decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    };
    r.map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => format!("{s} is too large (at most {})", u64::MAX),
        _ => format!("{s:?} is not a whole number (decimal or 0x hex)"),
    })
}

/// A duration in seconds, fractions allowed: finite, not negative, at most [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=MAX_SECS).contains(&v) {
        return Err(format!("{s} is out of range (0 to {MAX_SECS:e} seconds)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A buffer size in bytes, with an optional `K`, `M` or `G` suffix: 1 byte to 1 GiB.
/// Surrounding white space is ignored (as by [`parse_secs`], and by proctrace's parser
/// before clap).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&t[..t.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let bad = || format!("{s:?} is not a size (bytes, or a number with K, M or G)");
    let n: usize = num.parse().map_err(|_| bad())?;
    match n.checked_mul(mult) {
        Some(b) if (1..=MAX_BUFFER).contains(&b) => Ok(b),
        _ => Err(format!("{s} is out of range (1 byte to 1G)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_range_checked() {
        assert_eq!(parse_u64("0x456"), Ok(0x456));
        assert!(parse_u64("18446744073709551616").is_err());
        assert!(parse_u64("-1").is_err());
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_secs("1e9"), Ok(Duration::from_secs(1_000_000_000)));
        for bad in ["1e19", "1e30", "-1", "NaN", "inf", "", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        // Regression: " 1K" was a usage error after the move to clap (accepted before).
        assert_eq!(parse_size(" 1K"), Ok(1 << 10));
        assert_eq!(parse_size("2M\n"), Ok(2 << 20));
        for bad in [
            "0",
            "2G",
            "99999999999999999999",
            "18446744073709551615K",
            "-5",
            "",
            "K",
            " ",
            "1 K",
            "1G+1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
