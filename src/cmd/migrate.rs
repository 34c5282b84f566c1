//! `migtun migrate` and `migtun status`: clients of the local agent's admin socket.
//!
//! The agent runs the migration; this command submits it and shows progress. If this process
//! dies the migration goes on; Ctrl-C asks the agent to cancel it (and waits for the rollback).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::HumanBytes;
use migtun_control::admin::{self, Direction, MigrationSummary, Request, Status};
use migtun_control::messages::{Event, MigrateArgs, OutcomeKind, Report};

use super::ui::{self, Screen, Ui};

pub fn migrate(admin_socket: &Path, args: MigrateArgs, json: bool) -> anyhow::Result<()> {
    migrate_on(admin_socket, args, Ui::new(json, Screen::stderr()))
}

/// [`migrate`] with the output going to `ui`.
pub fn migrate_on(admin_socket: &Path, args: MigrateArgs, ui: Ui) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        // Shared between the report handler and the Ctrl-C branch; one thread, so RefCell.
        let state = std::rc::Rc::new(std::cell::RefCell::new(State { ui, id: None, outcome: None }));
        let socket = admin_socket.to_path_buf();
        let request = Request::Migrate { args };
        let handler_state = state.clone();
        let submit = admin::request(&socket, &request, move |line| {
            let mut st = handler_state.borrow_mut();
            if let Some(err) = refusal(&line) {
                st.outcome = Some((OutcomeKind::Refused, err.to_string()));
                st.ui.refused(err);
                return false;
            }
            let Ok(event) = serde_json::from_value::<Event>(line.clone()) else { return true };
            if let Report::Accepted { .. } = &event.report {
                st.id = Some(event.id.clone());
            }
            if let Report::Done { outcome, message, .. } = &event.report {
                st.outcome = Some((*outcome, message.clone()));
            }
            st.ui.show(&event, &line);
            st.outcome.is_none()
        });
        tokio::pin!(submit);
        let result = tokio::select! {
            r = &mut submit => r,
            _ = tokio::signal::ctrl_c() => {
                let id = state.borrow().id.clone();
                let Some(id) = id else { bail!("interrupted before the agent accepted the migration") };
                state.borrow_mut().ui.interrupted();
                admin::request(&socket, &Request::Cancel { id }, |_| false).await?;
                submit.await
            }
        };
        let mut st = state.borrow_mut();
        let outcome = st.outcome.as_ref().map(|(kind, _)| *kind);
        st.ui.end(outcome);
        result?;
        match st.outcome.take() {
            Some((OutcomeKind::Succeeded, _)) => Ok(()),
            Some((kind, message)) => bail!("migration {}: {message}", serde_json::to_string(&kind).unwrap_or_default().trim_matches('"')),
            None => bail!("the agent closed the connection before the migration ended (it may still be running: see `migtun status`)"),
        }
    })
}

/// The agent's refusal of the request itself: `{"error": ...}`, not an event (a failed
/// migration's `done` event has an `error` too).
fn refusal(line: &serde_json::Value) -> Option<&str> {
    line.get("event").is_none().then(|| line.get("error").and_then(|e| e.as_str())).flatten()
}

struct State {
    ui: Ui,
    id: Option<String>,
    outcome: Option<(OutcomeKind, String)>,
}

/// `migtun resolve`: the operator's decision for a migration whose outcome is unknown.
pub fn resolve(admin_socket: &Path, id: &str, guest_on: admin::GuestOn) -> anyhow::Result<()> {
    super::ask_agent(admin_socket, &Request::Resolve { id: id.to_string(), guest_on })?.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{id}: resolved (guest on the {}); `migtun status` shows the migration's end", guest_on.as_str());
    Ok(())
}

pub fn status(admin_socket: &Path, json: bool) -> anyhow::Result<()> {
    let line = super::ask_agent(admin_socket, &Request::Status)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        println!("{line}");
        return Ok(());
    }
    let status: Status = serde_json::from_value(line).context("unexpected answer")?;
    print!("{}", render_status(&status));
    Ok(())
}

/// `migtun status` for people: running migrations with their progress, then the ended ones.
fn render_status(status: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "agent {}", status.name);
    let (running, ended): (Vec<_>, Vec<_>) = status.migrations.iter().partition(|m| m.outcome.is_none());
    let arrow = |m: &MigrationSummary| match m.direction {
        Direction::Outgoing => format!("{} -> {}", m.vm, m.peer),
        Direction::Incoming => format!("{} <- {}", m.vm, m.peer),
    };
    let _ = writeln!(out, "running:{}", if running.is_empty() { " none" } else { "" });
    for m in &running {
        let phase = match &m.step {
            Some(s) => format!("{}/{s}", m.phase),
            None => m.phase.clone(),
        };
        let _ = writeln!(out, "  {}  {}  {phase}  since {} ({})", m.id, arrow(m), m.started, ui::duration(m.duration_s));
        if let Some(p) = &m.progress {
            let pct = if p.total_bytes > 0 { p.done_bytes as f64 * 100.0 / p.total_bytes as f64 } else { 0.0 };
            let mut line = format!("    {} {}/{} ({pct:.0}%)", p.stage, HumanBytes(p.done_bytes), HumanBytes(p.total_bytes));
            if let Some(r) = p.bytes_per_s {
                line += &format!(", {}", ui::rate(r));
            }
            if let Some(e) = p.eta_s {
                line += &format!(", eta {}", ui::duration(e));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(out, "ended (the last {} of each direction):{}", admin::HISTORY, if ended.is_empty() { " none" } else { "" });
    for m in ended.iter().rev() {
        let outcome = m.outcome.and_then(|o| serde_json::to_value(o).ok()).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let _ = writeln!(out, "  {}  {}  {outcome}  {}  took {}", m.id, arrow(m), m.started, ui::duration(m.duration_s));
        if m.outcome != Some(OutcomeKind::Succeeded) {
            if let Some(msg) = &m.message {
                let _ = writeln!(out, "    {msg}");
            }
        }
    }
    let _ = writeln!(out, "routes:{}", if status.routes.is_empty() { " none" } else { "" });
    for r in &status.routes {
        let _ = writeln!(out, "  {r}");
    }
    let _ = writeln!(out, "open streams:{}", if status.streams.is_empty() { " none" } else { "" });
    for s in &status.streams {
        let _ = writeln!(out, "  {} {} ({}): {}", s.peer, s.route, s.side, s.open);
    }
    out
}

/// The files to carry, checked before anything is submitted.
pub fn check_files(files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    files
        .iter()
        .map(|f| {
            let abs = std::fs::canonicalize(f).with_context(|| format!("--with-file {}", f.display()))?;
            if !abs.is_file() {
                bail!("--with-file {}: not a regular file", f.display());
            }
            Ok(abs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use migtun_control::messages::Totals;

    #[test]
    fn a_failed_done_event_is_no_refusal_of_the_request() {
        assert_eq!(refusal(&serde_json::json!({"error": "bad request: missing field `to`"})), Some("bad request: missing field `to`"));
        let done = Event::now("m-1", Report::done(OutcomeKind::Failed, "it broke".into(), Totals::default()));
        assert_eq!(refusal(&serde_json::to_value(done).unwrap()), None);
    }
}
