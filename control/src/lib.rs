//! migtun control plane: the QMP client, the migration state machine and its driver on the
//! source, the destination's side, the journal that lets both survive a crash, and the control
//! RPC between agents.

pub mod qmp;
pub mod rpc;
pub use destination::incoming;
pub mod messages;
pub mod progress;
pub mod admin;
pub mod migration;
pub use migration::{driver, journal, machine, recovery, teardown};
pub mod failpoint;
pub mod process;
pub mod authz;
pub mod service;
pub mod tunnels;
pub mod destination;
pub mod qemu_command;
/// Entry points for the fuzz targets in `fuzz/` and their corpus test; not an API.
#[doc(hidden)]
pub mod fuzzing;
