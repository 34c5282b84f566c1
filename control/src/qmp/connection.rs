//! Behind one [`Qmp`] handle: the state shared with its tasks (commands waiting for their reply
//! by id, why the connection ended), the reader task (lines to replies and events), the writer
//! task (whole command lines from a bounded queue) and the greeting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::*;


/// Why a connection ended; turned into an error for each command that was still pending.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    Eof,
    Io(String),
    Protocol(String),
}

impl Failure {
    fn error_for(&self, command: &str) -> QmpError {
        let closed = |reason: String| QmpError::Closed {
            command: command.to_owned(),
            reason,
        };
        match self {
            Failure::Eof => closed("QEMU closed the QMP socket (did it exit or crash?)".into()),
            Failure::Io(e) => closed(e.clone()),
            Failure::Protocol(m) => QmpError::Protocol(format!(
                "{m} (connection dropped; {command} did not complete)"
            )),
        }
    }
}

pub(super) struct Pending {
    pub(super) command: String,
    pub(super) reply: oneshot::Sender<Result<Value, QmpError>>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) failed: Option<Failure>,
}

/// State shared by the handle and the reader/writer tasks. The lock is held only for map
/// operations, never across an await.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it; the map itself
        // is always consistent (single inserts/removes), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(
        &self,
        id: u64,
        command: &str,
    ) -> Result<oneshot::Receiver<Result<Value, QmpError>>, QmpError> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(f.error_for(command));
        }
        let (tx, rx) = oneshot::channel();
        st.pending.insert(
            id,
            Pending {
                command: command.to_owned(),
                reply: tx,
            },
        );
        Ok(rx)
    }

    pub(super) fn complete(&self, id: u64, result: Result<Value, (String, String)>) {
        let Some(p) = self.lock().pending.remove(&id) else {
            // Most likely the reply to a command that timed out: harmless.
            tracing::debug!(id, "QMP reply for a command nobody waits for any more");
            return;
        };
        let result = result.map_err(|(class, desc)| QmpError::Qemu {
            command: p.command.clone(),
            class,
            desc,
        });
        let _ = p.reply.send(result);
    }

    pub(super) fn fail(&self, failure: Failure) {
        let mut st = self.lock();
        if st.failed.is_some() {
            return;
        }
        let pending: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
        tracing::warn!(?failure, pending = pending.len(), "QMP connection failed");
        for p in pending {
            let _ = p.reply.send(Err(failure.error_for(&p.command)));
        }
        st.failed = Some(failure);
    }

    pub(super) fn error_for(&self, command: &str) -> QmpError {
        match &self.lock().failed {
            Some(f) => f.error_for(command),
            None => QmpError::Closed {
                command: command.to_owned(),
                reason: "the QMP client was shut down".into(),
            },
        }
    }
}

/// Removes a pending entry when its command gives up (timeout or dropped future).
pub(super) struct Deregister<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

pub(super) async fn reader_task(
    mut rd: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    let mut line = Vec::new();
    let failure = loop {
        line.clear();
        match read_line(&mut rd, &mut line, MAX_LINE).await {
            Ok(true) => {}
            Ok(false) => break Failure::Eof,
            Err(LineError::Truncated) => break Failure::Eof,
            // QEMU killed with unread commands in its socket buffer: the kernel resets.
            Err(LineError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break Failure::Eof
            }
            Err(LineError::Io(e)) => break Failure::Io(format!("reading the QMP socket: {e}")),
            Err(LineError::TooLong) => {
                break Failure::Protocol(format!("QEMU sent a line longer than {MAX_LINE} bytes"))
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        tracing::trace!(line = %excerpt(&line), "QMP <-");
        match parse_message(&line) {
            Err(e) => break Failure::Protocol(e),
            Ok(Message::Return {
                id: Some(id),
                value,
            }) => shared.complete(id, Ok(value)),
            Ok(Message::Error {
                id: Some(id),
                class,
                desc,
            }) => shared.complete(id, Err((class, desc))),
            // QEMU answers without an id only when it could not parse a request: the stream is
            // out of sync, and we cannot tell whose command it was.
            Ok(Message::Return { id: None, .. }) | Ok(Message::Error { id: None, .. }) => {
                break Failure::Protocol(format!("reply without an id: {}", excerpt(&line)))
            }
            Ok(Message::Greeting(_)) => {
                break Failure::Protocol("a second greeting in the middle of the session".into())
            }
            Ok(Message::Event(ev)) => {
                // Fails only when nobody subscribes, which is fine.
                let _ = events.send(ev);
            }
        }
    };
    shared.fail(failure);
    // Dropping `events` here tells subscribers the stream ended.
}

pub(super) async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = queue.recv().await {
        if let Err(e) = wr.write_all(&line).await {
            let failure = match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    Failure::Eof
                }
                _ => Failure::Io(format!("writing to the QMP socket: {e}")),
            };
            shared.fail(failure);
            return;
        }
    }
    let _ = wr.shutdown().await;
}

pub(super) fn decode<T: DeserializeOwned>(command: &str, value: &Value) -> Result<T, QmpError> {
    T::deserialize(value).map_err(|e| {
        QmpError::Protocol(format!(
            "unexpected reply to {command} ({e}): {}",
            excerpt_value(value)
        ))
    })
}

pub(super) async fn read_greeting<R: AsyncBufRead + Unpin>(rd: &mut R) -> Result<Greeting, QmpError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(rd, &mut line, MAX_LINE).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(QmpError::Closed {
                    command: "QMP greeting".into(),
                    reason: "the socket closed before anything was sent".into(),
                })
            }
            Err(LineError::Io(e)) => return Err(QmpError::Io(e)),
            Err(LineError::TooLong) => {
                return Err(QmpError::Protocol(format!(
                    "greeting line longer than {MAX_LINE} bytes"
                )))
            }
            Err(LineError::Truncated) => {
                return Err(QmpError::Protocol(format!(
                    "the socket closed in the middle of the greeting: {}",
                    excerpt(&line)
                )))
            }
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    let value = parse_json(&line).map_err(QmpError::Protocol)?;
    match classify(value) {
        Ok(Message::Greeting(g)) => Ok(g),
        Ok(_) => Err(QmpError::Greeting(format!(
            "expected the greeting first, got {}",
            excerpt(&line)
        ))),
        Err(e) => Err(QmpError::Greeting(e)),
    }
}
