//! The enrolled pods indexed two ways: by workload uid (enrolment, release) and by address
//! (every outbound connection asks whether its destination is a pod of this node). Both
//! lookups are hash lookups; the address index is kept in line on every insert and removal.
//!
//! Generic over the pod type so the index is tested (and benchmarked, `benches/decisions.rs`)
//! without network namespaces.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::Arc;

/// What the index needs to know of a pod.
pub trait Addressed {
    /// The workload uid.
    fn uid(&self) -> &str;
    /// The pod's addresses.
    fn ips(&self) -> &[IpAddr];
}

/// Pods by uid and by IP address. An address claimed by two pods at once (one being
/// released while its successor starts) belongs to the one inserted last, and falls back to
/// the other when that one goes.
#[derive(Debug)]
pub struct PodIndex<P> {
    by_uid: HashMap<String, Arc<P>>,
    by_ip: HashMap<IpAddr, Arc<P>>,
}

impl<P> Default for PodIndex<P> {
    fn default() -> Self {
        PodIndex {
            by_uid: HashMap::new(),
            by_ip: HashMap::new(),
        }
    }
}

impl<P: Addressed> PodIndex<P> {
    /// Adds `pod`, replacing the pod of the same uid (whose addresses may differ); returns
    /// the replaced one.
    pub fn insert(&mut self, pod: Arc<P>) -> Option<Arc<P>> {
        let old = self.by_uid.insert(pod.uid().to_owned(), pod.clone());
        if let Some(old) = &old {
            self.unindex(old);
        }
        for ip in pod.ips() {
            self.by_ip.insert(*ip, pod.clone());
        }
        old
    }

    pub fn remove(&mut self, uid: &str) -> Option<Arc<P>> {
        let pod = self.by_uid.remove(uid)?;
        self.unindex(&pod);
        Some(pod)
    }

    /// Drops the address entries that point at `gone` (no longer in `by_uid` under that
    /// pod), handing each address to another pod that has it, if any.
    fn unindex(&mut self, gone: &Arc<P>) {
        for ip in gone.ips() {
            let Entry::Occupied(entry) = self.by_ip.entry(*ip) else {
                continue;
            };
            if !Arc::ptr_eq(entry.get(), gone) {
                continue;
            }
            // Rare (an address shared during a hand-over): a scan is fine here.
            match self.by_uid.values().find(|p| p.ips().contains(ip)) {
                Some(other) => {
                    *entry.into_mut() = other.clone();
                }
                None => {
                    entry.remove();
                }
            }
        }
    }

    pub fn get(&self, uid: &str) -> Option<&Arc<P>> {
        self.by_uid.get(uid)
    }

    /// The pod that owns `ip`.
    pub fn by_ip(&self, ip: &IpAddr) -> Option<&Arc<P>> {
        self.by_ip.get(ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<P>)> {
        self.by_uid.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<P>> {
        self.by_uid.values()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_uid.keys()
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// Removes every pod.
    pub fn drain(&mut self) -> Vec<Arc<P>> {
        self.by_ip.clear();
        self.by_uid.drain().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct TestPod {
        uid: String,
        ips: Vec<IpAddr>,
    }

    impl Addressed for TestPod {
        fn uid(&self) -> &str {
            &self.uid
        }
        fn ips(&self) -> &[IpAddr] {
            &self.ips
        }
    }

    fn pod(uid: &str, ips: &[&str]) -> Arc<TestPod> {
        Arc::new(TestPod {
            uid: uid.to_owned(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        })
    }

    fn owner(index: &PodIndex<TestPod>, ip: &str) -> Option<String> {
        index.by_ip(&ip.parse().unwrap()).map(|p| p.uid.clone())
    }

    #[test]
    fn enrolled_pod_is_found_by_its_address() {
        let mut index = PodIndex::default();
        assert!(index.insert(pod("a", &["198.18.1.10"])).is_none());
        index.insert(pod("b", &["198.18.1.11"]));
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("a"));
        assert_eq!(owner(&index, "198.18.1.11").as_deref(), Some("b"));
        assert_eq!(owner(&index, "198.18.1.12"), None);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn released_pod_leaves_the_address_index() {
        let mut index = PodIndex::default();
        index.insert(pod("a", &["198.18.1.10"]));
        index.insert(pod("b", &["198.18.1.11"]));
        assert_eq!(
            index.remove("a").map(|p| p.uid.clone()).as_deref(),
            Some("a")
        );
        assert_eq!(owner(&index, "198.18.1.10"), None);
        assert_eq!(owner(&index, "198.18.1.11").as_deref(), Some("b"));
        assert!(index.remove("a").is_none());
        assert!(index.get("a").is_none());
    }

    #[test]
    fn reenrolled_with_a_new_address_is_found_by_the_new_one_only() {
        let mut index = PodIndex::default();
        index.insert(pod("a", &["198.18.1.10"]));
        let old = index.insert(pod("a", &["198.18.1.20"]));
        assert_eq!(
            old.map(|p| p.ips.clone()),
            Some(vec!["198.18.1.10".parse().unwrap()])
        );
        assert_eq!(owner(&index, "198.18.1.10"), None);
        assert_eq!(owner(&index, "198.18.1.20").as_deref(), Some("a"));
        assert_eq!(index.len(), 1);
        // Released, then enrolled again with its first address.
        index.remove("a");
        index.insert(pod("a", &["198.18.1.10"]));
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("a"));
        assert_eq!(owner(&index, "198.18.1.20"), None);
    }

    #[test]
    fn pod_with_two_addresses_is_found_by_either_and_leaves_with_both() {
        let mut index = PodIndex::default();
        index.insert(pod("a", &["198.18.1.10", "fd00::10"]));
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("a"));
        assert_eq!(owner(&index, "fd00::10").as_deref(), Some("a"));
        // Same uid, one address dropped.
        index.insert(pod("a", &["fd00::10"]));
        assert_eq!(owner(&index, "198.18.1.10"), None);
        assert_eq!(owner(&index, "fd00::10").as_deref(), Some("a"));
        index.remove("a");
        assert_eq!(owner(&index, "fd00::10"), None);
        assert!(index.drain().is_empty());
    }

    #[test]
    fn address_shared_during_a_handover_falls_back_to_the_remaining_pod() {
        let mut index = PodIndex::default();
        index.insert(pod("old", &["198.18.1.10"]));
        index.insert(pod("new", &["198.18.1.10"]));
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("new"));
        index.remove("old");
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("new"));

        index.insert(pod("old", &["198.18.1.10"]));
        index.remove("old");
        assert_eq!(owner(&index, "198.18.1.10").as_deref(), Some("new"));
        index.remove("new");
        assert_eq!(owner(&index, "198.18.1.10"), None);
    }

    #[test]
    fn drained_index_is_empty() {
        let mut index = PodIndex::default();
        index.insert(pod("a", &["198.18.1.10"]));
        index.insert(pod("b", &["198.18.1.11"]));
        let mut gone: Vec<String> = index.drain().iter().map(|p| p.uid.clone()).collect();
        gone.sort();
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(owner(&index, "198.18.1.10"), None);
        assert!(index.is_empty());
    }
}
