//! The table of exposed routes: the static `[[expose]]` entries and the dynamic ones the
//! control plane adds for a single migration (scoped to one peer and one migration id).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::endpoint::Endpoint;
use crate::wire::ReplyCode;

/// Where a route leads and who may open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposeRoute {
    pub name: String,
    pub target: Endpoint,
    /// Peer names (certificate DNS SANs) allowed to open this route.
    pub allow: Vec<String>,
    /// Dynamic routes belong to one migration: a stream must name it in its preamble.
    pub migration: Option<String>,
    /// Counts what this route's streams receive from the peer (a migration's progress on the
    /// destination: the metrics count all migrations' routes together).
    pub received: Option<ByteCount>,
}

/// A byte counter shared between a route's streams and whoever added the route.
#[derive(Clone, Debug, Default)]
pub struct ByteCount(Arc<AtomicU64>);

impl ByteCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// The same counter, not the same count.
impl PartialEq for ByteCount {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ByteCount {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("route {0:?} already exists")]
    Duplicate(String),
    #[error("route {name:?}: {why}")]
    BadName { name: String, why: &'static str },
}

/// Why a stream was refused, with the reply code the source will see.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ReplyCode,
    pub detail: String,
}

#[derive(Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<String, Arc<ExposeRoute>>>,
}

impl RouteTable {
    pub fn new(routes: impl IntoIterator<Item = ExposeRoute>) -> Result<RouteTable, RouteError> {
        let table = RouteTable::default();
        for r in routes {
            table.add(r)?;
        }
        Ok(table)
    }

    pub fn add(&self, route: ExposeRoute) -> Result<(), RouteError> {
        crate::wire::validate_name(&route.name).map_err(|why| RouteError::BadName { name: route.name.clone(), why })?;
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.contains_key(&route.name) {
            return Err(RouteError::Duplicate(route.name));
        }
        routes.insert(route.name.clone(), Arc::new(route));
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Option<Arc<ExposeRoute>> {
        self.routes.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    pub fn list(&self) -> Vec<Arc<ExposeRoute>> {
        let mut v: Vec<_> = self.routes.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Decides whether `peer` (its certificate names) may open `route` for `migration`.
    pub fn authorize(
        &self,
        route: &str,
        migration: Option<&str>,
        peer: &crate::tls::PeerIdentity,
    ) -> Result<Arc<ExposeRoute>, Refusal> {
        let found = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(route).cloned();
        let Some(r) = found else {
            return Err(Refusal { code: ReplyCode::UnknownRoute, detail: format!("no route {route:?} on this host") });
        };
        if !peer.is_any_of(&r.allow) {
            return Err(Refusal {
                code: ReplyCode::Forbidden,
                detail: format!("peer {} may not open route {route:?}", peer.name()),
            });
        }
        if r.migration.is_some() && r.migration.as_deref() != migration {
            // Do not tell a peer which migration a route belongs to.
            return Err(Refusal { code: ReplyCode::Forbidden, detail: format!("route {route:?} belongs to another migration") });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerIdentity;

    fn route(name: &str, allow: &[&str], migration: Option<&str>) -> ExposeRoute {
        ExposeRoute {
            name: name.into(),
            target: Endpoint::Unix("/tmp/x".into()),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            migration: migration.map(Into::into),
            received: None,
        }
    }

    #[test]
    fn authorization_by_name_route_and_migration() {
        let t = RouteTable::new([route("migration", &["host-a"], None), route("m1.ram", &["host-a"], Some("m1"))]).unwrap();
        let a = PeerIdentity { names: vec!["host-a".into()] };
        let c = PeerIdentity { names: vec!["host-c".into()] };
        assert!(t.authorize("migration", None, &a).is_ok());
        assert_eq!(t.authorize("migration", None, &c).unwrap_err().code, ReplyCode::Forbidden);
        assert_eq!(t.authorize("nope", None, &a).unwrap_err().code, ReplyCode::UnknownRoute);
        assert!(t.authorize("m1.ram", Some("m1"), &a).is_ok());
        assert_eq!(t.authorize("m1.ram", Some("m2"), &a).unwrap_err().code, ReplyCode::Forbidden);
        assert_eq!(t.authorize("m1.ram", None, &a).unwrap_err().code, ReplyCode::Forbidden);
        assert_eq!(t.add(route("migration", &[], None)), Err(RouteError::Duplicate("migration".into())));
        assert!(t.remove("m1.ram").is_some());
        assert_eq!(t.authorize("m1.ram", Some("m1"), &a).unwrap_err().code, ReplyCode::UnknownRoute);
    }
}
