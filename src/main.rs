//! `migtun`: the command line. Wiring only; the work happens in the crates and in `cmd/`.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "migtun", version, about = "QEMU live migration over one encrypted, mutually authenticated port")]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=migtun_proxy=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host agent.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config and explain what it means; exits non-zero if it is wrong.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a CA and host certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Two agents and a tunnelled transfer on this machine, with no set-up.
    Demo {
        /// How much data to carry through the tunnel.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A new CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// A host certificate signed by DIR/ca.*: DIR/HOST.pem and DIR/HOST.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => cmd::logging::init(cli.log_format).and_then(|()| cmd::serve::serve(&config)),
        Command::Check { config } => cmd::serve::check(&config),
        Command::Certs { command: CertsCommand::Init { dir } } => cmd::certs::init(&dir),
        Command::Certs { command: CertsCommand::Issue { dir, name } } => cmd::certs::issue(&dir, &name),
        Command::Demo { size_mib } => cmd::logging::init_quiet(cli.log_format).and_then(|()| cmd::demo::run(size_mib)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migtun: {e:#}");
            ExitCode::FAILURE
        }
    }
}
