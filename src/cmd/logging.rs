//! tracing set-up: human-readable by default, JSON on request, filtered by RUST_LOG.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::LogFormat;

fn install(format: LogFormat, default: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// The agent's logging: stream opens/closes and every failure at info/warn.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    install(format, "info")
}

/// For commands that print their own report: only warnings and errors.
pub fn init_quiet(format: LogFormat) -> anyhow::Result<()> {
    install(format, "warn")
}
