//! `migtun`: the command line. Wiring only; the work happens in the crates and in `cmd/`.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

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
    #[command(after_help = "Example:\n  migtun serve --config /etc/migtun/host-a.toml\n\nSIGTERM or SIGINT drains (open streams run on for drain_timeout_secs); a second signal exits at once.")]
    Serve {
        /// The agent's config file (TOML; README.md, \"Setting up two hosts\").
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config and what the host must provide for it, and explain what it means;
    /// exits non-zero, one line per problem, if `serve` would not start.
    #[command(after_help = "Example:\n  migtun check --config /etc/migtun/host-a.toml")]
    Check {
        /// The agent's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a CA and host certificates.
    #[command(after_help = "Example:\n  migtun certs init --dir /root/pki                 # ca.pem, ca.key (keep ca.key off the hypervisors)\n  migtun certs issue --dir /root/pki --name host-a  # host-a.pem, host-a.key: copy to host-a\n  migtun certs revoke --dir /root/pki --name host-c # crl.pem: copy to every host's tls.crl")]
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Live-migrate a QEMU VM, with its disks, to a peer (the local agent runs it).
    #[command(after_help = "Examples:\n  migtun migrate --admin /run/migtun/admin.sock --qmp /run/vms/web1.qmp --to host-b\n  migtun migrate ... --disks vd0                 # copy only vd0; the others are on shared storage\n  migtun migrate ... --shared-storage            # copy no disk\n  migtun migrate ... --parallel 4 --downtime-ms 300 --with-file /var/lib/vms/web1.nvram\n  migtun migrate ... --json                      # JSON lines for scripts\n\nCtrl-C asks the agent to cancel and roll back; the migration belongs to the agent, not to this command.")]
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
        /// Parallel RAM streams: 1 is one stream, N > 1 multifd with N channels [default: 4 with QEMU 8.0+, one stream with QEMU 7.2, --postcopy or a 1-CPU host].
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
        parallel: Option<u8>,
        /// Switch to postcopy once RAM has been copied once (the guest runs on the destination
        /// while the rest follows; a failure then loses it on both sides).
        #[arg(long)]
        postcopy: bool,
        /// Bytes per second for the RAM migration [default: no limit; QEMU's own 128 MiB/s is lifted].
        #[arg(long)]
        max_bandwidth: Option<u64>,
        /// The longest pause of the guest at switchover QEMU aims for [default: QEMU's, 300 ms].
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
    /// Per-migration routes for tooling that drives QEMU itself (libvirt): a socket pair on
    /// this host and on the peer, under both hosts' `[tunnels] dir`.
    #[command(after_help = "Example:\n  migtun tunnel open --admin /run/migtun/admin.sock --to host-b --name vm1\n  virsh migrate --live --copy-storage-all vm1 ... --migrateuri unix:///run/migtun/tunnels/vm1/migration.sock --disks-uri unix:///run/migtun/tunnels/vm1/nbd.sock\n  migtun tunnel close --admin /run/migtun/admin.sock --name vm1")]
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Running migrations and open streams of the local agent.
    #[command(after_help = "Example:\n  migtun status --admin /run/migtun/admin.sock")]
    Status {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// One JSON document instead of text.
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
    #[command(after_help = "Example:\n  migtun resolve --admin /run/migtun/admin.sock m-1f2e3d4c5b6a7980 --guest-on source")]
    Resolve {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// The migration id (m-...).
        id: String,
        /// Where the guest is: `source` (the destination does not run it; resume it here) or
        /// `destination` (it runs there; quit the source QEMU).
        #[arg(long, value_enum)]
        guest_on: GuestOnArg,
    },
    /// Ask the agent's metrics listener whether it is alive (`/healthz`) or ready (`/readyz`);
    /// exits 0 on 200, 1 otherwise (for container HEALTHCHECKs: no curl needed).
    #[command(after_help = "Examples:\n  migtun healthcheck --metrics 127.0.0.1:9477           # alive: /healthz\n  migtun healthcheck --metrics 127.0.0.1:9477 --ready   # ready: /readyz (503 while draining, certificate expired)\n  migtun healthcheck --config /etc/migtun/host-a.toml   # the config's `metrics` address\n  migtun healthcheck --url http://127.0.0.1:9477/readyz")]
    #[command(group(clap::ArgGroup::new("target").required(true).args(["url", "metrics", "config"])))]
    Healthcheck {
        /// The URL to GET (http:// only), path included.
        #[arg(long)]
        url: Option<String>,
        /// The agent's metrics address (host:port, the config's `metrics` key).
        #[arg(long)]
        metrics: Option<String>,
        /// The agent's config file: its `metrics` address.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Ask `/readyz` (serving, not draining, certificate valid) instead of `/healthz`.
        #[arg(long, conflicts_with = "url")]
        ready: bool,
    },
    /// A shell completion script on stdout.
    #[command(after_help = "Examples:\n  migtun completions bash > /etc/bash_completion.d/migtun\n  migtun completions zsh > /usr/local/share/zsh/site-functions/_migtun\n  migtun completions fish > ~/.config/fish/completions/migtun.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page, migtun(1), in roff on stdout.
    #[command(after_help = "Examples:\n  migtun man > /usr/local/share/man/man1/migtun.1\n  migtun man | man -l -")]
    Man,
    /// Make the running agent re-read its config file and the certificate, key, CA and CRL files
    /// (as SIGHUP does): new handshakes use them, routes come and go, open streams run on.
    /// Exits non-zero, printing the problems, if the new config is refused (the agent keeps the
    /// one it runs).
    #[command(after_help = "Example:
  migtun reload --admin /run/migtun/admin.sock
  kill -HUP $(pidof migtun)                    # the same, without the admin socket")]
    Reload {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
    },
    /// Two agents and a tunnelled transfer on this machine, with no set-up.
    #[command(after_help = "Example:\n  migtun demo --size-mib 256")]
    Demo {
        /// How much data to carry through the tunnel.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
}

#[derive(Subcommand)]
enum TunnelCommand {
    /// Open a tunnel to a peer: this agent listens on `[tunnels] dir/<name>/<socket>.sock`, the
    /// peer forwards each socket to the same path under its `[tunnels] dir`, where its QEMU
    /// listens. Prints the `unix://` URIs to pass to libvirt.
    #[command(after_help = "Examples:\n  migtun tunnel open --admin /run/migtun/admin.sock --to host-b --name vm1\n  migtun tunnel open ... --name vm1 --ttl 30m --socket migration   # RAM only (shared storage)\n  migtun tunnel open ... --json")]
    Open {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// The peer (a configured `[[peer]]` whose `[tunnels] allow` names this host).
        #[arg(long)]
        to: String,
        /// The tunnel's name (letters, digits, '-', '_'), e.g. the domain's name.
        #[arg(long)]
        name: String,
        /// How long the tunnel accepts new connections: 90, 90s, 10m, 1h [default: 10m; at most the peer's tunnels.max_ttl_secs].
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<std::time::Duration>,
        /// A socket of the tunnel (repeat for more) [default: migration and nbd].
        #[arg(long = "socket")]
        sockets: Vec<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Close a tunnel on both hosts (streams already open run on).
    #[command(after_help = "Example:\n  migtun tunnel close --admin /run/migtun/admin.sock --name vm1")]
    Close {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// The tunnel's name.
        #[arg(long)]
        name: String,
    },
    /// The tunnels open on this host, both directions.
    #[command(after_help = "Example:\n  migtun tunnel list --admin /run/migtun/admin.sock")]
    List {
        /// The local agent's admin socket.
        #[arg(long)]
        admin: PathBuf,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `90`, `90s`, `10m`, `1h`.
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, ""));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected a number of seconds, or N followed by s, m or h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m or h)")),
    };
    if secs == 0 {
        return Err("the TTL must be at least 1 second".into());
    }
    Ok(std::time::Duration::from_secs(secs))
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
        /// The PKI directory to create (mode 0700); it must not hold a CA yet.
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
        /// The PKI directory (ca.pem, ca.key, HOST.pem); crl.pem is written there.
        #[arg(long)]
        dir: PathBuf,
        /// The host whose certificate is revoked.
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
        Command::Tunnel { command } => match command {
            TunnelCommand::Open { admin, to, name, ttl, sockets, json } => {
                cmd::tunnel::open(&admin, &to, &name, sockets, ttl.unwrap_or(migtun_control::tunnels::DEFAULT_TTL), json)
            }
            TunnelCommand::Close { admin, name } => cmd::tunnel::close(&admin, &name),
            TunnelCommand::List { admin, json } => cmd::tunnel::list(&admin, json),
        },
        Command::Resolve { admin, id, guest_on } => {
            let guest_on = match guest_on {
                GuestOnArg::Source => migtun_control::admin::GuestOn::Source,
                GuestOnArg::Destination => migtun_control::admin::GuestOn::Destination,
            };
            cmd::migrate::resolve(&admin, &id, guest_on)
        }
        Command::Healthcheck { url, metrics, config, ready } => {
            let target = match (&url, &metrics, &config) {
                (Some(u), _, _) => Ok(cmd::healthcheck::Target::Url(u)),
                (_, Some(m), _) => Ok(cmd::healthcheck::Target::Metrics(m)),
                (_, _, Some(c)) => Ok(cmd::healthcheck::Target::Config(c)),
                // The argument group already requires one of them.
                _ => Err(anyhow::anyhow!("healthcheck: give --url, --metrics or --config")),
            };
            target.and_then(|t| cmd::healthcheck::run(t, ready))
        }
        Command::Completions { shell } => cmd::manual::completions(Cli::command(), shell),
        Command::Man => cmd::manual::man(Cli::command()),
        Command::Reload { admin } => cmd::reload::reload(&admin),
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
