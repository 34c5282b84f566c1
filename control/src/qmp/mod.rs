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

//!
//! Files: `wire.rs` (the line protocol, pure parsing), `connection.rs` (the reader and writer
//! tasks and the state they share), `client.rs` ([`Qmp`]: connecting, its commands), `commands.rs` (typed queries and their replies), `events.rs`
//! ([`EventsExt`]: waiting for an event).

mod client;
mod commands;
mod connection;
mod events;
mod wire;

pub use client::*;
pub use commands::*;
use connection::*;
pub use events::*;
pub use wire::*;

use std::path::PathBuf;
use std::time::Duration;



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


#[cfg(test)]
mod tests;
