//! [`Qmp`], the handle of one QMP connection: connecting (greeting, capabilities), commands
//! (plain, pipelined, out of band, typed) and events. The tasks behind it are in `connection`.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::*;

/// A connected QMP session. Cheap `&self` methods; share it with `Arc<Qmp>`.
/// Dropping it closes the socket and stops its tasks.
pub struct Qmp {
    greeting: Greeting,
    peer_pid: Option<u32>,
    /// Out-of-band execution is enabled (QEMU offered `oob`): see [`Qmp::execute_oob`].
    oob: bool,
    timeouts: Timeouts,
    next_id: AtomicU64,
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    /// Never read: kept to hand out new subscribers via `resubscribe`. The only sender lives in
    /// the reader task, so subscribers see the end of the stream when the connection ends.
    events: broadcast::Receiver<Event>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Qmp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version())
            .field("peer_pid", &self.peer_pid)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Qmp {
    /// Connects with the default [`Timeouts`].
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Qmp::connect_with(path, Timeouts::default()).await
    }

    /// Connects, reads the greeting and negotiates capabilities (none are enabled).
    pub async fn connect_with(path: &Path, timeouts: Timeouts) -> Result<Qmp, QmpError> {
        let secs = timeouts.greeting.as_secs_f64();
        let stream = match tokio::time::timeout(timeouts.greeting, UnixStream::connect(path)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(QmpError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: format!("connect to {}", path.display()),
                    secs,
                })
            }
        };
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != 0);
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let greeting = tokio::time::timeout(timeouts.greeting, read_greeting(&mut rd))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "QMP greeting".into(),
                secs,
            })??;
        tracing::debug!(?greeting, ?peer_pid, path = %path.display(), "QMP connected");

        let shared = Arc::new(Shared::default());
        let (events_tx, events_rx) = broadcast::channel(EVENT_CAPACITY);
        let (writer, queue) = mpsc::channel(WRITE_QUEUE);
        let tasks = [
            tokio::spawn(reader_task(rd, shared.clone(), events_tx)),
            tokio::spawn(writer_task(wr, queue, shared.clone())),
        ];
        let oob = greeting.capabilities.iter().any(|c| c == "oob");
        let qmp = Qmp {
            greeting,
            peer_pid,
            oob,
            timeouts,
            next_id: AtomicU64::new(1),
            shared,
            writer,
            events: events_rx,
            tasks,
        };
        // `oob` lets `yank` through while QEMU's main loop is blocked (see `execute_oob`);
        // in-band commands behave as before (each has an id, which OOB mode requires).
        let caps = if oob { json!({ "enable": ["oob"] }) } else { Value::Null };
        qmp.execute_with_timeout("qmp_capabilities", caps, timeouts.greeting)
            .await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting: `(major, minor, micro)`.
    pub fn version(&self) -> (u32, u32, u32) {
        let g = &self.greeting;
        (g.major, g.minor, g.micro)
    }

    /// The whole greeting (version, package string, offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The pid of the process at the other end of the socket (SO_PEERCRED, taken at connect
    /// time), i.e. QEMU's pid. `None` if the kernel did not tell.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// True once the connection has failed or QEMU went away; every command then fails at once.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().failed.is_some()
    }

    /// Subscribes to events. Subscribe *before* issuing the command that triggers the event you
    /// want; see [`EventsExt::wait_for`]. Each receiver buffers [`EVENT_CAPACITY`] events; a
    /// receiver that falls further behind loses the oldest ones and gets `RecvError::Lagged`.
    /// When the connection ends, receivers get `RecvError::Closed` after the buffered events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.resubscribe()
    }

    /// Runs a command with the default command timeout. `arguments` is a JSON object, or
    /// `Value::Null` for none. Returns QEMU's `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.timeouts.command)
            .await
    }

    /// Runs a command with its own timeout. On timeout the command is abandoned (QEMU may still
    /// run it; its late reply is ignored) and the connection stays usable.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.encode(command, arguments);
        self.exchange(command, id, line, timeout).await
    }

    /// Sends one encoded command and waits, at most `timeout`, for its reply.
    async fn exchange(&self, command: &str, id: u64, line: Vec<u8>, timeout: Duration) -> Result<Value, QmpError> {
        let reply = self.shared.register(id, command)?;
        let _deregister = Deregister {
            shared: &self.shared,
            id,
        };
        tracing::trace!(line = %excerpt(&line), "QMP ->");
        let exchange = async {
            if self.writer.send(line).await.is_err() {
                return Err(self.shared.error_for(command));
            }
            match reply.await {
                Ok(result) => result,
                Err(_) => Err(self.shared.error_for(command)),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Runs several commands in one go: all are sent before the first reply is awaited (QEMU
    /// runs them in order, one round trip instead of one each). A failing command does not stop
    /// the later ones, which were sent already; the first error is returned, else every reply
    /// in order. For sequences whose failure the caller cleans up as a whole.
    pub async fn execute_pipelined(
        &self,
        commands: Vec<(&str, Value)>,
    ) -> Result<Vec<Value>, QmpError> {
        let names: Vec<&str> = commands.iter().map(|c| c.0).collect();
        let timeout = self.timeouts.command;
        let exchange = async {
            let mut sent = Vec::with_capacity(commands.len());
            for (command, arguments) in commands {
                let (id, line) = self.encode(command, arguments);
                let reply = self.shared.register(id, command)?;
                let guard = Deregister {
                    shared: &self.shared,
                    id,
                };
                tracing::trace!(line = %excerpt(&line), "QMP ->");
                if self.writer.send(line).await.is_err() {
                    return Err(self.shared.error_for(command));
                }
                sent.push((command, reply, guard));
            }
            let mut replies = Vec::with_capacity(sent.len());
            for (command, reply, _guard) in sent {
                replies.push(match reply.await {
                    Ok(result) => result?,
                    Err(_) => return Err(self.shared.error_for(command)),
                });
            }
            Ok(replies)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                command: names.join(", "),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Runs a command out of band (`exec-oob`): QEMU's monitor thread runs it at once, even
    /// while the main loop is blocked, e.g. draining block requests to an NBD server that
    /// stopped answering. Only commands QEMU marks `allow-oob` (`yank`, `query-yank`,
    /// `migrate-pause`, ...) may be sent so. Without OOB support it is an ordinary command.
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if !self.oob {
            return self.execute_with_timeout(command, arguments, timeout).await;
        }
        let (id, line) = self.encode_as("exec-oob", command, arguments);
        self.exchange(command, id, line, timeout).await
    }

    /// A command line with a fresh id.
    fn encode(&self, command: &str, arguments: Value) -> (u64, Vec<u8>) {
        self.encode_as("execute", command, arguments)
    }

    fn encode_as(&self, verb: &str, command: &str, arguments: Value) -> (u64, Vec<u8>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert(verb.into(), Value::from(command));
        if !arguments.is_null() {
            msg.insert("arguments".into(), arguments);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string().into_bytes();
        line.push(b'\n');
        (id, line)
    }

    /// Runs a command and decodes its reply into `T`. A reply that does not fit `T` is a
    /// [`QmpError::Protocol`] naming the command.
    pub async fn call<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments).await?;
        decode(command, &value)
    }

    /// Subscribes, runs the command, then waits for the first event `name` whose data satisfies
    /// `predicate` (race-free: the subscription exists before the command is sent).
    pub async fn execute_and_wait<F>(
        &self,
        command: &str,
        arguments: Value,
        event: &str,
        predicate: F,
        timeout: Duration,
    ) -> Result<(Value, Event), QmpError>
    where
        F: FnMut(&Value) -> bool + Send,
    {
        let mut events = self.events();
        let reply = self.execute(command, arguments).await?;
        let ev = events.wait_for(event, predicate, timeout).await?;
        Ok((reply, ev))
    }

    /// Waits for a state that a query reports, driven by events: runs `probe` (typically a
    /// `query-*` command) once, then again each time an event named in `events` arrives, until it
    /// returns `Some`. The subscription exists before the first probe, so no change slips
    /// between the two. `recheck` is only a safety net (a change whose event QEMU does not send,
    /// e.g. `MIGRATION` without the `events` capability, or events lost to lag): the probe also
    /// runs when nothing arrived for that long. Fails with [`QmpError::Timeout`] naming `what`
    /// after `timeout`, or with the probe's own error (a closed connection, for one).
    pub async fn wait_until<T, F, Fut>(
        &self,
        what: &str,
        events: &[&str],
        recheck: Duration,
        timeout: Duration,
        mut probe: F,
    ) -> Result<T, QmpError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, QmpError>>,
    {
        let mut rx = self.events();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(done) = probe().await? {
                return Ok(done);
            }
            // Wait for a relevant event (others are skipped), the recheck, or the deadline.
            let next = async {
                loop {
                    match rx.recv().await {
                        Ok(ev) if events.contains(&ev.name.as_str()) => return,
                        Ok(_) => {}
                        // Something may have been missed: probe now.
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        // The connection ended: the probe reports it.
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            };
            let wake = (tokio::time::Instant::now() + recheck).min(deadline);
            if tokio::time::timeout_at(wake, next).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                // One last look: it may have happened without an event.
                if let Some(done) = probe().await? {
                    return Ok(done);
                }
                return Err(QmpError::Timeout {
                    command: what.to_owned(),
                    secs: timeout.as_secs_f64(),
                });
            }
        }
    }
}
