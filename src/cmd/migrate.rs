//! `migtun migrate` and `migtun status`: clients of the local agent's admin socket.
//!
//! The agent runs the migration; this command submits it and shows progress. If this process
//! dies the migration goes on; Ctrl-C asks the agent to cancel it (and waits for the rollback).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use migtun_control::admin::{self, Request, Status};
use migtun_control::messages::{MigrateArgs, OutcomeKind, Report};

pub fn migrate(admin_socket: &Path, args: MigrateArgs, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        // Shared between the report handler and the Ctrl-C branch; one thread, so RefCell.
        let state = std::rc::Rc::new(std::cell::RefCell::new(State { ui: Ui::new(json), id: None, outcome: None }));
        let socket = admin_socket.to_path_buf();
        let request = Request::Migrate { args };
        let handler_state = state.clone();
        let submit = admin::request(&socket, &request, move |line| {
            let mut st = handler_state.borrow_mut();
            if let Some(err) = line.get("error").and_then(|e| e.as_str()) {
                st.outcome = Some((OutcomeKind::Refused, err.to_string()));
                return false;
            }
            let Ok(report) = serde_json::from_value::<Report>(line.clone()) else { return true };
            if let Report::Accepted { id, .. } = &report {
                st.id = Some(id.clone());
            }
            if let Report::Done { outcome, message } = &report {
                st.outcome = Some((*outcome, message.clone()));
            }
            st.ui.show(&report, &line);
            st.outcome.is_none()
        });
        tokio::pin!(submit);
        let result = tokio::select! {
            r = &mut submit => r,
            _ = tokio::signal::ctrl_c() => {
                let id = state.borrow().id.clone();
                let Some(id) = id else { bail!("interrupted before the agent accepted the migration") };
                state.borrow_mut().ui.note("Ctrl-C: asking the agent to cancel the migration (rolling back) ...");
                admin::request(&socket, &Request::Cancel { id }, |_| false).await?;
                submit.await
            }
        };
        result?;
        let mut st = state.borrow_mut();
        st.ui.finish();
        match st.outcome.take() {
            Some((OutcomeKind::Succeeded, _)) => Ok(()),
            Some((kind, message)) => bail!("migration {}: {message}", serde_json::to_string(&kind).unwrap_or_default().trim_matches('"')),
            None => bail!("the agent closed the connection before the migration ended (it may still be running: see `migtun status`)"),
        }
    })
}

struct State {
    ui: Ui,
    id: Option<String>,
    outcome: Option<(OutcomeKind, String)>,
}

/// `migtun resolve`: the operator's decision for a migration whose outcome is unknown.
pub fn resolve(admin_socket: &Path, id: &str, guest_on: admin::GuestOn) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let mut answer = None;
        admin::request(admin_socket, &Request::Resolve { id: id.to_string(), guest_on }, |line| {
            answer = Some(line);
            false
        })
        .await?;
        let line = answer.context("no answer from the agent")?;
        if let Some(e) = line.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("{e}");
        }
        println!("{id}: resolved (guest on the {}); `migtun status` shows the migration's end", guest_on.as_str());
        Ok(())
    })
}

pub fn status(admin_socket: &Path, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let mut answer = None;
        admin::request(admin_socket, &Request::Status, |line| {
            answer = Some(line);
            false
        })
        .await?;
        let line = answer.context("no answer from the agent")?;
        if json {
            println!("{line}");
            return Ok(());
        }
        let status: Status = serde_json::from_value(line).context("unexpected answer")?;
        println!("agent {}", status.name);
        println!("migrations:{}", if status.migrations.is_empty() { " none" } else { "" });
        for m in &status.migrations {
            let outcome = m.outcome.map(|o| format!(" ({o:?})")).unwrap_or_default();
            println!("  {}  {} -> {}  {}{outcome}", m.id, m.vm, m.to, m.phase);
        }
        println!("routes:{}", if status.routes.is_empty() { " none" } else { "" });
        for r in &status.routes {
            println!("  {r}");
        }
        println!("open streams:{}", if status.streams.is_empty() { " none" } else { "" });
        for s in &status.streams {
            println!("  {} {} ({}): {}", s.peer, s.route, s.side, s.open);
        }
        Ok(())
    })
}

/// Human progress (a bar per stage) or JSON lines.
struct Ui {
    json: bool,
    bar: Option<(String, ProgressBar)>,
}

impl Ui {
    fn new(json: bool) -> Ui {
        Ui { json, bar: None }
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some((_, bar)) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn show(&mut self, report: &Report, raw: &serde_json::Value) {
        if self.json {
            println!("{raw}");
            return;
        }
        match report {
            Report::Accepted { id, vm, to } => self.note(&format!("migration {id}: {vm} -> {to}")),
            Report::Phase { phase, message } => {
                self.finish();
                self.note(&format!("[{phase}] {message}"));
            }
            Report::Log { message } => self.note(&format!("  {message}")),
            Report::Progress { stage, done, total, rate, eta_secs, dirty_rate, expected_downtime_ms } => {
                let bar = self.bar_for(stage);
                bar.set_length(*total.max(done));
                bar.set_position(*done);
                let mut msg = format!("{}/s", human(*rate));
                if let Some(eta) = eta_secs {
                    msg += &format!(", eta {eta:.0}s");
                }
                if let Some(d) = dirty_rate {
                    msg += &format!(", dirty {d} pages/s");
                }
                if let Some(t) = expected_downtime_ms {
                    msg += &format!(", downtime ~{t} ms");
                }
                bar.set_message(msg);
            }
            Report::Done { outcome, message } => {
                self.finish();
                self.note(&format!("{outcome:?}: {message}"));
            }
        }
    }

    fn bar_for(&mut self, stage: &str) -> ProgressBar {
        if let Some((s, bar)) = &self.bar {
            if s == stage {
                return bar.clone();
            }
        }
        self.finish();
        let style = ProgressStyle::with_template(&format!("  {stage:6} {{bar:40.cyan/blue}} {{bytes}}/{{total_bytes}} {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::new(0).with_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some((stage.to_string(), bar.clone()));
        bar
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish();
        }
    }
}

fn human(bytes_per_s: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes_per_s;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
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
