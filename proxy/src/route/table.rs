//! The table of exposed routes: the static `[[expose]]` entries and the dynamic ones the
//! control plane adds for a single migration (scoped to one peer and one migration id).
//!
//! A reload replaces the static entries ([`RouteTable::replace_static`]) in one step; the
//! dynamic ones are the control plane's and never touched by it. Streams hold their route, so
//! a stream open on a route that a reload removes or changes runs on as it began.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use crate::io::endpoint::Endpoint;
pub use crate::relay::ByteCount;
use crate::route::wire::ReplyCode;

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
    routes: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    routes: HashMap<String, Arc<ExposeRoute>>,
    /// The names of the config's `[[expose]]` routes (the rest are dynamic).
    statics: BTreeSet<String>,
}

/// What [`RouteTable::replace_static`] changed, by route name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, another target or `allow`.
    pub changed: Vec<String>,
}

impl RouteTable {
    /// A table of the config's routes (static: [`RouteTable::replace_static`] replaces them).
    pub fn new(routes: impl IntoIterator<Item = ExposeRoute>) -> Result<RouteTable, RouteError> {
        let table = RouteTable::default();
        for r in routes {
            let name = r.name.clone();
            table.add(r)?;
            table.routes.write().unwrap_or_else(|p| p.into_inner()).statics.insert(name);
        }
        Ok(table)
    }

    /// Adds a dynamic route.
    pub fn add(&self, route: ExposeRoute) -> Result<(), RouteError> {
        crate::route::wire::validate_name(&route.name).map_err(|why| RouteError::BadName { name: route.name.clone(), why })?;
        let mut table = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if table.routes.contains_key(&route.name) {
            return Err(RouteError::Duplicate(route.name));
        }
        table.routes.insert(route.name.clone(), Arc::new(route));
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Option<Arc<ExposeRoute>> {
        let mut table = self.routes.write().unwrap_or_else(|p| p.into_inner());
        table.statics.remove(name);
        table.routes.remove(name)
    }

    /// Makes `routes` the static routes, all at once: the others go, new ones come, changed ones
    /// are replaced. Nothing changes if a new route's name is bad or taken by a dynamic route.
    pub fn replace_static(&self, routes: Vec<ExposeRoute>) -> Result<RouteChanges, RouteError> {
        let mut table = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for r in &routes {
            crate::route::wire::validate_name(&r.name).map_err(|why| RouteError::BadName { name: r.name.clone(), why })?;
            if table.routes.contains_key(&r.name) && !table.statics.contains(&r.name) {
                return Err(RouteError::Duplicate(r.name.clone()));
            }
        }
        let mut changes = RouteChanges::default();
        let new: BTreeSet<String> = routes.iter().map(|r| r.name.clone()).collect();
        for gone in table.statics.difference(&new).cloned().collect::<Vec<_>>() {
            table.routes.remove(&gone);
            changes.removed.push(gone);
        }
        for r in routes {
            match table.routes.get(&r.name) {
                Some(old) if **old == r => continue,
                Some(_) => changes.changed.push(r.name.clone()),
                None => changes.added.push(r.name.clone()),
            }
            table.routes.insert(r.name.clone(), Arc::new(r));
        }
        table.statics = new;
        Ok(changes)
    }

    pub fn list(&self) -> Vec<Arc<ExposeRoute>> {
        let mut v: Vec<_> = self.routes.read().unwrap_or_else(|p| p.into_inner()).routes.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Decides whether `peer` (its certificate names) may open `route` for `migration`.
    pub fn authorize(
        &self,
        route: &str,
        migration: Option<&str>,
        peer: &crate::tls::identity::PeerIdentity,
    ) -> Result<Arc<ExposeRoute>, Refusal> {
        let found = self.routes.read().unwrap_or_else(|p| p.into_inner()).routes.get(route).cloned();
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
    use crate::tls::identity::PeerIdentity;

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

    #[test]
    fn replacing_static_routes_leaves_dynamic_ones() {
        let t = RouteTable::new([route("keep", &["host-a"], None), route("gone", &["host-a"], None), route("moved", &["host-a"], None)]).unwrap();
        t.add(route("m1.ram", &["host-a"], Some("m1"))).unwrap();
        // A static route may not take a dynamic route's name: nothing changes.
        assert_eq!(t.replace_static(vec![route("m1.ram", &["host-a"], None)]), Err(RouteError::Duplicate("m1.ram".into())));
        assert_eq!(t.list().len(), 4);
        let changes = t
            .replace_static(vec![route("keep", &["host-a"], None), route("moved", &["host-b"], None), route("new", &["host-a"], None)])
            .unwrap();
        assert_eq!(changes, RouteChanges { added: vec!["new".into()], removed: vec!["gone".into()], changed: vec!["moved".into()] });
        let names: Vec<String> = t.list().iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, ["keep", "m1.ram", "moved", "new"]);
        assert_eq!(t.list()[2].allow, ["host-b"]);
    }
}
