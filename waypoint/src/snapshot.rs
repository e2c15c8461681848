//! What a request is decided against: the mesh (workloads and services, from the same source
//! ztunnel reads) and the compiled route table, taken together as one immutable value. A
//! change to either builds a new snapshot; a request holds the one it started with.

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
    /// Metric label values of each workload (by uid) and service (by hostname), made once.
    workload_names: HashMap<String, Arc<Names>>,
    service_names: HashMap<String, Arc<Names>>,
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
    pub fn endpoints(
        &self,
        service: &Service,
        port: u16,
        subset: Option<&SubsetSelector>,
    ) -> Vec<(Arc<Workload>, SocketAddr)> {
        let family = service
            .vips
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut all = self.state.service_endpoints(service, family, port);
        if let Some(subset) = subset {
            all.retain(|(w, _)| subset.selects(&w.labels));
        }
        all.retain(|(w, _)| w.status == HealthStatus::Healthy);
        all
    }
}
