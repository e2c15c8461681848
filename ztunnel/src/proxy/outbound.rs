//! Outbound: connections an enrolled pod's application made, redirected to the pod's 15001.
//! `state::route` decides the path from the original destination: HBONE to a mesh workload
//! on another node, straight to the destination pod's inbound path when it is on this node,
//! HBONE to the destination's waypoint (or a reset when the waypoint is unavailable: never
//! around it), plain TCP to workloads outside the mesh and to unknown addresses
//! (passthrough). This module does the I/O of that decision.
//!
//! The application's connect has already succeeded (to the pod's 15001) when ztunnel
//! decides. So a connection refused before any byte is relayed (no route, connect failed,
//! denied by policy, no valid certificate, HBONE refused) is closed with a reset: the
//! application sees ECONNRESET, never the clean end of stream of a server that accepted and
//! then closed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::copy::{Side as _, Stats, relay};
use super::tracker::{ConnMeta, ConnPath, Outcome, Policy, Tracked};
use super::{Proxy, hbone_addr, inbound};
use crate::capture::Netns;
use crate::hbone::{ConnectHeaders, HboneError, PoolKey, new_traceparent};
use crate::identity::Identity;
use crate::state::workload::Workload;
use crate::state::{Refusal, Route};

pub(super) async fn accept_loop(
    proxy: Arc<Proxy>,
    uid: String,
    netns: Arc<Netns>,
    listener: TcpListener,
) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "outbound accept failed");
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let Some(orig) = proxy
            .capture
            .take_original_destination(netns.cookie(), peer)
        else {
            warn!(%peer, "outbound connection without a recorded original destination; closing");
            Stats::add(&proxy.stats.failed, 1);
            let here = SocketAddr::from(([127, 0, 0, 1], super::OUTBOUND_PORT));
            proxy.tracker.reject(
                ConnMeta::new(ConnPath::NoRoute, peer, here),
                "no_original_destination",
                "the capture recorded no original destination for this connection",
            );
            conn.reset();
            continue;
        };
        let Some(pod) = proxy.pods.get(&uid) else {
            // Released (removed or opted out) between the connect and now: nothing will
            // carry it, and it never reached its destination.
            info!(%peer, dst = %orig, "outbound connection from a pod no longer enrolled; resetting");
            Stats::add(&proxy.stats.failed, 1);
            conn.reset();
            continue;
        };
        let proxy = proxy.clone();
        let src = pod.workload.clone();
        let netns = netns.clone();
        let busy = proxy.busy();
        tokio::spawn(async move {
            let _busy = busy;
            if let Err(reason) = handle(&proxy, &src, &netns, &mut conn, orig).await {
                // Refused before any byte was relayed, or broken while relaying: a reset
                // either way.
                conn.reset();
                Stats::add(&proxy.stats.failed, 1);
                info!(src = %src.name, dst = %orig, "outbound connection failed: {reason}");
            }
        });
    }
}

/// Carries one connection to its destination. On error the caller resets `conn`.
async fn handle(
    proxy: &Proxy,
    src: &Arc<Workload>,
    netns: &Netns,
    conn: &mut TcpStream,
    orig: SocketAddr,
) -> Result<(), String> {
    let state = proxy.state.borrow().clone();
    let app = conn.peer_addr().ok();
    // The application's socket is on the pod's loopback after the redirect; its pod address
    // and port are what the destination (and the operator) should see as the client.
    let client = SocketAddr::new(
        src.workload_ips
            .first()
            .copied()
            .or(app.map(|a| a.ip()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        app.map_or(0, |a| a.port()),
    );
    let mut meta = ConnMeta::new(ConnPath::Passthrough, client, orig);
    meta.src_workload = Some(src.clone());
    meta.src_identity = Some(src.identity());
    let routed = crate::state::route(&state, src, orig, rand::random::<u64>(), |ip| {
        proxy.pods.by_ip(ip).is_some()
    });
    meta.dst_service = routed.service;
    match routed.route {
        Route::Refused(refusal @ Refusal::NoHealthyEndpoint { .. }) => {
            meta.path = ConnPath::NoRoute;
            let reason = refusal.to_string();
            Err(failed(
                proxy.tracker.open(meta),
                Outcome::ConnectFailed(reason),
            ))
        }
        Route::Refused(refusal) => {
            // The waypoint leads nowhere: refused, never sent around it (fail closed).
            meta.path = ConnPath::NoRoute;
            let reason = refusal.to_string();
            Stats::add(&proxy.stats.rejected_inputs, 1);
            proxy.tracker.reject(meta, refusal.kind(), &reason);
            Err(reason)
        }
        Route::Passthrough { addr, workload } => {
            meta.upstream = Some(addr);
            meta.dst_workload = workload;
            // Not in the mesh: plain TCP from the pod's namespace, as if never captured.
            debug!(src = %src.name, dst = %addr, "passthrough");
            let tracked = proxy.tracker.open(meta);
            let mut upstream = match proxy.connect_within(netns.connect(addr, None)).await {
                Ok(upstream) => upstream,
                Err(e) => {
                    let reason = format!("connect {addr}: {e}");
                    return Err(failed(tracked, Outcome::ConnectFailed(reason)));
                }
            };
            let result = relay(&proxy.stats, &tracked, conn, &mut upstream).await;
            if result.is_err() {
                upstream.reset();
            }
            tracked.finish_relay(&result);
            result.map(drop).map_err(|e| e.to_string())
        }
        Route::SameNode { workload, addr } => {
            meta.upstream = Some(addr);
            meta.dst_identity = Some(workload.identity());
            meta.dst_workload = Some(workload);
            // Gone since the decision: carried as to any other node's pod.
            match proxy.pods.by_ip(addr.ip()) {
                Some(local) => same_node(proxy, src, conn, client, meta, &local, addr).await,
                None => hbone_to_workload(proxy, src, netns, conn, client, meta, addr).await,
            }
        }
        Route::Hbone { workload, addr, .. } => {
            meta.upstream = Some(addr);
            meta.dst_identity = Some(workload.identity());
            meta.dst_workload = Some(workload);
            hbone_to_workload(proxy, src, netns, conn, client, meta, addr).await
        }
        Route::Waypoint(wp) => {
            debug!(src = %src.name, dst = %orig, waypoint = %wp.waypoint, via = %wp.peer, "waypoint");
            meta.dst_identity = Some(wp.identity.clone());
            meta.dst_workload = Some(wp.waypoint.clone());
            let hop = Hop {
                peer: wp.peer,
                identity: wp.identity,
                authority: wp.authority,
            };
            hbone(proxy, src, netns, conn, client, meta, hop).await
        }
    }
}

/// To a mesh workload (another node's, or one of this node's that left since the route was
/// decided) through its ztunnel's 15008, unless the port is one of ztunnel's own.
async fn hbone_to_workload(
    proxy: &Proxy,
    src: &Arc<Workload>,
    netns: &Netns,
    conn: &mut TcpStream,
    client: SocketAddr,
    mut meta: ConnMeta,
    addr: SocketAddr,
) -> Result<(), String> {
    meta.path = ConnPath::HboneOut;
    if let Some(reason) = super::own_port_refusal(addr) {
        // To a mesh workload's ztunnel port: the destination refuses it; refused here.
        Stats::add(&proxy.stats.rejected_inputs, 1);
        proxy.tracker.reject(meta, super::OWN_PORT, &reason);
        return Err(reason);
    }
    let Some(identity) = meta.dst_identity.clone() else {
        return Err(format!("no identity known for {addr}"));
    };
    let hop = Hop {
        peer: hbone_addr(addr),
        identity,
        authority: addr,
    };
    hbone(proxy, src, netns, conn, client, meta, hop).await
}

/// Same node: no tunnel, same policy, delivered straight into the destination pod.
async fn same_node(
    proxy: &Proxy,
    src: &Arc<Workload>,
    conn: &mut TcpStream,
    client: SocketAddr,
    mut meta: ConnMeta,
    local: &super::pods::Pod,
    addr: SocketAddr,
) -> Result<(), String> {
    meta.path = ConnPath::SameNode;
    if let Some(reason) = super::own_port_refusal(addr) {
        // Delivered into a listener of ours on this node: a loop. Refused here.
        Stats::add(&proxy.stats.rejected_inputs, 1);
        proxy.tracker.reject(meta, super::OWN_PORT, &reason);
        return Err(reason);
    }
    debug!(src = %src.name, dst = %addr, "same-node");
    let tracked = proxy.tracker.open(meta);
    // The client's address of the destination's family, as a tunnel's peer would be.
    let src_ip = src
        .workload_ips
        .iter()
        .find(|ip| ip.is_ipv6() == addr.is_ipv6())
        .copied()
        .unwrap_or(client.ip());
    let admitted = inbound::admit(
        proxy,
        local,
        addr,
        Some(src.identity()),
        Some(src_ip),
        None,
        &tracked,
    )
    .await;
    let mut upstream = match admitted {
        Ok(upstream) => upstream,
        Err((status, reason)) => {
            return Err(failed(tracked, inbound::outcome(status, reason)));
        }
    };
    let result = relay(&proxy.stats, &tracked, conn, &mut upstream).await;
    if result.is_err() {
        upstream.reset();
    }
    tracked.finish_relay(&result);
    result.map(drop).map_err(|e| e.to_string())
}

/// One HBONE hop: the peer's 15008 (or a waypoint's HBONE port), what it must prove, and the
/// CONNECT authority.
struct Hop {
    peer: SocketAddr,
    identity: Identity,
    authority: SocketAddr,
}

/// A tunnel from `src` (its own identity, pooled per client address) over `hop`.
async fn hbone(
    proxy: &Proxy,
    src: &Arc<Workload>,
    netns: &Netns,
    conn: &mut TcpStream,
    client: SocketAddr,
    mut meta: ConnMeta,
    hop: Hop,
) -> Result<(), String> {
    let Hop {
        peer,
        identity: dst_id,
        authority,
    } = hop;
    let src_id = src.identity();
    meta.path = ConnPath::HboneOut;
    meta.upstream = Some(peer);
    let forwarded_host = meta.dst_service.as_ref().map(|s| s.hostname.clone());
    let tracked = proxy.tracker.open(meta);
    let tls = match proxy.client_tls(&src_id, &dst_id).await {
        Ok(tls) => tls,
        Err(e) => return Err(failed(tracked, Outcome::ConnectFailed(e.to_string()))),
    };
    let key = PoolKey {
        src: src_id,
        src_addr: Some(client.ip()),
        dst: peer,
        dst_identity: dst_id.clone(),
    };
    let headers = ConnectHeaders {
        baggage: Some(baggage(src)),
        forwarded_for: Some(client),
        forwarded_host,
        traceparent: Some(new_traceparent()),
    };
    let connected = proxy
        .pool
        .connect(key, authority, &headers, || netns.connect(peer, None), tls)
        .await;
    let mut tunnel = match connected {
        Ok(tunnel) => tunnel,
        Err(HboneError::Denied) => {
            let reason = format!("HBONE to {peer} ({dst_id}): denied by the destination's policy");
            tracked.set_policy(Policy::Denied {
                policy: None,
                reason: "refused by the destination's ztunnel (401)".to_owned(),
            });
            return Err(failed(tracked, Outcome::Denied(reason)));
        }
        Err(e) => {
            let reason = format!("HBONE to {peer} ({dst_id}): {e}");
            return Err(failed(tracked, Outcome::ConnectFailed(reason)));
        }
    };
    debug!(src = %src.name, dst = %authority, via = %peer, "HBONE");
    let result = relay(&proxy.stats, &tracked, conn, &mut tunnel).await;
    if result.is_err() {
        tunnel.reset();
    }
    tracked.finish_relay(&result);
    result.map(drop).map_err(|e| e.to_string())
}

/// Ends `tracked` with `outcome` and returns the reason, for the caller's log line.
fn failed(tracked: Tracked, outcome: Outcome) -> String {
    let reason = match &outcome {
        Outcome::Denied(r)
        | Outcome::ConnectFailed(r)
        | Outcome::Error(r)
        | Outcome::Rejected(r) => r.clone(),
        Outcome::Complete | Outcome::Aborted => String::new(),
    };
    tracked.finish(outcome);
    reason
}

/// W3C baggage describing the source, as Istio's ztunnel sends it.
fn baggage(w: &Workload) -> String {
    let mut parts = vec![
        format!("k8s.cluster.name={}", w.cluster_id),
        format!("k8s.namespace.name={}", w.namespace()),
        format!("k8s.pod.name={}", w.name),
    ];
    if let Some(app) = w.labels.get("app") {
        parts.push(format!("service.name={app}"));
    }
    if let Some(version) = w.labels.get("version") {
        parts.push(format!("service.version={version}"));
    }
    parts.join(",")
}
