//! Settling an unknown outcome: past the point of no return without the destination's answer,
//! ask it again (`finish` is idempotent there, answered from its journal) over a fresh
//! connection, with back-off, until it answers or the operator decides (`migtun resolve`). The
//! guest stays paused meanwhile: resuming it could make two copies run.
//!
//! Used by the driver (an answer lost during a migration) and by recovery (a migration the
//! journal found at `Finishing` after a restart); it knows neither.

use std::time::Duration;

use migtun_proxy::agent::AgentHandle;
use tracing::{info, warn};

use crate::admin::{GuestOn, Tracked};
use crate::messages::{FinishReply, FinishRequest, Report};
use crate::rpc::RpcClient;

/// First wait before asking the destination again; doubled after each failed attempt.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts: a destination that comes back is heard from within this.
const MAX_RETRY: Duration = Duration::from_secs(15);
/// One attempt: connect, hello, `finish`. The destination's `finish` may wait up to 30 s for
/// its incoming migration to complete.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(45);
/// Asks the destination `to` what became of migration `id` until it answers: `Ok` = the guest
/// runs (or is held) there, `Err(why)` = it does not and the source must keep it. An operator's
/// `migtun resolve` answers instead.
pub async fn settle(agent: &AgentHandle, to: &str, id: &str, resume: bool, tracked: &Tracked) -> Result<(), String> {
    tracked.report(Report::Phase {
        phase: "unknown".into(),
        step: None,
        message: format!(
            "waiting for {to}'s answer: the guest stays paused on the source. If {to} is gone for good: \
             `migtun resolve {id} --guest-on source` (or `destination`)"
        ),
    });
    let _awaiting = tracked.await_resolution();
    let mut delay = FIRST_RETRY;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, ask(agent, to, id, resume)).await {
            Ok(Ok(reply)) if reply.guest_kept => {
                info!(migration = %id, %to, attempt, "the destination answers: the guest runs there");
                tracked.report(Report::Log { message: format!("{to} answers: the guest runs there") });
                return Ok(());
            }
            Ok(Ok(reply)) => {
                info!(migration = %id, %to, attempt, detail = %reply.detail, "the destination answers: it does not have the guest");
                tracked.report(Report::Log { message: format!("{to} answers: {}", reply.detail) });
                return Err(reply.detail);
            }
            Ok(Err(e)) => note_attempt(tracked, id, to, attempt, delay, &e),
            Err(_) => note_attempt(tracked, id, to, attempt, delay, &format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            decision = tracked.resolution() => {
                warn!(migration = %id, guest_on = decision.as_str(), "the operator resolved the unknown outcome");
                return match decision {
                    GuestOn::Destination => Ok(()),
                    GuestOn::Source => Err("the operator decided (migtun resolve) that the guest is not on the destination".into()),
                };
            }
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}

fn note_attempt(tracked: &Tracked, id: &str, to: &str, attempt: u64, delay: Duration, why: &str) {
    // Every attempt at first, then one line in ten: the log says it is still asking.
    if attempt <= 3 || attempt % 10 == 0 {
        warn!(migration = %id, %to, attempt, error = %why, "no answer yet from the destination; the guest stays paused");
        tracked.report(Report::Log {
            message: format!("attempt {attempt}: no answer from {to} ({why}); asking again in {} s", delay.as_secs()),
        });
    }
}

/// One `finish(success)` on a fresh control connection.
async fn ask(agent: &AgentHandle, to: &str, id: &str, resume: bool) -> Result<FinishReply, String> {
    let io = agent.connect_control(to).await.map_err(|e| e.to_string())?;
    let rpc = RpcClient::connect(io, to, agent.name()).await.map_err(|e| e.to_string())?;
    let req = FinishRequest { migration: id.to_string(), success: true, resume };
    rpc.call_with_timeout::<_, FinishReply>("finish", &req, ATTEMPT_TIMEOUT).await.map_err(|e| e.to_string())
}
