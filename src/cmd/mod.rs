//! The subcommands.

pub mod certs;
pub mod demo;
pub mod healthcheck;
pub mod logging;
pub mod manual;
pub mod migrate;
pub mod reload;
pub mod serve;
pub mod tunnel;
pub mod ui;
