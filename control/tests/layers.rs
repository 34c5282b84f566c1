//! The control plane's layering (the map in `src/lib.rs`): every `crate::` path in
//! `control/src/**/*.rs` must point to the same layer or a lower one. Fails naming the file, the
//! line and both layers.

use std::path::{Path, PathBuf};

/// Module path prefixes (after `crate::`) and their layer, lowest first; the longest prefix wins.
/// Same rank, different layer: neither may use the other.
const LAYERS: &[(&str, &str, u8)] = &[
    ("messages", "base", 0),
    ("progress", "base", 0),
    ("failpoint", "base", 0),
    ("process", "base", 0),
    ("qemu_command", "base", 0),
    ("migration::machine", "machine", 1),
    ("machine", "machine", 1),
    ("destination", "policy", 1),
    ("qmp", "qmp", 2),
    ("rpc", "rpc", 2),
    ("migration::journal", "journal", 2),
    ("journal", "journal", 2),
    ("migration::handover", "journal", 2),
    ("migration::teardown", "tools", 3),
    ("teardown", "tools", 3),
    ("tunnels", "tools", 3),
    ("admin", "tools", 3),
    // Builds the rpc server's policy from the config: above rpc, so rpc never knows it.
    ("authz", "tools", 3),
    // Asks the destination again for an unknown outcome: used by the driver and by recovery.
    ("migration::settle", "tools", 3),
    ("migration::driver", "sides", 4),
    ("driver", "sides", 4),
    ("migration::recovery", "sides", 4),
    ("recovery", "sides", 4),
    ("destination::incoming", "sides", 4),
    ("incoming", "sides", 4),
    // `migration/mod.rs` only declares its modules.
    ("migration", "sides", 4),
    ("service", "service", 5),
    ("fuzzing", "service", 5),
];

/// The entry of `module` in [`LAYERS`] (longest prefix), flat re-export paths (`driver`) named
/// as their module (`migration::driver`).
fn unit_of(module: &str) -> Option<&'static str> {
    let prefix = LAYERS
        .iter()
        .map(|(prefix, _, _)| *prefix)
        .filter(|prefix| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|prefix| prefix.len())?;
    let nested = LAYERS.iter().map(|(p, _, _)| *p).find(|p| p.rsplit("::").next() == Some(prefix) && p.contains("::"));
    Some(nested.unwrap_or(prefix))
}

fn layer_of(module: &str) -> Option<(&'static str, u8)> {
    LAYERS
        .iter()
        .filter(|(prefix, _, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|(_, name, rank)| (*name, *rank))
}

/// `src/migration/machine/begin.rs` → `migration::machine::begin`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod" && *p != "lib").collect();
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())).path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module paths named by `crate::a::b` in one line of code (comments dropped).
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        found.push(path.trim_end_matches(':').to_string());
    }
    found
}

/// Pairs of modules of one layer that use each other (rpc and authz did): one of them belongs
/// higher, or what both use belongs in a module of its own.
fn cycles(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = std::collections::BTreeSet::new();
    for file in &files {
        let Some(from) = unit_of(&module_of(src, file)) else { continue };
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for path in crate_paths(line) {
                if let Some(to) = unit_of(&path).filter(|to| *to != from) {
                    edges.insert((from, to));
                }
            }
        }
    }
    edges.iter().filter(|(a, b)| a < b && edges.contains(&(*b, *a))).map(|(a, b)| format!("{a} and {b} use each other")).collect()
}

fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let module = module_of(src, file);
        if module.is_empty() {
            continue; // lib.rs: the map and its re-exports
        }
        let Some((from, from_rank)) = layer_of(&module) else {
            problems.push(format!("{}: module {module} has no layer in tests/layers.rs", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for path in crate_paths(line) {
                let Some((to, to_rank)) = layer_of(&path) else { continue };
                if to != from && to_rank >= from_rank {
                    problems.push(format!(
                        "{}:{}: layer {from} (rank {from_rank}) uses crate::{path} of layer {to} (rank {to_rank})",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn control_imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(problems.is_empty(), "imports against the layering of control/src/lib.rs:\n{}", problems.join("\n"));
}

#[test]
fn no_two_control_modules_use_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = cycles(&src);
    assert!(problems.is_empty(), "modules of control/src that use each other:\n{}", problems.join("\n"));
}

#[test]
fn the_scanner_sees_an_upward_path() {
    assert_eq!(crate_paths("use crate::migration::driver::Outgoing; // crate::qmp"), vec!["migration::driver::Outgoing"]);
    assert_eq!(layer_of("migration::machine::types"), Some(("machine", 1)));
    assert_eq!(layer_of("destination::incoming"), Some(("sides", 4)));
    assert_eq!(layer_of("destination::cookie"), Some(("policy", 1)));
    assert!(crate_paths("use migtun_crate::x;").is_empty());
    assert_eq!(unit_of("driver::Outgoing"), Some("migration::driver"));
    assert_eq!(unit_of("rpc::server"), Some("rpc"));
}
