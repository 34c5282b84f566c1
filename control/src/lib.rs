//! migtun control plane (QMP client and migration orchestration) — grows with the control-plane issue.

pub mod qmp;
pub mod rpc;
pub mod incoming;
pub mod messages;
pub mod admin;
pub mod machine;
pub mod driver;
pub mod authz;
pub mod service;
pub mod destination;
/// Entry points for the fuzz targets in `fuzz/` and their corpus test; not an API.
#[doc(hidden)]
pub mod fuzzing;
