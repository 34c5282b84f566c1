//! The agent's health, as `/readyz` reports it: serving, draining, still starting, its
//! certificate's validity, and the last dial to each configured peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

/// Seconds since the epoch, for certificate validity and dial times.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A not-after that is not known (the certificate could not be parsed).
const NOT_AFTER_UNKNOWN: i64 = i64::MIN;
/// The longest error text kept for a peer: enough for "connect to ...: connection refused",
/// bounded whatever an error's text holds.
const PEER_ERROR_MAX: usize = 256;

/// What `/readyz` reports: set by the agent (serving, draining, certificates) and by its peer
/// connectors (the last dial to each configured peer).
pub struct Health {
    serving: AtomicBool,
    draining: AtomicBool,
    /// Start-up work still outstanding while the agent serves (see [`Health::starting`]).
    starting: Mutex<Option<String>>,
    leaf_not_after: AtomicI64,
    ca_not_after: AtomicI64,
    listen: Mutex<Option<SocketAddr>>,
    /// Configured peers only ([`Health::peer_configured`]), so the map is bounded by the config.
    peers: Mutex<BTreeMap<String, Option<Dial>>>,
}

/// The outcome of the last connection this agent opened to a peer.
#[derive(Clone)]
struct Dial {
    at: i64,
    error: Option<String>,
}

/// `/readyz`'s answer: whether the agent is ready, and the JSON document.
pub struct Readiness {
    pub ready: bool,
    pub json: serde_json::Value,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            starting: Mutex::new(None),
            leaf_not_after: AtomicI64::new(NOT_AFTER_UNKNOWN),
            ca_not_after: AtomicI64::new(NOT_AFTER_UNKNOWN),
            listen: Mutex::new(None),
            peers: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Health {
    /// The port, forwards and QUIC are served (the agent's accept loops run).
    pub fn serving(&self, listen: SocketAddr) {
        *self.listen.lock().unwrap_or_else(|p| p.into_inner()) = Some(listen);
        self.serving.store(true, Ordering::SeqCst);
    }

    /// Whether [`Health::serving`] was said.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// The port's address, once serving.
    pub fn listening_on(&self) -> Option<SocketAddr> {
        *self.listen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start-up work the agent serves without, and is not ready until it is done (with
    /// `[qemu]`: the journal of the agent it replaces); `None` once done.
    pub fn starting(&self, what: Option<String>) {
        *self.starting.lock().unwrap_or_else(|p| p.into_inner()) = what;
    }

    /// What [`Health::starting`] last said.
    pub fn still_starting(&self) -> Option<String> {
        self.starting.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The agent drains: not ready any more.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The not-after (unix seconds) of the agent's certificate and of its earliest CA (a reload
    /// with new certificates calls this again through [`Metrics::certificates_expire`](super::Metrics::certificates_expire)).
    pub fn certificates(&self, leaf: Option<i64>, ca: Option<i64>) {
        self.leaf_not_after.store(leaf.unwrap_or(NOT_AFTER_UNKNOWN), Ordering::Relaxed);
        self.ca_not_after.store(ca.unwrap_or(NOT_AFTER_UNKNOWN), Ordering::Relaxed);
    }

    /// A configured peer: listed (as not tried yet) until a connection to it is attempted.
    pub fn peer_configured(&self, name: &str) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_insert(None);
    }

    /// The configured peers are now `names` (a reload): others are dropped, new ones listed as
    /// not tried, the outcomes of those that stay are kept.
    pub fn peers_configured(&self, names: &[String]) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|name, _| names.contains(name));
        for name in names {
            peers.entry(name.clone()).or_insert(None);
        }
    }

    /// A connection to a configured peer (TLS or QUIC handshake included) succeeded or failed.
    /// Names that were not configured are ignored.
    pub fn peer_dialed(&self, name: &str, error: Option<&dyn std::fmt::Display>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = peers.get_mut(name) {
            let error = error.map(|e| {
                let mut text = e.to_string();
                if text.len() > PEER_ERROR_MAX {
                    let mut end = PEER_ERROR_MAX;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                text
            });
            *slot = Some(Dial { at: unix_now(), error });
        }
    }

    /// Readiness at `now` (unix seconds): serving, not draining, certificates not expired.
    /// Peers are reported but do not decide: a host is ready to serve whoever can reach it.
    pub fn report(&self, now: i64) -> Readiness {
        let serving = self.serving.load(Ordering::Relaxed);
        let draining = self.draining.load(Ordering::Relaxed);
        let listen = *self.listen.lock().unwrap_or_else(|p| p.into_inner());
        let mut problems = Vec::new();
        if !serving {
            problems.push("not serving yet".to_string());
        }
        if draining {
            problems.push("draining: no new streams are accepted".to_string());
        }
        let starting = self.still_starting();
        if let Some(what) = &starting {
            problems.push(format!("starting: {what}"));
        }
        let cert = |which: &str, at: i64, problems: &mut Vec<String>| {
            if at == NOT_AFTER_UNKNOWN {
                return serde_json::json!({ "not_after": null, "valid": null });
            }
            let valid = now < at;
            if !valid {
                problems.push(format!("the {which} certificate expired at {at} (unix seconds)"));
            }
            serde_json::json!({ "not_after": at, "expires_in_secs": at - now, "valid": valid })
        };
        let leaf = cert("agent's", self.leaf_not_after.load(Ordering::Relaxed), &mut problems);
        let ca = cert("CA", self.ca_not_after.load(Ordering::Relaxed), &mut problems);
        let peers: serde_json::Map<String, serde_json::Value> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, dial)| {
                let v = match dial {
                    None => serde_json::json!({ "reachable": null, "last_connect": null }),
                    Some(d) => serde_json::json!({
                        "reachable": d.error.is_none(),
                        "last_connect": d.at,
                        "error": d.error,
                    }),
                };
                (name.clone(), v)
            })
            .collect();
        let ready = problems.is_empty();
        let json = serde_json::json!({
            "ready": ready,
            "listening": serving && !draining,
            "listen": listen.map(|a| a.to_string()),
            "draining": draining,
            "starting": starting,
            "certificate": leaf,
            "ca": ca,
            "peers": peers,
            "problems": problems,
        });
        Readiness { ready, json }
    }
}
