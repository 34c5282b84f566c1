//! `migtun reload`: asks the running agent to re-read its config and `[tls]` files (as SIGHUP
//! does), and says what changed or why nothing did.

use std::path::Path;

use anyhow::Context;
use migtun_control::admin::{self, Request};

pub fn reload(admin_socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let mut answer = None;
        admin::request(admin_socket, &Request::Reload, |line| {
            answer = Some(line);
            false
        })
        .await?;
        let line = answer.context("no answer from the agent")?;
        if let Some(e) = line.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("reload refused; the agent keeps its running config:\n{e}");
        }
        let changes = line.get("changes").and_then(|c| c.as_array()).cloned().unwrap_or_default();
        for c in changes.iter().filter_map(|c| c.as_str()) {
            println!("{c}");
        }
        if changes.iter().filter_map(|c| c.as_str()).any(|c| c.starts_with("FAILED:")) {
            anyhow::bail!("reloaded, but not every change could be applied");
        }
        println!("reloaded");
        Ok(())
    })
}
