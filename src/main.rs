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
    /// Live-migrate a QEMU VM, with its disks, to a peer (the local agent runs it).
    Migrate {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// The VM's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// The destination peer.
        #[arg(long)]
        to: String,
        /// Copy only these disks (device, qdev id or node name), comma-separated.
        #[arg(long, value_delimiter = ',', conflicts_with = "shared_storage")]
        disks: Option<Vec<String>>,
        /// Copy no disk: both hosts see the same storage.
        #[arg(long)]
        shared_storage: bool,
        /// multifd channels.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
        parallel: Option<u8>,
        #[arg(long)]
        postcopy: bool,
        /// Bytes per second for the RAM migration [default: no limit; QEMU's own 128 MiB/s is lifted].
        #[arg(long)]
        max_bandwidth: Option<u64>,
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Migrate even with host (VFIO) devices attached.
        #[arg(long)]
        force: bool,
        /// A file to carry to the destination with the migration (repeatable).
        #[arg(long = "with-file")]
        with_file: Vec<PathBuf>,
        /// Machine-readable events (JSON lines) instead of progress bars.
        #[arg(long)]
        json: bool,
    },
    /// Running migrations and open streams of the local agent.
    Status {
        #[arg(long)]
        admin: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Decide where a guest is when its destination cannot say (the outcome of a migration is
    /// unknown: the destination host is gone after the point of no return).
    ///
    /// Only for a migration that `migtun status` shows as `unknown`. Check the destination host
    /// first: `--guest-on destination` if the guest runs there (the source QEMU quits),
    /// `--guest-on source` if it does not and never will (the source resumes the guest).
    /// Deciding wrongly runs the guest twice or nowhere.
    Resolve {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// The migration id (m-...).
        id: String,
        #[arg(long, value_enum)]
        guest_on: GuestOnArg,
    },
    /// Two agents and a tunnelled transfer on this machine, with no set-up.
    Demo {
        /// How much data to carry through the tunnel.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GuestOnArg {
    /// The guest is not on the destination: resume it on the source.
    Source,
    /// The guest runs on the destination: quit the source QEMU.
    Destination,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A new CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// A host certificate signed by DIR/ca.*: DIR/HOST.pem and DIR/HOST.key.
    ///
    /// Example: migtun certs issue --dir /etc/migtun/pki --name host-a --ip 10.0.0.1
    Issue {
        /// The PKI directory (ca.pem, ca.key); the new files are written there.
        #[arg(long)]
        dir: PathBuf,
        /// The host's name: its DNS SAN, the name peers configure for it.
        #[arg(long)]
        name: String,
        /// Validity in days [default: 730].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: Option<u32>,
        /// An IP address SAN as well (repeatable).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Replace an existing certificate and key of this host (renewal).
        #[arg(long)]
        force: bool,
    },
    /// Revoke DIR/HOST.pem: adds it to DIR/crl.pem (signed by DIR/ca.key), the agents' `tls.crl`.
    Revoke {
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
        Command::Certs { command: CertsCommand::Issue { dir, name, days, ips, force } } => cmd::certs::issue(&dir, &name, days, &ips, force),
        Command::Certs { command: CertsCommand::Revoke { dir, name } } => cmd::certs::revoke(&dir, &name),
        Command::Migrate {
            admin, qmp, to, disks, shared_storage, parallel, postcopy, max_bandwidth, downtime_ms, force, with_file, json,
        } => cmd::migrate::check_files(&with_file).and_then(|files| {
            let args = migtun_control::messages::MigrateArgs {
                qmp: std::fs::canonicalize(&qmp).unwrap_or(qmp),
                to,
                disks,
                shared_storage,
                parallel,
                postcopy,
                max_bandwidth,
                downtime_ms,
                force,
                files,
            };
            cmd::migrate::migrate(&admin, args, json)
        }),
        Command::Status { admin, json } => cmd::migrate::status(&admin, json),
        Command::Resolve { admin, id, guest_on } => {
            let guest_on = match guest_on {
                GuestOnArg::Source => migtun_control::admin::GuestOn::Source,
                GuestOnArg::Destination => migtun_control::admin::GuestOn::Destination,
            };
            cmd::migrate::resolve(&admin, &id, guest_on)
        }
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
