//! The data plane's view of the mesh: workloads, services, namespaces and L4 policies, with
//! the indexes the proxy needs (by IP, by VIP, by uid, by node) and the pure decisions made on
//! them (where a connection goes, which endpoint, is it allowed).
//!
//! A `State` is immutable once built; a source (local file, xDS) builds a new one and swaps
//! it in whole. Nothing here does I/O.

pub mod authz;
pub mod policy;
pub mod route;
pub mod service;
mod waypoint;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use authz::{Decision, DenyReason, authorize};
pub use policy::{Action, Authorization, ConnectionInfo, Scope};
pub use route::{Refusal, Route, Routed, WaypointRoute, route};
pub use service::Service;
pub use workload::{DATAPLANE_MODE_LABEL, NamespacedHostname, Protocol, Workload};

/// A namespace and its labels (what enrols its pods in the mesh).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Why a set of objects cannot form a `State`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    #[error("uid {0:?} is already used by another workload")]
    DuplicateUid(String),
    #[error("address {ip} is already used by {other}")]
    DuplicateAddress { ip: IpAddr, other: String },
    #[error("service {0} is defined twice")]
    DuplicateService(String),
    #[error("policy {0} is defined twice")]
    DuplicatePolicy(String),
    #[error("namespace {0:?} is defined twice")]
    DuplicateNamespace(String),
}

/// Where a connection to an address goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A workload addressed directly, by one of its IPs.
    Workload(Arc<Workload>, SocketAddr),
    /// A service VIP: the healthy endpoints that serve the port, each with the address to dial.
    /// Empty when the service does not declare the port or has no usable endpoint.
    Service {
        service: Arc<Service>,
        endpoints: Vec<(Arc<Workload>, SocketAddr)>,
    },
    /// Not in the mesh: passed through as plain TCP.
    Unknown,
}

/// Builds a `State`, checking that keys and addresses are unique.
#[derive(Debug, Default)]
pub struct StateBuilder {
    state: State,
}

impl StateBuilder {
    pub fn workload(&mut self, w: Workload) -> Result<(), StateError> {
        if self.state.workloads.contains_key(&w.uid) {
            return Err(StateError::DuplicateUid(w.uid));
        }
        for ip in &w.workload_ips {
            self.state.address_free(*ip)?;
        }
        let w = Arc::new(w);
        for ip in &w.workload_ips {
            self.state.by_ip.insert(*ip, w.clone());
        }
        self.state.workloads.insert(w.uid.clone(), w);
        Ok(())
    }

    pub fn service(&mut self, s: Service) -> Result<(), StateError> {
        let key = s.key();
        if self.state.services.contains_key(&key) {
            return Err(StateError::DuplicateService(key.to_string()));
        }
        for vip in &s.vips {
            self.state.address_free(*vip)?;
        }
        let s = Arc::new(s);
        for vip in &s.vips {
            self.state.by_vip.insert(*vip, s.clone());
        }
        self.state.services.insert(key, s);
        Ok(())
    }

    pub fn policy(&mut self, p: Authorization) -> Result<(), StateError> {
        let key = p.key();
        if self.state.policies.contains_key(&key) {
            return Err(StateError::DuplicatePolicy(key));
        }
        self.state.policies.insert(key, Arc::new(p));
        Ok(())
    }

    pub fn namespace(&mut self, ns: Namespace) -> Result<(), StateError> {
        if self.state.namespaces.contains_key(&ns.name) {
            return Err(StateError::DuplicateNamespace(ns.name));
        }
        self.state.namespaces.insert(ns.name.clone(), ns);
        Ok(())
    }

    /// Capture by protocol instead of by namespace label: a workload is captured when istiod
    /// says it speaks HBONE. The xDS source sets this: the workload API has no namespaces,
    /// and istiod marks ambient workloads with `tunnel_protocol: HBONE`.
    pub fn capture_by_protocol(&mut self, yes: bool) {
        self.state.capture_by_protocol = yes;
    }

    /// Marks the state as not yet the whole picture of the mesh, with why (the xDS source
    /// before every subscribed type has answered once). Nothing may be concluded from what
    /// such a state lacks: see [`State::incomplete`].
    pub fn incomplete(&mut self, why: impl Into<String>) {
        self.state.incomplete = Some(why.into());
    }

    pub fn build(mut self) -> State {
        let mut endpoints: HashMap<NamespacedHostname, Vec<Arc<Workload>>> = HashMap::new();
        // BTreeMap order: endpoints come out sorted by uid, so picks are reproducible.
        for w in self.state.workloads.values() {
            for svc in w.services.keys() {
                endpoints.entry(svc.clone()).or_default().push(w.clone());
            }
        }
        self.state.endpoints = endpoints;
        self.state
    }
}

/// The whole mesh as one ztunnel sees it.
#[derive(Debug, Default)]
pub struct State {
    workloads: BTreeMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: BTreeMap<NamespacedHostname, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    endpoints: HashMap<NamespacedHostname, Vec<Arc<Workload>>>,
    policies: BTreeMap<String, Arc<Authorization>>,
    namespaces: BTreeMap<String, Namespace>,
    capture_by_protocol: bool,
    /// Why this is not yet a complete view, or `None` when it is.
    incomplete: Option<String>,
}

impl State {
    pub fn builder() -> StateBuilder {
        StateBuilder::default()
    }

    fn address_free(&self, ip: IpAddr) -> Result<(), StateError> {
        if let Some(w) = self.by_ip.get(&ip) {
            return Err(StateError::DuplicateAddress {
                ip,
                other: format!("workload {}", w.uid),
            });
        }
        if let Some(s) = self.by_vip.get(&ip) {
            return Err(StateError::DuplicateAddress {
                ip,
                other: format!("service {}", s.key()),
            });
        }
        Ok(())
    }

    /// This state with the workloads named in `netns` (by uid) placed in those network
    /// namespaces, the others unchanged: pod discovery finds namespaces the source does not
    /// know.
    pub fn with_netns(&self, netns: &BTreeMap<String, std::path::PathBuf>) -> State {
        let mut b = StateBuilder {
            state: State {
                services: self.services.clone(),
                by_vip: self.by_vip.clone(),
                policies: self.policies.clone(),
                namespaces: self.namespaces.clone(),
                capture_by_protocol: self.capture_by_protocol,
                incomplete: self.incomplete.clone(),
                ..State::default()
            },
        };
        for w in self.workloads.values() {
            let w = match netns.get(&w.uid) {
                Some(path) if w.netns.as_ref() != Some(path) => {
                    let mut w = (**w).clone();
                    w.netns = Some(path.clone());
                    Arc::new(w)
                }
                _ => w.clone(),
            };
            // Same uids and addresses as an already valid state: nothing can collide.
            for ip in &w.workload_ips {
                b.state.by_ip.insert(*ip, w.clone());
            }
            b.state.workloads.insert(w.uid.clone(), w);
        }
        b.build()
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip).cloned()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    pub fn service_by_vip(&self, vip: IpAddr) -> Option<Arc<Service>> {
        self.by_vip.get(&vip).cloned()
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The healthy endpoints of `service` for `port`, each with the address to dial: of the
    /// same family as `vip` when the endpoint has one (a dual-stack service answers IPv6
    /// clients on IPv6), else its first address.
    pub fn service_endpoints(
        &self,
        service: &Service,
        vip: IpAddr,
        port: u16,
    ) -> Vec<(Arc<Workload>, SocketAddr)> {
        let key = service.key();
        let Some(workloads) = self.endpoints.get(&key) else {
            return Vec::new();
        };
        workloads
            .iter()
            .filter(|w| w.status == workload::HealthStatus::Healthy)
            .filter_map(|w| {
                let ip = w
                    .workload_ips
                    .iter()
                    .find(|ip| ip.is_ipv6() == vip.is_ipv6())
                    .or(w.workload_ips.first())
                    .copied()?;
                let target = service.target_port(port, w.services.get(&key))?;
                Some((w.clone(), SocketAddr::new(ip, target)))
            })
            .collect()
    }

    /// Every workload that names `service` as one of its services, healthy or not, sorted
    /// by uid.
    pub fn members(&self, service: &NamespacedHostname) -> Vec<Arc<Workload>> {
        self.endpoints.get(service).cloned().unwrap_or_default()
    }

    /// Where a connection to `dst` goes.
    pub fn resolve(&self, dst: SocketAddr) -> Destination {
        if let Some(w) = self.by_ip.get(&dst.ip()) {
            return Destination::Workload(w.clone(), dst);
        }
        if let Some(s) = self.by_vip.get(&dst.ip()) {
            return Destination::Service {
                service: s.clone(),
                endpoints: self.service_endpoints(s, dst.ip(), dst.port()),
            };
        }
        Destination::Unknown
    }

    /// The workloads this node's ztunnel acts for.
    pub fn local_workloads(&self, node: &str) -> Vec<Arc<Workload>> {
        self.workloads
            .values()
            .filter(|w| w.node == node)
            .cloned()
            .collect()
    }

    /// The policies that apply to `w`, by their scope; dry-run policies included.
    pub fn policies_for(&self, w: &Workload) -> Vec<Arc<Authorization>> {
        self.policies
            .values()
            .filter(|p| match p.scope {
                Scope::Global => true,
                Scope::Namespace => p.namespace == w.namespace(),
                Scope::WorkloadSelector => w.authorization_policies.contains(&p.key()),
            })
            .cloned()
            .collect()
    }

    /// Whether the mesh captures `w`'s traffic. Local mode: its namespace is labelled
    /// `istio.io/dataplane-mode=ambient` and the workload does not opt out with `none`.
    /// xDS mode ([`StateBuilder::capture_by_protocol`]): istiod already applied those labels
    /// and says so with the workload's protocol, HBONE.
    pub fn is_captured(&self, w: &Workload) -> bool {
        let enrolled = if self.capture_by_protocol {
            w.protocol == Protocol::Hbone
        } else {
            self.namespaces.get(w.namespace()).is_some_and(|ns| {
                ns.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient")
            })
        };
        enrolled && !w.opted_out()
    }

    /// Why this state is not yet the complete view of the mesh (`None`: it is). A local file
    /// is complete as soon as it is read; the xDS source is complete once every subscribed
    /// type has been answered at least once. Until then a workload missing from it may only
    /// not have arrived yet: readiness answers 503, and nothing is released, pruned or
    /// captured on the strength of it.
    pub fn incomplete(&self) -> Option<&str> {
        self.incomplete.as_deref()
    }

    /// True when capture follows the workloads' protocol (xDS) rather than namespace labels.
    pub fn captures_by_protocol(&self) -> bool {
        self.capture_by_protocol
    }
}

/// Picks one endpoint; the same `seed` gives the same pick for the same list (a caller
/// passes a random or round-robin number). `None` when the list is empty.
pub fn pick_endpoint<T>(endpoints: &[T], seed: u64) -> Option<&T> {
    if endpoints.is_empty() {
        return None;
    }
    // usize is at most 64 bits on supported targets: the remainder fits.
    let i = (seed % endpoints.len() as u64) as usize;
    endpoints.get(i)
}

#[cfg(test)]
mod tests;
