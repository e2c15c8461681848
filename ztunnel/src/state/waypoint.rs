//! Waypoints as the state knows them: which workloads serve a `GatewayAddress` (Istio's
//! `Service.waypoint` / `Workload.waypoint`), whether a workload is itself the waypoint it
//! would be sent to, and which identities a destination accepts as its waypoints (the peers
//! whose `forwarded` header it may believe). Pure lookups on a `State`; the outbound decision
//! that uses them is `state::route`.

use std::net::IpAddr;
use std::sync::Arc;

use super::State;
use super::workload::{GatewayAddress, GatewayDestination, HealthStatus, Workload};
use crate::identity::Identity;

/// Where a waypoint address led: its name for messages, and the workloads behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// `namespace/hostname` of the waypoint service, or the address as given.
    pub name: String,
    /// Every workload serving the waypoint, healthy or not, sorted by uid.
    pub members: Vec<Arc<Workload>>,
}

/// Why a waypoint address leads nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unresolved {
    pub name: String,
    pub why: &'static str,
}

/// The workloads behind `gw`: the endpoints of the waypoint service it names (by hostname,
/// or by VIP), or the workload at its address.
pub(crate) fn resolve(state: &State, gw: &GatewayAddress) -> Result<Resolved, Unresolved> {
    match &gw.destination {
        GatewayDestination::Hostname(key) => {
            let name = key.to_string();
            if state.service(key).is_none() {
                return Err(Unresolved {
                    name,
                    why: "no such service",
                });
            }
            Ok(Resolved {
                name,
                members: state.members(key),
            })
        }
        GatewayDestination::Address(ip) => {
            let name = ip.to_string();
            if let Some(w) = state.workload_by_ip(*ip) {
                return Ok(Resolved {
                    name,
                    members: vec![w],
                });
            }
            match state.service_by_vip(*ip) {
                Some(s) => Ok(Resolved {
                    name: format!("{name} ({})", s.key()),
                    members: state.members(&s.key()),
                }),
                None => Err(Unresolved {
                    name,
                    why: "the address is neither a workload nor a service VIP",
                }),
            }
        }
    }
}

/// Whether `w` is (one of the workloads of) the waypoint `gw`: its traffic must not be sent
/// to itself. Decided from the address alone, so it holds even when the waypoint has no
/// healthy endpoint.
pub(crate) fn is_waypoint(state: &State, w: &Workload, gw: &GatewayAddress) -> bool {
    match &gw.destination {
        GatewayDestination::Hostname(key) => w.services.contains_key(key),
        GatewayDestination::Address(ip) => {
            w.workload_ips.contains(ip)
                || state
                    .service_by_vip(*ip)
                    .is_some_and(|s| w.services.contains_key(&s.key()))
        }
    }
}

/// The healthy workloads of a resolved waypoint.
pub(crate) fn healthy(r: &Resolved) -> Vec<&Arc<Workload>> {
    r.members
        .iter()
        .filter(|w| w.status == HealthStatus::Healthy)
        .collect()
}

/// The address to dial a waypoint workload on: of the family of `like` when it has one.
pub(crate) fn address_like(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.workload_ips
        .iter()
        .find(|ip| ip.is_ipv6() == like.is_ipv6())
        .or(w.workload_ips.first())
        .copied()
}

impl State {
    /// The identities of the waypoints configured for `w`: its own waypoint and those of the
    /// services it is an endpoint of, every workload of each (healthy or not: health decides
    /// where traffic goes, not who may have sent it). A tunnel from one of these identities
    /// may carry the original client in `forwarded` (see `authz::policy_source`).
    pub fn waypoint_identities(&self, w: &Workload) -> Vec<Identity> {
        let services = w
            .services
            .keys()
            .filter_map(|key| self.service(key))
            .filter_map(|s| s.waypoint.clone());
        let mut ids: Vec<Identity> = Vec::new();
        for gw in w.waypoint.clone().into_iter().chain(services) {
            let Ok(r) = resolve(self, &gw) else { continue };
            for m in r.members {
                if !ids.contains(m.identity_ref()) {
                    ids.push(m.identity());
                }
            }
        }
        ids
    }
}
