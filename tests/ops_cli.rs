//! The command line's generated parts (issue 12, item 10): `migtun completions bash|zsh|fish`
//! and `migtun man` come from the clap definitions and name every subcommand (taken from
//! `migtun --help`, so a new subcommand is checked too); the bash script parses, the man page
//! renders. The new subcommands' `--help` has an example, like every other's (tests/cli.rs).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");

fn migtun(args: &[&str]) -> Output {
    Command::new(MIGTUN).args(args).output().expect("run migtun")
}

/// The subcommands `--help` lists under "Commands:" (without `help`), of `migtun` or of `sub`.
fn subcommands(sub: &[&str]) -> Vec<String> {
    let mut args = sub.to_vec();
    args.push("--help");
    let help = String::from_utf8(migtun(&args).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
}

/// `name`, which the test needs: missing fails under CI=true, else skips loudly.
fn required_tool(name: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{name} is missing: CI must install it (.ci/run)");
        eprintln!("\n!!! SKIPPED: {name} is not installed; that check did not run !!!\n");
    }
    found
}

#[test]
fn completions_name_every_subcommand_and_bash_parses_its_script() {
    let top = subcommands(&[]);
    for expected in ["serve", "check", "certs", "migrate", "status", "resolve", "healthcheck", "completions", "man", "demo"] {
        assert!(top.iter().any(|c| c == expected), "--help lists {expected}: {top:?}");
    }
    let certs = subcommands(&["certs"]);
    assert_eq!(certs, ["init", "issue", "revoke"]);
    for shell in ["bash", "zsh", "fish"] {
        let out = migtun(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.len() > 1000, "{shell}: a real script, {} bytes", script.len());
        for sub in top.iter().chain(&certs) {
            assert!(script.contains(sub.as_str()), "{shell} completion names {sub}");
        }
        // Options are completed too.
        for option in ["--config", "--admin", "--guest-on", "--ready"] {
            assert!(script.contains(option.trim_start_matches('-')), "{shell} completion names {option}");
        }
    }
    if let Some(bash) = required_tool("bash") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("migtun.bash");
        std::fs::write(&file, migtun(&["completions", "bash"]).stdout).unwrap();
        let out = Command::new(&bash).arg("-n").arg(&file).output().unwrap();
        assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
        // And it works: sourced, it registers a completion for migtun that offers `serve`.
        let probe = format!(
            "source {}; COMP_WORDS=(migtun se); COMP_CWORD=1; COMP_LINE='migtun se'; COMP_POINT=9; \
             _migtun migtun se migtun; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        );
        let out = Command::new(&bash).args(["-c", &probe]).output().unwrap();
        let replies = String::from_utf8_lossy(&out.stdout);
        assert!(replies.lines().any(|l| l == "serve"), "completing `migtun se`: {replies:?} {}", String::from_utf8_lossy(&out.stderr));
    }
    // zsh and fish check their syntax too, where installed (not required).
    for (shell, flag) in [("zsh", "-n"), ("fish", "--no-execute")] {
        let Some(path) = find_tool(shell) else {
            eprintln!("{shell} not installed: its completion script's syntax is not checked");
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("migtun.script");
        std::fs::write(&file, migtun(&["completions", shell]).stdout).unwrap();
        let out = Command::new(path).arg(flag).arg(&file).output().unwrap();
        assert!(out.status.success(), "{shell} {flag}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = migtun(&["completions", "tcsh"]);
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn the_man_page_renders_and_names_every_subcommand_with_its_example() {
    let out = migtun(&["man"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let roff = String::from_utf8(out.stdout).unwrap();
    // roff structure: a title, the standard sections, a section per subcommand.
    assert!(roff.starts_with(".ie") || roff.starts_with(".TH") || roff.contains("\n.TH migtun 1"), "{}", &roff[..200.min(roff.len())]);
    assert!(roff.contains(".TH migtun 1"), "title line");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH OPTIONS", ".SH VERSION"] {
        assert!(roff.contains(section), "{section}");
    }
    let mut all: Vec<String> = subcommands(&[]).iter().map(|s| format!("MIGTUN {}", s.to_uppercase())).collect();
    all.extend(subcommands(&["certs"]).iter().map(|s| format!("MIGTUN CERTS {}", s.to_uppercase())));
    for section in &all {
        assert!(roff.contains(&format!(".SH \"{section}\"")), "a section for {section}");
    }
    let Some(man) = find_tool("man") else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "man is missing: CI must install man-db (.ci/run)");
        eprintln!("\n!!! man is not installed: the page's roff structure was checked, not its rendering !!!\n");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("migtun.1");
    std::fs::write(&page, &roff).unwrap();
    let out = Command::new(man)
        .args(["--warnings", "-l"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "man -l: {}", String::from_utf8_lossy(&out.stderr));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(!warnings.contains("warning"), "groff warnings: {warnings}");
    for section in all.iter().map(String::as_str).chain(["NAME", "SYNOPSIS", "OPTIONS"]) {
        assert!(text.lines().any(|l| l.trim() == section), "rendered page has {section}:\n{text}");
    }
    for example in ["migtun serve --config /etc/migtun/host-a.toml", "migtun healthcheck --metrics 127.0.0.1:9477", "migtun completions bash"] {
        assert!(text.contains(example), "the page shows {example:?}");
    }
}

#[test]
fn healthcheck_without_a_target_is_a_usage_error() {
    // Their --help examples and option descriptions are checked with every other subcommand's
    // in tests/cli.rs.
    let out = migtun(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(2), "healthcheck needs --url, --metrics or --config");
}
