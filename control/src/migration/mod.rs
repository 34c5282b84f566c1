//! The source side of a migration: the state machine that decides ([`machine`], no I/O), the
//! driver that performs its actions, the journal both sides write so that a restarted agent
//! finishes what it started, and what undoes or settles a migration after a crash.

pub mod machine;
pub mod driver;
pub mod handover;
pub mod journal;
pub mod recovery;
pub mod settle;
pub mod teardown;
