//! Who may use this host's control plane: the destination's `[qemu] allow_sources`.
//!
//! A valid certificate of the fleet's CA proves a name, not a right: every control request
//! except the hello is refused unless the caller is a configured `[[peer]]` that
//! `[qemu] allow_sources` names. Absent or empty, this host accepts no incoming migration.
//! Refusals are 403s whose message names the key, so that the source's user knows what to change.

use std::collections::HashSet;
use std::sync::Arc;

use migtun_proxy::Config;

use crate::rpc::{MethodError, Policy};

/// The allow-list of sources, as read from the config.
#[derive(Clone, Debug)]
pub struct SourcePolicy {
    /// This host's name, for messages.
    host: String,
    /// `None`: no `[qemu]` section at all.
    allow_sources: Option<HashSet<String>>,
    peers: HashSet<String>,
}

impl SourcePolicy {
    pub fn from_config(config: &Config) -> SourcePolicy {
        SourcePolicy {
            host: config.name.clone(),
            allow_sources: config.qemu.as_ref().map(|q| q.allow_sources.iter().cloned().collect()),
            peers: config.peers.iter().map(|p| p.name.clone()).collect(),
        }
    }

    /// May `peer` call `method` here?
    pub fn check(&self, peer: &str, method: &str) -> Result<(), MethodError> {
        let host = &self.host;
        let refuse = |reason, why: String| {
            Err(MethodError::refused(403, reason, format!("{peer} may not migrate guests here ({method} refused): {why}")))
        };
        if !self.peers.contains(peer) {
            return refuse("not-a-peer", format!("it is not a configured [[peer]] of {host}, and only peers in [qemu] allow_sources may"));
        }
        match &self.allow_sources {
            None => refuse("not-allowed", format!("{host} has no [qemu] section, so no [qemu] allow_sources: it accepts no incoming migration")),
            Some(a) if a.is_empty() => {
                refuse("not-allowed", format!("[qemu] allow_sources of {host} is empty: it accepts no incoming migration"))
            }
            Some(a) if !a.contains(peer) => refuse("not-allowed", format!("not in [qemu] allow_sources of {host}")),
            Some(_) => Ok(()),
        }
    }

    /// The policy for [`crate::rpc::Router::authorize`].
    pub fn into_policy(self) -> Policy {
        let this = Arc::new(self);
        Arc::new(move |peer, method| this.check(peer.name(), method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>) -> SourcePolicy {
        SourcePolicy {
            host: "host-b".into(),
            allow_sources: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            peers: ["host-a", "host-c"].iter().map(|s| s.to_string()).collect(),
        }
    }

    fn refusal(p: &SourcePolicy, peer: &str) -> MethodError {
        p.check(peer, "prepare").expect_err("must be refused")
    }

    #[test]
    fn only_configured_peers_named_in_allow_sources() {
        let p = policy(Some(&["host-a"]));
        assert!(p.check("host-a", "prepare").is_ok());
        let e = refusal(&p, "host-c");
        assert_eq!((e.status, e.refusal), (403, Some("not-allowed")));
        assert_eq!(e.message, "host-c may not migrate guests here (prepare refused): not in [qemu] allow_sources of host-b");
        let e = refusal(&p, "host-x");
        assert_eq!((e.status, e.refusal), (403, Some("not-a-peer")));
        assert!(e.message.contains("not a configured [[peer]] of host-b") && e.message.contains("allow_sources"), "{}", e.message);
    }

    #[test]
    fn absent_or_empty_accepts_nobody() {
        for p in [policy(None), policy(Some(&[]))] {
            let e = refusal(&p, "host-a");
            assert_eq!((e.status, e.refusal), (403, Some("not-allowed")));
            assert!(e.message.contains("[qemu] allow_sources") && e.message.contains("accepts no incoming migration"), "{}", e.message);
        }
    }
}
