//! The data plane's layering, checked: every `crate::X` reference in `proxy/src/**/*.rs` must point
//! at a module in the same layer or a lower one (the table in `LAYERS`, the same map `lib.rs`
//! documents), no two modules use each other (which one layer would allow), and nothing in
//! `proxy/` may name the control-plane crate.
//!
//! A folder is one module of one layer: every file under `src/tls/` (`tls/session/records.rs` too)
//! is in the layer of `tls`, and its `crate::tls::…` paths to its own folder are never upward.
//!
//! Test code is exempt: a `tests.rs` file, or a `#[cfg(test)] mod … { … }` block, may drive the code
//! it tests through a higher layer (a TLS session tested through the relay); shipped code may not.
//!
//! There are no exceptions left from the flat layout: any upward import fails this test, naming
//! the file, the line and both layers.

use std::path::{Path, PathBuf};

/// Layers bottom-up: a module may use its own layer and those before it, never one after it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "io",
&["metrics", "notify", "io"],
    ),
    ("tls", &["tls"]),
    ("quic", &["quic"]),
    ("config", &["config"]),
    ("stream", &["stream"]),
    ("relay", &["relay"]),
    ("peer", &["peer"]),
    ("route", &["route"]),
    ("port", &["port"]),
    ("agent", &["agent", "fuzzing", "lib"]),
];

fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (_, mods))| mods.contains(&module))
        .map(|(i, (name, _))| (i, *name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/tls/record.rs` → `tls`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("a path component");
    let first = first.as_os_str().to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_string()
}

/// The modules named as `crate::X` on one line, comments and doc comments excluded.
fn crate_refs(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = &rest[..at];
        let tail = &rest[at + "crate::".len()..];
        // Skip identifiers that merely end in `crate` (`$crate::`, `some_crate::`).
        let standalone = !before.ends_with(|c: char| c.is_alphanumeric() || c == '_');
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if standalone && !name.is_empty() && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(name);
        }
        rest = tail;
    }
    out
}

/// The lines of `text` that ship, numbered from 1: none of a `tests.rs`, and no line of a
/// top-level `#[cfg(test)] mod name {` block (up to its closing `}` in column 0).
fn shipped_lines<'a>(file: &Path, text: &'a str) -> Vec<(usize, &'a str)> {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return Vec::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let opens_test_module = lines[i].trim_end() == "#[cfg(test)]"
            && lines.get(i + 1).is_some_and(|l| l.starts_with("mod ") && l.trim_end().ends_with('{'));
        if opens_test_module {
            i += 2;
            while i < lines.len() && lines[i].trim_end() != "}" {
                i += 1;
            }
        } else {
            out.push((i + 1, lines[i]));
        }
        i += 1;
    }
    out
}

/// Pairs of modules (of one layer: across layers the upward one already failed) that use each
/// other: one of them belongs below the other, or what they share below both.
fn mutual(uses: &std::collections::BTreeSet<(String, String)>) -> Vec<String> {
    uses.iter()
        .filter(|(a, b)| a < b && uses.contains(&(b.clone(), a.clone())))
        .map(|(a, b)| format!("`{a}` and `{b}` use each other: one belongs below the other"))
        .collect()
}

#[test]
fn two_modules_that_use_each_other_are_reported() {
    let uses = [("metrics", "io"), ("io", "metrics"), ("io", "tls")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(mutual(&uses), ["`io` and `metrics` use each other: one belongs below the other"]);
}

#[test]
fn test_modules_are_not_shipped_code() {
    let text = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\nuse crate::c;\n#[cfg(test)]\nfn helper() { crate::d(); }\n";
    let shipped: Vec<usize> = shipped_lines(Path::new("/x/src/m.rs"), text).iter().map(|(n, _)| *n).collect();
    assert_eq!(shipped, [1, 6, 7, 8], "a cfg(test) fn is not a test module: it is checked");
    assert!(shipped_lines(Path::new("/x/src/tls/session/tests.rs"), text).is_empty());
}

#[test]
fn a_file_in_a_folder_is_in_the_folder_s_layer() {
    let src = Path::new("/x/src");
    for (file, module) in [
        ("/x/src/tls/mod.rs", "tls"),
        ("/x/src/tls/session/records.rs", "tls"),
        ("/x/src/quic/stream.rs", "quic"),
        ("/x/src/relay.rs", "relay"),
    ] {
        assert_eq!(module_of(src, Path::new(file)), module, "{file}");
    }
    assert_eq!(layer_of("tls").map(|(_, name)| name), Some("tls"));
    assert_eq!(crate_refs("use crate::tls::session::{accept, connect}; // crate::port"), ["tls"]);
}

#[test]
fn no_module_uses_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    let mut failures = Vec::new();
    let mut uses = std::collections::BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some((from_layer, from_name)) = layer_of(&module) else {
            failures.push(format!(
                "{}: module `{module}` is in no layer of LAYERS (tests/layers.rs) — add it where it belongs",
                file.display()
            ));
            continue;
        };
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (n, line) in shipped_lines(file, &text) {
            for target in crate_refs(line) {
                if target != module {
                    uses.insert((module.clone(), target.clone()));
                }
                let Some((to_layer, to_name)) = layer_of(&target) else {
                    continue; // an item of lib.rs itself (`crate::Agent`) or a macro path
                };
                if to_layer <= from_layer {
                    continue;
                }
                failures.push(format!(
                    "{}:{}: `{module}` (layer {from_name}) uses `crate::{target}` (layer {to_name}), a higher layer",
                    file.display(),
                    n
                ));
            }
        }
    }
    failures.extend(mutual(&uses));
    assert!(
        failures.is_empty(),
        "layering broken:\n{}",
        failures.join("\n")
    );
}

#[test]
fn proxy_never_references_control() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        let d = root.join(dir);
        if d.is_dir() {
            rust_files(&d, &mut files);
        }
    }
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("proxy/Cargo.toml");
    assert!(
        !cargo.contains("migtun-control"),
        "proxy/Cargo.toml depends on migtun-control"
    );
    let needle = ["migtun", "_control"].concat();
    for file in files {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains(&needle),
                "{}:{}: the data plane names the control plane",
                file.display(),
                n + 1
            );
        }
    }
}
