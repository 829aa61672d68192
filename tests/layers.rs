//! The layer rule of docs/ARCHITECTURE.md, checked on the source: no module of `src/`
//! names (`use crate::…` or a `crate::…` path in code; comments and doc links are not
//! dependencies) a module of a layer above its own, and the peers of one layer that must
//! stay independent (`bus` and `proc`) do not name each other.
//!
//! [`LAYERS`] is the one list of the layers; docs/ARCHITECTURE.md describes it. Also: no two
//! public types share a name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The crate's top-level modules, from the bottom up. A module may name modules of its own
/// layer and of the layers before it. In a layer marked independent, the modules do not
/// name each other.
///
/// The codec is pure and names nothing of the crate: its errors (`DecodeError`, `TooLarge`)
/// are its own and convert into `error::Error`, which names the codec's `CbId`.
const LAYERS: &[(&[&str], Independent)] = &[
    (&["codec"], Independent::No),
    (&["error"], Independent::No),
    (&["seq"], Independent::No),
    (&["sys"], Independent::No),
    (&["connector"], Independent::No),
    (&["bus", "proc"], Independent::Yes),
    (&["tokio"], Independent::No),
];

/// Modules every layer may use: `sync` swaps parking_lot/std primitives for loom's; it
/// names no other module.
const ANYWHERE: &[&str] = &["sync"];

#[derive(Clone, Copy, PartialEq)]
enum Independent {
    Yes,
    No,
}

/// The top-level module `name` belongs to, by file: `registry` and `delivery` are
/// `connector/registry.rs` and `connector/delivery.rs` built alone under `cfg(cnbus_loom)`.
fn canonical(name: &str) -> &str {
    match name {
        "registry" | "delivery" => "connector",
        n => n,
    }
}

fn layer_of(module: &str) -> Option<(usize, Independent)> {
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (mods, _))| mods.contains(&module))
        .map(|(i, (_, ind))| (i, *ind))
}

/// Whether `from` may name `to`.
fn allowed(from: &str, to: &str) -> Result<(), String> {
    if from == to || ANYWHERE.contains(&to) || ANYWHERE.contains(&from) {
        return Ok(());
    }
    let (Some((lf, ind)), Some((lt, _))) = (layer_of(from), layer_of(to)) else {
        return Err(format!(
            "`{from}` or `{to}` is not in tests/layers.rs's LAYERS: add it where it belongs"
        ));
    };
    if lt > lf {
        Err(format!("`{from}` names `{to}`, a layer above it"))
    } else if lt == lf && ind == Independent::Yes {
        Err(format!(
            "`{from}` names `{to}`: the two must not depend on each other"
        ))
    } else {
        Ok(())
    }
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `line` without its `//` comment (a `//` inside a string literal is kept).
fn code(line: &str) -> &str {
    let b = line.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The items the crate root re-exports (`pub use error::{Error, …};`), by the module they
/// come from, so that `crate::Error` counts as naming `error`.
fn root_reexports(lib: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in lib.lines().map(code) {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = ident(rest).to_string();
        let items = rest[module.len()..].trim_start_matches("::");
        for item in items.trim_matches(|c| "{};".contains(c)).split(',') {
            let item = item.trim();
            if !item.is_empty() {
                out.push((item.to_string(), module.clone()));
            }
        }
    }
    out
}

/// The top-level modules a line of code names through `crate::`: `crate::sys::…`,
/// `crate::{codec::X, error::Y}`, `crate::Error` (a root re-export). `$crate` (in macros)
/// is not a path of this file.
fn named(line: &str, reexports: &[(String, String)], out: &mut BTreeSet<String>) {
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c == '$' || c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let mut name_module = |name: &str| {
            if let Some((_, m)) = reexports.iter().find(|(item, _)| item == name) {
                out.insert(m.clone());
            } else if !name.is_empty() {
                out.insert(canonical(name).to_string());
            }
        };
        if let Some(group) = after.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for part in group.split(',') {
                name_module(ident(part.trim()));
            }
        } else {
            name_module(ident(after));
        }
    }
}

/// The top-level module of a file under `src/` (`None` for the crate root and binaries).
fn module_of(rel: &Path) -> Option<String> {
    let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
    let first = parts.next()?;
    if first == "lib.rs" || first == "bin" || first == "main.rs" {
        return None;
    }
    Some(canonical(first.trim_end_matches(".rs")).to_string())
}

#[test]
fn no_module_names_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let reexports = root_reexports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(
        reexports.iter().any(|(i, m)| i == "Error" && m == "error"),
        "the crate root's re-exports were not found: {reexports:?}"
    );
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut faults = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(from) = module_of(rel) else {
            continue;
        };
        checked += 1;
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut to = BTreeSet::new();
            named(code(line), &reexports, &mut to);
            for to in to {
                if let Err(why) = allowed(&from, &to) {
                    faults.push(format!(
                        "src/{}:{}: {why}\n    {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files checked under {}",
        src.display()
    );
    assert!(
        faults.is_empty(),
        "layer rule broken:\n{}",
        faults.join("\n")
    );
}

/// Every top-level module of the crate is in [`LAYERS`] (or [`ANYWHERE`]), so a new module
/// is placed deliberately.
#[test]
fn every_module_has_a_layer() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let mut missing = Vec::new();
    for line in lib.lines().map(code) {
        let l = line.trim();
        let Some(rest) = l
            .strip_prefix("pub mod ")
            .or_else(|| l.strip_prefix("mod "))
            .or_else(|| l.strip_prefix("pub(crate) mod "))
        else {
            continue;
        };
        let m = canonical(ident(rest));
        if m != "guide" && layer_of(m).is_none() && !ANYWHERE.contains(&m) {
            missing.push(m.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a layer in tests/layers.rs: {missing:?}"
    );
}

/// The checker itself: it sees what it must and ignores comments.
#[test]
fn the_checker_reads_paths_and_skips_comments() {
    let re = vec![("Error".to_string(), "error".to_string())];
    let mut to = BTreeSet::new();
    named(
        code("use crate::{codec::CbId, sys::Dest}; // crate::bus"),
        &re,
        &mut to,
    );
    named(code("let e: crate::Error = x;"), &re, &mut to);
    named(
        code("$crate::proc::x(); krate::connector::y()"),
        &re,
        &mut to,
    );
    named(code("/// [`Bus`](crate::bus::Bus)"), &re, &mut to);
    assert_eq!(
        to.into_iter().collect::<Vec<_>>(),
        ["codec", "error", "sys"]
    );
    assert!(allowed("sys", "connector").is_err());
    assert!(allowed("bus", "proc").is_err());
    assert!(allowed("proc", "connector").is_ok());
    assert!(allowed("codec", "error").is_err());
    assert!(allowed("error", "codec").is_ok());
    assert!(allowed("bus", "sync").is_ok());
}

/// One name per idea: no two `pub` types (struct, enum, type alias, trait) in `src/` share a
/// name (two `Received`s, two `SeqTracker`s and two `Source`s were three such pairs).
#[test]
fn public_type_names_are_unique() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut twins = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("bin") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let l = code(line).trim_start();
            let Some(rest) = ["pub struct ", "pub enum ", "pub type ", "pub trait "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
            else {
                continue;
            };
            let name = ident(rest).to_string();
            let at = format!("src/{}:{}", rel.display(), n + 1);
            if let Some((_, first)) = seen.iter().find(|(s, _)| *s == name) {
                twins.push(format!("{name}: {first} and {at}"));
            } else {
                seen.push((name, at));
            }
        }
    }
    assert!(seen.len() > 50, "only {} public types found", seen.len());
    assert!(
        twins.is_empty(),
        "public types sharing a name:\n{}",
        twins.join("\n")
    );
}
