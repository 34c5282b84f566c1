//! `migtun completions SHELL` and `migtun man`: shell completion scripts (clap_complete) and a
//! man page in roff (clap_mangen), both made from the same clap definitions the parser uses, so
//! they never fall behind the command line.

use std::io::Write;

use anyhow::Context;
use clap::Command;

/// Writes the completion script for `shell` to stdout.
pub fn completions(mut cmd: Command, shell: clap_complete::Shell) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    std::io::stdout().write_all(&out).context("write the completion script")
}

/// Writes one man page, `migtun(1)`, to stdout: the top command, then a section per subcommand
/// (and sub-subcommand) with its options and examples.
pub fn man(cmd: Command) -> anyhow::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    // Every subcommand, with its own synopsis, options and the example of its --help.
    let mut commands = Vec::new();
    collect(&cmd, &mut Vec::new(), &mut commands);
    for (path, sub) in &commands {
        writeln!(out, ".SH \"{}\"", roff_escape(&path.join(" ").to_uppercase()))?;
        let sub_man = clap_mangen::Man::new(sub.clone());
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(out, ".PP\n{}", roff_escape(&about.to_string()))?;
        }
        let mut part = Vec::new();
        sub_man.render_synopsis_section(&mut part)?;
        sub_man.render_options_section(&mut part)?;
        // The sub-page's sections become subsections of this command's section.
        let part = String::from_utf8_lossy(&part).replacen(".SH SYNOPSIS", ".SS Synopsis", 1).replacen(".SH OPTIONS", ".SS Options", 1);
        out.write_all(part.as_bytes())?;
        if let Some(after) = sub.get_after_long_help().or(sub.get_after_help()) {
            // The help's own "Example(s):" heading is this subsection's title.
            let after = after.to_string();
            let body = match after.split_once('\n') {
                Some((first, rest)) if first.starts_with("Example") => rest.to_string(),
                _ => after,
            };
            writeln!(out, ".SS Examples\n.nf\n{}\n.fi", roff_escape(&body))?;
        }
    }
    man.render_version_section(&mut out)?;
    std::io::stdout().write_all(&out).context("write the man page")
}

/// Subcommands depth-first, with their full names (`migtun certs issue`).
fn collect(cmd: &Command, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Command)>) {
    prefix.push(cmd.get_name().to_string());
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut path = prefix.clone();
        path.push(sub.get_name().to_string());
        out.push((path, sub.clone()));
        collect(sub, prefix, out);
    }
    prefix.pop();
}

/// Text for roff: backslashes doubled, a leading `.` or `'` (a request) guarded with `\&`.
fn roff_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .lines()
        .map(|l| if l.starts_with('.') || l.starts_with('\'') { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}
