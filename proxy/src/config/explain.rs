//! `migtun check`'s words for a config: what each key means on this host.

use std::fmt::Write as _;

use rustls_pki_types::UnixTime;

use super::*;
use crate::tls::identity::dns_sans;

impl Config {
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let leaf = self.tls.cert_chain.first();
        let sans = leaf.map(dns_sans).unwrap_or_default();
        let _ = writeln!(out, "identity: {}", self.name);
        let _ = writeln!(
            out,
            "  certificate {} (DNS SANs: {}; {})",
            self.tls.cert_path.display(),
            if sans.is_empty() {
                "none".to_string()
            } else {
                sans.join(", ")
            },
            leaf.map(|c| validity_summary(c.as_ref()))
                .unwrap_or_default()
        );
        if self.tls.cert_chain.len() > 1 {
            let _ = writeln!(
                out,
                "  chain       {} intermediate certificate(s)",
                self.tls.cert_chain.len() - 1
            );
        }
        let _ = writeln!(out, "  key         {}", self.tls.key_path.display());
        let subjects: Vec<String> = self
            .tls
            .ca_certs
            .iter()
            .map(|c| subject(c.as_ref()))
            .collect();
        let _ = writeln!(
            out,
            "  trusts      {} ({} CA certificate(s): {})",
            self.tls.ca_path.display(),
            self.tls.ca_certs.len(),
            subjects.join("; ")
        );
        let _ = writeln!(
            out,
            "  records     {} ({})",
            self.tls.record_layer.name(),
            match self.tls.record_layer {
                RecordLayer::Own => "tls.record_layer: migtun's own TLS record layer after rustls' handshake",
                RecordLayer::Rustls => "tls.record_layer: rustls' record layer (tokio-rustls), the fallback",
            }
        );
        if let Some(crl) = &self.tls.crl_path {
            let _ = writeln!(
                out,
                "  revokes     {} ({} CRL(s); checked on every handshake, resumed ones too)",
                crl.display(),
                self.tls.crls.len()
            );
        }
        let _ = writeln!(out, "listen: TCP {} (TLS 1.3, mutual TLS; peers must present a certificate from the CA above)", self.listen);
        let _ = writeln!(
            out,
            "        UDP {} (QUIC, same TLS 1.3 identity and checks)",
            self.listen
        );

        if self.peers.is_empty() {
            let _ = writeln!(out, "peers: none");
        } else {
            let _ = writeln!(out, "peers:");
            for p in &self.peers {
                let _ = writeln!(
                    out,
                    "  {} at {} over {}",
                    p.name,
                    p.address,
                    transport_name(p.transport)
                );
            }
        }
        if self.forwards.is_empty() {
            let _ = writeln!(out, "forwards: none");
        } else {
            let _ = writeln!(out, "forwards (local listener → peer route):");
            for f in &self.forwards {
                let mode = match f.listen {
                    Endpoint::Unix(_) => {
                        let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "the agent's".into());
                        if f.owner == Ownership::default() {
                            format!(" (mode {:04o})", f.mode)
                        } else {
                            format!(" (mode {:04o}, uid {}, gid {})", f.mode, id(f.owner.uid), id(f.owner.gid))
                        }
                    }
                    Endpoint::Tcp(_) => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {}{} → peer {}, route {}",
                    f.listen, mode, f.peer, f.route
                );
            }
        }
        if self.exposes.is_empty() {
            let _ = writeln!(out, "exposes: none (peers can open no static route here)");
        } else {
            let _ = writeln!(out, "exposes (route → local target):");
            for e in &self.exposes {
                let _ = writeln!(
                    out,
                    "  route {} → {} allowed for {}",
                    e.route,
                    e.target,
                    e.allow.join(", ")
                );
            }
        }
        match &self.admin {
            Some(a) => {
                let _ = writeln!(out, "admin: {} (mode 0600)", a.display());
            }
            None => {
                let _ = writeln!(
                    out,
                    "admin: none (migtun migrate/status cannot reach this agent)"
                );
            }
        }
        match &self.metrics {
            Some(m) => {
                let _ = writeln!(out, "metrics: http://{m}/metrics (Prometheus text format)");
            }
            None => {
                let _ = writeln!(out, "metrics: off");
            }
        }
        let _ = writeln!(
            out,
            "drain: open streams may run {} s after SIGTERM/SIGINT before they are closed",
            self.drain_timeout.as_secs()
        );
        match &self.qemu {
            Some(q) => {
                let hook = match &q.prepare_hook {
                    Some(h) => format!("prepare hook {}", h.display()),
                    None => {
                        "no prepare hook (this host cannot be a migration destination)".to_string()
                    }
                };
                let _ = writeln!(out, "qemu: run_dir {}, {}", q.run_dir.display(), hook);
                let shared = if q.shared_storage.is_empty() {
                    "none (migrations with disks that are not copied are refused)".to_string()
                } else {
                    q.shared_storage.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    out,
                    "qemu: destination QEMU is {}, sandbox {}, runs as {}; copied disks up to {} bytes each; shared storage: {shared}",
                    q.emulator.display(),
                    if q.sandbox { "on" } else { "off" },
                    q.run_as.as_deref().unwrap_or("the agent's user"),
                    q.max_disk_bytes,
                );
                if q.allow_sources.is_empty() {
                    let _ = writeln!(
                        out,
                        "  incoming migrations: none accepted (qemu.allow_sources is empty)"
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "  incoming migrations from: {} (at most {} at once, {} per peer; side-channel files up to {} bytes)",
                        q.allow_sources.join(", "),
                        q.max_incoming,
                        q.max_incoming_per_peer,
                        q.max_upload_bytes
                    );
                }
            }
            None => {
                let _ = writeln!(out, "qemu: not configured (no orchestrated migrations)");
            }
        }
        match &self.tunnels {
            Some(t) => {
                let from = if t.allow.is_empty() { "accepted from no peer (tunnels.allow is empty)".to_string() } else { format!("accepted from {}", t.allow.join(", ")) };
                let _ = writeln!(out, "tunnels: dir {}, {from}; at most {} open at once, TTL up to {} s", t.dir.display(), t.max_open, t.max_ttl.as_secs());
                let uid = match (&t.owner, t.ownership.uid) {
                    (Some(user), Some(uid)) => format!("owner {user} (uid {uid})"),
                    _ => "the agent's user".to_string(),
                };
                let gid = t.ownership.gid.map(|g| format!("gid {g}")).unwrap_or_else(|| "the agent's group".into());
                let _ = writeln!(out, "  each tunnel's directory: mode {:04o}, {uid}, {gid}; its sockets on the listening side: mode {TUNNEL_SOCKET_MODE:04o}, the same owner and group", t.mode);
            }
            None => {
                let _ = writeln!(out, "tunnels: not configured (migtun tunnel open is refused)");
            }
        }
        out
    }
}

pub(super) fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tls => "TLS/TCP",
        Transport::Quic => "QUIC",
        Transport::Auto => "QUIC, falling back to TLS/TCP",
    }
}

/// "valid until 2027-01-01 12:00:00 UTC (729 days left)" for a DER certificate.
pub(super) fn validity_summary(der: &[u8]) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return "unparseable".into();
    };
    let until = cert.validity().not_after.timestamp();
    let now = UnixTime::now().as_secs() as i64;
    let left = until - now;
    if left < 0 {
        format!("EXPIRED on {}", fmt_time(until))
    } else {
        format!(
            "valid until {} ({} days left)",
            fmt_time(until),
            left / 86_400
        )
    }
}

pub(super) fn subject(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => c.subject().to_string(),
        Err(_) => "unparseable certificate".into(),
    }
}

/// Unix seconds as "YYYY-MM-DD HH:MM:SS UTC".
pub(super) fn fmt_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
