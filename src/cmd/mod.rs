//! The subcommands.

pub mod certs;
pub mod demo;
pub mod logging;
pub mod serve;
