//! Outbound: connections an enrolled pod's application made, redirected to the pod's 15001.
//! The original destination decides the path: HBONE to a mesh workload on another node,
//! straight to the destination pod's inbound path when it is on this node, plain TCP to
//! workloads outside the mesh and to unknown addresses (passthrough).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::copy::{Stats, relay};
use super::{Proxy, hbone_addr, inbound};
use crate::capture::Netns;
use crate::hbone::{ConnectHeaders, PoolKey};
use crate::state::Destination;
use crate::state::workload::{Protocol, Workload};

pub(super) async fn accept_loop(
    proxy: Arc<Proxy>,
    uid: String,
    netns: Arc<Netns>,
    listener: TcpListener,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
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
            continue;
        };
        let Some(pod) = proxy.pods.get(&uid) else {
            continue;
        };
        let proxy = proxy.clone();
        let src = pod.workload.clone();
        let netns = netns.clone();
        tokio::spawn(async move {
            if let Err(reason) = handle(&proxy, &src, &netns, conn, orig).await {
                Stats::add(&proxy.stats.failed, 1);
                info!(src = %src.name, dst = %orig, "outbound connection failed: {reason}");
            }
        });
    }
}

async fn handle(
    proxy: &Proxy,
    src: &Workload,
    netns: &Netns,
    mut conn: TcpStream,
    orig: SocketAddr,
) -> Result<(), String> {
    let state = proxy.state.borrow().clone();
    let (dst, addr) = match state.resolve(orig) {
        Destination::Workload(w, addr) => (Some(w), addr),
        Destination::Service { service, endpoints } => {
            let seed = rand::random::<u64>();
            let (w, addr) = crate::state::pick_endpoint(&endpoints, seed)
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "service {} has no healthy endpoint for port {}",
                        service.hostname,
                        orig.port()
                    )
                })?;
            (Some(w), addr)
        }
        Destination::Unknown => (None, orig),
    };
    let src_ip = conn.peer_addr().map(|a| a.ip()).ok();
    // A workload is reached through HBONE only when its ztunnel captures it: in the mesh
    // (protocol HBONE) and enrolled (namespace label, no opt-out).
    let Some(dst) = dst.filter(|w| w.protocol == Protocol::Hbone && state.is_captured(w)) else {
        // Not in the mesh: plain TCP from the pod's namespace, as if never captured.
        debug!(src = %src.name, dst = %addr, "passthrough");
        let mut upstream = netns
            .connect(addr, None)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        relay(&proxy.stats, &mut conn, &mut upstream)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    };

    if let Some(local) = proxy.pods.by_ip(addr.ip()) {
        // Same node: no tunnel, same policy, delivered straight into the destination pod.
        let src_addr = conn.peer_addr().ok();
        debug!(src = %src.name, dst = %addr, "same-node");
        let mut upstream = inbound::admit(
            proxy,
            &local,
            addr,
            Some(src.identity()),
            src_ip.or(src_addr.map(|a| a.ip())),
        )
        .await
        .map_err(|(_, reason)| reason)?;
        relay(&proxy.stats, &mut conn, &mut upstream)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }

    let src_id = src.identity();
    let dst_id = dst.identity();
    let tls = proxy
        .client_tls(&src_id, &dst_id)
        .await
        .map_err(|e| e.to_string())?;
    let peer = hbone_addr(addr);
    let key = PoolKey {
        src: src_id,
        dst: peer,
        dst_identity: dst_id.clone(),
    };
    let headers = ConnectHeaders {
        baggage: Some(baggage(src)),
        // The application's socket is on the pod's loopback after the redirect; its pod
        // address and port are what the destination should see as the client.
        forwarded_for: src
            .workload_ips
            .first()
            .map(|ip| SocketAddr::new(*ip, conn.peer_addr().map(|a| a.port()).unwrap_or(0))),
        forwarded_host: None,
        traceparent: None,
    };
    let mut tunnel = proxy
        .pool
        .connect(key, addr, &headers, || netns.connect(peer, None), tls)
        .await
        .map_err(|e| format!("HBONE to {peer} ({dst_id}): {e}"))?;
    debug!(src = %src.name, dst = %addr, via = %peer, "HBONE");
    relay(&proxy.stats, &mut conn, &mut tunnel)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
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
