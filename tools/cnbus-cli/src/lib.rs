//! What cnbus's command-line tools (`proctrace`, `cnbus-agent`) share, in one place:
//!
//! * [`args`]: range-checked value parsers for `clap` (seconds, sizes, integers);
//! * [`clock`]: kernel clocks to wall-clock time, and its RFC 3339 form (the `time` crate);
//! * [`procfs`]: small `/proc` reads (`stat`, command line, the tool's own usage);
//! * [`event`]: the one JSON schema of a process event line and of a `lost` line, for
//!   both tools (docs/AGENT.md, "JSON event lines");
//! * [`json`]: one JSON object per line, written with `serde_json`, and the fields of a
//!   `lost` line;
//! * [`output`]: [`warn!`] (stderr that never panics), how a failed write ends a tool (a
//!   closed pipe or a terminal that hung up: quietly, status 0), and
//!   the termination signals blocked at start;
//! * [`generate`]: the hidden `completions SHELL` and `man` subcommands (`clap_complete`,
//!   `clap_mangen`).
//!
//! It is not part of the library: `cnbus` never depends on it (nor on `clap` or `time`).

pub mod args;
pub mod clock;
pub mod event;
pub mod generate;
pub mod json;
pub mod output;
pub mod procfs;
