//! Caps per key: how many of something one source address or one peer holds at once.
//!
//! [`KeyedLimit::try_acquire`] hands out a [`KeyedPermit`] while the key holds fewer than the
//! cap; dropping the permit gives the place back. Keys with nothing held are forgotten, so the
//! map is never larger than the number of permits out, which the caller bounds (by a global
//! semaphore or by the number of configured peers).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts held per key, each at most `max`.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    max: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(max: usize) -> Arc<KeyedLimit<K>> {
        Arc::new(KeyedLimit { max, held: Mutex::new(HashMap::new()) })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for `key`, or `None` when it already holds `max`.
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Option<KeyedPermit<K>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyedPermit { limit: self.clone(), key: Some(key) })
    }

    /// How many `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }

    fn release(&self, key: &K) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(key);
            }
        }
    }
}

/// One place held under a [`KeyedLimit`]; given back on drop.
pub struct KeyedPermit<K: Hash + Eq + Clone> {
    limit: Arc<KeyedLimit<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Drop for KeyedPermit<K> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.limit.release(&k);
        }
    }
}

/// The key a source address is limited by: the IPv4 address, or the /64 of an IPv6 address
/// (one host, or one customer of a provider, usually has a whole /64 to pick addresses from).
/// An IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_key_and_forgets_empty_keys() {
        let l = KeyedLimit::new(2);
        let a1 = l.try_acquire("a").expect("first");
        let a2 = l.try_acquire("a").expect("second");
        assert!(l.try_acquire("a").is_none(), "a third place for the same key is refused");
        let b = l.try_acquire("b").expect("another key is not affected");
        drop(a1);
        let a3 = l.try_acquire("a").expect("a place given back is usable again");
        drop((a2, a3, b));
        assert!(l.held.lock().unwrap().is_empty(), "keys holding nothing are forgotten");
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(source_key(mapped), "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
