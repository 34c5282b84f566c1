//! The subcommands.

pub mod certs;
pub mod demo;
pub mod logging;
pub mod migrate;
pub mod serve;
pub mod ui;
