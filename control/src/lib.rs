//! migtun control plane: drives QEMU over QMP, runs the live migration's state machine on the
//! source, decides and runs the destination's side, journals both so a restarted agent finishes
//! what it started, and speaks the control RPC between agents.
//!
//! # The map, lowest layer first
//!
//! Each layer may use the layers above it in this list, never one below it
//! (`tests/layers.rs` checks every `crate::` path against this table, and that no two modules
//! use each other):
//!
//! 1. **base**: [`messages`] (the wire types between agents and of reports), [`progress`],
//!    [`failpoint`], [`process`], [`qemu_command`] (the QEMU command line
//!    of a migratable guest, for the demo and the tests). Uses nothing of this crate.
//! 2. **machine**: [`migration::machine`], the source's state machine. Pure: no I/O, no clock,
//!    no tokio; tested without sockets. Uses nothing of this crate.
//! 3. **policy**: [`destination`] (`cookie`, `cmdline` with its `options` and `keys`, `opts`,
//!    `paths`): what a destination allows to run. Uses base.
//! 4. **qmp**: [`qmp`], the QEMU client (wire, connection, client, commands, events). **rpc**:
//!    [`rpc`], the control RPC between agents (server, client, liveness, body). **journal**:
//!    [`migration::journal`] and [`migration::handover`] (taking it over from the agent a
//!    restart replaces). None of these three knows another.
//! 5. **tools**: [`migration::teardown`] (undoing a migration in QEMU), [`migration::settle`]
//!    (asking the destination again for an unknown outcome), [`tunnels`], [`admin`] (the local
//!    admin socket and its registry: `socket`, `registry`), [`authz`] (who may call the RPC: a policy for its server,
//!    from the config).
//! 6. **sides**: [`migration::driver`] (the machine's I/O: the loop, `executor`, `observe`) and
//!    [`migration::recovery`] on the source, [`destination::incoming`] on the destination.
//! 7. **service**: [`service`], which wires the sides into one agent; and [`fuzzing`] (not an API).
//!
//! `migtun_proxy` (the data plane) is used by every layer from policy up; it never knows this
//! crate. The old flat paths (`machine`, `driver`, `journal`, `recovery`, `teardown`,
//! `incoming`) stay as re-exports.

pub mod admin;
pub mod authz;
pub mod destination;
pub mod failpoint;
pub mod qemu_command;
/// Entry points for the fuzz targets in `fuzz/` and their corpus test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod messages;
pub mod migration;
pub mod process;
pub mod progress;
pub mod qmp;
pub mod rpc;
pub mod service;
pub mod tunnels;

pub use destination::incoming;
pub use migration::{driver, handover, journal, machine, recovery, teardown};
