//! `migtun reload`: asks the running agent to re-read its config and `[tls]` files (as SIGHUP
//! does), and says what changed or why nothing did.

use std::path::Path;

use migtun_control::admin::Request;

pub fn reload(admin_socket: &Path) -> anyhow::Result<()> {
    let line = super::ask_agent(admin_socket, &Request::Reload)?
        .map_err(|e| anyhow::anyhow!("reload refused; the agent keeps its running config:\n{e}"))?;
    let changes = line.get("changes").and_then(|c| c.as_array()).cloned().unwrap_or_default();
    for c in changes.iter().filter_map(|c| c.as_str()) {
        println!("{c}");
    }
    if changes.iter().filter_map(|c| c.as_str()).any(|c| c.starts_with("FAILED:")) {
        anyhow::bail!("reloaded, but not every change could be applied");
    }
    println!("reloaded");
    Ok(())
}
