//! Where an outbound connection goes: the pure decision of the outbound path. From the state,
//! the source workload, the original destination and a random seed, [`route`] picks the path
//! (passthrough, HBONE to a workload, same node, HBONE to a waypoint) or says why there is
//! none; `proxy::outbound` only does the I/O of the answer.
//!
//! Waypoints follow Istio's ambient mode: a service VIP whose service has a `waypoint` goes to
//! that waypoint, with the VIP and port as the tunnel's authority; a pod addressed by its own
//! IP keeps the L4 path unless the pod's workload has a `waypoint` of its own. A waypoint that
//! cannot be reached (unknown, no healthy workload) refuses the connection: it is never sent
//! around the waypoint, and never short-circuited on the same node. A source that is itself
//! the waypoint goes direct, so a waypoint's own traffic cannot loop back into it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::waypoint::{self, address_like};
use super::workload::{GatewayAddress, Protocol, Workload};
use super::{Destination, Service, State, pick_endpoint};
use crate::identity::Identity;

/// The decision for one connection, with the service it addressed (if a VIP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub service: Option<Arc<Service>>,
    pub route: Route,
}

/// The path a connection takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Plain TCP to `addr`: a workload outside the mesh (or not captured), or an unknown
    /// address.
    Passthrough {
        addr: SocketAddr,
        workload: Option<Arc<Workload>>,
    },
    /// HBONE to a mesh workload on another node: `peer` is its 15008, `addr` the authority.
    Hbone {
        workload: Arc<Workload>,
        addr: SocketAddr,
        peer: SocketAddr,
    },
    /// A captured workload on this node: delivered without a tunnel.
    SameNode {
        workload: Arc<Workload>,
        addr: SocketAddr,
    },
    /// HBONE to the destination's waypoint.
    Waypoint(WaypointRoute),
    /// No path: the connection is refused.
    Refused(Refusal),
}

/// A tunnel to a waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointRoute {
    /// The waypoint workload's address and HBONE port (`hboneMtlsPort`).
    pub peer: SocketAddr,
    /// What the waypoint must prove: its workload's identity.
    pub identity: Identity,
    /// The CONNECT authority: the address the client dialled (service VIP and port, or the
    /// pod address and port of a workload with its own waypoint).
    pub authority: SocketAddr,
    /// The waypoint workload chosen.
    pub waypoint: Arc<Workload>,
}

/// Why a connection has no path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The service addressed has no healthy endpoint for the port.
    NoHealthyEndpoint { service: String, port: u16 },
    /// The destination's waypoint leads nowhere (unknown, or no healthy workload).
    WaypointUnavailable {
        /// The service (`namespace/hostname`) or workload the traffic was for.
        target: String,
        /// The waypoint as configured.
        waypoint: String,
        why: String,
    },
}

impl Refusal {
    /// The `ztunnel_rejected_inputs_total` reason, for refusals counted there.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            Refusal::WaypointUnavailable { .. } => "waypoint_unavailable",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoHealthyEndpoint { service, port } => {
                write!(
                    f,
                    "service {service} has no healthy endpoint for port {port}"
                )
            }
            Refusal::WaypointUnavailable {
                target,
                waypoint,
                why,
            } => write!(
                f,
                "waypoint {waypoint} of {target} is unavailable ({why}); refused rather than sent around it"
            ),
        }
    }
}

/// Where a connection from `src` to `orig` goes. `seed` picks among endpoints (the same seed
/// gives the same pick); `on_this_node` says whether an address belongs to a pod this node
/// has enrolled.
pub fn route(
    state: &State,
    src: &Workload,
    orig: SocketAddr,
    seed: u64,
    on_this_node: impl Fn(IpAddr) -> bool,
) -> Routed {
    match state.resolve(orig) {
        Destination::Unknown => Routed {
            service: None,
            route: Route::Passthrough {
                addr: orig,
                workload: None,
            },
        },
        Destination::Workload(w, addr) => {
            let route = match through_waypoint(state, src, w.waypoint.as_ref()) {
                Some(gw) => to_waypoint(state, gw, orig, seed, || w.to_string()),
                None => mesh(state, w, addr, &on_this_node),
            };
            Routed {
                service: None,
                route,
            }
        }
        Destination::Service { service, endpoints } => {
            let route = match through_waypoint(state, src, service.waypoint.as_ref()) {
                Some(gw) => to_waypoint(state, gw, orig, seed, || service.key().to_string()),
                None => match pick_endpoint(&endpoints, seed) {
                    Some((w, addr)) => mesh(state, w.clone(), *addr, &on_this_node),
                    None => Route::Refused(Refusal::NoHealthyEndpoint {
                        service: service.hostname.clone(),
                        port: orig.port(),
                    }),
                },
            };
            Routed {
                service: Some(service),
                route,
            }
        }
    }
}

/// The waypoint to go through, unless there is none or `src` is that waypoint.
fn through_waypoint<'a>(
    state: &State,
    src: &Workload,
    gw: Option<&'a GatewayAddress>,
) -> Option<&'a GatewayAddress> {
    gw.filter(|gw| !waypoint::is_waypoint(state, src, gw))
}

fn to_waypoint(
    state: &State,
    gw: &GatewayAddress,
    authority: SocketAddr,
    seed: u64,
    target: impl FnOnce() -> String,
) -> Route {
    let unavailable = |waypoint: String, why: &str, target: String| {
        Route::Refused(Refusal::WaypointUnavailable {
            target,
            waypoint,
            why: why.to_owned(),
        })
    };
    let resolved = match waypoint::resolve(state, gw) {
        Ok(r) => r,
        Err(e) => return unavailable(e.name, e.why, target()),
    };
    let healthy = waypoint::healthy(&resolved);
    let Some(w) = pick_endpoint(&healthy, seed) else {
        return unavailable(resolved.name, "no healthy endpoint", target());
    };
    let Some(ip) = address_like(w, authority.ip()) else {
        return unavailable(resolved.name, "its workload has no address", target());
    };
    Route::Waypoint(WaypointRoute {
        peer: SocketAddr::new(ip, gw.hbone_mtls_port),
        identity: w.identity(),
        authority,
        waypoint: (*w).clone(),
    })
}

/// A workload reached without a waypoint: through HBONE when its ztunnel captures it (in the
/// mesh and enrolled), on this node without a tunnel, else as plain TCP.
fn mesh(
    state: &State,
    w: Arc<Workload>,
    addr: SocketAddr,
    on_this_node: &impl Fn(IpAddr) -> bool,
) -> Route {
    if w.protocol != Protocol::Hbone || !state.is_captured(&w) {
        return Route::Passthrough {
            addr,
            workload: Some(w),
        };
    }
    if on_this_node(addr.ip()) {
        Route::SameNode { workload: w, addr }
    } else {
        Route::Hbone {
            workload: w,
            addr,
            peer: SocketAddr::new(addr.ip(), crate::hbone::HBONE_PORT),
        }
    }
}

#[cfg(test)]
mod tests;
