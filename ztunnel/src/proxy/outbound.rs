//! Outbound: connections an enrolled pod's application made, redirected to the pod's 15001.
//! The original destination decides the path: HBONE to a mesh workload on another node,
//! straight to the destination pod's inbound path when it is on this node, plain TCP to
//! workloads outside the mesh and to unknown addresses (passthrough).
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
use crate::state::Destination;
use crate::state::workload::{Protocol, Workload};

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
    let (dst, addr) = match state.resolve(orig) {
        Destination::Workload(w, addr) => (Some(w), addr),
        Destination::Service { service, endpoints } => {
            meta.dst_service = Some(service.clone());
            let seed = rand::random::<u64>();
            match crate::state::pick_endpoint(&endpoints, seed).cloned() {
                Some((w, addr)) => (Some(w), addr),
                None => {
                    meta.path = ConnPath::NoRoute;
                    let reason = format!(
                        "service {} has no healthy endpoint for port {}",
                        service.hostname,
                        orig.port()
                    );
                    return Err(failed(
                        proxy.tracker.open(meta),
                        Outcome::ConnectFailed(reason),
                    ));
                }
            }
        }
        Destination::Unknown => (None, orig),
    };
    meta.upstream = Some(addr);
    meta.dst_workload = dst.clone();
    // A workload is reached through HBONE only when its ztunnel captures it: in the mesh
    // (protocol HBONE) and enrolled (namespace label, no opt-out).
    let Some(dst) = dst.filter(|w| w.protocol == Protocol::Hbone && state.is_captured(w)) else {
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
        return result.map(drop).map_err(|e| e.to_string());
    };
    meta.dst_identity = Some(dst.identity());
    let local = proxy.pods.by_ip(addr.ip());
    if let Some(reason) = super::own_port_refusal(addr) {
        // To a mesh workload's ztunnel port: on this node it would be delivered into a
        // listener of ours; on another the destination refuses it. Refused here either way.
        meta.path = if local.is_some() {
            ConnPath::SameNode
        } else {
            ConnPath::HboneOut
        };
        Stats::add(&proxy.stats.rejected_inputs, 1);
        proxy.tracker.reject(meta, super::OWN_PORT, &reason);
        return Err(reason);
    }

    if let Some(local) = local {
        // Same node: no tunnel, same policy, delivered straight into the destination pod.
        debug!(src = %src.name, dst = %addr, "same-node");
        meta.path = ConnPath::SameNode;
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
            &local,
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
        return result.map(drop).map_err(|e| e.to_string());
    }

    let src_id = src.identity();
    let dst_id = dst.identity();
    let peer = hbone_addr(addr);
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
        .connect(key, addr, &headers, || netns.connect(peer, None), tls)
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
    debug!(src = %src.name, dst = %addr, via = %peer, "HBONE");
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
