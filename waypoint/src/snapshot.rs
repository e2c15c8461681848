//! What a request is decided against: the mesh (workloads and services, from the same source
//! ztunnel reads) and the compiled route table, taken together as one immutable value. A
//! change to either builds a new snapshot; a request holds the one it started with.
//!
//! What requests look up is made here once per change, not per request: each service's
//! healthy endpoints on each of its ports, and the metric label values of each workload and
//! service.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ztunnel::state::workload::HealthStatus;
use ztunnel::state::{Service, State, Workload};

use crate::metrics::Names;
use crate::route::RouteTable;
use crate::route::table::SubsetSelector;

/// The mesh and the routes, as of one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub state: Arc<State>,
    pub table: Arc<RouteTable>,
    by_host: HashMap<String, Arc<Service>>,
    /// The healthy endpoints of each service (by hostname) on each of its ports.
    endpoints: HashMap<String, HashMap<u16, Arc<[EndpointAddr]>>>,
    /// Metric label values of each workload (by uid) and service (by hostname), made once.
    workload_names: HashMap<String, Arc<Names>>,
    service_names: HashMap<String, Arc<Names>>,
}

/// A workload and the address to dial it on for one service port.
pub type EndpointAddr = (Arc<Workload>, SocketAddr);

/// The endpoints a request may go to: a service's healthy endpoints on a port, narrowed to a
/// subset. Borrowed from the snapshot; nothing is collected per request.
#[derive(Debug)]
pub struct Endpoints<'s> {
    all: Cow<'s, [EndpointAddr]>,
    subset: Option<&'s SubsetSelector>,
}

impl<'s> Endpoints<'s> {
    /// Exactly these endpoints (a workload addressed directly).
    pub fn only(endpoint: EndpointAddr) -> Endpoints<'s> {
        Endpoints {
            all: Cow::Owned(vec![endpoint]),
            subset: None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &EndpointAddr> {
        let subset = self.subset;
        self.all
            .iter()
            .filter(move |(w, _)| subset.is_none_or(|s| s.selects(&w.labels)))
    }

    pub fn len(&self) -> usize {
        match self.subset {
            None => self.all.len(),
            Some(_) => self.iter().count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The `i`-th endpoint (`i < len()`).
    pub fn get(&self, i: usize) -> Option<&EndpointAddr> {
        match self.subset {
            None => self.all.get(i),
            Some(_) => self.iter().nth(i),
        }
    }

    /// One endpoint at random, `None` when there is none.
    pub fn random(&self) -> Option<&EndpointAddr> {
        match self.len() {
            0 => None,
            n => self.get(rand::random_range(0..n)),
        }
    }
}

/// Where the traffic of one tunnel was addressed.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service, by one of its VIPs: its routes apply.
    Service(Arc<Service>),
    /// A workload addressed by its own IP: no service routes (a mesh route attaches to a
    /// service, never to a pod).
    Workload(Arc<Workload>),
}

impl Snapshot {
    pub fn new(state: Arc<State>, table: Arc<RouteTable>) -> Snapshot {
        let by_host = state
            .services()
            .map(|s| (s.hostname.clone(), s.clone()))
            .collect();
        let endpoints = state
            .services()
            .map(|s| {
                let ports = s
                    .ports
                    .keys()
                    .map(|&port| (port, healthy_endpoints(&state, s, port).into()))
                    .collect();
                (s.hostname.clone(), ports)
            })
            .collect();
        let workload_names = state
            .workloads()
            .map(|w| (w.uid.clone(), Names::workload(w)))
            .collect();
        let service_names = state
            .services()
            .map(|s| (s.hostname.clone(), Names::service(s)))
            .collect();
        Snapshot {
            state,
            table,
            by_host,
            endpoints,
            workload_names,
            service_names,
        }
    }

    /// The metric label values of a workload (made now if it is not of this snapshot).
    pub fn workload_names(&self, w: &Workload) -> Arc<Names> {
        self.workload_names
            .get(&w.uid)
            .cloned()
            .unwrap_or_else(|| Names::workload(w))
    }

    /// The metric label values of a service (made now if it is not of this snapshot).
    pub fn service_names(&self, s: &Service) -> Arc<Names> {
        self.service_names
            .get(&s.hostname)
            .cloned()
            .unwrap_or_else(|| Names::service(s))
    }

    /// The service with this fully qualified hostname.
    pub fn service(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host)
    }

    /// What a CONNECT authority names: a service VIP or a workload IP of the mesh.
    pub fn destination(&self, ip: IpAddr) -> Option<Destination> {
        if let Some(s) = self.state.service_by_vip(ip) {
            return Some(Destination::Service(s));
        }
        self.state.workload_by_ip(ip).map(Destination::Workload)
    }

    /// The healthy endpoints of `service` that serve `port` and belong to `subset`, each with
    /// the address to dial (IPv4 preferred).
    pub fn endpoints<'s>(
        &'s self,
        service: &Service,
        port: u16,
        subset: Option<&'s SubsetSelector>,
    ) -> Endpoints<'s> {
        let all = match self
            .endpoints
            .get(&service.hostname)
            .and_then(|ports| ports.get(&port))
        {
            Some(found) => Cow::Borrowed(&**found),
            // A service of another snapshot (a tunnel opened before a change), or a port it
            // does not declare.
            None => Cow::Owned(healthy_endpoints(&self.state, service, port)),
        };
        Endpoints { all, subset }
    }
}

/// The healthy endpoints of `service` that serve `port`, each with the address to dial
/// (IPv4 preferred).
fn healthy_endpoints(state: &State, service: &Service, port: u16) -> Vec<EndpointAddr> {
    let family = service
        .vips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut all = state.service_endpoints(service, family, port);
    all.retain(|(w, _)| w.status == HealthStatus::Healthy);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"workloads:
  - uid: c//v1/Pod/default/a
    name: a
    namespace: default
    serviceAccount: a
    workloadIps: ["10.0.0.1"]
    protocol: HBONE
    node: n
    canonicalRevision: v1
    services: {"default/a.default.svc.cluster.local": {80: 8080}}
  - uid: c//v1/Pod/default/b
    name: b
    namespace: default
    serviceAccount: a
    workloadIps: ["10.0.0.2"]
    protocol: HBONE
    node: n
    canonicalRevision: v2
    services: {"default/a.default.svc.cluster.local": {80: 9090}}
services:
  - {name: a, namespace: default, hostname: a.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
policies: []
"#;

    #[test]
    fn endpoints_are_made_once_per_port_and_narrowed_by_subset() {
        let state = ztunnel::source::local::parse("mesh.yaml", MESH).expect("mesh");
        let snap = Snapshot::new(Arc::new(state), Arc::default());
        let service = snap
            .service("a.default.svc.cluster.local")
            .expect("service")
            .clone();
        let all = snap.endpoints(&service, 80, None);
        assert!(
            matches!(all.all, Cow::Borrowed(_)),
            "made with the snapshot"
        );
        let mut addrs: Vec<String> = all.iter().map(|(_, a)| a.to_string()).collect();
        addrs.sort();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:9090"]);
        let v2 = SubsetSelector {
            name: "v2".into(),
            labels: Some([("version".into(), "v2".into())].into()),
        };
        let only_v2 = snap.endpoints(&service, 80, Some(&v2));
        assert_eq!(only_v2.len(), 1);
        assert_eq!(only_v2.get(0).map(|(w, _)| w.name.as_str()), Some("b"));
        assert_eq!(only_v2.random().map(|(_, a)| a.port()), Some(9090));
        assert!(
            snap.endpoints(&service, 81, None).is_empty(),
            "undeclared port"
        );
    }
}
