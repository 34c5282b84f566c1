//! `migtun serve` and `migtun check`.

use std::path::Path;

use anyhow::Context;
use std::sync::Arc;

use migtun_control::admin::{self, Reloader};
use migtun_control::journal::{self, Journal, JournalError};
use migtun_control::service::ControlPlane;
use migtun_proxy::agent::AgentHandle;
use migtun_proxy::{Agent, Config};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let problems = migtun_proxy::agent::preflight::check(&config, &path.display().to_string());
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        anyhow::bail!("{} problem(s): `migtun serve` would not start with {}", problems.len(), path.display());
    }
    print!("{}", config.explain());
    println!("config OK");
    Ok(())
}

pub fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // What the host must provide, checked before anything binds: every problem at once, each
    // naming the key and the file (the same lines as `migtun check`).
    let problems = migtun_proxy::agent::preflight::check(&config, &path.display().to_string());
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        anyhow::bail!("{}", lines.join("\n"));
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let path = path.to_path_buf();
    rt.block_on(async move {
        // SIGHUP reloads; SIGTERM and SIGINT drain. Installed first, before anything is bound:
        // their default action would end the agent mid-start, leaving its sockets behind (a
        // signal that arrives during start-up drains the agent as soon as it runs).
        let hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(term, int, shutdown.clone()));
        // With [qemu], the journal. The agent this one replaces may still hold it (serving, or
        // draining): this one serves meanwhile and takes it once that one has exited.
        let journal = match &config.qemu {
            None => None,
            Some(q) => match Journal::open(&q.state_dir) {
                Ok(journal) => Some(Ok(journal)),
                Err(JournalError::Locked { holder, .. }) => Some(Err(holder)),
                Err(e) => return Err(e.into()),
            },
        };
        let mut agent = Agent::bind(config).await?;
        let handle = agent.handle();
        let reloader: Reloader = {
            let (path, handle) = (path.clone(), handle.clone());
            Arc::new(move || {
                let (path, handle) = (path.clone(), handle.clone());
                Box::pin(async move { reload(&path, &handle).await })
            })
        };
        tokio::spawn(on_hangup(hangup, reloader.clone()));
        let admin_path = agent.config().admin.clone();

        // Every agent answers the hello (and tunnels), so peers can tell what it supports; with
        // [qemu], the destination side (prepare/finish/files, to the peers in allow_sources)
        // and `migtun migrate`, once the journal is ours and its unfinished migrations settled.
        let plane = ControlPlane::new(&handle, agent.config());
        let take_over = match journal {
            None => None,
            Some(Ok(journal)) => {
                plane.start(Arc::new(journal)).await;
                None
            }
            Some(Err(holder)) => {
                let holder = journal::who_holds(holder.as_ref());
                plane.waiting(&format!("waiting for the journal, held by the agent this one replaces ({holder})"));
                let dir = agent.config().qemu.as_ref().map(|q| q.state_dir.clone()).unwrap_or_default();
                Some(plane.take_over(dir, shutdown.clone()))
            }
        };
        agent.set_control_handler(plane.router().into_handler());
        // Draining: a new agent on this config waits for the journal until this one is gone.
        tokio::spawn({
            let (plane, handle, stop) = (plane.clone(), handle.clone(), shutdown.clone());
            async move {
                stop.cancelled().await;
                plane.draining(handle.drain_timeout());
            }
        });
        let registry = plane.registry();
        registry.set_reloader(reloader);
        if let Some(path) = admin_path {
            // Bound before the agent runs: a failure stops the start-up, and systemd hears
            // READY=1 (from `run`) only once this socket accepts connections too. A live socket
            // there is the agent this one replaces, still draining: the path is taken over once
            // it has let go (READY=1 then comes first).
            let first = match admin::bind(&path).await {
                Ok(listener) => Some(listener),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tracing::warn!(path = %path.display(), "admin socket held by another agent (draining?); waiting for it");
                    None
                }
                Err(e) => return Err(e).with_context(|| format!("`admin`: cannot listen on {}", path.display())),
            };
            let starter = plane.starter();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let listener = match first {
                    Some(listener) => listener,
                    None => loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(ADMIN_RETRY) => {}
                        }
                        match admin::bind(&path).await {
                            Ok(listener) => break listener,
                            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                            Err(e) => {
                                tracing::error!(path = %path.display(), error = %e, "admin socket failed; `migtun migrate` cannot reach this agent");
                                return;
                            }
                        }
                    },
                };
                if let Err(e) = admin::serve_on(listener, handle, registry, starter, stop).await {
                    tracing::error!(path = %path.display(), error = %e, "admin socket failed; `migtun migrate` cannot reach this agent");
                }
            });
        }
        agent.run(shutdown).await?;
        // A take-over that failed drained the agent: its reason is the exit's. (Its task ends
        // at once after the drain: it was done, or waited and heard the shutdown.)
        if let Some(task) = take_over {
            task.await.context("the journal's take-over task")??;
        }
        Ok(())
    })
}

/// How often a new agent tries to take the admin socket from the agent draining there.
const ADMIN_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit and logs what the
/// agent got. Every stream costs descriptors (the port's connection, the local one, during the
/// handshake a few more), and the usual soft default (1024, systemd's too) is exhausted by a
/// few hundred streams or a flood of idle connections; the hard limit (systemd's default is
/// 524288, `LimitNOFILE=` raises it) is what the operator allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, writable local of that
    // exact type; it has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit (RLIMIT_NOFILE)");
        return;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local of that type.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::warn!(soft = before, hard = limit.rlim_max, error = %std::io::Error::last_os_error(),
                "cannot raise the open-files limit to the hard limit; keeping the soft limit");
            return;
        }
        limit = raised;
    }
    tracing::info!(soft = limit.rlim_cur, hard = limit.rlim_max, was = before, "open-files limit (RLIMIT_NOFILE)");
}

/// Re-reads the config file at `path` (and the `[tls]` files it names) and applies it to the
/// running agent. Refused, with the running config kept, on the lines `migtun check` prints
/// for the file, or on a key that needs a restart; otherwise the changes, one line each.
pub async fn reload(path: &Path, handle: &AgentHandle) -> Result<Vec<String>, String> {
    migtun_proxy::notify::reloading(&format!("reloading {}", path.display()));
    tracing::info!(config = %path.display(), "reloading");
    let result = apply(path, handle).await;
    match &result {
        Ok(changes) => tracing::info!(changes = changes.len(), "reloaded"),
        Err(e) => tracing::error!(config = %path.display(), error = %e, "reload refused; the running config stays"),
    }
    // Applied or refused, the agent serves (a refused reload keeps the running config).
    migtun_proxy::notify::ready(if result.is_ok() { "serving; config reloaded" } else { "serving; the last reload was refused" });
    result
}

async fn apply(path: &Path, handle: &AgentHandle) -> Result<Vec<String>, String> {
    let file = path.display().to_string();
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let problems = migtun_proxy::agent::preflight::check_reload(&config, &file);
    if !problems.is_empty() {
        return Err(problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"));
    }
    let peers: Vec<String> = config.peers.iter().map(|p| p.name.clone()).collect();
    let changes = handle
        .reload(config)
        .await
        .map_err(|e| e.lines().iter().map(|l| format!("{file}: {l}")).collect::<Vec<_>>().join("\n"))?;
    // `/readyz` lists the peers of the config that runs now.
    handle.metrics().health.peers_configured(&peers);
    Ok(changes)
}

/// Every SIGHUP reloads (one at a time; a SIGHUP during a reload runs another one after it).
async fn on_hangup(mut hangup: tokio::signal::unix::Signal, reload: Reloader) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        let _ = reload().await;
    }
}

/// First SIGTERM/SIGINT: drain. A second one: exit at once.
async fn on_signals(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal, shutdown: CancellationToken) {
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping now");
    std::process::exit(130);
}
