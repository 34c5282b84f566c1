//! An async client for QMP, the QEMU Machine Protocol.
//!
//! QMP is newline-delimited JSON over a UNIX socket. QEMU speaks first with a greeting
//! (`{"QMP": {"version": .., "capabilities": [..]}}`), the client leaves capabilities-negotiation
//! mode with `qmp_capabilities`, and from then on it sends `{"execute": .., "arguments": ..,
//! "id": N}` and QEMU answers `{"return": .., "id": N}` or `{"error": {"class", "desc"}, "id": N}`.
//! Asynchronous events (`{"event", "data", "timestamp"}`) may arrive at any time, also between a
//! command and its reply.
//!
//! Structure (one connection):
//! - a **reader task** owns the read half: it reads bounded lines, parses each one
//!   ([`parse_message`], pure), hands replies to the waiting command by id and broadcasts events;
//! - a **writer task** owns the write half and writes whole command lines from a bounded queue.
//!   A command whose caller gives up (timeout, dropped future) can therefore never leave half a
//!   line in the socket: the stream stays in sync for everybody else;
//! - [`Qmp`] itself is a handle with `&self` methods, shareable between tasks (`Arc<Qmp>`).
//!
//! Anything malformed fails the whole connection with [`QmpError::Protocol`]: after a line we do
//! not understand we can no longer be sure which reply belongs to which command. Nothing QEMU (or
//! whatever sits on the socket) sends can make this module panic.
//!
//! ```no_run
//! # async fn demo(qmp: &migtun_control::qmp::Qmp) -> Result<(), migtun_control::qmp::QmpError> {
//! use migtun_control::qmp::EventsExt;
//! use std::time::Duration;
//! // Subscribe first, then issue the command that triggers the event: no event can slip by.
//! let mut events = qmp.events();
//! qmp.execute("stop", serde_json::Value::Null).await?;
//! events.wait_for("STOP", |_| true, Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Longest line accepted from QEMU. Real replies are far smaller (`query-named-block-nodes` on a
/// VM with long backing chains is the largest we send, a few MiB at worst), but the bound keeps a
/// confused or hostile peer from making us buffer without limit.
pub const MAX_LINE: usize = 16 << 20;

/// How long to wait for the socket connect, the greeting and the `qmp_capabilities` reply.
/// QEMU greets immediately on accept; a live but busy QEMU (e.g. a main loop blocked on slow
/// storage) may take a few seconds, anything longer means it is stuck or it is not QEMU.
pub const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the reply to a command. QMP commands run in QEMU's main loop and are
/// normally answered in milliseconds; the slow ones (`blockdev-add` of a remote NBD export,
/// `query-block` behind an unresponsive NFS mount) still answer within seconds. After 30 s QEMU
/// is considered stuck, which the orchestrator must handle rather than wait forever.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events buffered per subscriber. A migration produces a few events per second at most
/// (MIGRATION, MIGRATION_PASS, BLOCK_JOB_*, STOP/RESUME); 1024 gives a subscriber that is busy
/// elsewhere minutes of slack. A subscriber that falls further behind loses the oldest events
/// and learns it through `RecvError::Lagged` (see [`EventsExt::wait_for`]).
pub const EVENT_CAPACITY: usize = 1024;

/// Command lines queued for the writer task. Commands are tiny and QEMU reads them promptly;
/// when it does not (stuck QEMU), senders wait here and their command timeout fires.
const WRITE_QUEUE: usize = 64;

/// Read buffer of the reader task: most replies fit in one read.
const READ_BUFFER: usize = 64 * 1024;

/// Characters of offending input quoted in error messages: enough to recognise it, not a flood.
const EXCERPT_CHARS: usize = 200;

/// Timeouts of one connection. `Timeouts::default()` uses the `DEFAULT_*` constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect, greeting and capabilities negotiation.
    pub greeting: Duration,
    /// Default for each command (see [`Qmp::execute_with_timeout`] to override per command).
    pub command: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            greeting: DEFAULT_GREETING_TIMEOUT,
            command: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

/// Everything that can go wrong talking to QEMU. The messages are meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}: {source} (is QEMU running with -qmp unix:{path},server=on?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a QMP greeting: {0} (is this QEMU's QMP socket?)")]
    Greeting(String),
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qemu {
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    #[error("{command}: no answer from QEMU within {secs} s (is QEMU stuck or overloaded?)")]
    Timeout { command: String, secs: f64 },
    #[error("QMP connection to QEMU lost, {command} did not complete: {reason}")]
    Closed {
        /// What was pending: a command name, or the event being waited for.
        command: String,
        reason: String,
    },
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("missed {missed} QMP events while waiting for {event}: the subscriber fell more than {capacity} events behind", capacity = EVENT_CAPACITY)]
    EventsLagged { event: String, missed: u64 },
    #[error("QMP socket I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The QMP greeting: QEMU's version and the capabilities it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
    /// Offered capabilities, e.g. `["oob"]` (none are enabled by this client).
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// E.g. `STOP`, `RESUME`, `MIGRATION`, `BLOCK_JOB_READY`.
    pub name: String,
    /// The event's `data` member, `Value::Null` when QEMU sent none.
    pub data: Value,
    /// `(seconds, microseconds)` since the epoch, when QEMU sent a valid timestamp.
    pub timestamp: Option<(u64, u64)>,
}

/// One line from QEMU, classified. The output of the pure parser [`parse_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Greeting),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// Parses one line (without its line terminator; surrounding whitespace is ignored).
/// Errors are human-readable and quote the offending input.
pub fn parse_message(line: &[u8]) -> Result<Message, String> {
    classify(parse_json(line)?)
}

fn parse_json(line: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(line).map_err(|e| format!("invalid JSON ({e}): {}", excerpt(line)))
}

fn classify(value: Value) -> Result<Message, String> {
    let Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object, got {}",
            excerpt_value(&value)
        ));
    };
    if let Some(body) = obj.remove("QMP") {
        return parse_greeting(body).map(Message::Greeting);
    }
    if let Some(name) = obj.get("event") {
        let Some(name) = name.as_str() else {
            return Err(format!(
                "event name is not a string: {}",
                excerpt_value(name)
            ));
        };
        let name = name.to_owned();
        let timestamp = obj.get("timestamp").and_then(|t| {
            Some((
                t.get("seconds")?.as_u64()?,
                t.get("microseconds")?.as_u64()?,
            ))
        });
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(Event {
            name,
            data,
            timestamp,
        }));
    }
    let id = match obj.get("id") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            format!(
                "reply id is not one we send (an unsigned integer): {}",
                excerpt_value(v)
            )
        })?),
    };
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = obj.get("error") {
        let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(class), Some(desc)) = (field("class"), field("desc")) else {
            return Err(format!(
                "error reply without a string class and desc: {}",
                excerpt_value(error)
            ));
        };
        return Ok(Message::Error { id, class, desc });
    }
    Err(format!(
        "neither a reply, an error nor an event: {}",
        excerpt_value(&Value::Object(obj))
    ))
}

fn parse_greeting(body: Value) -> Result<Greeting, String> {
    #[derive(Deserialize)]
    struct Body {
        version: Version,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Version {
        qemu: Triple,
        #[serde(default)]
        package: String,
    }
    #[derive(Deserialize)]
    struct Triple {
        major: u32,
        minor: u32,
        micro: u32,
    }
    let b = Body::deserialize(&body)
        .map_err(|e| format!("malformed greeting ({e}): {}", excerpt_value(&body)))?;
    Ok(Greeting {
        major: b.version.qemu.major,
        minor: b.version.qemu.minor,
        micro: b.version.qemu.micro,
        package: b.version.package.trim().to_owned(),
        capabilities: b.capabilities,
    })
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

fn excerpt_value(v: &Value) -> String {
    excerpt(v.to_string().as_bytes())
}

#[derive(Debug)]
pub(crate) enum LineError {
    Io(std::io::Error),
    TooLong,
    /// EOF after part of a line.
    Truncated,
}

/// Reads one `\n`-terminated line into `buf` (terminator included), at most `max` bytes before
/// the terminator. `Ok(false)` is a clean EOF before any byte of a new line.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineError> {
    loop {
        let avail = r.fill_buf().await.map_err(LineError::Io)?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(false)
            } else {
                Err(LineError::Truncated)
            };
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take - usize::from(done) > max {
            return Err(LineError::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// Why a connection ended; turned into an error for each command that was still pending.
#[derive(Debug, Clone)]
enum Failure {
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

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    failed: Option<Failure>,
}

/// State shared by the handle and the reader/writer tasks. The lock is held only for map
/// operations, never across an await.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it; the map itself
        // is always consistent (single inserts/removes), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(
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

    fn complete(&self, id: u64, result: Result<Value, (String, String)>) {
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

    fn fail(&self, failure: Failure) {
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

    fn error_for(&self, command: &str) -> QmpError {
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
struct Deregister<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

async fn reader_task(
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

async fn writer_task(
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

    /// `query-status`.
    pub async fn query_status(&self) -> Result<Status, QmpError> {
        self.call("query-status", Value::Null).await
    }

    /// `query-block`: block devices attached to guest devices (and legacy `-drive`s).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.call("query-block", Value::Null).await
    }

    /// `query-named-block-nodes` with `flat: true`: every node once, backing chains not nested.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.call("query-named-block-nodes", json!({ "flat": true }))
            .await
    }

    /// `query-block-jobs`.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.call("query-block-jobs", Value::Null).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.call("query-migrate", Value::Null).await
    }

    /// `query-migrate-capabilities`.
    pub async fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapability>, QmpError> {
        self.call("query-migrate-capabilities", Value::Null).await
    }

    /// `migrate-set-capabilities`, e.g. `&[("multifd", true), ("pause-before-switchover", true)]`.
    pub async fn migrate_set_capabilities(
        &self,
        capabilities: &[(&str, bool)],
    ) -> Result<(), QmpError> {
        let caps: Vec<Value> = capabilities
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await?;
        Ok(())
    }

    /// `migrate-set-parameters`, e.g. `json!({"max-bandwidth": 1e9 as u64, "downtime-limit": 300})`.
    pub async fn migrate_set_parameters(&self, parameters: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", parameters).await?;
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(command: &str, value: &Value) -> Result<T, QmpError> {
    T::deserialize(value).map_err(|e| {
        QmpError::Protocol(format!(
            "unexpected reply to {command} ({e}): {}",
            excerpt_value(value)
        ))
    })
}

async fn read_greeting<R: AsyncBufRead + Unpin>(rd: &mut R) -> Result<Greeting, QmpError> {
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

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub running: bool,
    /// `prelaunch`, `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, ...
    pub status: String,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// Legacy drive name; empty for devices set up with `-blockdev`.
    #[serde(default)]
    pub device: String,
    /// QOM path or id of the guest device, e.g. `/machine/peripheral/vd0/virtio-backend`.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium, absent for an empty drive (e.g. CD-ROM without a disc).
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node (`inserted` of `query-block`, entries of `query-named-block-nodes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// Filename (or JSON pseudo-filename) of the node.
    #[serde(default)]
    pub file: String,
    /// Driver: `raw`, `qcow2`, `file`, `nbd`, ...
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub backing_file: Option<String>,
    #[serde(default)]
    pub ro: bool,
    pub image: ImageInfo,
}

/// `image` of a block node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageInfo {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub format: String,
    /// Guest-visible size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockJobInfo {
    /// `mirror`, `commit`, `stream`, `backup`.
    #[serde(rename = "type", default)]
    pub job_type: String,
    /// The job id (named `device` for historical reasons).
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub speed: u64,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub paused: bool,
    /// A mirror is `ready` once source and target are in sync.
    #[serde(default)]
    pub ready: bool,
    /// Job status: `running`, `ready`, `concluded`, ...
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// Reply of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// `none` (no migration yet: QEMU omits the field), `setup`, `active`, `pre-switchover`,
    /// `device`, `completed`, `failed`, `cancelled`, `postcopy-active`, ...
    #[serde(default = "status_none")]
    pub status: String,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    /// Estimated downtime in milliseconds (while active).
    #[serde(rename = "expected-downtime", default)]
    pub expected_downtime: Option<i64>,
    /// Milliseconds since the migration started (or its total duration when completed).
    #[serde(rename = "total-time", default)]
    pub total_time: Option<i64>,
    /// Why the migration failed, when `status` is `failed`.
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

fn status_none() -> String {
    "none".into()
}

/// `ram` of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct MigrationRam {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes left to send in this pass.
    pub remaining: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Pages dirtied per second by the guest.
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Bytes per page (0 when QEMU does not say: 4096 on x86).
    #[serde(rename = "page-size")]
    pub page_size: u64,
}

/// One entry of `query-migrate-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_7_2_greeting() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
        let Ok(Message::Greeting(g)) = parse_message(line) else {
            panic!("not a greeting: {:?}", parse_message(line));
        };
        assert_eq!((g.major, g.minor, g.micro), (7, 2, 22));
        assert_eq!(g.package, "Debian 1:7.2+dfsg-7+deb12u18");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn parses_replies_errors_and_events() {
        assert_eq!(
            parse_message(br#"{"return": {"running": false}, "id": 7}"#),
            Ok(Message::Return {
                id: Some(7),
                value: json!({"running": false})
            })
        );
        assert_eq!(
            parse_message(
                br#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#
            ),
            Ok(Message::Error {
                id: Some(3),
                class: "CommandNotFound".into(),
                desc: "The command x has not been found".into()
            })
        );
        assert_eq!(
            parse_message(
                br#"{"timestamp": {"seconds": 1700000000, "microseconds": 123}, "event": "STOP"}"#
            ),
            Ok(Message::Event(Event {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Some((1700000000, 123))
            }))
        );
        let Ok(Message::Event(ev)) = parse_message(
            br#"{"event": "BLOCK_JOB_READY", "data": {"device": "m0"}, "timestamp": {"seconds": -1}}"#,
        ) else {
            panic!("event expected")
        };
        assert_eq!(ev.data["device"], "m0");
        assert_eq!(ev.timestamp, None);
        // An error reply to an unparsable request has no id.
        assert!(matches!(
            parse_message(br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#),
            Ok(Message::Error { id: None, .. })
        ));
        // Surrounding whitespace (QEMU ends lines with \r\n) is fine.
        assert!(matches!(
            parse_message(b"  {\"return\": {}, \"id\": 1}\r\n"),
            Ok(Message::Return { id: Some(1), .. })
        ));
    }

    #[test]
    fn rejects_malformed_lines_without_panicking() {
        let bad: &[&[u8]] = &[
            b"",
            b"garbage",
            b"\xff\xfe\x00",
            b"[1, 2]",
            b"42",
            b"{\"return\": {}, \"id\": 1",
            br#"{"return": {}, "id": "abc"}"#,
            br#"{"return": {}, "id": -1}"#,
            br#"{"error": "nope", "id": 1}"#,
            br#"{"error": {"class": 1, "desc": "x"}, "id": 1}"#,
            br#"{"event": 5}"#,
            br#"{"QMP": {}}"#,
            br#"{"QMP": {"version": {"qemu": {"major": "7"}}}}"#,
            br#"{"something": "else"}"#,
        ];
        for line in bad {
            let r = parse_message(line);
            assert!(
                r.is_err(),
                "{:?} parsed as {r:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Error messages quote the input, but only an excerpt of it.
        let long = format!("{{\"x\": \"{}\"", "a".repeat(10_000));
        let e = parse_message(long.as_bytes()).unwrap_err();
        assert!(e.len() < 500, "{e}");
    }

    #[tokio::test]
    async fn line_reader_bounds_and_truncation() {
        let mut r = BufReader::with_capacity(4, &b"ab\ncdef\r\n\nxyz"[..]);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
        assert_eq!(buf, b"ab\n");
        buf.clear();
        assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
        assert_eq!(buf, b"cdef\r\n");
        buf.clear();
        assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
        assert_eq!(buf, b"\n");
        buf.clear();
        assert!(matches!(
            read_line(&mut r, &mut buf, 16).await,
            Err(LineError::Truncated)
        ));
        buf.clear();
        let mut r = BufReader::with_capacity(4, &b""[..]);
        assert!(!read_line(&mut r, &mut buf, 16).await.unwrap());

        // Exactly `max` bytes before the newline is fine, one more is not.
        let mut r = BufReader::with_capacity(3, &b"12345\n123456\n"[..]);
        assert!(read_line(&mut r, &mut buf, 5).await.unwrap());
        buf.clear();
        assert!(matches!(
            read_line(&mut r, &mut buf, 5).await,
            Err(LineError::TooLong)
        ));
    }

    #[test]
    fn typed_replies_tolerate_omissions_and_reject_mismatches() {
        let m: MigrationInfo = decode("query-migrate", &json!({})).unwrap();
        assert_eq!(m.status, "none");
        assert_eq!(m.ram, None);
        let m: MigrationInfo = decode(
            "query-migrate",
            &json!({"status": "active", "expected-downtime": 300, "total-time": 1234,
                    "ram": {"transferred": 10, "remaining": 20, "total": 30, "mbps": 941.5,
                            "dirty-pages-rate": 4, "duplicate": 9}}),
        )
        .unwrap();
        assert_eq!(m.ram.as_ref().unwrap().mbps, 941.5);
        assert_eq!(m.expected_downtime, Some(300));
        let e = decode::<Status>("query-status", &json!("nonsense")).unwrap_err();
        assert!(
            matches!(&e, QmpError::Protocol(m) if m.contains("query-status")),
            "{e}"
        );
    }

    #[test]
    fn error_messages_read_well() {
        let e = QmpError::Qemu {
            command: "blockdev-mirror".into(),
            class: "GenericError".into(),
            desc: "Cannot find device='x'".into(),
        };
        assert_eq!(
            e.to_string(),
            "QEMU refused blockdev-mirror: GenericError: Cannot find device='x'"
        );
        let e = QmpError::Timeout {
            command: "query-status".into(),
            secs: 0.5,
        };
        assert!(e
            .to_string()
            .starts_with("query-status: no answer from QEMU within 0.5 s"));
    }
}
