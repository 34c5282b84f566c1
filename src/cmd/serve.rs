//! `migtun serve` and `migtun check`.

use std::path::Path;

use anyhow::Context;
use migtun_proxy::{Agent, Config};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    print!("{}", config.explain());
    println!("config OK");
    Ok(())
}

pub fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let agent = Agent::bind(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        agent.run(shutdown).await?;
        Ok(())
    })
}

/// First SIGTERM/SIGINT: drain. A second one: exit at once.
async fn on_signals(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping now");
    std::process::exit(130);
}
