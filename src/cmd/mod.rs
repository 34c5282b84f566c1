//! The subcommands.

use std::path::Path;

use anyhow::Context;
use migtun_control::admin::{self, Request};

pub mod certs;
pub mod demo;
pub mod healthcheck;
pub mod logging;
pub mod manual;
pub mod migrate;
pub mod reload;
pub mod serve;
pub mod tunnel;
pub mod ui;

/// Sends one request to the local agent's admin socket and returns its one answer line: `Err`
/// when the agent cannot be reached or does not answer, `Ok(Err(text))` when it answers with
/// an `error` (each command words that for its user).
pub fn ask_agent(admin_socket: &Path, request: &Request) -> anyhow::Result<Result<serde_json::Value, String>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let mut answer = None;
        admin::request(admin_socket, request, |line| {
            answer = Some(line);
            false
        })
        .await?;
        let line = answer.context("no answer from the agent")?;
        Ok(match line.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(e.to_string()),
            None => Ok(line),
        })
    })
}
