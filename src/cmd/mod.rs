//! The subcommands.

pub mod certs;
pub mod demo;
pub mod logging;
pub mod migrate;
pub mod reload;
pub mod serve;
pub mod ui;
