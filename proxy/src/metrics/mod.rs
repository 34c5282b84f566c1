//! Prometheus metrics (prometheus-client): the families, their bounded labels, and the agent's
//! [`Health`] that `/readyz` reports. The HTTP endpoint that serves them is [`crate::agent::ops`].
//! Label values are bounded: peers are authenticated certificate names, routes are configured
//! names (a route a peer asks for that does not exist is counted as `<unknown>`; the routes a
//! migration opens for itself, `m-<id>.ram` and `m-<id>.nbd`, are counted as `migration.ram` and
//! `migration.nbd`, so that migrations do not add series), reasons are the fixed strings of
//! [`crate::route::wire::ReplyCode::reason`] and [`crate::tls::failure::failure_reason`]. Migrations have their
//! own families ([`MigrationMetrics`]) whose labels are peers and fixed words.

use std::fmt::Write as _;

use prometheus_client::encoding::{text::encode, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub(crate) mod health;
pub use health::{Health, Readiness};

/// Which end of a tunnelled stream this agent is.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// Accepted on a local forward listener, sent to a peer.
    Source,
    /// Received from a peer, connected to a local expose target.
    Target,
}

/// Bytes leave towards the peer (`tx`) or arrive from it (`rx`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::Tx => "tx",
            Direction::Rx => "rx",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer: String,
    pub route: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub peer: String,
    pub route: String,
    pub side: Side,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub peer: String,
    pub route: String,
    pub side: Side,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `client` when this agent dialled, `server` when it accepted.
    pub role: &'static str,
    /// `full` or `resumed`.
    pub kind: &'static str,
    /// `tls` (TLS over TCP) or `quic`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeFailureLabels {
    pub role: &'static str,
    /// The peer's name when it is known (client role), `-` otherwise.
    pub peer: String,
    pub reason: &'static str,
    /// `tls` (TLS over TCP) or `quic`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SwitchLabels {
    pub peer: String,
    /// The transport new streams use from now on: `tls` or `quic`.
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `leaf`: this agent's own certificate; `ca`: the earliest of its chain's intermediates
    /// and the trust anchors of `tls.ca`.
    pub which: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// `port`, `forward`, `metrics` or `admin`.
    pub listener: &'static str,
    /// [`crate::io::accept::ErrorKind::label`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `tls` (TLS over TCP) or `quic`.
    pub transport: &'static str,
    /// `address-limit`, `client-hello-timeout`, `not-tls`, `not-a-peer`, `peer-preamble-limit`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlRefusalLabels {
    /// The caller's name if it is a configured peer, `unknown` otherwise (a stranger's
    /// certificate name must not create series).
    pub peer: String,
    /// A method this agent serves, `upload`, or `unknown`.
    pub method: String,
    /// A fixed string naming the rule (e.g. `not-allowed`, `max-incoming-per-peer`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub peer: String,
    /// `outgoing` (this host is the source) or `incoming`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationEndLabels {
    pub peer: String,
    pub direction: &'static str,
    /// `succeeded`, `failed`, `cancelled`, `refused` or `unknown`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationPhaseLabels {
    pub direction: &'static str,
    /// A fixed word: `begin`, `prepare`, `perform`, `finish`, `confirm`, `unknown`, `recovering`
    /// (outgoing); `prepared` (incoming).
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationBytesLabels {
    /// `ram` or `disk`.
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Migrations, for the control plane: every label is a configured peer or a fixed word.
#[derive(Clone)]
pub struct MigrationMetrics {
    pub started: Family<MigrationLabels, Counter>,
    pub finished: Family<MigrationEndLabels, Counter>,
    pub current: Family<MigrationPhaseLabels, Gauge>,
    pub duration: Family<DirectionLabels, Histogram>,
    pub downtime: Histogram,
    pub bytes: Family<MigrationBytesLabels, Counter>,
}

/// Migration durations: seconds to an hour and more (a TiB of disks takes that long).
const DURATION_BUCKETS: [f64; 12] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];
/// Downtime: QEMU's default limit is 300 ms; tens of ms are good, seconds are trouble.
const DOWNTIME_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 5.0];

/// A migration counted in `migtun_migrations_current` while the guard lives, in its phase.
pub struct MigrationGauge {
    current: Family<MigrationPhaseLabels, Gauge>,
    labels: MigrationPhaseLabels,
}

impl MigrationGauge {
    /// Moves this migration to `phase`.
    pub fn set_phase(&mut self, phase: &'static str) {
        if self.labels.phase == phase {
            return;
        }
        self.current.get_or_create(&self.labels).dec();
        self.labels.phase = phase;
        self.current.get_or_create(&self.labels).inc();
    }
}

impl Drop for MigrationGauge {
    fn drop(&mut self) {
        self.current.get_or_create(&self.labels).dec();
    }
}

impl MigrationMetrics {
    fn new(registry: &mut Registry) -> MigrationMetrics {
        let m = MigrationMetrics {
            started: Family::default(),
            finished: Family::default(),
            current: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS.into_iter())),
            downtime: Histogram::new(DOWNTIME_BUCKETS.into_iter()),
            bytes: Family::default(),
        };
        registry.register("migrations_started", "Migrations begun, by peer and direction", m.started.clone());
        registry.register("migrations_finished", "Migrations ended, by peer, direction and outcome", m.finished.clone());
        registry.register("migrations_current", "Migrations in progress, by direction and phase", m.current.clone());
        registry.register("migration_duration_seconds", "Duration of ended migrations, by direction", m.duration.clone());
        registry.register("migration_downtime_seconds", "Guest downtime of succeeded outgoing migrations (QEMU's figure)", m.downtime.clone());
        registry.register("migration_bytes", "Bytes outgoing migrations moved, by phase (ram, disk)", m.bytes.clone());
        m
    }

    /// A migration begins: counted, and in `current` until the guard is dropped.
    pub fn begin(&self, peer: &str, direction: &'static str, phase: &'static str) -> MigrationGauge {
        self.started.get_or_create(&MigrationLabels { peer: peer.to_string(), direction }).inc();
        let labels = MigrationPhaseLabels { direction, phase };
        self.current.get_or_create(&labels).inc();
        MigrationGauge { current: self.current.clone(), labels }
    }

    /// A migration ended after `seconds`.
    pub fn end(&self, peer: &str, direction: &'static str, outcome: &'static str, seconds: f64) {
        self.finished.get_or_create(&MigrationEndLabels { peer: peer.to_string(), direction, outcome }).inc();
        self.duration.get_or_create(&DirectionLabels { direction }).observe(seconds);
    }
}

/// The route label of a stream: the route's name, except for the routes that come and go at
/// run time, whose names would make one series per migration: the routes a migration opens for
/// itself (`m-<16 hex digits>.<kind>`), counted together as `migration.<kind>`, and a tunnel's
/// (`t-<name>.<socket>`, names chosen by the tooling or by the peer), counted together as
/// `tunnel.migration`, `tunnel.nbd` or, for any other socket name, `tunnel.other`.
pub fn route_label(route: &str) -> String {
    if let Some((id, kind)) = route.split_once('.') {
        let hex = id.strip_prefix("m-").unwrap_or_default();
        if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return format!("migration.{kind}");
        }
        if id.len() > 2 && id.starts_with("t-") {
            let kind = if matches!(kind, "migration" | "nbd") { kind } else { "other" };
            return format!("tunnel.{kind}");
        }
    }
    route.to_string()
}

/// Every metric the agent keeps. Cheap to share: each field is an `Arc` inside.
pub struct Metrics {
    registry: Registry,
    pub bytes: Family<BytesLabels, Counter>,
    pub streams_open: Family<StreamLabels, Gauge>,
    pub stream_opens: Family<StreamLabels, Counter>,
    pub stream_failures: Family<FailureLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub handshake_failures: Family<HandshakeFailureLabels, Counter>,
    pub protocol_errors: Family<ReasonLabels, Counter>,
    pub transport_switches: Family<SwitchLabels, Counter>,
    pub accept_failures: Family<AcceptLabels, Counter>,
    pub port_refusals: Family<RefusalLabels, Counter>,
    pub handshakes_pending: Family<TransportLabels, Gauge>,
    pub port_paused: Counter,
    pub awaiting_preamble: Gauge,
    pub control_refusals: Family<ControlRefusalLabels, Counter>,
    pub certificate_not_after: Family<CertificateLabels, Gauge>,
    pub migrations: MigrationMetrics,
    /// What `/readyz` reports.
    pub health: Health,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("migtun");
        let bytes = Family::default();
        let streams_open = Family::default();
        let stream_opens = Family::default();
        let stream_failures = Family::default();
        let handshakes = Family::default();
        let handshake_failures = Family::default();
        let protocol_errors = Family::default();
        let transport_switches = Family::default();
        let accept_failures = Family::default();
        let port_refusals = Family::default();
        let handshakes_pending = Family::default();
        let port_paused = Counter::default();
        let awaiting_preamble = Gauge::default();
        let control_refusals = Family::default();
        let certificate_not_after = Family::default();
        registry.register("bytes", "Bytes relayed, by peer, route and direction (tx: towards the peer)", bytes.clone());
        registry.register("streams_open", "Tunnelled streams open now", streams_open.clone());
        registry.register("stream_opens", "Tunnelled streams opened successfully", stream_opens.clone());
        registry.register("stream_failures", "Tunnelled streams that failed to open, by reason", stream_failures.clone());
        registry.register("handshakes", "Completed TLS handshakes, by transport, role and kind", handshakes.clone());
        registry.register(
            "handshake_failures",
            "Failed TLS handshakes, by transport, role and reason",
            handshake_failures.clone(),
        );
        registry.register(
            "transport_switches",
            "Peers with transport \"auto\": new streams moved to `to` (tls: UDP blocked, quic: works again)",
            transport_switches.clone(),
        );
        registry.register(
            "certificate_not_after_seconds",
            "When certificates expire (unix seconds): which=\"leaf\" this agent's own, which=\"ca\" the earliest of its chain and tls.ca",
            certificate_not_after.clone(),
        );
        registry.register("protocol_errors", "Malformed or unexpected data on the port", protocol_errors.clone());
        registry.register(
            "accept_failures",
            "Failed accepts on a listener, by listener and reason (fd-limit, memory: the loop backs off)",
            accept_failures.clone(),
        );
        registry.register(
            "port_refusals",
            "Connections to the port refused before any stream: over the per-address handshake limit, no \
             ClientHello in time, not TLS, a certificate that is not a configured peer, too many \
             connections of one peer awaiting their preamble",
            port_refusals.clone(),
        );
        registry.register("handshakes_pending", "Handshakes in progress on the port, by transport", handshakes_pending.clone());
        registry.register(
            "port_paused",
            "Times the port stopped accepting because every handshake slot was taken (connections wait in the backlog)",
            port_paused.clone(),
        );
        registry.register(
            "awaiting_preamble",
            "Authenticated data connections (or QUIC streams) whose preamble has not arrived yet",
            awaiting_preamble.clone(),
        );
        registry.register(
            "control_refusals",
            "Control RPC requests refused (not authorized, over a limit), by peer, method and reason",
            control_refusals.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let migrations = MigrationMetrics::new(&mut registry);
        Metrics {
            registry,
            migrations,
            bytes,
            streams_open,
            stream_opens,
            stream_failures,
            handshakes,
            handshake_failures,
            protocol_errors,
            transport_switches,
            accept_failures,
            port_refusals,
            handshakes_pending,
            port_paused,
            awaiting_preamble,
            control_refusals,
            certificate_not_after,
            health: Health::default(),
        }
    }

    /// The not-after (unix seconds) of the agent's own certificate and of its earliest CA.
    pub fn certificates_expire(&self, leaf: Option<i64>, ca: Option<i64>) {
        for (which, at) in [("leaf", leaf), ("ca", ca)] {
            if let Some(at) = at {
                self.certificate_not_after.get_or_create(&CertificateLabels { which }).set(at);
            }
        }
        self.health.certificates(leaf, ca);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn stream_failed(&self, peer: &str, route: &str, side: Side, reason: &str) {
        self.stream_failures
            .get_or_create(&FailureLabels {
                peer: peer.to_string(),
                route: route_label(route),
                side,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A failed TLS-over-TCP handshake.
    pub fn handshake_failed(&self, role: &'static str, peer: &str, reason: &'static str) {
        self.handshake_failed_on("tls", role, peer, reason)
    }

    /// A failed handshake on `transport` (`tls` or `quic`).
    pub fn handshake_failed_on(&self, transport: &'static str, role: &'static str, peer: &str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeFailureLabels { transport, role, peer: peer.to_string(), reason })
            .inc();
    }

    /// A completed TLS-over-TCP handshake.
    pub fn handshake_done(&self, role: &'static str, resumed: bool) {
        self.handshake_done_on("tls", role, resumed)
    }

    /// A completed handshake on `transport` (`tls` or `quic`).
    pub fn handshake_done_on(&self, transport: &'static str, role: &'static str, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.handshakes.get_or_create(&HandshakeLabels { transport, role, kind }).inc();
    }

    /// A failed `accept` on `listener` ([`crate::io::accept`]).
    pub fn accept_failed(&self, listener: &'static str, reason: &'static str) {
        self.accept_failures.get_or_create(&AcceptLabels { listener, reason }).inc();
    }

    /// A connection refused by the port's limits or because its certificate is not a peer's.
    pub fn port_refused(&self, transport: &'static str, reason: &'static str) {
        self.port_refusals.get_or_create(&RefusalLabels { transport, reason }).inc();
    }

    /// The gauge of handshakes in progress on `transport`.
    pub fn pending_handshakes(&self, transport: &'static str) -> Gauge {
        self.handshakes_pending.get_or_create(&TransportLabels { transport }).clone()
    }

    /// A refused control RPC request; `peer` and `method` must already be bounded values.
    pub fn control_refused(&self, peer: &str, method: &str, reason: &'static str) {
        self.control_refusals
            .get_or_create(&ControlRefusalLabels { peer: peer.to_string(), method: method.to_string(), reason })
            .inc();
    }

    /// `auto` transport: a peer's streams moved from QUIC to TLS over TCP, or back.
    pub fn transport_switched(&self, peer: &str, to: &'static str) {
        self.transport_switches.get_or_create(&SwitchLabels { peer: peer.to_string(), to }).inc();
    }

    /// Counters and the open-streams gauge for one stream; the gauge goes down on drop.
    pub fn stream(&self, peer: &str, route: &str, side: Side) -> StreamMetrics {
        let route = route_label(route);
        let labels = StreamLabels { peer: peer.to_string(), route: route.clone(), side };
        self.stream_opens.get_or_create(&labels).inc();
        let open = self.streams_open.get_or_create(&labels).clone();
        open.inc();
        let counter = |direction| {
            self.bytes
                .get_or_create(&BytesLabels { peer: peer.to_string(), route: route.clone(), direction })
                .clone()
        };
        StreamMetrics { tx: counter(Direction::Tx), rx: counter(Direction::Rx), open }
    }

    /// Sum of the samples of metric `name` (full name, e.g. `migtun_bytes_total`) whose labels
    /// include every `labels` pair. Reads the text exposition, which is prometheus-client's only
    /// read API; meant for tests, the demo and status output, not hot paths.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.encode(), name, labels)
    }
}

/// Sums the samples of `name` carrying all `labels` in a Prometheus text exposition.
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod route_label_tests {
    use super::*;

    #[test]
    fn migration_routes_share_one_label_and_configured_routes_keep_theirs() {
        assert_eq!(route_label("m-0123456789abcdef.ram"), "migration.ram");
        assert_eq!(route_label("m-0123456789abcdef.nbd"), "migration.nbd");
        assert_eq!(route_label("libvirt"), "libvirt");
        assert_eq!(route_label("m-short.ram"), "m-short.ram");
        // A tunnel's routes: one series per socket kind, whatever the tunnels are called.
        assert_eq!(route_label("t-vm1.migration"), "tunnel.migration");
        assert_eq!(route_label("t-vm-2.nbd"), "tunnel.nbd");
        assert_eq!(route_label("t-vm3.peer-chosen-name"), "tunnel.other");
        assert_eq!(route_label("t-"), "t-");
        let m = Metrics::new();
        for id in ["m-0000000000000001", "m-0000000000000002"] {
            drop(m.stream("host-b", &format!("{id}.ram"), Side::Source));
        }
        let text = m.encode();
        assert_eq!(text.matches("migtun_bytes_total{").count(), 2, "tx and rx of one route label:\n{text}");
        let mut g = m.migrations.begin("host-b", "outgoing", "begin");
        g.set_phase("perform");
        assert_eq!(m.sample("migtun_migrations_current", &[("phase", "perform")]), 1.0);
        drop(g);
        assert_eq!(m.sample("migtun_migrations_current", &[]), 0.0);
    }
}

/// Per-stream metric handles, held by the relay so that counting a chunk is one atomic add.
pub struct StreamMetrics {
    pub tx: Counter,
    pub rx: Counter,
    open: Gauge,
}

impl Drop for StreamMetrics {
    fn drop(&mut self) {
        self.open.dec();
    }
}
