//! Waiting for QMP events on a subscription.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use super::*;

/// Waiting for one particular event on a subscription from [`Qmp::events`].
pub trait EventsExt {
    /// Waits for the next event called `name` whose data satisfies `predicate`, skipping
    /// others. Fails with [`QmpError::Timeout`] after `timeout`, [`QmpError::Closed`] when the
    /// connection ends, and [`QmpError::EventsLagged`] if events were lost (the one awaited
    /// may have been among them).
    fn wait_for<F>(
        &mut self,
        name: &str,
        predicate: F,
        timeout: Duration,
    ) -> impl Future<Output = Result<Event, QmpError>> + Send
    where
        F: FnMut(&Value) -> bool + Send;
}

impl EventsExt for broadcast::Receiver<Event> {
    async fn wait_for<F>(
        &mut self,
        name: &str,
        mut predicate: F,
        timeout: Duration,
    ) -> Result<Event, QmpError>
    where
        F: FnMut(&Value) -> bool + Send,
    {
        let wait = async {
            loop {
                match self.recv().await {
                    Ok(ev) if ev.name == name && predicate(&ev.data) => return Ok(ev),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        return Err(QmpError::EventsLagged {
                            event: name.to_owned(),
                            missed,
                        })
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(QmpError::Closed {
                            command: format!("wait for event {name}"),
                            reason: "the QMP connection ended".into(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(QmpError::Timeout {
                    command: format!("wait for event {name}"),
                    secs: timeout.as_secs_f64(),
                })
            })
    }
}
