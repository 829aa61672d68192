//! Tiny argument helpers shared by the examples (`--name value`, decimal or `0x` hex).

/// The value after `name` as an integer (decimal or `0x` hex); `None` when the flag is
/// absent. A flag with a missing or malformed value ends the program with a message.
pub fn int(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    let v = args.get(i + 1).map(String::as_str).unwrap_or("");
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    };
    if parsed.is_none() {
        eprintln!("{name} wants a number (decimal or 0x hex), got {v:?}");
        std::process::exit(2);
    }
    parsed
}
