//! The root package's example programs, for tests that run them as a user would.
//!
//! Each is built by the test with the cargo that runs it (`CARGO`), for the same profile
//! and features (a no-op when `cargo test` already built the examples, as it does), and
//! located from cargo's JSON messages: this works from a fresh clone, with any target
//! directory, under a plain `cargo test --workspace --all-features`.

// The features named below are the root package's; compiled into a tool's tests (which do
// not build examples) they are unknown there.
#![allow(unexpected_cfgs)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The path of example `name`'s executable, built on first use.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let mut cmd = Command::new(env!("CARGO"));
    let manifest = super::repo_root().join("Cargo.toml");
    cmd.args([
        "build",
        "-p",
        "cnbus",
        "--example",
        name,
        "--message-format=json-render-diagnostics",
        "--manifest-path",
    ]);
    cmd.arg(manifest);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let mut features = Vec::new();
    if cfg!(feature = "tokio") {
        features.push("tokio");
    }
    if cfg!(feature = "serde") {
        features.push("serde");
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running cargo build --example {name}: {e}"));
    assert!(out.status.success(), "cargo build --example {name} failed");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no executable for the {name} example"));
    built.insert(name.to_string(), path.clone());
    path
}
